"""Benchmark: optimize on large models (issue 13): wall and CPU time, peak RSS, exactness.

Three models, built here (none is committed; they are deleted afterwards unless ``--keep``):

* ``vgg16``: torchvision's VGG-16 (138,357,544 parameters), one ONNX file (``onnxdns export``);
* ``vgg16-external``: the same model saved with its weights in ``vgg16-external.onnx.data``;
* ``mlp-2gb``: a stack of fully connected layers over 2 GB (random weights, external data,
  since one protobuf cannot hold it).

Each is optimized with the default CPU pipeline and validated (``onnxdns.api.optimize``, as
``onnxdns optimize M -o OUT --target cpu`` does) in a fresh child process, one at a time. The
parent reads the child's peak RSS and CPU times from ``wait4``; the child reports the time of
every pass and of the phases around them (load, statistics, save, structure check, load check,
numeric comparison) by timing those functions. Peak RSS is given as a ratio to the model's
bytes on disk (file plus data file).

    python benchmarks/large_models.py                       # all, JSON to benchmarks/results/
    python benchmarks/large_models.py --models vgg16 --work /tmp/big
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("vgg16", "vgg16-external", "mlp-2gb")
#: The phases timed in the child: (module, function, label).
PHASES = (
    ("onnxdns.modelio", "load_ir", "load"),
    ("onnxdns.api", "model_stats", "statistics"),
    ("onnxdns.modelio", "save_model", "save"),
    ("onnxdns.api", "_structure", "structure check"),
    ("onnxdns.api", "_load_check", "load check (output session)"),
    ("onnxdns.validate", "compare", "numeric comparison (input session, runs)"),
)


# --------------------------------------------------------------------------- models


def build_vgg16(work: Path) -> Path:
    path = work / "vgg16.onnx"
    subprocess.run([sys.executable, "-m", "onnxdns", "-q", "export", "vgg16-imagenet", "-o", str(path)], check=True)
    return path


def build_vgg16_external(work: Path, vgg16: Path) -> Path:
    from onnxdns import modelio

    path = work / "vgg16-external.onnx"
    model = modelio.load_ir(vgg16).model
    modelio.save_model(model, path, external_data=True)
    return path


def build_mlp(work: Path, width: int = 8192, layers: int = 8, classes: int = 1000) -> Path:
    """x[N, width] -> (Gemm width x width -> Relu) x layers -> Gemm -> y: 4 x (width^2 x layers)
    bytes of weights (8192 x 8 layers: 2.15 GB), written with external data."""
    import onnx_ir as ir

    from onnxdns import modelio

    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["N", width]))
    nodes, inits, h = [], [], x
    scale = np.float32(np.sqrt(2.0 / width))
    for i in range(layers + 1):
        rows = classes if i == layers else width
        w = ir.Value(name=f"W{i}", const_value=ir.tensor((rng.standard_normal((rows, width), dtype=np.float32) * scale), name=f"W{i}"))
        b = ir.Value(name=f"b{i}", const_value=ir.tensor(np.zeros(rows, np.float32), name=f"b{i}"))
        inits += [w, b]
        gemm = ir.node("Gemm", [h, w, b], attributes={"transB": 1}, name=f"fc{i}")
        nodes.append(gemm)
        h = gemm.outputs[0]
        h.name = f"h{i}"
        if i < layers:
            relu = ir.node("Relu", [h], name=f"relu{i}")
            nodes.append(relu)
            h = relu.outputs[0]
            h.name = f"r{i}"
    h.name = "y"
    h.type, h.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(["N", classes])
    graph = ir.Graph([x], [h], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="mlp")
    model = ir.Model(graph, ir_version=8, producer_name="onnxdns-benchmark")
    path = work / "mlp-2gb.onnx"
    modelio.save_model(model, path, external_data=True)
    return path


# --------------------------------------------------------------------------- measurement


def child(model: str, out: str) -> None:
    """Run optimize once; print one JSON line (passes, phases, validation, stats)."""
    import importlib

    import resource

    from onnxdns.framework import GraphPass

    phases: dict[str, float] = {}
    peaks: list[tuple[str, int]] = [("start", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)]

    def timed_call(func, label, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
            peaks.append((label, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))

    for module, name, label in PHASES:
        mod = importlib.import_module(module)
        setattr(mod, name, lambda *a, _f=getattr(mod, name), _l=label, **k: timed_call(_f, _l, *a, **k))
    run_logged = GraphPass._run_logged
    GraphPass._run_logged = lambda self, model: timed_call(run_logged, f"pass {self.name}", self, model)
    from onnxdns import api

    t0 = time.perf_counter()
    result = api.optimize(model, out, target="cpu")
    wall = time.perf_counter() - t0
    comparison = result.validation.comparison
    print(json.dumps({
        "optimize_wall_s": wall,
        "passes": [{"name": p.name, "seconds": p.seconds, "modified": p.modified} for p in result.passes],
        "phases_s": phases,
        # the process's peak RSS so far after each phase and pass, in order: where memory goes
        "peak_rss_bytes_after": peaks,
        "validation": {"status": result.validation.status, "message": result.validation.message,
                       "max_abs_diff": None if comparison is None else comparison.max_abs_diff},
        "before": {"parameters": result.before.params, "file_bytes": result.before.file_bytes},
        "after": {"parameters": result.after.params, "file_bytes": result.after.file_bytes},
    }))


def measure(model: Path, work: Path) -> dict:
    out = work / f"{model.stem}-optimized.onnx"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(model), str(out)], stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{model}: optimize failed (status {status})")
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    model_bytes = report["before"]["file_bytes"]
    peak = usage.ru_maxrss * 1024
    for f in (out, out.with_name(out.name + ".data")):
        f.unlink(missing_ok=True)
    return {
        "model_bytes": model_bytes,
        "process_wall_s": round(wall, 2),
        "user_s": round(usage.ru_utime, 2),
        "system_s": round(usage.ru_stime, 2),
        "peak_rss_bytes": peak,
        "peak_rss_over_model_bytes": round(peak / model_bytes, 2),
        **report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--work", help="folder for the models (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the built models")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("NAME", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "large_models.json"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.build:
        name, work = args.build[0], Path(args.build[1])
        return print(build_mlp(work) if name == "mlp-2gb" else build_vgg16_external(work, work / "vgg16.onnx"))
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    work = Path(args.work or tempfile.mkdtemp(prefix="onnxdns-large-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        vgg16 = None
        for name in names:
            if name in ("vgg16", "vgg16-external") and vgg16 is None:
                vgg16 = build_vgg16(work)
            path = vgg16 if name == "vgg16" else _build_in_child(name, work)
            row = {"model": name, "load_average_before": os.getloadavg(), **measure(path, work)}
            results.append(row)
            print(f"{name}: {row['process_wall_s']} s wall ({row['user_s']} s user, {row['system_s']} s system), "
                  f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB = {row['peak_rss_over_model_bytes']}x the model "
                  f"({row['model_bytes']:,} bytes); {row['validation']['status']}: {row['validation']['message']}",
                  flush=True)
            if path != vgg16:  # one multi-GB model on disk at a time
                for f in path.parent.glob(path.name + "*"):
                    f.unlink()
    finally:
        if not args.keep:
            _clean(work, temporary=not args.work)
    import onnx
    import onnxruntime

    payload = {
        "command": "python benchmarks/large_models.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ram_bytes": _ram()},
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "setup": "default CPU pipeline with numeric validation (random inputs), one child process per model; "
                 "peak RSS from wait4 (includes the interpreter and onnxruntime, ~290 MiB before any model is read)",
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.output}")


def _build_in_child(name: str, work: Path) -> Path:
    """Build a model in a child process: the measured children are started by a parent that never
    held a model (on Linux a child's peak RSS starts at its parent's when it forks)."""
    out = subprocess.run([sys.executable, __file__, "--build", name, str(work)], check=True, stdout=subprocess.PIPE)
    return Path(out.stdout.decode().strip().splitlines()[-1])


def _clean(work: Path, temporary: bool) -> None:
    """Delete the built models (and the folder when it was a temporary one)."""
    if temporary:
        shutil.rmtree(work, ignore_errors=True)
        return
    for f in work.glob("*.onnx*"):
        if f.name.startswith(MODELS):
            f.unlink()


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


if __name__ == "__main__":
    main()
