"""Benchmark: exact channel removal on the model zoo, measured on the emitted ONNX files.

For every zoo model (seed-0 weights, fresh BatchNorm statistics) a random half of the output
channels of every prunable layer is zeroed (``onnxdns.synthetic.zero_channels``), as a
structured pruning method would leave them. The zeroed model is optimised with the default CPU
pipeline (``onnxdns.api.optimize``: fold, remove channels, clean up, sparse storage), checked
for exactness against the zeroed model, and both files are measured side by side in one
process: parameters, non-zeros, MACs, bytes on disk, onnxruntime CPU latency at batch 1 and 32
(median of repeated interleaved runs). Both ONNX files are kept under ``benchmarks/results/``.

    python benchmarks/remove_channels.py                 # all models, JSON to benchmarks/results/
    python benchmarks/remove_channels.py --models lenet-5,resnet-20 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from onnxdns import api, modelio
from onnxdns.models import INPUT_SHAPES, MODELS, build
from onnxdns.synthetic import zero_channels
from onnxdns.testing import export_module, output_difference
from onnxdns.validate import measure_latency

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = [name for name in MODELS if name != "vgg16-imagenet"]


def run_model(name: str, fraction: float, repeats: int, out_dir: Path, threads: int) -> dict:
    original = export_module(build(name), INPUT_SHAPES[name])
    zeroed, channels = zero_channels(original, fraction, seed=0)
    zeroed_path = modelio.save_model(zeroed, out_dir / f"{name}-zeroed.onnx")
    optimized_path = out_dir / f"{name}-optimized.onnx"
    result = api.optimize(zeroed_path, optimized_path, target="cpu", validate=False)
    optimized = modelio.load_model(optimized_path)
    rng = np.random.default_rng(1)
    check = {"input": rng.standard_normal((8, *INPUT_SHAPES[name])).astype(np.float32)}
    diff, scale = output_difference(zeroed, optimized, check)
    latency = {}
    for batch in (1, 32):
        feeds = {"input": rng.standard_normal((batch, *INPUT_SHAPES[name])).astype(np.float32)}
        lat = measure_latency({"zeroed": zeroed_path, "optimized": optimized_path}, feeds, repeats=repeats, warmup=5, threads=threads)
        latency[f"batch_{batch}"] = {
            "zeroed_ms": lat["zeroed"].median_ms,
            "optimized_ms": lat["optimized"].median_ms,
            "speedup": lat["zeroed"].median_ms / lat["optimized"].median_ms,
        }
    removal = next(p.details for p in result.passes if p.name == "remove-channels")
    before, after = result.before, result.after
    return {
        "model": name,
        "zeroed_channels": int(sum(len(c) for c in channels.values())),
        "removed_channels": removal["total_removed_channels"],
        "kept_constant_channels": int(sum(len(v) for v in removal["constant_kept"].values())),
        "kept_reasons": sorted({r.split(" ")[0] + " " + r.split(" ")[1] for v in removal["constant_kept"].values() for r in v.values()}),
        "max_abs_diff": diff,
        "output_scale": scale,
        "params": {"zeroed": before.params, "optimized": after.params, "ratio": before.params / after.params},
        "nonzeros": {"zeroed": before.nonzeros, "optimized": after.nonzeros},
        "macs": {"zeroed": before.macs, "optimized": after.macs, "ratio": before.macs / after.macs},
        "bytes": {"zeroed": before.file_bytes, "optimized": after.file_bytes, "ratio": before.file_bytes / after.file_bytes},
        "nodes": {"zeroed": before.nodes, "optimized": after.nodes},
        "latency": latency,
        "files": {"zeroed": _display(zeroed_path), "optimized": _display(optimized_path)},
    }


def _display(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    root = RESULTS.parent.parent
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=RESULTS / "remove_channels.json")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"remove_channels.py: error: unknown model(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    model_dir = args.out.parent / "remove_channels"
    model_dir.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.time()
    for name in tqdm(names, desc="models", unit="model"):
        rows.append(run_model(name, args.fraction, args.repeats, model_dir, args.threads))
    report = {
        "benchmark": "remove_channels",
        "command": "python benchmarks/remove_channels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "fraction_zeroed": args.fraction,
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__},
        "wall_seconds": round(time.time() - start, 1),
        "models": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    header = f"{'model':15s} {'removed':>8s} {'kept':>5s} {'params x':>8s} {'MACs x':>7s} {'bytes x':>8s} {'b1 speedup':>10s} {'b32 speedup':>11s} {'max diff':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:15s} {r['removed_channels']:8d} {r['kept_constant_channels']:5d} {r['params']['ratio']:8.2f} "
              f"{r['macs']['ratio']:7.2f} {r['bytes']['ratio']:8.2f} {r['latency']['batch_1']['speedup']:10.2f} "
              f"{r['latency']['batch_32']['speedup']:11.2f} {r['max_abs_diff']:9.2e}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
