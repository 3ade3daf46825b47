"""Training throughput: onnxruntime-training vs PyTorch, LeNet-5 and LeNet-300-100, batch 64.

Each measurement runs in its own process (the frameworks would otherwise compete for the cores)
with the same intra-op thread count, on real MNIST batches, with SGD (momentum 0.9, weight decay
5e-4, cross-entropy). Variants:

* ``torch``: ``torch.optim.SGD`` on the zoo's PyTorch module, default OpenMP settings;
* ``torch-passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (2 threads only). On a machine whose
  cores are busy with other work, OpenMP's default spin-waiting makes 2-thread torch up to 60x
  slower than 1 thread; passive waiting avoids that;
* ``ort-dense``: onnxruntime-training step (forward, backward, momentum update) of the exported model;
* ``ort-dns``: the same on the masked model with straight-through gradients (weights and biases
  masked), surgery disabled: the cost of the masks in the graph;
* ``ort-dns-surgery``: the DNS training loop with surgery at *every* step (gamma = 0, the worst
  case; with the default gamma 1e-4 it runs at about 1/(1 + 1e-4 t) of the steps), c = 0 (about
  half of every layer pruned).

Measurements are interleaved over ``--rounds`` rounds so that a change in the machine's load hits
every variant alike; each reports the median of its timed passes, and the JSON keeps every pass
and the load average. Run: ``/work/venv/bin/python benchmarks/train_throughput.py`` (writes
``benchmarks/results/train_throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("lenet-5", "lenet-300-100")
VARIANTS = ("torch", "torch-passive", "ort-dense", "ort-dns", "ort-dns-surgery")
BATCH = 64
RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def _batches(n: int, seed: int = 0):
    import numpy as np

    from onnxdns.data import load_dataset

    train = load_dataset("mnist", "train")
    order = np.random.default_rng(seed).permutation(len(train))[: n * BATCH]
    return [(np.ascontiguousarray(train.images[order[i * BATCH:(i + 1) * BATCH]]),
             np.ascontiguousarray(train.labels[order[i * BATCH:(i + 1) * BATCH]])) for i in range(n)]


def _time(step, n: int, warmup: int, repeats: int) -> list[float]:
    """Steps per second of ``repeats`` timed passes of ``step(i)`` over batches i < n (after
    ``warmup`` untimed steps)."""
    for i in range(warmup):
        step(i % n)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            step(i)
        rates.append(n / (time.perf_counter() - start))
    return rates


def worker_torch(model: str, steps: int, repeats: int, threads: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    from onnxdns.models import build

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    net = build(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in _batches(steps)]

    def step(i: int) -> None:
        x, y = batches[i]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return _time(step, len(batches), warmup=10, repeats=repeats)


def worker_ort(model: str, variant: str, steps: int, repeats: int, threads: int) -> list[float]:
    import numpy as np

    from onnxdns import modelio
    from onnxdns.models import export_model
    from onnxdns.training import artifacts
    from onnxdns.workflows.train import artifact_spec
    from onnxdns.training.config import TrainConfig
    from onnxdns.sources import model_inputs, open_source
    from onnxdns.training import losses
    from onnxdns.training.loop import Feeder, Trainer
    from onnxdns.training.methods import get_method
    from onnxdns.training.optim import LRSchedule
    from onnxdns.training.params import select_parameters
    from onnxdns.training.session import TrainingSession

    with tempfile.TemporaryDirectory() as tmp:
        src = export_model(model, Path(tmp) / "model.onnx")
        # gamma 0: surgery at every step; c 0: thresholds at the mean |w|, about half the weights pruned
        config = TrainConfig(method="none" if variant == "ort-dense" else "dns", dns_gamma=0.0, dns_c="0",
                             dns_phases="all:1.0")
        method = get_method(config)
        forward = method.prepare(modelio.load_model(src))
        params = select_parameters(forward)
        spec = artifact_spec(config, params, forward, method.artifact_options(params))
        session = TrainingSession(artifacts.generate(forward, Path(tmp) / "artifacts", spec, batch_size=BATCH),
                                  threads=threads)
        batches = _batches(steps)
        if variant != "ort-dns-surgery":
            return _time(lambda i: session.train_step(list(batches[i]), 0.01), steps, warmup=10, repeats=repeats)
        name = forward.graph.input[0].name
        np.savez(Path(tmp) / "data.npz", **{name: np.concatenate([x for x, _ in batches]),
                                            "labels": np.concatenate([y for _, y in batches])})
        data = open_source(Path(tmp) / "data.npz", model_inputs(forward))
        loss = losses.choose(forward, loss="ce", loss_outputs=None, has_labels=True, temperature=None)
        total = 10 + steps * repeats
        trainer = Trainer(session, data, data, feeder=Feeder([name], loss), batch_size=BATCH, total_steps=total,
                          schedule=LRSchedule("constant", 0.01, total), layers=params.layers,
                          hooks=method.hooks(params, total), progress=False)
        for hook in trainer.hooks:
            hook.bind(trainer)
        return _time(lambda i: trainer._train_step(data._read(np.arange(i * BATCH, (i + 1) * BATCH))), steps,
                     warmup=10, repeats=repeats)


def _measure(model: str, variant: str, steps: int, repeats: int, threads: int) -> list[float]:
    """Run one worker process and return its steps per second."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if variant == "torch-passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, __file__, "--worker", model, variant, "--steps", str(steps),
           "--repeats", str(repeats), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{model} {variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="steps per timed pass (default: 200 LeNet-300-100, 40 LeNet-5)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per measurement, interleaved")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        model, variant = args.worker
        threads = args.threads[0]
        if variant.startswith("torch"):
            rates = worker_torch(model, args.steps, args.repeats, threads)
        else:
            rates = worker_ort(model, variant, args.steps, args.repeats, threads)
        print(json.dumps(rates))
        return

    jobs = [(model, variant, threads) for threads in args.threads for model in MODELS for variant in VARIANTS
            if not (variant == "torch-passive" and threads == 1)]
    rates: dict[tuple, list[float]] = {job: [] for job in jobs}
    loads = [os.getloadavg()]
    for _ in range(args.rounds):
        for model, variant, threads in jobs:
            steps = args.steps or (40 if model == "lenet-5" else 200)
            rates[(model, variant, threads)] += _measure(model, variant, steps, args.repeats, threads)
        loads.append(os.getloadavg())
    results = []
    for (model, variant, threads), values in rates.items():
        row = {"model": model, "variant": variant, "batch": BATCH, "threads": threads,
               "steps_per_s_median": round(statistics.median(values), 1), "steps_per_s_best": round(max(values), 1),
               "steps_per_s_all": [round(v, 1) for v in values]}
        results.append(row)
        print(f"{model:14} {variant:16} {threads} threads: median {row['steps_per_s_median']:8.1f} steps/s "
              f"(best {row['steps_per_s_best']:.1f})", flush=True)
    import onnxruntime
    import torch

    payload = {
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1_5_15min_per_round": loads},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "setup": "SGD momentum 0.9, weight decay 5e-4, cross-entropy, MNIST batches of 64; one process per "
                 "measurement; variants interleaved over rounds",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
