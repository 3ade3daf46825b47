"""Proof benchmark of issue 11: compress two trained OCR models the project did not produce
(the text-direction classifier and the text detector of the ``rapidocr-onnxruntime`` wheel) with
images rendered here (``benchmarks/ocr_data.py``), and measure every result with onnxruntime.

Per model and row: parameters, MACs (batch 1 at the task's image size: 3 x 48 x 192 lines,
3 x 480 x 480 pages), file size, onnxruntime CPU latency of the row side by side with the
original in one process (interleaved repeats, medians; :func:`onnxdns.lowrank.speed.measure`) at
batch 1 and at the task batch (6 lines: rapidocr's ``cls_batch_num``; 4 pages: a short
document), and fidelity on the held-out ``test`` split: classifier accuracy next to the
original's (and top-1 agreement with it), detector mean IoU of the binarised probability maps
and box F1 against the original (``benchmarks/ocr_metrics.py``). Recipe choices read only
``train`` (calibration, training) and ``val`` (validation); ``test`` is only reported.

Rows (``--methods``, default ``optimize,sparse-lowrank``; ``original`` is always measured):

* ``optimize``: ``onnxdns optimize`` (the exact cpu pipeline);
* ``sparse-lowrank``: the sparse-lowrank pass calibrated on the rendered ``train`` folder, then
  the cpu pipeline (``onnxdns.api.optimize(passes=["sparse-lowrank", *cpu])``), at each target of
  ``--cls-targets`` / ``--det-targets``; kept is the largest target whose model meets the rule on
  the ``val`` split (classifier: val accuracy loss <= 1 pt; detector: val mean map IoU >= 0.9),
  else the smallest. The classifier's targets are MAC ratios (cost model ``macs``, the pass's
  latency check off: its target is MACs); the detector's are CPU speed-ups (cost model
  ``latency``, and the pass undoes the splits it does not measure faster);
* ``dns``, ``slim``, ``sparse-lowrank-ft``: Dynamic Network Surgery, Network Slimming (BatchNorm
  gammas and inserted channel scales), sparse-lowrank then fine-tuning, each trained from the
  rendered folders (``onnxdns.train`` / ``onnxdns.slim`` with ``data=train``, ``val_data=val``,
  ``loss="ce"`` for the classifier, ``"distill"`` from the original for the detector) with the
  recipes of :data:`RECIPES`, then optimized. BatchNorm stays in the model through training
  (frozen: trained as ``(x - mean) / std * gamma + beta``; slim: training mode) and is folded by
  ``optimize`` afterwards. ``slim`` keeps the largest prune ratio of its recipe whose model meets
  the val rule (else the smallest). ``sparse-lowrank-ft`` splits at each of ``--cls-ft-targets`` /
  ``--det-ft-targets`` (further than the split alone keeps on val), fine-tunes with each recipe of
  its list and keeps the largest target whose best recipe meets the val rule; it records the
  val fidelity before and after fine-tuning. A row whose training raises is reported as not run, with the
  reason. A run of some ``--methods`` keeps the JSON's other rows measured on the same original
  and data. Latency is measured ``--latency-repeats`` times side by side (the spread of the
  speed-ups is recorded); ``--latency-only`` re-measures the recorded rows.

Targets (issue 11): classifier >= 2x fewer MACs at <= 1 pt accuracy loss; detector >= 1.5x
CPU speed-up at batch 1 with mean map IoU >= 0.9. The JSON states whether each row meets them.
The ONNX files of the rows are kept in ``benchmarks/results/ocr/`` (each at most 10 MB); the
originals are the wheel's files (path and SHA-256 in the JSON).

    python benchmarks/ocr.py                       # data in benchmarks/results/ocr/data (rendered if absent)
    python benchmarks/ocr.py --models cls --methods optimize,sparse-lowrank,dns,slim,sparse-lowrank-ft --threads 1
    python benchmarks/ocr.py --models det --methods optimize,sparse-lowrank,dns,slim,sparse-lowrank-ft --threads 1
    python benchmarks/ocr.py --latency-only --latency-repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ocr_data  # noqa: E402
import ocr_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT_DIR = RESULTS / "ocr"
MAX_FILE_BYTES = 10 * 2 ** 20
WHEEL_MODELS = {"cls": "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "det": "models/ch_PP-OCRv4_det_infer.onnx"}
#: (channels, height, width) of one sample, and the task batch, per model.
SHAPES = {"cls": (3, ocr_data.LINE_H, ocr_data.LINE_W), "det": (3, ocr_data.PAGE, ocr_data.PAGE)}
TASK_BATCH = {"cls": 6, "det": 4}
TRAIN_METHODS = ("dns", "slim", "sparse-lowrank-ft")
METHODS = ("optimize", "sparse-lowrank", *TRAIN_METHODS)

log = logging.getLogger("ocr")


# --------------------------------------------------------------------------- models and data


def wheel_model(kind: str) -> Path:
    """The original model file inside the installed rapidocr-onnxruntime wheel (found through the
    distribution's file list, as tests/realmodels.py finds it; the package is not imported)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("rapidocr-onnxruntime") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    want = f"rapidocr_onnxruntime/{WHEEL_MODELS[kind]}"
    path = next((Path(f.locate()) for f in files if str(f).replace("\\", "/") == want), None)
    if path is None or not path.is_file():
        raise SystemExit("ocr: error: rapidocr-onnxruntime 1.4.4 is not installed (scripts/setup.sh installs it "
                         "with pip install --no-deps)")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_data(folder: Path, seed: int, lines: int, pages: int) -> dict:
    manifest = folder / "manifest.json"
    if manifest.exists():
        stored = json.loads(manifest.read_text())
        if (stored["seed"], stored["lines"], stored["pages"]) != (seed, lines, pages):
            raise SystemExit(f"ocr: error: {folder} holds data for seed {stored['seed']}, {stored['lines']} lines, "
                             f"{stored['pages']} pages; give another --data folder")
        return stored
    log.info("rendering %d lines and %d pages into %s", lines, pages, folder)
    return ocr_data.generate(folder, seed=seed, lines=lines, pages=pages)


def folder(data: Path, kind: str, split: str) -> Path:
    return data / kind / split


def shown(path: Path | str) -> str:
    """``path`` as the JSON records it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --------------------------------------------------------------------------- measurements


def static_copy(path: Path, kind: str) -> onnx.ModelProto:
    """The model with its input fixed to [1, C, H, W] of the task (the files leave H and W open):
    MACs are counted at that size."""
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, *SHAPES[kind])):
        dim.Clear()
        dim.dim_value = value
    return model


def stats(path: Path, kind: str) -> dict:
    from onnxdns.stats import model_stats

    s = model_stats(static_copy(path, kind), file_bytes=path.stat().st_size)
    return {"params": s.params, "nonzeros": s.nonzeros, "macs": s.macs, "macs_complete": s.macs_complete,
            "nodes": s.nodes, "file_bytes": s.file_bytes}


def latency(original: Path, candidate: Path, kind: str, data: Path, threads: int, seconds: float) -> dict:
    """Median ms of both models side by side at batch 1 and the task batch, on val images."""
    from onnxdns.lowrank.calibration import Inputs
    from onnxdns.lowrank.speed import measure

    source = ocr_metrics.open_folder(folder(data, kind, "val"), original, kind)
    batch = next(source.batches(TASK_BATCH[kind]))
    name, array = next(iter(batch.inputs.items()))
    inputs = Inputs({name: array}, {name: 0})
    timings = measure(onnx.load(str(original)), onnx.load(str(candidate)), inputs, (1, TASK_BATCH[kind]),
                      threads=threads, seconds=seconds)
    return {str(b): {"original_ms": t["input_ms"], "row_ms": t["candidate_ms"], "speedup": t["speedup"],
                     "repeats": t["repeats"]} for b, t in timings.items()}


def fidelity(kind: str, candidate: Path, original: Path, data: Path, cache: dict) -> dict:
    """Held-out (test split) fidelity of ``candidate``; the original's numbers are cached."""
    test = folder(data, kind, "test")
    if kind == "cls":
        acc = ocr_metrics.classifier_accuracy(candidate, test)
        out = {"test_accuracy": round(acc["accuracy"], 4), "test_samples": acc["samples"],
               "per_class": {c: round(v, 4) for c, v in acc["per_class"].items()}}
        if candidate != original:
            out["agreement_with_original"] = round(ocr_metrics.classifier_agreement(candidate, original, test), 4)
        return out
    if "original_maps" not in cache:
        cache["original_maps"] = ocr_metrics.detector_maps(original, test)
    maps = cache["original_maps"] if candidate == original else ocr_metrics.detector_maps(candidate, test)
    out = ocr_metrics.detector_fidelity(maps, cache["original_maps"])
    out["test_pages"] = int(len(maps))
    return out


def targets(kind: str, row: dict, original: dict) -> dict:
    if kind == "cls":
        mac_ratio = original["stats"]["macs"] / max(row["stats"]["macs"], 1)
        loss_pts = 100 * (original["fidelity"]["test_accuracy"] - row["fidelity"]["test_accuracy"])
        return {"mac_reduction": round(mac_ratio, 3), "accuracy_loss_pts": round(loss_pts, 2),
                "met": bool(mac_ratio >= 2.0 and loss_pts <= 1.0),
                "target": ">= 2x fewer MACs at <= 1 pt accuracy loss"}
    speedup = row["latency"]["1"]["speedup"]
    iou = row["fidelity"]["mean_map_iou"]
    return {"speedup_batch1": speedup, "mean_map_iou": iou, "met": bool(speedup >= 1.5 and iou >= 0.9),
            "target": ">= 1.5x CPU speed-up at batch 1 with mean map IoU >= 0.9"}


# --------------------------------------------------------------------------- rows


def _cpu_passes() -> list[str]:
    from onnxdns.pipelines import pipeline_names

    return pipeline_names("cpu")


def _val_source(original: Path, kind: str, data: Path):
    return ocr_metrics.open_folder(folder(data, kind, "val"), original, kind)


def _validation(result) -> dict:
    v = result.validation
    out = {"status": v.status, "message": v.message}
    if v.comparison is not None:
        out["comparison"] = str(v.comparison)[:300]
    return out


def row_optimize(original: Path, out: Path, kind: str, data: Path, args, cache: dict) -> dict:
    from onnxdns.api import optimize

    result = optimize(original, out, target="cpu", data=_val_source(original, kind, data))
    return {"passes_modified": [r.name for r in result.passes if r.modified], "validation": _validation(result)}


def val_fidelity(kind: str, candidate: Path, original: Path, data: Path, cache: dict) -> float:
    """The number a recipe choice may read: val accuracy (classifier) or val mean map IoU (detector)."""
    val = folder(data, kind, "val")
    if kind == "cls":
        return ocr_metrics.classifier_accuracy(candidate, val)["accuracy"]
    if "original_val_maps" not in cache:
        cache["original_val_maps"] = ocr_metrics.detector_maps(original, val)
    return ocr_metrics.mean_map_iou(ocr_metrics.detector_maps(candidate, val), cache["original_val_maps"])


def _val_rule(kind: str, value: float, original_value: float) -> bool:
    if kind == "cls":
        return 100 * (original_value - value) <= 1.0
    return value >= 0.9


def _sparse_lowrank(original: Path, out: Path, kind: str, data: Path, args, target: float, cpu: bool = True) -> dict:
    from onnxdns.api import optimize

    calib = ocr_metrics.open_folder(folder(data, kind, "train"), original, kind)
    options = {"calib_data": calib, "target_speedup": target, "cost": args.cost[kind],
               "calib_samples": args.calib_samples[kind], "cost_batch": TASK_BATCH[kind], "threads": args.threads,
               "seed": args.seed, "speed_check": kind == "det"}
    result = optimize(original, out, target="cpu", passes=["sparse-lowrank", *(_cpu_passes() if cpu else [])],
                      data=_val_source(original, kind, data), pass_options={"sparse_lowrank": options})
    details = next(r.details for r in result.passes if r.name == "sparse-lowrank")
    check = details.get("speed_check", {})
    return {"options": {k: v for k, v in options.items() if k != "calib_data"},
            "calib_data": f"{shown(folder(data, kind, 'train'))} (rendered train split)",
            "split_layers": details.get("split_layers"),
            "speed_check": {"fallback": check.get("fallback"), "skipped": check.get("skipped"),
                            "attempts": [{"split_layers": a["split_layers"], "latency": a["latency"],
                                          "accepted": a["accepted"]} for a in check.get("attempts", [])]},
            "validation": _validation(result)}


def row_sparse_lowrank(original: Path, out: Path, kind: str, data: Path, args, cache: dict) -> dict:
    """The pass at each target of ``--{kind}-targets``; kept: the largest target whose model meets
    the rule on the val split (classifier: <= 1 pt val accuracy loss; detector: val mean map IoU
    >= 0.9), else the smallest target. Test numbers are measured on the kept model only."""
    original_val = cache.setdefault("original_val", val_fidelity(kind, original, original, data, cache))
    sweep = []
    for target in args.targets[kind]:
        path = out.with_name(f"{out.stem}.t{target:g}.tmp.onnx")
        details = _sparse_lowrank(original, path, kind, data, args, target)
        value = val_fidelity(kind, path, original, data, cache)
        sweep.append({"target_speedup": target, "path": path, "val": round(value, 4),
                      "val_rule_met": _val_rule(kind, value, original_val), "macs": stats(path, kind)["macs"],
                      "details": details})
        log.info("%s sparse-lowrank target %g: val %s %.4f (original %.4f), MACs %d", kind, target,
                 "accuracy" if kind == "cls" else "map IoU", value, original_val, sweep[-1]["macs"])
    passing = [s for s in sweep if s["val_rule_met"]]
    chosen = max(passing, key=lambda s: s["target_speedup"]) if passing else min(sweep, key=lambda s: s["target_speedup"])
    os.replace(chosen["path"], out)
    for s in sweep:
        Path(s["path"]).unlink(missing_ok=True)
    return {"chosen_target_speedup": chosen["target_speedup"], "chosen_by": "val split",
            "val_rule": "val accuracy loss <= 1 pt" if kind == "cls" else "val mean map IoU >= 0.9",
            "original_val": round(original_val, 4), "val_rule_met": chosen["val_rule_met"],
            "sweep": [{k: v for k, v in s.items() if k not in ("path", "details")} for s in sweep],
            "details": chosen["details"]}


#: Training recipes of the trained rows (chosen on the val split; see the README section).
#: ``batch_size`` 24 lines (classifier) / 4 pages (detector); SGD with momentum 0.9 unless
#: ``optimizer`` says ``adamw`` (betas 0.9 / 0.999). A list holds candidates the row chooses
#: between on the val split. The split detector needs AdamW: one gradient is 1,565x its
#: weights' norm where every other is below 0.04x, and SGD at lr 2e-5 lowered its val IoU.
RECIPES: dict[str, dict[str, Any]] = {
    "cls": {
        "dns": {"iterations": 900, "batch_size": 24, "lr": 0.001, "schedule": "cosine", "dns_c": "-0.8", "dns_ramp": 300},
        "slim": [{"epochs": 6, "finetune_epochs": 12, "lr": 0.003, "finetune_lr": 0.001, "batch_size": 24,
                  "slim_lambda": 0.01, "prune_ratios": [0.45, 0.5, 0.55]},
                 {"epochs": 6, "finetune_epochs": 12, "lr": 0.001, "finetune_lr": 0.001, "batch_size": 24,
                  "optimizer": "adamw", "slim_lambda": 0.01, "prune_ratios": [0.3, 0.4, 0.5]}],
        "sparse-lowrank-ft": [{"iterations": 1500, "batch_size": 24, "lr": 0.001, "schedule": "cosine"},
                              {"iterations": 1500, "batch_size": 24, "lr": 0.001, "schedule": "cosine",
                               "optimizer": "adamw"}],
    },
    "det": {
        "dns": {"iterations": 120, "batch_size": 4, "lr": 0.00002, "dns_c": "-0.8", "dns_ramp": 60},
        "slim": {"iterations": 104, "finetune_iterations": 156, "lr": 3e-5, "finetune_lr": 3e-5, "batch_size": 4,
                 "optimizer": "adamw", "slim_lambda": 1e-4, "prune_ratios": [0.3]},
        "sparse-lowrank-ft": [{"epochs": 6, "batch_size": 4, "lr": 1e-5, "schedule": "cosine", "optimizer": "adamw"},
                              {"epochs": 6, "batch_size": 4, "lr": 3e-5, "schedule": "cosine", "optimizer": "adamw"}],
    },
}


def _recipe(kind: str, row: str, args) -> dict:
    (recipe,) = _recipes(kind, row, args)
    return recipe


def _recipes(kind: str, row: str, args) -> list[dict]:
    """The recipe(s) of ``row``: a list holds candidates, chosen between on the val split."""
    given = RECIPES[kind][row]
    recipes = [dict(r) for r in (given if isinstance(given, list) else [given])]
    if args.iterations is not None:  # a shorter (or longer) run of every trained row
        for recipe in recipes:
            for key in ("iterations", "finetune_iterations"):
                if key in recipe:
                    recipe[key] = args.iterations
    return recipes


def _train_options(kind: str, data: Path, args, recipe: dict) -> dict:
    """The data, loss and schedule options of ``onnxdns.train`` for ``kind``: the rendered train
    split (labels from the class folders for the classifier; distillation for the detector), the
    val split for validation, the task's normalisation."""
    mean, std = (ocr_data.CLS_MEAN, ocr_data.CLS_STD) if kind == "cls" else (ocr_data.DET_MEAN, ocr_data.DET_STD)
    options = {"data": str(folder(data, kind, "train")), "val_data": str(folder(data, kind, "val")),
               "loss": "ce" if kind == "cls" else "distill", "mean": list(mean), "std": list(std),
               "seed": args.seed, "threads": args.threads, "progress": False}
    options.update({k: v for k, v in recipe.items()
                    if k in ("iterations", "epochs", "batch_size", "lr", "schedule", "optimizer", "dns_c", "dns_ramp")})
    return options


def _require(name: str):
    """``onnxdns.train`` or ``onnxdns.slim``, refused up front when this checkout lacks it (the
    trained rows wait for the data interface of issue 11 there)."""
    import onnxdns

    fn = getattr(onnxdns, name, None)
    if fn is None:
        raise NotImplementedError(f"onnxdns.{name} is not in this checkout")
    return fn


def _optimized(trained: Path, out: Path, kind: str, data: Path) -> None:
    from onnxdns.api import optimize

    optimize(trained, out, target="cpu", data=_val_source(trained, kind, data))


def _train(src: Path, out: Path, original: Path, method: str, options: dict) -> dict:
    """``onnxdns.train`` of ``src`` into ``out`` (distillation learns from ``original``); its
    checkpoint folder is removed afterwards. Returns the last epoch's validation figures."""
    import shutil

    train = _require("train")
    ckpt = out.with_name(f"{out.stem}.ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    result = train(src, out, method=method, teacher=original, checkpoint_dir=ckpt, **options)
    shutil.rmtree(ckpt, ignore_errors=True)
    last = result.history[-1] if result.history else None
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "total_density": round(result.total_density, 4),
            "last_val": {"loss": last.val_loss, **{k: round(v, 4) for k, v in (last.metrics or {}).items()}} if last else None}


def row_dns(original: Path, out: Path, kind: str, data: Path, args, cache: dict) -> dict:
    """DNS of the original (its BatchNorm frozen: trained as x * s + t from the stored statistics,
    folded by optimize afterwards; a BN folded before training leaves weights SGD cannot train at
    one learning rate), then optimized. DNS zeroes weights: the row reports non-zeros; dense CPU
    kernels do not run faster."""
    trained = out.with_suffix(".trained.onnx")
    recipe = _recipe(kind, "dns", args)
    options = _train_options(kind, data, args, recipe)
    summary = _train(original, trained, original, "dns", options)
    _optimized(trained, out, kind, data)
    trained.unlink()
    return {"train": {**options, "data": shown(options["data"]), "val_data": shown(options["val_data"]), "method": "dns"},
            "result": summary}


def _choose(sweep: list[dict], knob: str) -> dict:
    """The val-split choice of a sweep: the largest ``knob`` (prune ratio, split target) with a
    model that meets the val rule, its best val figure among the recipes; else the best val figure."""
    passing = [s for s in sweep if s["val_rule_met"]]
    if passing:
        top = max(s[knob] for s in passing)
        return max((s for s in passing if s[knob] == top), key=lambda s: s["val"])
    return max(sweep, key=lambda s: s["val"])


def row_slim(original: Path, out: Path, kind: str, data: Path, args, cache: dict) -> dict:
    """Network Slimming (``onnxdns.slim``) with each recipe of ``RECIPES[kind]["slim"]``: sparsity
    training on the channel scales (the classifier's BatchNorm gamma and inserted scales where a
    conv has no BatchNorm; the detector: inserted scales on its BN-folded convs, loss
    distillation), pruning at each ratio of the recipe (a recipe's sparsity stage is shared by its
    ratios), fine-tuning, optimize. Kept (:func:`_choose`): the largest ratio whose model meets the
    val rule, else the best val figure."""
    slim = _require("slim")
    src = original
    if kind == "det":  # BatchNorm folded first: slim trains inserted scales (fine-tuning distills from it)
        src = out.with_suffix(".folded.tmp.onnx")
        _optimized(original, src, kind, data)
    original_val = cache.setdefault("original_val", val_fidelity(kind, original, original, data, cache))
    sweep = []
    for number, recipe in enumerate(_recipes(kind, "slim", args)):
        options = _train_options(kind, data, args, recipe)
        for key in ("iterations", "epochs", "lr", "threads", "progress"):
            options.pop(key, None)
        stage = {k: recipe[k] for k in ("epochs", "finetune_epochs", "lr", "finetune_lr") if k in recipe}
        if "iterations" in recipe:  # slim's stages count epochs: iterations as a fraction of one
            steps = len(list(Path(folder(data, kind, "train")).rglob("*.png"))) / recipe["batch_size"]
            stage["epochs"] = recipe["iterations"] / steps
            stage["finetune_epochs"] = recipe["finetune_iterations"] / steps
        work = OUT_DIR / "work" / f"{kind}_slim_{number}"
        for ratio in recipe["prune_ratios"]:
            path = out.with_name(f"{out.stem}.{number}.r{ratio:g}.tmp.onnx")
            result = slim(src, path, slim_lambda=recipe["slim_lambda"], prune_ratio=ratio, work_dir=work,
                          threads=args.threads, progress=False, **stage, **options)
            value = val_fidelity(kind, path, original, data, cache)
            sweep.append({"recipe": number, "prune_ratio": ratio, "path": path, "val": round(value, 4),
                          "val_rule_met": _val_rule(kind, value, original_val), "macs": stats(path, kind)["macs"],
                          "slim_lambda": recipe["slim_lambda"], **stage,
                          "train": {k: v for k, v in options.items() if k not in ("data", "val_data")},
                          "stages": [{"name": r.name, "reused": r.reused, "seconds": r.seconds} for r in result.stages]})
            log.info("%s slim recipe %d ratio %g: val %.4f (original %.4f), MACs %d", kind, number, ratio, value,
                     original_val, sweep[-1]["macs"])
    chosen = _choose(sweep, "prune_ratio")
    os.replace(chosen["path"], out)
    for s in sweep:
        Path(s["path"]).unlink(missing_ok=True)
    if src != original:
        src.unlink()
    return {"chosen_prune_ratio": chosen["prune_ratio"], "chosen_recipe": chosen["recipe"], "chosen_by": "val split",
            "original_val": round(original_val, 4), "val_rule_met": chosen["val_rule_met"],
            "data": {"train": shown(folder(data, kind, "train")), "val": shown(folder(data, kind, "val"))},
            "sweep": [{k: v for k, v in s.items() if k != "path"} for s in sweep]}


def row_sparse_lowrank_ft(original: Path, out: Path, kind: str, data: Path, args, cache: dict) -> dict:
    """sparse-lowrank at each target of ``--{kind}-ft-targets`` (beyond what the split alone keeps
    on val: the fine-tuning recovers the rest), fine-tuned with each recipe of
    ``RECIPES[kind]["sparse-lowrank-ft"]`` (``method="none"``; the classifier learns the labels,
    the detector distills from the original), then optimized. Kept (:func:`_choose`, val split
    only): the largest target whose best fine-tuned model meets the val rule, else the best val figure."""
    original_val = cache.setdefault("original_val", val_fidelity(kind, original, original, data, cache))
    sweep = []
    for target in args.ft_targets[kind]:
        split = out.with_name(f"{out.stem}.t{target:g}.split.tmp.onnx")
        details = _sparse_lowrank(original, split, kind, data, args, target, cpu=False)  # BatchNorm folded after training
        details["val_before_finetuning"] = round(val_fidelity(kind, split, original, data, cache), 4)
        details["macs_before_optimize"] = stats(split, kind)["macs"]
        for number, recipe in enumerate(_recipes(kind, "sparse-lowrank-ft", args)):
            options = _train_options(kind, data, args, recipe)
            trained = out.with_name(f"{out.stem}.t{target:g}.r{number}.trained.tmp.onnx")
            path = out.with_name(f"{out.stem}.t{target:g}.r{number}.tmp.onnx")
            summary = _train(split, trained, original, "none", options)
            _optimized(trained, path, kind, data)
            trained.unlink()
            value = val_fidelity(kind, path, original, data, cache)
            sweep.append({"target_speedup": target, "recipe": number, "path": path, "val": round(value, 4),
                          "val_rule_met": _val_rule(kind, value, original_val), "macs": stats(path, kind)["macs"],
                          "train": {**{k: v for k, v in options.items() if k not in ("data", "val_data")},
                                    "method": "none"},
                          "result": summary, "sparse_lowrank": details})
            log.info("%s sparse-lowrank-ft target %g recipe %d: val %.4f (before fine-tuning %.4f, original %.4f)",
                     kind, target, number, value, details["val_before_finetuning"], original_val)
        split.unlink()
    chosen = _choose(sweep, "target_speedup")
    os.replace(chosen["path"], out)
    for s in sweep:
        Path(s["path"]).unlink(missing_ok=True)
    return {"chosen_target_speedup": chosen["target_speedup"], "chosen_recipe": chosen["recipe"], "chosen_by": "val split",
            "val_rule": "val accuracy loss <= 1 pt" if kind == "cls" else "val mean map IoU >= 0.9",
            "original_val": round(original_val, 4), "val_rule_met": chosen["val_rule_met"],
            "data": {"train": shown(folder(data, kind, "train")), "val": shown(folder(data, kind, "val"))},
            "sweep": [{k: v for k, v in s.items() if k not in ("path", "sparse_lowrank")} for s in sweep],
            "sparse_lowrank": chosen["sparse_lowrank"], "train": chosen["train"], "result": chosen["result"]}


ROWS: dict[str, Callable[..., dict]] = {
    "optimize": row_optimize, "sparse-lowrank": row_sparse_lowrank, "dns": row_dns, "slim": row_slim,
    "sparse-lowrank-ft": row_sparse_lowrank_ft,
}


def run_row(name: str, kind: str, original: Path, data: Path, args, cache: dict, base: dict) -> dict:
    out = OUT_DIR / f"{kind}_{name}.onnx"
    t0 = time.perf_counter()
    tmp = out.with_suffix(".tmp.onnx")
    tmp.unlink(missing_ok=True)
    try:
        details = ROWS[name](original, tmp, kind, data, args, cache)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if name in TRAIN_METHODS:  # the data interface of train/slim (issue 11) may not be there yet
            log.warning("%s %s not run: %s: %s", kind, name, type(e).__name__, e)
            return {"status": "not run", "reason": f"{type(e).__name__}: {e}"}
        raise
    os.replace(tmp, out)
    row = {"status": "ok", "file": str(out.relative_to(ROOT)), "seconds": round(time.perf_counter() - t0, 1),
           "details": details, "stats": stats(out, kind)}
    if row["stats"]["file_bytes"] > MAX_FILE_BYTES:
        raise SystemExit(f"ocr: error: {out} is {row['stats']['file_bytes']} bytes, over the 10 MB limit")
    # repeated side-by-side measurements (another benchmark may share the cores): the first is the
    # row's latency, the spread of the speed-ups over all of them is recorded next to it
    runs = [latency(original, out, kind, data, args.threads, args.latency_seconds) for _ in range(args.latency_repeats)]
    row["latency"], row["latency_threads"] = runs[0], args.threads
    row["latency_spread"] = {b: {"speedups": [r[b]["speedup"] for r in runs],
                                 "min": min(r[b]["speedup"] for r in runs), "max": max(r[b]["speedup"] for r in runs),
                                 "median": float(np.median([r[b]["speedup"] for r in runs]))} for b in runs[0]}
    row["fidelity"] = fidelity(kind, out, original, data, cache)
    row["targets"] = targets(kind, row, base)
    log.info("%s %s: %s", kind, name, json.dumps({k: row[k] for k in ("stats", "latency", "fidelity", "targets")}))
    return row


def run_model(kind: str, data: Path, args, previous: dict | None = None) -> dict:
    """The original's row and the rows of ``args.methods``; rows of ``previous`` (the JSON's entry
    for this model) not run now are kept when they were measured on the same original and data."""
    original = wheel_model(kind)
    cache: dict = {}
    base = {"file": f"rapidocr-onnxruntime wheel: rapidocr_onnxruntime/{WHEEL_MODELS[kind]}",
            "sha256": sha256(original), "stats": stats(original, kind),
            "fidelity": fidelity(kind, original, original, data, cache)}
    if kind == "cls":  # the original on val too: what recipe choices may look at
        base["fidelity"]["val_accuracy"] = round(
            ocr_metrics.classifier_accuracy(original, folder(data, kind, "val"))["accuracy"], 4)
    log.info("%s original: %s", kind, json.dumps({k: base[k] for k in ("stats", "fidelity")}))
    rows = {"original": base}
    kept = {}
    if previous and previous.get("data") == data_key(data) and \
            previous.get("rows", {}).get("original", {}).get("sha256") == base["sha256"]:
        kept = {n: r for n, r in previous["rows"].items() if n != "original" and n not in args.methods}
    for name in METHODS:
        if name in args.methods:
            rows[name] = run_row(name, kind, original, data, args, cache, base)
        elif name in kept:
            rows[name] = kept[name]
    return {"input_shape": [1, *SHAPES[kind]], "task_batch": TASK_BATCH[kind], "threads": args.threads,
            "data": data_key(data), "rows": rows}


def data_key(data: Path) -> dict:
    """What identifies the rendered data set a row was measured on."""
    manifest = json.loads((data / "manifest.json").read_text())
    return {k: manifest[k] for k in ("seed", "lines", "pages", "val_fraction", "test_fraction")}


def save(path: Path, results: dict, kind: str) -> None:
    """Write ``results`` with its entry for ``kind`` into the JSON at ``path`` atomically, keeping
    the other models' entries as the file has them now (a run of the other model may have ended
    since this one read it)."""
    current = json.loads(path.read_text()) if path.exists() else {}
    merged = {**results, "models": {**current.get("models", {}), kind: results["models"][kind]}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=OUT_DIR / "data",
                   help="rendered data folder (rendered with ocr_data.py when absent; not committed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lines", type=int, default=3000)
    p.add_argument("--pages", type=int, default=300)
    p.add_argument("--models", default="cls,det", help="cls, det or both (default)")
    p.add_argument("--methods", default="optimize,sparse-lowrank", help=f"rows besides the original: {','.join(METHODS)}")
    p.add_argument("--cls-targets", default="1.5,2,3",
                   help="sparse-lowrank targets tried for the classifier (cost macs: MAC ratios; default 1.5,2,3)")
    p.add_argument("--det-targets", default="1.5,2",
                   help="sparse-lowrank targets tried for the detector (cost latency; default 1.5,2)")
    p.add_argument("--cls-ft-targets", default="2.6,3", help="sparse-lowrank targets before fine-tuning (default 2.6,3)")
    p.add_argument("--det-ft-targets", default="3,3.5", help="sparse-lowrank targets before fine-tuning (default 3,3.5)")
    p.add_argument("--cls-calib-samples", type=int, default=256, help="calibration lines (default 256)")
    p.add_argument("--det-calib-samples", type=int, default=32, help="calibration pages (default 32)")
    p.add_argument("--latency-seconds", type=float, default=3.0,
                   help="timed seconds per model pair and batch (default 3)")
    p.add_argument("--latency-repeats", type=int, default=3,
                   help="side-by-side latency measurements per row (spread recorded; default 3)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations of every trained row (default: each row's recipe, RECIPES)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: onnxruntime decides)")
    p.add_argument("--latency-only", action="store_true",
                   help="only re-measure the latency of the rows recorded in --out (--latency-repeats times "
                        "each; the first becomes the row's latency, and its targets are re-judged)")
    p.add_argument("--out", type=Path, default=RESULTS / "ocr.json")
    args = p.parse_args(argv)
    args.methods_given = any(a == "--methods" or a.startswith("--methods=") for a in (argv or sys.argv[1:]))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "original"]
    bad = [m for m in args.models if m not in SHAPES] + [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown model or method: {', '.join(bad)}")
    args.targets = {"cls": [float(t) for t in args.cls_targets.split(",")],
                    "det": [float(t) for t in args.det_targets.split(",")]}
    args.ft_targets = {"cls": [float(t) for t in args.cls_ft_targets.split(",")],
                       "det": [float(t) for t in args.det_ft_targets.split(",")]}
    args.calib_samples = {"cls": args.cls_calib_samples, "det": args.det_calib_samples}
    # The targets: classifier MACs (cost model macs, no latency check: a 1 ms model whose
    # time is overhead would have every split undone), detector CPU time (cost model latency, and
    # the pass's own check undoes splits not measured faster).
    args.cost = {"cls": "macs", "det": "latency"}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        manifest = ensure_data(args.data, args.seed, args.lines, args.pages)
    except ocr_data.DataError as e:
        print(f"ocr: error: {e}", file=sys.stderr)
        return 2
    import onnxruntime as ort

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("models", {})
    results.update({
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "onnx": onnx.__version__, "threads": args.threads,
                    "note": "2 CPU cores shared with other jobs while measuring: latencies are medians of "
                            "interleaved runs, ratios are more reliable than absolute times"},
        "data": {"folder": shown(args.data), "seed": args.seed, "counts": manifest["counts"],
                 "generator": "benchmarks/ocr_data.py", "cls": manifest["cls"], "det": manifest["det"]},
        "metrics": {"binarize_threshold": ocr_metrics.THRESH, "box_thresh": ocr_metrics.BOX_THRESH,
                    "box_match_iou": ocr_metrics.MATCH_IOU, "fidelity_split": "test"},
    })
    if args.latency_only:  # re-measure the recorded rows' latency side by side, repeatedly
        for kind in args.models:
            original = wheel_model(kind)
            for name, row in results["models"].get(kind, {}).get("rows", {}).items():
                if name == "original" or row.get("status") != "ok" or (args.methods_given and name not in args.methods):
                    continue
                runs = [latency(original, ROOT / row["file"], kind, args.data, args.threads, args.latency_seconds)
                        for _ in range(args.latency_repeats)]
                row["latency"], row["latency_threads"] = runs[0], args.threads
                row["targets"] = targets(kind, row, results["models"][kind]["rows"]["original"])
                row["latency_spread"] = {b: {"speedups": [r[b]["speedup"] for r in runs],
                                             "min": min(r[b]["speedup"] for r in runs),
                                             "max": max(r[b]["speedup"] for r in runs),
                                             "median": float(np.median([r[b]["speedup"] for r in runs]))}
                                         for b in runs[0]}
                log.info("%s %s latency spread: %s", kind, name, json.dumps(row["latency_spread"]))
            save(args.out, results, kind)
        return 0
    for kind in args.models:
        t0 = time.perf_counter()
        results["models"][kind] = run_model(kind, args.data, args, results["models"].get(kind))
        results["models"][kind]["last_run_seconds"] = round(time.perf_counter() - t0, 1)
        save(args.out, results, kind)
    print(json.dumps({k: {r: v.get("targets", v.get("status")) for r, v in m["rows"].items()}
                      for k, m in results["models"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
