"""Benchmark: sparse + low-rank splitting (pass ``sparse-lowrank``), measured with onnxruntime.

(a) ``vgg16`` (VGG-16's 13 conv layers at 3/8 width) trained here on Fashion-MNIST with
    onnxruntime-training: baseline accuracy, accuracy after the split and after fine-tuning,
    parameter and MAC ratios, onnxruntime CPU latency ratios at batch 1 and 64 measured side by
    side in one process, on one thread and on all cores (``--latency-threads``). The three ONNX
    files are kept in ``benchmarks/results/sparse_lowrank/`` (each under 10 MB). A baseline
    already there is reused (``--retrain`` trains a new one); the split and the fine-tuning are
    cached stages (``stages/*.json``: redone when their input file or settings change).
(b) ``vgg16-imagenet`` (torchvision VGG-16, random weights, 138M parameters, 224x224x3) calibrated on
    Fashion-MNIST images upsampled to 224x224x3: the pass runs in a child process that reports its
    wall time and peak memory; then latency ratios at batch 1 and 8 side by side, and per layer the
    relative post-activation reconstruction error.

For every split layer the JSON also compares, at (at least) the same MACs, the post-activation
error of the chosen sparse + low-rank split with low-rank alone (truncated SVD of the weight, and
the same ADMM fit with no sparse part) and sparse alone (ADMM with no low-rank part), all on
held-out calibration images.

    python benchmarks/sparse_lowrank.py                      # full run (about 40 minutes on 2 cores)
    python benchmarks/sparse_lowrank.py --quick              # reduced configuration (minutes)
    python benchmarks/sparse_lowrank.py --parts a --retrain  # only (a), training a new baseline
    (a part run alone keeps the other part's results in the JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxdns import modelio, runtime
from onnxdns.data import load_dataset
from onnxdns.lowrank.finetune import finetune
from onnxdns.models import export_model
from onnxdns.passes.fold_batchnorm import FoldBatchNormPass
from onnxdns.sources import model_inputs
from onnxdns.sources.datasets import DatasetSource
from onnxdns.workflows.evaluate import evaluate
from onnxdns.workflows.sparse_lowrank import SparseLowRank
from onnxdns.stats import model_stats
from onnxdns.validate import measure_latency
from stages import Stage, rel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MAX_FILE_BYTES = 10 * 2 ** 20


# --------------------------------------------------------------------------- (a) Fashion-MNIST


def train_baseline(args: argparse.Namespace, models: Path, log: dict) -> Path:
    """The trained vgg16 baseline (reused from an earlier run unless --retrain)."""
    baseline = models / "vgg16-fmnist-baseline.onnx"
    info = baseline.with_suffix(".json")
    if baseline.exists() and info.exists() and not args.retrain:
        log["baseline_training"] = {**json.loads(info.read_text()), "reused": True}
        return baseline
    with tempfile.TemporaryDirectory(prefix="slr-bench-") as tmp:
        src = export_model("vgg16", Path(tmp) / "vgg16.onnx")
        t0 = time.perf_counter()
        from onnxdns.training import train

        result = train(src, Path(tmp) / "trained.onnx", checkpoint_dir=Path(tmp) / "ckpt", method="none",
                       data="fashion-mnist", epochs=args.epochs, batch_size=64, lr=args.lr, schedule="cosine",
                       momentum=0.9, weight_decay=5e-4, seed=0, threads=args.threads, progress=True)
        trained = modelio.load_model(result.output)
    folded = FoldBatchNormPass()(trained)
    modelio.save_model(folded, baseline)
    record = {"epochs": args.epochs, "lr": args.lr, "batch_size": 64, "schedule": "cosine", "steps": result.steps,
              "seconds": round(time.perf_counter() - t0, 1),
              "test_accuracy_per_epoch": [h.test_accuracy for h in result.history],
              "note": "BatchNormalization folded into the convolutions after training (exact)"}
    info.write_text(json.dumps(record, indent=1) + "\n")
    log["baseline_training"] = {**record, "reused": False}
    return baseline


def part_a(args: argparse.Namespace) -> dict[str, Any]:
    models_dir = args.out.with_suffix("")
    models_dir.mkdir(parents=True, exist_ok=True)
    stages = models_dir / "stages"
    out: dict[str, Any] = {"model": "vgg16 (width 3/8, 28x28x1, Fashion-MNIST)"}
    baseline_path = train_baseline(args, models_dir, out)
    test = load_dataset("fashion-mnist", "test")
    split_path = models_dir / "vgg16-fmnist-split.onnx"
    tuned_path = models_dir / "vgg16-fmnist-split-finetuned.onnx"

    # 1. the pass (cached: a rerun with the same baseline and settings reuses the split model)
    def run_split() -> dict:
        t0 = time.perf_counter()
        slr = SparseLowRank("fashion-mnist", target_speedup=args.target_speedup,
                            target_compression=args.target_compression or None, calib_samples=args.calib_samples,
                            iterations=args.iterations, compare=True, threads=args.threads, progress=True)
        applied = slr.apply(modelio.to_ir(modelio.load_model(baseline_path)))
        seconds = time.perf_counter() - t0
        modelio.save_model(modelio.to_proto(applied.model), split_path)
        return {"pass_seconds": round(seconds, 1), "threads": args.threads, "details": applied.details}

    split = Stage("split", {"target_speedup": args.target_speedup, "target_compression": args.target_compression or None,
                            "calib_samples": args.calib_samples, "iterations": args.iterations},
                  [baseline_path], [split_path], run_split, stages)
    split_record = split()

    # 2. fine-tuning of the split model in the onnxruntime-training loop (cached likewise)
    tuned = None
    if args.finetune_epochs > 0:
        def run_finetune() -> dict:
            model = modelio.to_ir(modelio.load_model(split_path))
            ft = finetune(model, "fashion-mnist", epochs=args.finetune_epochs, lr=args.finetune_lr,
                          threads=args.threads, progress=True)
            modelio.save_model(modelio.to_proto(model), tuned_path)
            return {**ft, "threads": args.threads}

        tuning = Stage("finetune", {"epochs": args.finetune_epochs, "lr": args.finetune_lr}, [split_path], [tuned_path],
                       run_finetune, stages)
        out["finetune"] = {**tuning(), "reused": tuning.reused}
        tuned = tuned_path
    applied_details = split_record["details"]
    pass_seconds = split_record["pass_seconds"]
    out["pass_reused"] = split.reused
    out["pass_threads"] = split_record["threads"]

    models = {"baseline": baseline_path, "split": split_path}
    if tuned is not None:
        models["finetuned"] = tuned
    accuracy = {label: _accuracy(path, test) for label, path in
                tqdm(list(models.items()), desc="(a) test accuracy", unit="model")}
    latency = _latency(models, {1: args.repeats, 64: max(5, args.repeats // 4)}, (1, 28, 28), args.latency_threads,
                       test)
    stats = {label: model_stats(modelio.load_model(p), file_bytes=p.stat().st_size) for label, p in models.items()}
    final = "finetuned" if tuned is not None else "split"
    out.update({
        "pass_seconds": round(pass_seconds, 1),
        "pass_details": applied_details,
        "narrowed": applied_details.get("narrowed"),
        "accuracy": accuracy,
        "accuracy_loss_points": {k: round(100 * (accuracy["baseline"] - v), 2)
                                 for k, v in accuracy.items() if k != "baseline"},
        "params": {k: s.params for k, s in stats.items()},
        "params_ratio": stats["baseline"].params / stats[final].params,
        "macs": {k: s.macs for k, s in stats.items()},
        "macs_ratio": stats["baseline"].macs / stats[final].macs,
        "latency": latency,
        "files": {k: rel(p) for k, p in models.items()},
        "file_bytes": {k: s.file_bytes for k, s in stats.items()},
    })
    out["targets"] = {
        "params_ratio>=4": out["params_ratio"] >= 4,
        **{f"speedup>=2.2 (batch 1 and 64, {t.replace('_', ' ')})": all(v[f"speedup_{final}"] >= 2.2 for v in rows.values())
           for t, rows in latency.items()},
        "accuracy_loss<=1pt": out["accuracy_loss_points"][final] <= 1.0,
        "files<=10MB": all(s.file_bytes <= MAX_FILE_BYTES for s in stats.values()),
    }
    return out


def _accuracy(path: Path, dataset, batch: int = 500) -> float:
    """Top-1 accuracy of the model at ``path`` on ``dataset`` (the workflows' evaluator, onnxruntime CPU)."""
    source = DatasetSource("fashion-mnist", model_inputs(path), dataset=dataset)
    return evaluate(path, source, batch_size=batch).accuracy


def _latency(models: dict[str, Path], batches: dict[int, int], shape: tuple[int, ...], threads: list[int],
             dataset=None) -> dict:
    """Median latency of every model, side by side in this process (sessions without spin-waiting),
    per onnxruntime intra-op thread count and batch size."""
    out: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for t in threads:
        rows = {}
        for batch, repeats in tqdm(list(batches.items()), desc=f"latency, {t} thread(s)", unit="batch size"):
            if dataset is not None:
                x = np.asarray(dataset.images[:batch], np.float32)
            else:
                x = rng.standard_normal((batch, *shape)).astype(np.float32)
            lat = measure_latency(models, [x], repeats=repeats, warmup=3, threads=t)
            row = {f"{k}_ms": round(v.median_ms, 3) for k, v in lat.items()}
            base = lat["baseline"].median_ms
            row.update({f"speedup_{k}": round(base / v.median_ms, 3) for k, v in lat.items() if k != "baseline"})
            row["repeats"] = repeats
            rows[f"batch_{batch}"] = row
        out[f"threads_{t or 'all'}"] = rows
    return out


# --------------------------------------------------------------------------- (b) ImageNet VGG-16


def imagenet_worker(config: dict) -> dict:
    """Child process: export VGG-16, run the pass, save the result; report time and peak memory."""
    src = Path(config["src"])
    if not src.exists():
        export_model("vgg16-imagenet", src)
    model = modelio.load_model(src)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    slr = SparseLowRank(config["calib_data"], target_speedup=config["target_speedup"],
                        calib_samples=config["calib_samples"], iterations=config["iterations"],
                        max_rows=config["max_rows"], compare=True, threads=config["threads"], progress=True)
    applied = slr.apply(modelio.to_ir(model))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    modelio.save_model(modelio.to_proto(applied.model), config["dst"])
    return {"pass_seconds": round(seconds, 1), "peak_rss_mib": round(peak / 1024, 1),
            "rss_before_pass_mib": round(rss_before / 1024, 1), "details": applied.details}


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="slr-bench-imagenet-") as tmp:
        src, dst, report = Path(tmp) / "vgg16.onnx", Path(tmp) / "vgg16-split.onnx", Path(tmp) / "worker.json"
        export_model("vgg16-imagenet", src)
        config = {"src": str(src), "dst": str(dst), "calib_data": "fashion-mnist", "calib_samples": args.imagenet_calib,
                  "target_speedup": args.imagenet_speedup, "iterations": args.iterations,
                  "max_rows": args.imagenet_max_rows, "threads": args.threads, "report": str(report)}
        print(f"(b) running the pass on VGG-16 (224x224) in a child process, {args.imagenet_calib} calibration images",
              file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--imagenet-worker", json.dumps(config)], check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the ImageNet worker failed with status {proc.returncode}")
        worker = json.loads(report.read_text())
        stats = {"original": model_stats(modelio.load_model(src, check=False), file_bytes=src.stat().st_size),
                 "split": model_stats(modelio.load_model(dst, check=False), file_bytes=dst.stat().st_size)}
        batches = {1: args.imagenet_repeats, 8: max(3, args.imagenet_repeats // 2)}
        latency = _latency({"baseline": src, "split": dst}, batches, (3, 224, 224), args.latency_threads)
    details = worker["details"]
    return {
        "model": "vgg16-imagenet (torchvision VGG-16, random weights, 224x224x3)",
        "calibration": details["calibration"],
        "pass_seconds": worker["pass_seconds"],
        "pass_peak_rss_mib": worker["peak_rss_mib"],
        "rss_before_pass_mib": worker["rss_before_pass_mib"],
        "params": {k: s.params for k, s in stats.items()},
        "macs": {k: s.macs for k, s in stats.items()},
        "macs_ratio": stats["original"].macs / stats["split"].macs,
        "latency": latency,
        "pass_details": details,
    }


# --------------------------------------------------------------------------- comparison and summary


def equal_macs_comparison(details: dict) -> dict[str, Any]:
    """Per split layer, errors at (at least) equal MACs: the chosen split, the best split using both
    parts, low-rank alone (truncated SVD; ADMM) and sparse alone (ADMM)."""
    keys = ("mixed_admm", "lowrank_svd", "lowrank_admm", "sparse_admm")
    rows = []
    for r in details["layers"]:
        if r["status"] != "split" or "baselines" not in r:
            continue
        b = r["baselines"]
        row = {"layer": r["name"], "rank": r["rank"], "keep": r["keep"], "macs": r["macs_after"],
               "chosen": r["rel_error"]}
        for key in keys:
            if key in b:
                row[key] = b[key]["rel_error"]
                row[f"{key}_macs"] = b[key]["macs"]
                if key == "mixed_admm":
                    row["mixed_rank"], row["mixed_keep"] = b[key]["rank"], b[key]["keep"]
        pure = [row[k] for k in ("lowrank_svd", "lowrank_admm", "sparse_admm") if k in row]
        family = min([row["chosen"]] + ([row["mixed_admm"]] if "mixed_admm" in row else []))
        row["sparse_lowrank"] = family
        row["sparse_lowrank_lowest"] = all(family <= p for p in pure)
        row["mixed_beats_both_pure"] = "mixed_admm" in row and all(row["mixed_admm"] < p for p in pure)
        rows.append(row)
    return {
        "note": "sparse_lowrank = the lower of the chosen split and the best split with both parts; all errors "
                "are relative post-activation errors on held-out calibration images, baselines at >= the same MACs",
        "layers": rows,
        "sparse_lowrank_lowest_in": sum(r["sparse_lowrank_lowest"] for r in rows),
        "mixed_beats_both_pure_in": sum(r["mixed_beats_both_pure"] for r in rows),
        "below_truncated_svd_in": sum(r["sparse_lowrank"] < r.get("lowrank_svd", float("inf")) for r in rows),
        "layers_compared": len(rows),
    }


def summary(report: dict) -> str:
    lines = []
    a = report.get("a")
    if a:
        lines.append("(a) vgg16 on Fashion-MNIST")
        lines.append(f"{'model':10s} {'threads':>7s} {'accuracy':>9s} {'params':>10s} {'MACs':>12s} {'b1 ms':>8s} "
                     f"{'b64 ms':>8s} {'b1 x':>6s} {'b64 x':>6s}")
        for t, lat in a["latency"].items():
            for k in a["accuracy"]:
                b1, b64 = lat["batch_1"], lat["batch_64"]
                lines.append(f"{k:10s} {t.split('_')[1]:>7s} {100 * a['accuracy'][k]:8.2f}% {a['params'][k]:10,d} "
                             f"{a['macs'][k]:12,d} {b1[k + '_ms']:8.3f} {b64[k + '_ms']:8.2f} "
                             f"{b1.get('speedup_' + k, 1.0):6.2f} {b64.get('speedup_' + k, 1.0):6.2f}")
        lines.append(f"params {a['params_ratio']:.2f}x fewer, MACs {a['macs_ratio']:.2f}x fewer; targets: "
                     + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in a["targets"].items()))
    b = report.get("b")
    if b:
        lines.append("")
        lines.append("(b) VGG-16 ImageNet-size (random weights)")
        lines.append(f"pass {b['pass_seconds']:.0f} s, peak RSS {b['pass_peak_rss_mib']:.0f} MiB; "
                     f"MACs {b['macs_ratio']:.2f}x fewer")
        for t, lat in b["latency"].items():
            lines.append(f"  {t.replace('_', ' ')}: speed-up batch 1 {lat['batch_1']['speedup_split']:.2f}x "
                         f"({lat['batch_1']['baseline_ms']:.1f} -> {lat['batch_1']['split_ms']:.1f} ms), batch 8 "
                         f"{lat['batch_8']['speedup_split']:.2f}x ({lat['batch_8']['baseline_ms']:.1f} -> "
                         f"{lat['batch_8']['split_ms']:.1f} ms)")
    for part in ("a", "b"):
        cmp = report.get(f"{part}_equal_macs")
        if not cmp:
            continue
        lines.append("")
        lines.append(f"({part}) relative post-activation error at >= equal MACs (held-out calibration images)")
        lines.append(f"{'layer':28s} {'r':>4s} {'kept':>5s} {'chosen':>7s} {'mixed':>7s} {'SVD':>7s} {'L admm':>7s} "
                     f"{'S admm':>7s}")
        for r in cmp["layers"]:
            def f(key):
                return f"{r[key]:7.4f}" if key in r else f"{'-':>7s}"
            lines.append(f"{r['layer'][-28:]:28s} {r['rank']:4d} {r['keep']:5d} {f('chosen')} {f('mixed_admm')} "
                         f"{f('lowrank_svd')} {f('lowrank_admm')} {f('sparse_admm')}")
        n = cmp["layers_compared"]
        lines.append(f"sparse+low-rank (chosen or best mixed) lowest in {cmp['sparse_lowrank_lowest_in']}/{n} layers, "
                     f"below truncated SVD in {cmp['below_truncated_svd_in']}/{n}; a split with both parts beats "
                     f"both pure forms in {cmp['mixed_beats_both_pure_in']}/{n}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b", help="a, b or a,b")
    parser.add_argument("--quick", action="store_true", help="reduced configuration for a smoke run")
    parser.add_argument("--retrain", action="store_true", help="train a new baseline even if one is stored")
    parser.add_argument("--epochs", type=float, default=4.0, help="baseline training epochs")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--target-speedup", type=float, default=2.2)
    parser.add_argument("--target-compression", type=float, default=3.0,
                        help="parameter reduction required as well (0: none)")
    parser.add_argument("--calib-samples", type=int, default=2048)
    parser.add_argument("--iterations", type=int, default=10, help="ADMM iterations")
    parser.add_argument("--finetune-epochs", type=float, default=4.0)
    parser.add_argument("--finetune-lr", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=300, help="latency repeats at batch 1 for (a)")
    parser.add_argument("--imagenet-calib", type=int, default=64)
    parser.add_argument("--imagenet-speedup", type=float, default=2.5)
    parser.add_argument("--imagenet-max-rows", type=int, default=8192)
    parser.add_argument("--imagenet-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime and BLAS threads of training and the pass "
                        "(0: all cores)")
    parser.add_argument("--latency-threads", default="1,0",
                        help="onnxruntime intra-op thread counts to measure latency at (0: all cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (models go to the folder of the same name); default "
                             "benchmarks/results/sparse_lowrank.json, or sparse_lowrank_quick.json with --quick")
    parser.add_argument("--imagenet-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.imagenet_worker:
        config = json.loads(args.imagenet_worker)
        Path(config["report"]).write_text(json.dumps(imagenet_worker(config)))
        return 0
    if args.out is None:
        args.out = RESULTS / ("sparse_lowrank_quick.json" if args.quick else "sparse_lowrank.json")
    if args.quick:
        args.epochs, args.calib_samples = min(args.epochs, 0.3), 1024
        args.finetune_epochs = min(args.finetune_epochs, 0.1)
        args.repeats, args.iterations, args.imagenet_calib, args.imagenet_repeats = 20, 5, 8, 3
        args.imagenet_max_rows = 4096
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.latency_threads = [int(t) for t in args.latency_threads.split(",") if t.strip()]
    report: dict[str, Any] = {
        "benchmark": "sparse_lowrank",
        "command": "python benchmarks/sparse_lowrank.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__,
                    "onnx": onnx.__version__},
    }
    if args.out.exists():  # keep the parts not rerun now
        previous = json.loads(args.out.read_text())
        for part in ("a", "b"):
            if part not in parts:
                for key in (part, f"{part}_equal_macs", f"{part}_command"):
                    if key in previous:
                        report[key] = previous[key]
    start = time.time()
    if "a" in parts:
        report["a"] = part_a(args)
        report["a_equal_macs"] = equal_macs_comparison(report["a"]["pass_details"])
        report["a_command"] = report["command"]
    if "b" in parts:
        report["b"] = part_b(args)
        report["b_equal_macs"] = equal_macs_comparison(report["b"]["pass_details"])
        report["b_command"] = report["command"]
    report["wall_seconds_this_invocation"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
