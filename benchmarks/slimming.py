"""Benchmark: Network Slimming end to end on Fashion-MNIST, measured with onnxruntime.

For a VGG-style BatchNorm net (``vgg-bn``: conv-BN-ReLU 32-64-128-128-256-256, 1.1M parameters,
29M MACs) and a ResNet-style one with residual adds (``resnet-20``), all trained here with
onnxruntime-training:

1. ``baseline``: dense training (BatchNorm in training mode) with the same recipe and length as the
   sparsity training: the accuracy bar;
2. ``slim`` (:func:`onnxdns.workflows.slim.slim`): sparsity training from the same initial weights
   (``lambda * sum |gamma|``), global-threshold channel pruning (coupled channels as whole groups),
   fine-tuning, ``optimize``;
3. both final models optimized for the CPU (BatchNorm folded) and compared: test accuracy,
   parameters, MACs, onnxruntime CPU latency at batch 1 and 64 measured side by side in one process;
4. ``round_to`` study: the sparse model pruned at the same threshold with kept counts rounded to
   1, 8 and 16 (no fine-tuning), latency against MACs (why the channel-count multiple matters).

Every stage is skipped when its result is there with the same settings (``--fresh`` starts over);
an interrupted training resumes from its checkpoint. Work files go to ``runs/slimming/``; the
reported ONNX files to ``benchmarks/results/slimming/``, the JSON to ``benchmarks/results/slimming.json``.

    python benchmarks/slimming.py                       # full run (about an hour on 2 free cores)
    python benchmarks/slimming.py --models vgg          # one model
    python benchmarks/slimming.py --quick               # smoke run on data subsets (minutes)
    python benchmarks/slimming.py --set vgg.prune_ratio=0.8   # change a setting (later stages redo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxdns import api, modelio, report
from onnxdns.data import load_dataset
from onnxdns.models import build
from onnxdns.models.export import export_model
from onnxdns.passes.slim_channels import SlimChannelsPass
from onnxdns.workflows.evaluate import evaluate
from onnxdns.workflows.slim import TRAIN_DEFAULTS, slim
from onnxdns.workflows.stages import Stage
from onnxdns.workflows.train import train_stage
from onnxdns.stats import model_stats
from onnxdns.validate import measure_latency

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "slimming"
MAX_FILE_BYTES = 10 * 2 ** 20

#: Per model: the zoo model and the recipe. Sparsity rate: the reference uses s = 1e-4 (VGG) and
#: 1e-5 (ResNet-164) over 160 epochs of CIFAR at lr 0.1/0.01/0.001; with a few epochs here the
#: penalty is scaled up so that lambda x (sum of learning rates) stays in the same range.
CONFIGS: dict[str, dict[str, Any]] = {
    "vgg": {"model": "vgg-bn", "epochs": 3.0, "slim_lambda": 1e-3, "prune_ratio": 0.6, "round_to": 8,
            "targets": {"params_ratio": 10.0, "macs_ratio": 4.0, "max_accuracy_drop_pt": 0.5, "latency_vs_macs": 0.8}},
    "resnet": {"model": "resnet-20", "epochs": 2.0, "slim_lambda": 1e-3, "prune_ratio": 0.5, "round_to": 8,
               "targets": {"macs_ratio": 2.0, "max_accuracy_drop_pt": 1.0}},
}
QUICK = {"subset": 2000, "epochs": 1.0}
LATENCY_REPEATS = {1: 300, 64: 30}


def run_model(key: str, cfg: dict[str, Any], args: argparse.Namespace, test_set) -> dict[str, Any]:
    work = WORK / key
    work.mkdir(parents=True, exist_ok=True)
    out_dir = RESULTS / WORK.name  # slimming (or slimming-quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = {"progress": not args.no_progress, "threads": args.threads}
    original = work / "original.onnx"
    if not original.exists():
        export_model(build(cfg["model"]), original, input_shape=(1, 28, 28))
    recipe = {**TRAIN_DEFAULTS, "seed": 0}
    if args.quick:
        recipe["subset"] = QUICK["subset"]
    epochs = QUICK["epochs"] if args.quick else cfg["epochs"]
    timings: dict[str, float] = {}

    # 1. dense baseline (a cached stage: skipped when done with the same settings and initial model)
    baseline = work / "baseline.onnx"
    options = {**recipe, "data": "fashion-mnist", "method": "none", "batchnorm": "train", "epochs": epochs}

    def train_baseline() -> dict[str, Any]:
        t0 = time.perf_counter()
        result = train_stage(original, baseline, work / "baseline.ckpt", options, **runtime)
        if result.interrupted:
            raise KeyboardInterrupt
        return {"seconds": round(time.perf_counter() - t0, 1)}

    saved = Stage("baseline", options, [original], [baseline], train_baseline, work / "stages")()
    timings["baseline_training"] = saved["seconds"]

    # 2. Network Slimming pipeline (its stages skip themselves)
    print(f"[{key}] slim: sparsity training, pruning, fine-tuning, optimize", file=sys.stderr)
    t0 = time.perf_counter()
    slim_out = work / "slim.onnx"
    slimmed = slim(original, slim_out, data="fashion-mnist", slim_lambda=cfg["slim_lambda"],
                   prune_ratio=cfg["prune_ratio"], round_to=cfg["round_to"], epochs=epochs, lr=recipe["lr"],
                   work_dir=work / "slim", validate=True, evaluate=True, **runtime,
                   **{k: v for k, v in recipe.items() if k != "lr"})
    if slimmed.interrupted:
        raise KeyboardInterrupt
    timings.update({f"slim_{s.name}": s.seconds for s in slimmed.stages})

    # 3. optimized baseline, accuracy, stats, latency side by side
    t0 = time.perf_counter()
    base_opt = out_dir / f"{key}-baseline.onnx"
    slim_final = out_dir / f"{key}-slim.onnx"
    opt = api.optimize(baseline, base_opt, target="cpu", validate=True, data="fashion-mnist")
    if not opt.ok:
        raise RuntimeError(f"optimized baseline failed validation: {opt.validation.message}")
    shutil.copyfile(slim_out, slim_final)
    models = {"baseline": base_opt, "slim": slim_final}
    acc = {k: evaluate(p, "fashion-mnist", split="test", batch_size=500).accuracy for k, p in models.items()}
    stats = {k: model_stats(modelio.load_model(p), file_bytes=p.stat().st_size) for k, p in models.items()}
    latency = _latency(models, args.threads)
    stage_rows = {s.name: {"params": s.params, "macs": s.macs, "accuracy": s.accuracy, "seconds": s.seconds,
                           "reused": s.reused} for s in slimmed.stages}
    prune = slimmed.stage("prune").details
    sparse = slimmed.stage("sparse").details
    out: dict[str, Any] = {
        "model": cfg["model"],
        "recipe": {**recipe, "epochs_each_stage": epochs, "slim_lambda": cfg["slim_lambda"],
                   "prune_ratio": cfg["prune_ratio"], "round_to": cfg["round_to"], "threads": args.threads},
        "accuracy": {"baseline": acc["baseline"], "slim": acc["slim"],
                     "sparse_trained": stage_rows["sparse"]["accuracy"], "pruned_before_finetune": stage_rows["prune"]["accuracy"]},
        "accuracy_drop_pt": round(100 * (acc["baseline"] - acc["slim"]), 2),
        "params": {k: s.params for k, s in stats.items()},
        "params_ratio": stats["baseline"].params / stats["slim"].params,
        "macs": {k: s.macs for k, s in stats.items()},
        "macs_ratio": stats["baseline"].macs / stats["slim"].macs,
        "latency": latency,
        "file_bytes": {k: s.file_bytes for k, s in stats.items()},
        "files": {k: str(p.relative_to(ROOT)) for k, p in models.items()},
        "threshold": prune.get("threshold"),
        "pruned_channels": prune.get("pruned_channels"),
        "prunable_bn_channels": prune.get("prunable_bn_channels"),
        "gamma_after_sparsity_training": {k: sparse.get(k) for k in ("small_fraction", "abs_gamma_quantiles", "penalty")},
        "conv_widths": {"baseline": _conv_widths(base_opt), "slim": _conv_widths(slim_final)},
        "residual_adds": {"baseline": _add_widths(base_opt), "slim": _add_widths(slim_final)},
        "stages": stage_rows,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    out["round_to_study"] = _round_to_study(work, slimmed, args.threads)
    out["timings_seconds"]["measurements_this_invocation"] = round(time.perf_counter() - t0, 1)
    out["timings_seconds"]["total_when_run_from_scratch"] = round(sum(timings.values()), 1)
    out["targets"] = _targets(out, cfg["targets"])
    return out


def _latency(models: dict[str, Path], threads: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for batch, repeats in tqdm(list(LATENCY_REPEATS.items()), desc="latency", unit="batch size", file=sys.stderr):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        lat = measure_latency(models, [x], repeats=repeats, warmup=5, threads=threads)
        rows[f"batch_{batch}"] = {"baseline_ms": round(lat["baseline"].median_ms, 4), "slim_ms": round(lat["slim"].median_ms, 4),
                                  "speedup": round(lat["baseline"].median_ms / lat["slim"].median_ms, 3), "repeats": repeats}
    return rows


def _round_to_study(work: Path, slimmed, threads: int) -> dict[str, Any]:
    """The sparse model pruned at the pipeline's threshold with kept counts rounded to 1, 8, 16,
    optimized, and timed side by side (no fine-tuning: latency and MACs only)."""
    sparse = modelio.load_model(work / "slim" / "sparse.onnx")
    threshold = slimmed.stage("prune").details["threshold"]
    paths: dict[str, Path] = {}
    macs: dict[str, int] = {}
    widths: dict[str, list[int]] = {}
    for r in (1, 8, 16):
        pruned = SlimChannelsPass(threshold=threshold, round_to=r).apply(sparse).model
        src, dst = work / f"round{r}-pruned.onnx", work / f"round{r}.onnx"
        modelio.save_model(pruned, src)
        api.optimize(src, dst, target="cpu", validate=False, pass_options={"remove_channels": {"round_to": r}})
        paths[f"round_to_{r}"] = dst
        macs[f"round_to_{r}"] = model_stats(modelio.load_model(dst)).macs
        widths[f"round_to_{r}"] = _conv_widths(dst)
    study: dict[str, Any] = {"macs": macs, "conv_widths": widths}
    rng = np.random.default_rng(1)
    for batch, repeats in LATENCY_REPEATS.items():
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        lat = measure_latency(paths, [x], repeats=repeats, warmup=5, threads=threads)
        study[f"batch_{batch}_ms"] = {k: round(v.median_ms, 4) for k, v in lat.items()}
    return study


def _conv_widths(path: Path) -> list[int]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def _add_widths(path: Path) -> list[list[int | None]]:
    """Channel counts of both inputs of every Add on 4-D tensors (residual adds), in graph order."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    rows = []
    for node in model.graph.node:
        if node.op_type == "Add" and all(len(shapes.get(i, [])) == 4 for i in node.input):
            rows.append([shapes[i][1] for i in node.input])
    return rows


def _targets(out: dict[str, Any], targets: dict[str, float]) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    if "params_ratio" in targets:
        checks[f"params_ratio>={targets['params_ratio']:g}"] = out["params_ratio"] >= targets["params_ratio"]
    checks[f"macs_ratio>={targets['macs_ratio']:g}"] = out["macs_ratio"] >= targets["macs_ratio"]
    checks[f"accuracy_drop<={targets['max_accuracy_drop_pt']:g}pt"] = out["accuracy_drop_pt"] <= targets["max_accuracy_drop_pt"]
    if "latency_vs_macs" in targets:
        bound = targets["latency_vs_macs"] * out["macs_ratio"]
        for name, row in out["latency"].items():
            checks[f"speedup_{name}>={targets['latency_vs_macs']:g}xMACs_ratio"] = row["speedup"] >= bound
    if out["residual_adds"]["baseline"]:
        slim_adds = out["residual_adds"]["slim"]
        checks["residual_adds_consistent"] = (len(slim_adds) == len(out["residual_adds"]["baseline"])
                                              and all(a == b for a, b in slim_adds))
    checks["files<=10MB"] = all(v <= MAX_FILE_BYTES for v in out["file_bytes"].values())
    return checks


def summary_table(results: dict[str, Any]) -> str:
    rows = []
    for key, r in results.items():
        lat = r["latency"]
        rows.append((key, r["model"], report.percent(r["accuracy"]["baseline"]), report.percent(r["accuracy"]["slim"]),
                     f"{r['accuracy_drop_pt']:+.2f}", f"{r['params_ratio']:.1f}x", f"{r['macs_ratio']:.1f}x",
                     f"{lat['batch_1']['speedup']:.2f}x", f"{lat['batch_64']['speedup']:.2f}x",
                     "yes" if all(r["targets"].values()) else "NO: " + ", ".join(k for k, v in r["targets"].items() if not v)))
    return report.table(("net", "model", "baseline acc", "slim acc", "drop pt", "params", "MACs", "lat b1", "lat b64",
                         "targets met"), rows, left=2)


def _apply_overrides(settings: list[str]) -> None:
    for item in settings:
        name, _, value = item.partition("=")
        key, _, field = name.partition(".")
        if key not in CONFIGS or not field or not value:
            raise SystemExit(f"--set expects NET.FIELD=VALUE with NET in {', '.join(CONFIGS)}, got '{item}'")
        CONFIGS[key][field] = json.loads(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['subset']} training images, 1 epoch per stage")
    parser.add_argument("--fresh", action="store_true", help="delete earlier work and start over")
    parser.add_argument("--set", action="append", default=[], metavar="NET.FIELD=VALUE", help="override a setting (JSON value)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/slimming.json)")
    args = parser.parse_args(argv)
    _apply_overrides(args.set)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown:
        parser.error(f"unknown model key(s) {unknown}; choose from {', '.join(CONFIGS)}")
    global WORK
    if args.quick:
        WORK = WORK.with_name("slimming-quick")
    if args.fresh and WORK.exists():
        shutil.rmtree(WORK)
    out_path = args.out or RESULTS / ("slimming-quick.json" if args.quick else "slimming.json")
    start, load_start = time.perf_counter(), os.getloadavg()
    test_set = load_dataset("fashion-mnist", "test")
    results: dict[str, Any] = {}
    previous = json.loads(out_path.read_text()).get("results", {}) if out_path.exists() else {}
    for key in keys:
        results[key] = run_model(key, CONFIGS[key], args, test_set)
    results = {**{k: v for k, v in previous.items() if k not in results}, **results}
    doc = {
        "benchmark": "Network Slimming on Fashion-MNIST (benchmarks/slimming.py)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
                        "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "wall_seconds_this_invocation": round(time.perf_counter() - start, 1),
        "configs": {k: CONFIGS[k] for k in results if k in CONFIGS},
        "results": results,
    }
    out_path.write_text(json.dumps(doc, indent=1, default=_default))
    print(summary_table(results))
    shown = out_path.resolve().relative_to(ROOT) if out_path.resolve().is_relative_to(ROOT) else out_path
    print(f"\nwrote {shown} in {doc['wall_seconds_this_invocation']:.0f} s")
    return 0


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
