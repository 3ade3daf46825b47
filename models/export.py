"""Export a zoo model (or any single-input PyTorch classifier) to an inference ONNX file.

Uses the legacy TorchScript exporter (``dynamo=False``). Two of its defaults are avoided on
purpose, because the compression passes need the model's real structure:

* ``training=EVAL`` with constant folding runs an "eval peephole" that folds every
  BatchNormalization into the preceding Conv (Network Slimming needs the BN scales). The model
  is put in eval mode and exported with ``training=PRESERVE`` instead: BN nodes stay, in their
  inference form (``training_mode=0``, one output), and other constants are still folded.
* Without ``keep_initializers_as_inputs`` the exporter merges initializers with equal *values*
  (a fresh BN's running variance and scale are both ones) into one tensor read through
  ``Identity`` nodes, so changing one would change the other. Initializers are exported
  separately and then removed from the graph inputs.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Mapping

import onnx
import torch
from torch import nn

from onnxdns import modelio
from onnxdns.errors import OnnxdnsError

#: Highest opset the legacy exporter writes that this stack runs.
MAX_EXPORT_OPSET = min(20, modelio.MAX_OPSET)


def export_model(
    name_or_module: str | nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
) -> Path:
    """Export to ``path`` (written atomically) and return it.

    ``name_or_module`` is a zoo name (``onnxdns.models.MODELS``; built with seed 0) or a module
    taking one float tensor of shape ``(batch, *input_shape)`` and returning logits.
    ``input_shape`` (C, H, W) defaults to the zoo's shape for a name and is required for a module.
    ``state_dict`` (a mapping or a ``torch.save`` file) is loaded first; a given module is then
    copied, never modified. The graph has one input ``input``, one output ``logits``, batch
    dimension ``batch`` when ``dynamic_batch``; IR version <= 10, checked by ``onnx.checker``.
    """
    from onnxdns.models import INPUT_SHAPES, build

    out = Path(path)
    if not out.parent.exists():
        raise OnnxdnsError(f"{out.parent}: output folder does not exist")
    if not 7 <= opset <= MAX_EXPORT_OPSET:
        raise OnnxdnsError(f"opset {opset} not supported for export (7..{MAX_EXPORT_OPSET})")
    if isinstance(name_or_module, str):
        model = build(name_or_module)
        shape = tuple(input_shape) if input_shape is not None else INPUT_SHAPES[name_or_module]
    elif isinstance(name_or_module, nn.Module):
        if input_shape is None:
            raise OnnxdnsError("export_model: input_shape (C, H, W) is required when exporting a module")
        model, shape = name_or_module, tuple(input_shape)
        if state_dict is not None:
            import copy

            model = copy.deepcopy(model)
    else:
        raise TypeError(f"export_model: expected a zoo name or torch.nn.Module, got {type(name_or_module).__name__}")
    if state_dict is not None:
        _load_state(model, state_dict)

    proto = export_proto(model, shape, opset, dynamic_batch)
    modelio.check_supported(proto, str(out))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxdnsError(f"exported model fails the ONNX checker: {str(e).strip().splitlines()[0]}") from None
    return modelio.save_model(proto, out)


def _load_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
    if isinstance(state_dict, (str, os.PathLike)):
        try:
            state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise OnnxdnsError(f"{state_dict}: cannot read weights: {str(e).strip().splitlines()[0]}") from None
    if not isinstance(state_dict, Mapping):
        raise OnnxdnsError(f"weights must be a state dict (name -> tensor), got {type(state_dict).__name__}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise OnnxdnsError(f"weights do not fit the model: {' '.join(lines[1:2] or lines[:1])}") from None


def export_proto(model: nn.Module, shape: tuple[int, ...], opset: int = 17, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Trace ``model`` in eval mode (its mode is restored) and return the cleaned ModelProto."""
    generator = torch.Generator().manual_seed(0)
    dummy = torch.randn(2, *shape, generator=generator)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message=".*feature will be removed")
            warnings.filterwarnings("ignore", message=".*constant folding be turned off")
            torch.onnx.export(
                model, (dummy,), buffer, dynamo=False, opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                keep_initializers_as_inputs=True, export_params=True,
                input_names=["input"], output_names=["logits"], dynamic_axes=axes,
            )
    except Exception as e:  # the exporter raises many types (RuntimeError, SymbolicValueError, ...)
        raise OnnxdnsError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    if len(proto.graph.output) != 1:
        raise OnnxdnsError(f"export_model: the model must return one tensor, it returns {len(proto.graph.output)}")
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    return proto
