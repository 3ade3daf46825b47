"""Training artifacts (training, eval and optimizer models plus checkpoint) for onnxruntime-training.

:func:`generate` calls ``onnxruntime.training.artifacts.generate_artifacts`` and then edits the
generated training graph:

* **straight-through gradients** (Dynamic Network Surgery): for a masked weight ``W`` read
  through ``Mul(W, T)``, onnxruntime's autodiff computes ``dL/dW = Mul(dL/d(W*T), T)``, which
  freezes pruned weights. That ``Mul`` becomes an ``Identity`` of ``dL/d(W*T)``, so every weight,
  pruned or not, moves with the gradient of the masked product and can be spliced back. The node
  is found by structure (the producer chain of ``<W>_grad``, the gradient name onnxruntime itself
  relies on to order outputs) and the edit fails loudly if the pattern is not there;
* **L2 weight decay** (SGD): ``<W>_grad + weight_decay * W`` is fed to the gradient accumulator,
  which is what ``torch.optim.SGD(weight_decay=...)`` does before its momentum update (AdamW
  decays in its kernel, decoupled).

The optimizer model is heavy-ball momentum SGD or AdamW (:mod:`onnxdns.training.optim`). The loss defaults
to cross-entropy over the model's first output; any ``onnxblock.Block`` can replace it (the run's
blocks are in :mod:`onnxdns.training.losses`; a block may add graph inputs, e.g. ``labels`` or the
teacher's outputs, which follow the model's inputs). Outputs listed in ``train_only_outputs`` (BatchNormalization running
statistics to write back into the checkpoint) are exposed by the training model only and removed
from the eval model, where BatchNormalization runs in inference mode with one output.

Given input shapes (the first training batch's), the training model is built for exactly those
shapes (see :func:`generate`); the eval model keeps the model's dynamic dimensions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdns.errors import OnnxdnsError
from onnxdns.training.optim import optimizer_block

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
MANIFEST = "artifacts.json"


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    """What to generate. Names are initializer / value names of the forward model."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...] = ()
    #: parameter -> its mask: gradients pass straight through ``Mul(parameter, mask)``.
    straight_through: dict[str, str] = dataclasses.field(default_factory=dict)
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: ``sgd`` (heavy-ball momentum) or ``adamw`` (see :mod:`onnxdns.training.optim`).
    optimizer: str = "sgd"
    #: Builds the loss block; called with no argument. None: cross-entropy on the model output.
    loss: Callable[[], object] | None = None
    #: Model values returned (after the loss) by both the training and the eval model.
    outputs: tuple[str, ...] = ()
    #: Model values returned (after ``outputs``) by the training model only.
    train_only_outputs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """Paths and names of generated artifacts (``load`` reads them back from the manifest)."""

    directory: Path
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    inputs: tuple[str, ...]  # user inputs of the training model: the model's, then the loss's (labels, teacher.*)
    outputs: tuple[str, ...]
    train_only_outputs: tuple[str, ...]
    momentum: float
    weight_decay: float
    straight_through: tuple[str, ...]
    #: The training model's fixed input shapes (None: the model's own, dynamic dimensions kept).
    input_shapes: dict[str, list[int]] | None
    optimizer: str = "sgd"  # absent from the manifests of runs made before AdamW existed

    @property
    def training_model(self) -> Path:
        return self.directory / TRAINING_MODEL

    @property
    def eval_model(self) -> Path:
        return self.directory / EVAL_MODEL

    @property
    def optimizer_model(self) -> Path:
        return self.directory / OPTIMIZER_MODEL

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Artifacts":
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise OnnxdnsError(f"{path}: cannot read training artifacts manifest: {e}") from None
        fields = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - {"directory"}
        missing = fields - set(data)
        if missing:
            raise OnnxdnsError(f"{path}: incomplete manifest (missing {', '.join(sorted(missing))}; made by another "
                               "onnxdns version?); start the run over")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        if values["input_shapes"] is not None and not isinstance(values["input_shapes"], dict):
            raise OnnxdnsError(f"{path}: damaged manifest (input_shapes)")
        return cls(directory=Path(directory), **values)

    def save_manifest(self) -> None:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "directory"}
        (self.directory / MANIFEST).write_text(json.dumps(data, indent=1))


def generate(model: onnx.ModelProto, directory: str | os.PathLike, spec: ArtifactSpec, *,
             batch_size: int | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Artifacts:
    """Generate the four artifacts of ``model`` into ``directory`` (created if needed).

    With ``input_shapes`` (input name -> shape, e.g. the first training batch's) the training
    model is built for exactly those shapes (the eval model keeps the model's dynamic dimensions):
    onnxruntime 1.19's CPU ``AveragePoolGrad`` takes its output shape from the graph and crashes
    the process (SIGFPE) when a dimension is symbolic. ``batch_size``: fix only axis 0 of every
    input to it (models whose other dimensions are fixed).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if batch_size is not None and input_shapes is None:
        input_shapes = batch_shapes(model, batch_size)
    missing = [n for n in (*spec.trainable, *spec.frozen) if n not in {i.name for i in model.graph.initializer}]
    if missing:
        raise OnnxdnsError(f"training: parameter(s) not in the model: {', '.join(missing[:5])}")
    if not spec.trainable:
        raise OnnxdnsError("training: the model has no trainable parameters (Conv/Gemm/MatMul weights)")
    if input_shapes is None:
        _generate(model, out, spec, with_optimizer=True)
    else:
        _generate(with_input_shapes(model, input_shapes), out, spec, with_optimizer=True)
        with tempfile.TemporaryDirectory(prefix="onnxdns-eval-") as tmp:
            _generate(model, Path(tmp), spec, with_optimizer=False)
            os.replace(Path(tmp) / EVAL_MODEL, out / EVAL_MODEL)

    training = onnx.load(str(out / TRAINING_MODEL))
    for param, mask in spec.straight_through.items():
        make_straight_through(training, param, mask)
    if spec.weight_decay and spec.optimizer == "sgd":  # AdamW decays in its kernel
        add_weight_decay(training, spec.trainable, spec.weight_decay)
    onnx.save(training, str(out / TRAINING_MODEL))
    if spec.optimizer == "adamw":
        torch_adamw(out / OPTIMIZER_MODEL)
    if spec.train_only_outputs:
        evaluation = onnx.load(str(out / EVAL_MODEL))
        drop_outputs(evaluation, spec.train_only_outputs)
        onnx.save(evaluation, str(out / EVAL_MODEL))

    user_inputs = tuple(i.name for i in training.graph.input
                        if i.name not in set(spec.trainable) | set(spec.frozen) and not _is_training_input(i.name))
    result = Artifacts(
        directory=out, trainable=tuple(spec.trainable), frozen=tuple(spec.frozen), inputs=user_inputs,
        outputs=tuple(spec.outputs), train_only_outputs=tuple(spec.train_only_outputs),
        momentum=float(spec.momentum), weight_decay=float(spec.weight_decay),
        straight_through=tuple(spec.straight_through),
        input_shapes=None if input_shapes is None else {k: [int(d) for d in v] for k, v in input_shapes.items()},
        optimizer=spec.optimizer,
    )
    result.save_manifest()
    return result


def _generate(model: onnx.ModelProto, out: Path, spec: ArtifactSpec, *, with_optimizer: bool) -> None:
    """``generate_artifacts`` with onnxruntime's native log kept out of the terminal."""
    from onnxruntime.training import artifacts as ort_artifacts  # imports torch: keep it lazy
    from onnxruntime.training import onnxblock

    from onnxdns.training.differentiable import differentiable

    model = differentiable(model)  # HardSwish/HardSigmoid have no gradient in onnxruntime 1.19
    loss = spec.loss() if spec.loss is not None else onnxblock.loss.CrossEntropyLoss()
    extra = [*spec.outputs, *spec.train_only_outputs]
    with _native_stderr_to_file() as log:
        try:
            ort_artifacts.generate_artifacts(
                model,
                requires_grad=list(spec.trainable),
                frozen_params=list(spec.frozen),
                loss=loss,
                optimizer=optimizer_block(spec.optimizer, spec.momentum, spec.weight_decay) if with_optimizer else None,
                artifact_directory=out,
                additional_output_names=extra or None,
            )
        except Exception as e:  # onnxruntime raises RuntimeError / Fail / InvalidGraph ...
            detail = str(e).strip().splitlines()[0] if str(e).strip() else log.tail()
            raise OnnxdnsError(f"cannot build the training graph: {detail}") from None


def torch_adamw(path: Path) -> None:
    """Switch the generated ``AdamWOptimizer`` node to ``adam_mode=0``, torch.optim.AdamW's update
    (onnxblock always writes 1, Hugging Face's, whose epsilon and weight decay act differently)."""
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise OnnxdnsError(f"{path}: expected one AdamWOptimizer node, found {len(nodes)}")
    for attribute in nodes[0].attribute:
        if attribute.name == "adam_mode":
            attribute.i = 0
    onnx.save(model, str(path))


def batch_shapes(model: onnx.ModelProto, batch_size: int) -> dict[str, tuple[int, ...]]:
    """Input name -> shape with axis 0 set to ``batch_size`` (every other dimension must be fixed)."""
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = [batch_size] + [d.dim_value if d.HasField("dim_value") else -1 for d in list(dims)[1:]]
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value not in (0, batch_size):
            raise OnnxdnsError(f"{value.name} has a fixed batch size {dims[0].dim_value}, not {batch_size}")
        if any(d < 1 for d in shape[1:]):
            raise OnnxdnsError(f"{value.name} has open dimensions besides the batch: give the input shapes")
        shapes[value.name] = tuple(shape)
    return shapes


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have exactly ``shapes`` and whose outputs have each
    symbolic dimension that an input shares (by name, e.g. ``batch``) set to its value there
    (intermediate shape annotations are dropped so that inference recomputes them). A fixed
    dimension that differs is a one-line error."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name for i in out.graph.initializer}
    symbols: dict[str, int] = {}
    for value in out.graph.input:
        if value.name in inits:
            continue
        if value.name not in shapes:
            raise OnnxdnsError(f"training: no shape for model input {value.name}")
        shape = [int(d) for d in shapes[value.name]]
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if tensor.HasField("shape") and len(dims) != len(shape):
            raise OnnxdnsError(f"training: input {value.name} has rank {len(dims)}, the data gives {shape}")
        for d, n in zip(dims, shape):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != n:  # 0, -1: dynamic
                raise OnnxdnsError(f"training: input {value.name} has shape {_dims(dims)}, the data gives {shape}")
            if d.dim_param:
                symbols.setdefault(d.dim_param, n)
        tensor.shape.Clear()
        for n in shape:
            tensor.shape.dim.add().dim_value = n
    for value in out.graph.output:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in symbols:
                d.dim_value = symbols[d.dim_param]
            elif d.HasField("dim_value") and d.dim_value < 0:  # -1: dynamic (paddle2onnx), inference fills it
                d.Clear()
    del out.graph.value_info[:]
    return out


def with_batch_size(model: onnx.ModelProto, batch_size: int) -> onnx.ModelProto:
    """:func:`with_input_shapes` with axis 0 of every input set to ``batch_size``."""
    return with_input_shapes(model, batch_shapes(model, batch_size))


def _dims(dims) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _is_training_input(name: str) -> bool:
    return name == "lazy_reset_grad" or name.endswith("_grad.accumulation.buffer")


# --------------------------------------------------------------------------- graph edits


def make_straight_through(training: onnx.ModelProto, param: str, mask: str) -> None:
    """Replace ``Mul(d(W*T), T)`` producing ``<param>_grad`` by ``Identity(d(W*T))`` (in place).

    Raises :class:`OnnxdnsError` when the training graph does not have that structure.
    """
    graph = training.graph
    producers = {o: n for n in graph.node for o in n.output}
    graph_inputs = {i.name for i in graph.input}
    if mask not in graph_inputs:
        raise OnnxdnsError(f"straight-through gradient for {param}: mask {mask} is not a frozen input of the training graph")
    if not any(n.op_type == "Mul" and list(n.input) == [param, mask] for n in graph.node):
        raise OnnxdnsError(f"straight-through gradient for {param}: the forward graph has no Mul({param}, {mask})")
    name = f"{param}_grad"
    node = producers.get(name)
    while node is not None and node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Mul" or len(node.input) != 2 or mask not in node.input:
        found = "nothing" if node is None else f"{node.op_type}({', '.join(node.input)})"
        raise OnnxdnsError(
            f"straight-through gradient for {param}: expected {name} to come from Mul(<grad of masked {param}>, {mask}), "
            f"found {found}; onnxruntime's gradient graph changed shape"
        )
    other = node.input[1] if node.input[0] == mask else node.input[0]
    if other in (param, mask) or other in graph_inputs:
        raise OnnxdnsError(f"straight-through gradient for {param}: the gradient Mul reads {other}, not a gradient")
    node.op_type = "Identity"
    node.domain = ""
    del node.input[:]
    node.input.append(other)
    del node.attribute[:]


def add_weight_decay(training: onnx.ModelProto, params: tuple[str, ...] | list[str], weight_decay: float) -> None:
    """Feed ``<p>_grad + weight_decay * p`` to each parameter's gradient accumulator (in place)."""
    graph = training.graph
    coeff = "onnxdns.weight_decay"
    graph.initializer.append(numpy_helper.from_array(np.array(weight_decay, dtype=np.float32), coeff))
    nodes = list(graph.node)
    for param in params:
        grad = f"{param}_grad"
        index = next((i for i, n in enumerate(nodes) if n.op_type == "InPlaceAccumulatorV2"
                      and len(n.input) > 1 and n.input[1] == grad), None)
        if index is None:
            raise OnnxdnsError(f"weight decay: no gradient accumulator reads {grad} in the training graph")
        decay, total = f"{param}_grad.decay", f"{param}_grad.with_decay"
        new = [helper.make_node("Mul", [param, coeff], [decay], name=f"{param}_WeightDecayMul"),
               helper.make_node("Add", [grad, decay], [total], name=f"{param}_WeightDecayAdd")]
        nodes[index].input[1] = total
        nodes[index:index] = new
    del graph.node[:]
    graph.node.extend(nodes)


def drop_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    """Remove graph outputs ``names`` and trailing node outputs nothing reads any more."""
    graph = model.graph
    kept = [o for o in graph.output if o.name not in set(names)]
    del graph.output[:]
    graph.output.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        outputs = list(node.output)
        while len(outputs) > 1 and outputs[-1] not in used:
            outputs.pop()
        if len(outputs) != len(node.output):
            del node.output[:]
            node.output.extend(outputs)


# --------------------------------------------------------------------------- native logging


class _Log:
    def __init__(self, path: str) -> None:
        self.path = path

    def tail(self) -> str:
        try:
            lines = [ln for ln in Path(self.path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "unknown error"
        errors = [ln for ln in lines if "[E:" in ln or "rror" in ln]
        return (errors or lines or ["unknown error"])[-1].strip()


@contextlib.contextmanager
def _native_stderr_to_file() -> Iterator[_Log]:
    """Send file descriptor 2 to a temporary file: onnxruntime's graph builders log every graph
    transformer at INFO level from C++, ignoring the Python logging settings."""
    fd, path = tempfile.mkstemp(prefix="onnxdns-ort-", suffix=".log")
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        yield _Log(path)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
