"""Peak memory of reading, and of fine-tuning, from a folder of images through onnxdns's data source.

The folder is the full Fashion-MNIST training split written as PNG class folders
(``python benchmarks/fmnist_folder.py --out DIR``: 60,000 images); the model is the torchvision
MobileNetV3-Small of ``benchmarks/torchvision_fmnist.py`` (input [N, 3, 32, 32]), so every image
is decoded, converted to RGB, resized to 32x32 and normalised. Decoded in full the split would
be 60,000 x 3 x 32 x 32 float32 = 737 MB; the source holds one batch at a time.

Each measurement runs in a fresh child process and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark, cross-checked with
``VmHWM`` of ``/proc/self/status``), next to the resident size after the imports and before the
folder is opened (the baseline), so the difference is what the data path costs:

* ``read``: ``open_source(DIR)`` (lists the files, reads every header) and one pass over all
  batches (``--batch-size``, shuffled as a training epoch is);
* ``train``: ``onnxdns train MODEL -o OUT --method none --data DIR --val-fraction 0.01 ...`` (in the
  child process) for ``--iterations`` steps: fine-tuning with onnxruntime-training, which needs
  training from a folder (issue 11); without it the run is recorded as failed with its error.

    python benchmarks/fmnist_folder.py --out /tmp/fmnist-train-full
    python benchmarks/folder_memory.py --data /tmp/fmnist-train-full              # read and train
    python benchmarks/folder_memory.py --data /tmp/fmnist-train-full --modes read

Writes ``benchmarks/results/folder_memory.json``.
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

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = RESULTS / "torchvision_fmnist" / "mobilenet_v3_small.onnx"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory() -> dict:
    return {"rss_mb": round((_status_kb("VmRSS") or 0) / 1024, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "vmhwm_mb": round((_status_kb("VmHWM") or 0) / 1024, 1)}


def child_read(data: str, model: str, batch_size: int) -> dict:
    import numpy as np

    from onnxdns.sources import model_inputs, open_source

    inputs = model_inputs(model)
    baseline = _memory()
    start = time.perf_counter()
    source = open_source(data, inputs, mean=MEAN, std=STD)
    opened = time.perf_counter() - start
    after_open = _memory()
    n, checksum = 0, 0.0
    for batch in source.batches(batch_size, seed=0, epoch=0):
        x = batch.inputs[inputs[0].name]
        n += x.shape[0]
        checksum += float(np.float64(x[:, :, 0, 0].sum()))
    seconds = time.perf_counter() - start
    return {"mode": "read", "images": n, "classes": len(source.classes), "batch_size": batch_size,
            "open_seconds": round(opened, 1), "seconds": round(seconds, 1), "images_per_second": round(n / seconds),
            "peak_decoded_images": source.peak_decoded, "baseline": baseline, "after_open": after_open,
            "end": _memory(), "checksum": checksum}


def child_train(data: str, model: str, batch_size: int, iterations: int) -> dict:
    from onnxdns.cli import main as onnxdns_main

    baseline = _memory()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxdns-folder-memory-") as tmp:
        code = onnxdns_main(["train", model, "-o", str(Path(tmp) / "tuned.onnx"), "--method", "none", "--data", data,
                             "--val-fraction", "0.01", "--iterations", str(iterations), "--batch-size", str(batch_size),
                             "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)), "--no-progress"])
    if code != 0:
        sys.exit(code)  # its one-line error is the last line on stderr
    seconds = time.perf_counter() - start
    return {"mode": "train", "iterations": iterations, "batch_size": batch_size, "seconds": round(seconds, 1),
            "baseline": baseline, "end": _memory()}


def measure(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--data", str(args.data), "--model", str(args.model),
           "--batch-size", str(args.batch_size), "--iterations", str(args.iterations)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"mode": mode, "failed": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of images (class subfolders or flat)")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--modes", default="read,train", help="comma-separated: read, train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=200, help="training steps of the train mode")
    p.add_argument("--out", type=Path, default=RESULTS / "folder_memory.json")
    p.add_argument("--child", choices=("read", "train"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "read":
        print(json.dumps(child_read(str(args.data), str(args.model), args.batch_size)))
        return 0
    if args.child == "train":
        print(json.dumps(child_train(str(args.data), str(args.model), args.batch_size, args.iterations)))
        return 0
    files = sum(1 for _ in args.data.rglob("*.png"))
    rows = [measure(mode, args) for mode in args.modes.split(",") if mode]
    report = {
        "benchmark": "folder_memory",
        "command": "python benchmarks/folder_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "folder_png_files": files,
        "decoded_bytes_if_all_in_memory": files * 3 * 32 * 32 * 4,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "mem_total_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)},
        "runs": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        if "failed" in r:
            print(f"{r['mode']:6s} failed: {r['failed']}")
        else:
            print(f"{r['mode']:6s} peak RSS {r['end']['peak_rss_mb']:.0f} MB (baseline {r['baseline']['rss_mb']:.0f} MB, "
                  f"+{r['end']['peak_rss_mb'] - r['baseline']['rss_mb']:.0f} MB) in {r['seconds']} s")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
