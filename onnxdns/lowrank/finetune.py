"""Fine-tune a split model in the onnxruntime-training loop (plain training, method ``none``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxdns import modelio


def finetune(model: ir.Model, data: Any, *, teacher: onnx.ModelProto | None = None, epochs: float,
             lr: float = 0.005, batch_size: int = 64, seed: int = 0, threads: int = 0, progress: bool = False,
             data_dir: str | None = None, **options: Any) -> dict[str, Any]:
    """Train every float parameter of ``model`` (in place) on ``data`` (any data of
    :func:`onnxdns.training.train`: a data set name, a folder, ``.npz``/``.npy``, ``module:function``
    or a :class:`~onnxdns.sources.Source`).

    Runs :func:`onnxdns.training.train` with ``method="none"``, cosine learning rate from ``lr``,
    momentum 0.9, weight decay 5e-4 (``options`` override these and add others, e.g. ``mean``,
    ``std``, ``loss``), in a temporary folder. The loss is cross-entropy when the data has labels,
    else distillation from ``teacher`` (the model before the split; default: ``model`` itself).
    The trained initializers are copied back unless training diverged (non-finite weights: the
    model is then left as it was and ``diverged`` is True). Returns the run summary (validation
    metrics per epoch).
    """
    from onnxdns.training import train

    config = {"method": "none", "data": data, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4, "seed": seed}
    config.update(options)
    with tempfile.TemporaryDirectory(prefix="onnxdns-finetune-") as tmp:
        src, dst = Path(tmp) / "split.onnx", Path(tmp) / "finetuned.onnx"
        modelio.save_model(modelio.to_proto(model), src)
        teacher_path = None
        if teacher is not None:
            teacher_path = Path(tmp) / "teacher.onnx"
            modelio.save_model(teacher, teacher_path)
        result = train(src, dst, checkpoint_dir=Path(tmp) / "ckpt", progress=progress, threads=threads,
                       data_dir=data_dir, teacher=teacher_path, **config)
        trained = modelio.load_model(dst)
    arrays = {init.name: numpy_helper.to_array(init) for init in trained.graph.initializer
              if init.name in model.graph.initializers and model.graph.initializers[init.name].const_value is not None}
    diverged = any(a.dtype.kind == "f" and not np.all(np.isfinite(a)) for a in arrays.values())
    if not diverged:
        for name, array in arrays.items():
            model.graph.initializers[name].const_value = ir.tensor(array, name=name)
    history = result.history
    return {
        "epochs": epochs, "lr": lr, "steps": result.steps, "updated_initializers": 0 if diverged else len(arrays),
        "diverged": diverged, "loss": result.loss, "validation": history[-1].val_split if history else None,
        "val_accuracy": [h.val_accuracy for h in history], "metrics": [h.metrics for h in history],
        "seconds": round(result.seconds, 1),
    }
