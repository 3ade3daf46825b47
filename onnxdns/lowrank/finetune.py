"""Fine-tune a split model in the onnxruntime-training loop (plain training, method ``none``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnx import numpy_helper

from onnxdns import modelio


def finetune(model: ir.Model, dataset: str, *, epochs: float, lr: float = 0.005, batch_size: int = 64,
             seed: int = 0, threads: int = 0, progress: bool = False, data_dir: str | None = None,
             **options: Any) -> dict[str, Any]:
    """Train every float parameter of ``model`` (in place) on ``dataset``'s train split.

    Runs :func:`onnxdns.training.train` with ``method="none"``, cosine learning rate from ``lr``,
    momentum 0.9, weight decay 5e-4 (``options`` override these), in a temporary folder, then
    copies the trained initializers back. Returns the run summary (test accuracy per epoch).
    """
    from onnxdns.training import train

    config = {"method": "none", "data": dataset, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "schedule": "cosine", "momentum": 0.9, "weight_decay": 5e-4, "seed": seed}
    config.update(options)
    with tempfile.TemporaryDirectory(prefix="onnxdns-finetune-") as tmp:
        src, dst = Path(tmp) / "split.onnx", Path(tmp) / "finetuned.onnx"
        modelio.save_model(modelio.to_proto(model), src)
        result = train(src, dst, checkpoint_dir=Path(tmp) / "ckpt", progress=progress, threads=threads,
                       data_dir=data_dir, **config)
        trained = modelio.load_model(dst)
    updated = 0
    for init in trained.graph.initializer:
        value = model.graph.initializers.get(init.name)
        if value is None or value.const_value is None:
            continue
        value.const_value = ir.tensor(numpy_helper.to_array(init), name=init.name)
        updated += 1
    return {
        "epochs": epochs, "lr": lr, "steps": result.steps, "updated_initializers": updated,
        "test_accuracy": [h.test_accuracy for h in result.history], "seconds": round(result.seconds, 1),
    }
