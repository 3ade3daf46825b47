"""DNS, slimming and sparse-lowrank on a torchvision model and an image folder, end to end.

The user's path of issue 11: the BN-folded MobileNetV3-Small of ``benchmarks/torchvision_fmnist.py``
(``benchmarks/results/torchvision_fmnist/mobilenet_v3_small.onnx``) and Fashion-MNIST PNG class
folders written by ``benchmarks/fmnist_folder.py``. Every step is an ``onnxdns`` command (run in
this process through ``onnxdns.cli.main``), reading the folders with ``--mean``/``--std``:

* dns: ``train --method dns --data TRAIN --val-data VAL`` then ``optimize``;
* slim: ``slim --data TRAIN --val-data VAL`` (scales inserted after the BN-folded convolutions,
  sparsity training, pruning, fine-tuning, optimize);
* sparse-lowrank: ``optimize --passes ...,sparse-lowrank,... --calib-data TRAIN``, fine-tuned with
  ``train --method none --data TRAIN`` (the pass's own fine-tuning reads only the built-in data
  sets), then ``optimize``.

Each result is measured beside the original in one process: parameters, non-zeros, MACs, bytes,
accuracy on VAL under onnxruntime, CPU latency at batch 1 and 32 (median of interleaved runs).
The learning rate is 0.001: momentum SGD at 0.01 diverges on this BN-folded network.

    python benchmarks/fmnist_folder.py --out /tmp/fmnist-train --limit 500
    python benchmarks/fmnist_folder.py --out /tmp/fmnist-val --split test --limit 100
    python benchmarks/torchvision_methods.py --train /tmp/fmnist-train --val /tmp/fmnist-val
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = RESULTS / "torchvision_fmnist" / "mobilenet_v3_small.onnx"
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
NORM = ["--mean", MEAN, "--std", STD]


def onnxdns(*args) -> None:
    from onnxdns.cli import main

    argv = [str(a) for a in args]
    print("$ onnxdns " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"torchvision_methods.py: onnxdns {argv[0]} exited with status {code}")


def accuracy(path: Path, folder: Path) -> float:
    import onnxruntime as ort

    from onnxdns.sources import model_inputs, open_source

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    source = open_source(str(folder), model_inputs(str(path)), mean=[float(v) for v in MEAN.split(",")],
                         std=[float(v) for v in STD.split(",")])
    correct = sum(int((sess.run(None, dict(b.inputs))[0].argmax(1) == b.labels).sum()) for b in source.batches(256))
    return correct / len(source)


def measure(label: str, path: Path, val: Path, repeats: int, threads: int, seconds: float) -> dict:
    from onnxdns import api
    from onnxdns.validate import measure_latency

    before, after = api.inspect(MODEL), api.inspect(path)
    rng = np.random.default_rng(0)
    latency = {}
    for batch in (1, 32):
        feeds = {"input": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
        lat = measure_latency({"original": MODEL, label: path}, feeds, repeats=repeats, warmup=5, threads=threads)
        latency[f"batch_{batch}"] = {"original_ms": lat["original"].median_ms, "ms": lat[label].median_ms,
                                     "speedup": lat["original"].median_ms / lat[label].median_ms}
    return {
        "method": label, "file": str(path.relative_to(RESULTS.parent.parent)), "seconds": round(seconds, 1),
        "params": {"original": before.params, "after": after.params, "ratio": before.params / after.params},
        "nonzeros": {"original": before.nonzeros, "after": after.nonzeros, "ratio": before.nonzeros / after.nonzeros},
        "macs": {"original": before.macs, "after": after.macs, "ratio": before.macs / after.macs},
        "bytes": {"original": before.file_bytes, "after": after.file_bytes, "ratio": before.file_bytes / after.file_bytes},
        "accuracy": {"original": accuracy(MODEL, val), "after": accuracy(path, val)},
        "latency": latency,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, metavar="DIR")
    p.add_argument("--val", type=Path, required=True, metavar="DIR")
    p.add_argument("--methods", default="dns,slim,sparse-lowrank")
    p.add_argument("--iterations", type=int, default=300, help="training steps of dns and of sparse-lowrank's fine-tuning")
    p.add_argument("--epochs", type=float, default=2.0, help="slim: sparsity training and fine-tuning epochs each")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", default="0.001")
    p.add_argument("--prune-ratio", default="0.3", help="slim: share of prunable channels removed")
    p.add_argument("--dns-c", default="conv=0,fc=0.5",
                   help="DNS sensitivities (the LeNet default conv=3,fc=4 prunes ~97%% at the first step, more "
                        "than a few hundred steps can recover on this network)")
    p.add_argument("--target-compression", default="1.04", help="sparse-lowrank parameter target")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "torchvision_methods.json")
    args = p.parse_args(argv)
    out_dir = RESULTS / "torchvision_methods"
    work = out_dir / "work"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    data = ["--data", args.train, "--val-data", args.val, *NORM]
    train_opts = ["--batch-size", args.batch_size, "--lr", args.lr, "--no-progress"]
    rows = []
    for method in args.methods.split(","):
        start = time.time()
        final = out_dir / f"{method}.onnx"
        if method == "dns":
            onnxdns("train", MODEL, "-o", work / "dns-trained.onnx", "--method", "dns", *data, "--iterations",
                    args.iterations, "--dns-c", args.dns_c, *train_opts, "--checkpoint-dir", work / "dns.ckpt")
            onnxdns("optimize", work / "dns-trained.onnx", "-o", final, "--data", args.val, *NORM)
        elif method == "slim":
            onnxdns("slim", MODEL, "-o", final, *data, "--epochs", args.epochs, "--finetune-epochs", args.epochs,
                    "--prune-ratio", args.prune_ratio, *train_opts, "--work-dir", work / "slim")
        elif method == "sparse-lowrank":
            onnxdns("optimize", MODEL, "-o", work / "slr.onnx", "--passes", "fold-constants,sparse-lowrank,remove-dead-nodes",
                    "--calib-data", args.train, "--target-compression", args.target_compression, "--no-speed-check",
                    "--no-validate", *NORM)
            onnxdns("train", work / "slr.onnx", "-o", work / "slr-tuned.onnx", "--method", "none", *data,
                    "--iterations", args.iterations, *train_opts, "--checkpoint-dir", work / "slr.ckpt")
            onnxdns("optimize", work / "slr-tuned.onnx", "-o", final, "--data", args.val, *NORM)
        else:
            raise SystemExit(f"torchvision_methods.py: unknown method {method}")
        rows.append(measure(method, final, args.val, args.repeats, args.threads, time.time() - start))
    shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS).stdout.strip()
    report = {
        "benchmark": "torchvision_methods",
        "command": "python benchmarks/torchvision_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "code_commit": commit,
        "model": str(MODEL.relative_to(RESULTS.parent.parent)),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'method':15s} {'params x':>8s} {'MACs x':>7s} {'bytes x':>7s} {'acc orig':>8s} {'acc':>6s} {'b1 x':>5s} {'b32 x':>5s}")
    for r in rows:
        print(f"{r['method']:15s} {r['params']['ratio']:8.2f} {r['macs']['ratio']:7.2f} {r['bytes']['ratio']:7.2f} "
              f"{r['accuracy']['original']:8.1%} {r['accuracy']['after']:6.1%} {r['latency']['batch_1']['speedup']:5.2f} "
              f"{r['latency']['batch_32']['speedup']:5.2f}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
