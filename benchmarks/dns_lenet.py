"""Benchmark: Dynamic Network Surgery on LeNet-5 and LeNet-300-100 (MNIST), against the paper.

One command reproduces issue 3's acceptance figures::

    /work/venv/bin/python benchmarks/dns_lenet.py            # about an hour on 2 free cores
    /work/venv/bin/python benchmarks/dns_lenet.py --fresh    # redo every stage

For each model it

1. exports the zoo model (seed-0 initial weights) and trains our **dense reference** with
   onnxruntime-training (:data:`RECIPES`, ``dense``);
2. prunes the reference with **DNS** (per-layer sensitivities ``c``, conv and fc phases, the
   paper's iteration budget: LeNet-5 16K, LeNet-300-100 25K iterations at batch 64; thresholds
   ramped in over the first 3,000 / 4,000 steps of a phase, ``dns_ramp``, see docs/dns.md);
3. prunes the same reference with the **magnitude baseline** (Han et al. 2015: prune-retrain
   rounds, no splicing) twice with the same iteration budget and learning-rate schedule: at Han et
   al.'s published per-layer densities (``magnitude``), and at exactly DNS's per-layer densities
   (``magnitude-matched``, weights and biases ranked together as DNS prunes them);
4. runs ``onnxdns.api.optimize`` (cpu pipeline: fold masks, remove dead channels, sparse storage)
   on every pruned model and compares optimized and masked models in onnxruntime on the 10,000
   MNIST test images (top-1 agreement, max logit difference);
5. measures every reported test error with onnxruntime on the saved ONNX files.

Then it runs ``benchmarks/train_throughput.py`` (each framework in its own process, batch 64) and
reports onnxruntime-training steps/s over PyTorch's. Results: ``benchmarks/results/dns_lenet.json``
and the ONNX files it reports on in ``benchmarks/results/dns_lenet/``.

Stages are cached: a stage whose record (``benchmarks/results/dns_lenet/stages/*.json``) matches
its configuration and the SHA-256 of its input files is skipped, so an interrupted run restarts
where it stopped (a training interrupted with Ctrl-C resumes from its last checkpoint). Changing a
recipe or redoing the dense reference redoes what depends on it. Seeds are fixed (zoo weights:
seed 0; data order and surgery randomness: ``seed=0``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from stages import Stage, log, rel

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where a run writes: the JSON report, the ONNX files, stage records and checkpoints."""

    report: Path
    files: Path

    @property
    def stages(self) -> Path:
        return self.files / "stages"

    @property
    def work(self) -> Path:
        return self.files / "work"


PATHS = Paths(RESULTS / "dns_lenet.json", RESULTS / "dns_lenet")
#: Iteration multiplier (1: the real benchmark; ``--quick``: a smoke run of the whole pipeline).
SCALE = 1.0
QUICK_SCALE = 0.02
MODELS = ("lenet-5", "lenet-300-100")

#: The paper's figures (Guo, Yao and Chen, NIPS 2016, Table 1) and the per-layer densities of the
#: authors' released sparse models (``models/*/caffe_*_sparse.caffemodel`` of
#: yiwenguo/Dynamic-Network-Surgery: weights and biases counted together).
PUBLISHED = {
    "lenet-5": {"params": 431_080, "kept": 3_993, "compression": 108.0, "error_reference": 0.0091,
                "error_dns": 0.0091, "iterations": 16_000,
                "density": {"conv1": 0.1423, "conv2": 0.0311, "fc1": 0.0073, "fc2": 0.0431}},
    "lenet-300-100": {"params": 266_610, "kept": 4_988, "compression": 56.0, "error_reference": 0.0228,
                      "error_dns": 0.0199, "iterations": 25_000,
                      "density": {"fc1": 0.0186, "fc2": 0.0185, "fc3": 0.0485}},
}
#: Acceptance targets (issue 3): compression at least the paper's, error at most our reference's.
TARGETS = {"lenet-5": {"compression": 108.0, "file_ratio": 30.0}, "lenet-300-100": {"compression": 56.0}}
#: Han, Pool, Tran and Dally (NIPS 2015), Tables 1-2: weights kept per layer by magnitude pruning.
HAN_DENSITY = {"lenet-5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
               "lenet-300-100": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}}

#: The dense reference is trained as the paper's was: Caffe's LeNet solver (examples/mnist/
#: lenet_solver.prototxt: 10K iterations, lr 0.01, ``inv`` policy gamma 1e-4 power 0.75, momentum
#: 0.9, weight decay 5e-4, batch 64). Pruning then fine-tunes that reference for the paper's
#: iteration budget. ``dense-continued`` trains the reference on, without pruning, for the same
#: budget and schedule as DNS: it is reported (not used as the acceptance reference) so that the
#: cost of pruning at equal training time is visible too.
CAFFE_LENET_SOLVER: dict[str, Any] = {"method": "none", "iterations": 10_000, "schedule": "inv", "lr": 0.01}

#: Training recipes (``onnxdns.training.train`` options). Every run: SGD, momentum 0.9, weight
#: decay 5e-4, batch 64, seed 0 (the TrainConfig defaults).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "lenet-5": {
        "dense": CAFFE_LENET_SOLVER,
        "dense-continued": {"method": "none", "iterations": 16_000, "schedule": "cosine", "lr": 0.02},
        "dns": {"method": "dns", "iterations": 16_000, "schedule": "cosine", "lr": 0.02,
                "dns_phases": "conv:4000,fc:6000", "dns_c": "conv1=1.4,conv2=6.5,fc1=10.5,fc2=3", "dns_ramp": 3000},
        "magnitude": {"method": "magnitude", "iterations": 16_000, "schedule": "cosine", "lr": 0.02, "rounds": 3},
    },
    "lenet-300-100": {
        "dense": CAFFE_LENET_SOLVER,
        "dense-continued": {"method": "none", "iterations": 25_000, "schedule": "cosine", "lr": 0.02},
        "dns": {"method": "dns", "iterations": 25_000, "schedule": "cosine", "lr": 0.02,
                "dns_phases": "fc:8000", "dns_c": "fc1=10,fc2=6.5,fc3=5", "dns_ramp": 4000},
        "magnitude": {"method": "magnitude", "iterations": 25_000, "schedule": "cosine", "lr": 0.02, "rounds": 3},
    },
}


def scaled(options: dict[str, Any], factor: float) -> dict[str, Any]:
    """``options`` with every step count (iterations, lr step, DNS phase lengths and ramp) times ``factor``
    (``--quick`` smoke runs)."""
    out = dict(options)
    out["iterations"] = max(1, round(options["iterations"] * factor))
    if "lr_step" in options:
        out["lr_step"] = max(1, round(options["lr_step"] * factor))
    if options.get("dns_ramp"):
        out["dns_ramp"] = max(1, round(options["dns_ramp"] * factor))
    if "dns_phases" in options:
        items = (item.partition(":") for item in options["dns_phases"].split(","))
        out["dns_phases"] = ",".join(f"{kind}:{max(1, round(int(steps) * factor))}" for kind, _, steps in items)
    return out


# --------------------------------------------------------------------------- measurements


def layer_counts(path: Path) -> dict[str, dict[str, int]]:
    """Per layer (``conv1`` for ``conv1.weight`` and ``conv1.bias``): parameters and non-zeros of
    ``W * mask`` (``W`` when the parameter carries no mask), weights and biases together."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    counts: dict[str, dict[str, int]] = {}
    for name, value in inits.items():
        if name.endswith("__mask") or value.dtype.kind != "f" or value.size <= 1:
            continue
        mask = inits.get(f"{name}__mask")
        effective = value * mask if mask is not None else value
        entry = counts.setdefault(name.rsplit(".", 1)[0], {"params": 0, "kept": 0})
        entry["params"] += int(value.size)
        entry["kept"] += int(np.count_nonzero(effective))
    return counts


def summarize_counts(counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    params = sum(c["params"] for c in counts.values())
    kept = sum(c["kept"] for c in counts.values())
    return {
        "layers": {k: {**v, "density": round(v["kept"] / v["params"], 5)} for k, v in counts.items()},
        "params": params, "kept": kept, "compression": round(params / max(kept, 1), 2),
    }


# --------------------------------------------------------------------------- stages


def train_stage(name: str, src: Path, out: Path, options: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train ``src`` into ``out`` (the train workflow's cached stage: a cut run resumes its checkpoint)."""
    from onnxdns.workflows.train import train_stage as workflow_train_stage

    ckpt = PATHS.work / f"{name}.ckpt"
    result = workflow_train_stage(src, out, ckpt, options, threads=threads)
    if result.interrupted:
        raise SystemExit(f"interrupted: run the benchmark again to resume from {rel(ckpt)}")
    train_seconds = sum(r.seconds for r in result.history)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {
        "iterations": result.steps, "train_seconds": round(train_seconds, 1),
        "steps_per_s": round(result.steps / train_seconds, 1) if train_seconds else None,
        "history": [{"step": r.step, "lr": r.lr, "train_loss": round(r.train_loss, 5),
                     "test_accuracy": r.val_accuracy, "density": round(r.total_density, 5)} for r in result.history],
        "method_summary": {k: v for k, v in result.method_summary.items() if k != "thresholds"},
    }


def evaluate_stage(path: Path, threads: int) -> dict[str, Any]:
    """Test error of the model at ``path`` on MNIST's test split (the workflows' evaluator)."""
    from onnxdns.workflows.evaluate import evaluate

    accuracy = evaluate(path, "mnist", split="test", batch_size=1000, threads=threads).accuracy
    return {"test_error": 1.0 - accuracy, "file_bytes": path.stat().st_size, **summarize_counts(layer_counts(path))}


def optimize_stage(masked: Path, optimized: Path, threads: int) -> dict[str, Any]:
    """``onnxdns optimize`` of the masked model, then the optimized model against it on the test split."""
    from onnxdns import api
    from onnxdns.workflows.evaluate import evaluate

    result = api.optimize(masked, optimized, target="cpu", validate=False)
    check = evaluate(optimized, "mnist", split="test", reference=masked, batch_size=1000, threads=threads)
    (logits,) = check.fidelity.values()
    return {
        "file_bytes": optimized.stat().st_size,
        "test_error": 1.0 - check.accuracy,
        "top1_agreement_with_masked": check.top1_agreement,
        "max_abs_logit_diff": logits["max_abs_diff"],
        "logit_scale": logits["reference_max_abs"],
        "params": result.after.params, "nonzeros": result.after.nonzeros,
        "macs": result.after.macs, "macs_masked_model": result.before.macs,
        "passes_applied": [p.name for p in result.passes if p.modified],
    }


def run_model(model: str, threads: int) -> dict[str, Any]:
    from onnxdns.models import export_model

    recipe = {kind: scaled(options, SCALE) for kind, options in RECIPES[model].items()}
    init = PATHS.work / f"{model}-init.onnx"
    kept = ("dense", "dns-masked", "dns-optimized", "magnitude-optimized")  # the files the report is about
    files = {kind: (PATHS.files if kind in kept else PATHS.work) / f"{model}-{kind}.onnx" for kind in
             (*kept, "magnitude-masked", "magnitude-matched-masked", "magnitude-matched-optimized",
              "dense-continued-masked")}
    PATHS.work.mkdir(parents=True, exist_ok=True)
    (PATHS.work / ".gitignore").write_text("# checkpoints and intermediate models of benchmarks/dns_lenet.py\n*\n")
    if not init.exists():
        export_model(model, init)

    def training(kind: str, src: Path, options: dict[str, Any]) -> Stage:
        out = files[f"{kind}-masked" if kind != "dense" else "dense"]
        return Stage(f"{model}-{kind}-train", options, [src], [out],
                     lambda: train_stage(f"{model}-{kind}", src, out, options, threads), PATHS.stages)

    def evaluation(key: str) -> Stage:
        return Stage(f"{model}-{key}-eval", {}, [files[key]], [],
                     lambda: evaluate_stage(files[key], threads), PATHS.stages)

    def optimization(kind: str) -> Stage:
        masked, optimized = files[f"{kind}-masked"], files[f"{kind}-optimized"]
        return Stage(f"{model}-{kind}-optimize", {"target": "cpu"}, [masked], [optimized],
                     lambda: optimize_stage(masked, optimized, threads), PATHS.stages)

    report: dict[str, Any] = {"model": model, "published": PUBLISHED[model], "recipes": {}}
    dense_train = training("dense", init, recipe["dense"])()
    dense_eval = evaluation("dense")()
    report["dense"] = {**dense_train, **dense_eval, "file": rel(files["dense"])}
    continued_train = training("dense-continued", files["dense"], recipe["dense-continued"])()
    continued_eval = evaluation("dense-continued-masked")()
    report["dense-continued"] = {**continued_train, **continued_eval}

    runs = {
        "dns": recipe["dns"],
        "magnitude": {**recipe["magnitude"], "sparsity": _sparsity_spec(HAN_DENSITY[model])},
    }
    results: dict[str, Any] = {}
    for kind, options in runs.items():
        results[kind] = _pruned(kind, training(kind, files["dense"], options), evaluation(f"{kind}-masked"),
                                optimization(kind), files)
    dns_density = {k: v["kept"] / v["params"] for k, v in results["dns"]["layers"].items()}
    matched = {**recipe["magnitude"], "prune_biases": True, "sparsity": _sparsity_spec(dns_density)}
    results["magnitude-matched"] = _pruned("magnitude-matched", training("magnitude-matched", files["dense"], matched),
                                           evaluation("magnitude-matched-masked"), optimization("magnitude-matched"), files)
    for kind, options in {**runs, "magnitude-matched": matched}.items():
        report["recipes"][kind] = options
    report["recipes"]["dense"] = recipe["dense"]
    report["recipes"]["dense-continued"] = recipe["dense-continued"]
    report.update(results)

    dense_error, dense_bytes = report["dense"]["test_error"], report["dense"]["file_bytes"]
    for kind in results:
        r = report[kind]
        r["file_ratio"] = round(dense_bytes / r["optimized"]["file_bytes"], 2)
    dns = report["dns"]
    target = TARGETS[model]
    report["acceptance"] = {
        "compression": dns["compression"], "compression_target": target["compression"],
        "compression_ok": dns["compression"] >= target["compression"],
        "error_dns": dns["test_error"], "error_reference": dense_error,
        "error_ok": dns["test_error"] <= dense_error,
        "error_dense_same_budget": report["dense-continued"]["test_error"],
        "dns_beats_magnitude": _dns_beats_magnitude(report, dense_error),
        "optimized_agrees": dns["optimized"]["top1_agreement_with_masked"] == 1.0,
    }
    if "file_ratio" in target:
        report["acceptance"].update(file_ratio=dns["file_ratio"], file_ratio_target=target["file_ratio"],
                                    file_ratio_ok=dns["file_ratio"] >= target["file_ratio"])
    return report


def _pruned(kind: str, train: Stage, evaluate: Stage, optimize: Stage, files: dict[str, Path]) -> dict[str, Any]:
    trained = train()
    evaluated = evaluate()
    optimized = optimize()
    return {**trained, **evaluated, "optimized": optimized,
            "files": {"masked": rel(files[f"{kind}-masked"]), "optimized": rel(files[f"{kind}-optimized"])}}


def _sparsity_spec(density: dict[str, float]) -> str:
    # magnitude pruning keeps at least one weight per layer (sparsity < 1), even where DNS kept none
    return ",".join(f"{layer}={min(1.0 - d, 0.999999):.9f}" for layer, d in density.items())


def _dns_beats_magnitude(report: dict[str, Any], dense_error: float) -> dict[str, Any]:
    """DNS vs magnitude: at the same compression (matched), DNS's error is lower; and DNS reaches
    a higher compression than the magnitude baseline at Han et al.'s rates while its error is no
    higher than that baseline's."""
    dns, han, matched = report["dns"], report["magnitude"], report["magnitude-matched"]
    return {
        "same_compression_dns_error": dns["test_error"], "same_compression_magnitude_error": matched["test_error"],
        "same_compression_ok": dns["test_error"] < matched["test_error"],
        "magnitude_han_compression": han["compression"], "magnitude_han_error": han["test_error"],
        "higher_compression_same_accuracy_ok": dns["compression"] > han["compression"] and dns["test_error"] <= han["test_error"],
    }


def throughput(threads: list[int], rounds: int, quick: bool) -> dict[str, Any]:
    """Run benchmarks/train_throughput.py and reduce its JSON to ort / torch ratios."""
    out = PATHS.files / "train_throughput.json"
    cmd = [sys.executable, str(HERE / "train_throughput.py"), "--rounds", str(rounds), "--output", str(out),
           "--threads", *map(str, threads), *(["--steps", "5", "--repeats", "1"] if quick else [])]
    log(f"[throughput] {' '.join(cmd[1:])}")
    subprocess.run(cmd, check=True)
    data = json.loads(out.read_text())
    rates = {(r["model"], r["variant"], r["threads"]): r["steps_per_s_median"] for r in data["results"]}
    ratios = []
    for (model, variant, t), value in sorted(rates.items()):
        if variant != "ort-dense":
            continue
        row = {"model": model, "threads": t, "ort_dense_steps_per_s": value,
               "ort_dns_steps_per_s": rates.get((model, "ort-dns", t)),
               "torch_steps_per_s": rates.get((model, "torch", t)),
               "torch_passive_steps_per_s": rates.get((model, "torch-passive", t))}
        best_torch = max(v for v in (row["torch_steps_per_s"], row["torch_passive_steps_per_s"]) if v is not None)
        row["ratio_ort_dense_over_torch"] = round(value / best_torch, 2)
        row["ratio_ort_dns_over_torch"] = round(row["ort_dns_steps_per_s"] / best_torch, 2)
        ratios.append(row)
    return {"file": rel(out), "load_average_per_round": data["machine"]["load_average_1_5_15min_per_round"],
            "note": "torch = the faster of default OpenMP and OMP_WAIT_POLICY=PASSIVE; medians over processes",
            "ratios": ratios}


# --------------------------------------------------------------------------- report


def print_summary(report: dict[str, Any]) -> None:
    head = (f"{'model':14} {'run':18} {'error':>7} {'kept':>7} {'compr.':>7} {'file KB':>8} {'file x':>7} "
            f"{'agree':>6} {'iters':>6} {'train s':>8}")
    print("\n" + head)
    print("-" * len(head))
    for m in report["models"]:
        d = m["dense"]
        print(f"{m['model']:14} {'dense reference':18} {d['test_error']:7.2%} {d['kept']:7d} {1.0:7.1f} "
              f"{d['file_bytes'] / 1024:8.1f} {1.0:7.1f} {'':>6} {d['iterations']:6d} {d['train_seconds']:8.0f}")
        for kind in ("dns", "magnitude", "magnitude-matched"):
            r = m[kind]
            o = r["optimized"]
            print(f"{'':14} {kind:18} {r['test_error']:7.2%} {r['kept']:7d} {r['compression']:7.1f} "
                  f"{o['file_bytes'] / 1024:8.1f} {r['file_ratio']:7.1f} {o['top1_agreement_with_masked']:6.1%} "
                  f"{r['iterations']:6d} {r['train_seconds']:8.0f}")
        c = m["dense-continued"]
        print(f"{'':14} {'dense, +DNS budget':18} {c['test_error']:7.2%} {c['kept']:7d} {1.0:7.1f} "
              f"{'':>8} {'':>7} {'':>6} {c['iterations']:6d} {c['train_seconds']:8.0f}")
        p = m["published"]
        print(f"{'':14} {'paper (DNS)':18} {p['error_dns']:7.2%} {p['kept']:7d} {p['compression']:7.1f}")
        dens = ", ".join(f"{k} {v['density']:.2%}" for k, v in m["dns"]["layers"].items())
        print(f"{'':14} DNS per layer: {dens}")
        a = m["acceptance"]
        checks = [f"compression {a['compression']:.1f}x >= {a['compression_target']:.0f}x: {_ok(a['compression_ok'])}",
                  f"error {a['error_dns']:.2%} <= reference {a['error_reference']:.2%}: {_ok(a['error_ok'])}"]
        if "file_ratio" in a:
            checks.append(f"file {a['file_ratio']:.1f}x >= {a['file_ratio_target']:.0f}x: {_ok(a['file_ratio_ok'])}")
        b = a["dns_beats_magnitude"]
        checks.append(f"DNS beats magnitude at the same compression: {_ok(b['same_compression_ok'])}")
        checks.append(f"optimized = masked (top-1): {_ok(a['optimized_agrees'])}")
        print(f"{'':14} " + "; ".join(checks))
    t = report.get("throughput")
    if t:
        print("\ntraining steps/s, batch 64 (onnxruntime-training / PyTorch, each in its own process):")
        for r in t["ratios"]:
            print(f"  {r['model']:14} {r['threads']} threads: ort dense {r['ort_dense_steps_per_s']:7.1f}, ort dns "
                  f"{r['ort_dns_steps_per_s']:7.1f}, torch {max(v for v in (r['torch_steps_per_s'], r['torch_passive_steps_per_s']) if v):7.1f}"
                  f" -> ratio {r['ratio_ort_dense_over_torch']:.2f} (dense), {r['ratio_ort_dns_over_torch']:.2f} (dns)")
    print(f"\nwall time {report['wall_seconds'] / 60:.1f} min -> {rel(PATHS.report)}")


def _ok(flag: bool) -> str:
    return "ok" if flag else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: lenet-5,lenet-300-100")
    parser.add_argument("--fresh", action="store_true",
                        help="redo every stage of the models run (delete their cached stages and files)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for training and inference")
    parser.add_argument("--no-throughput", action="store_true", help="skip the training throughput comparison")
    parser.add_argument("--throughput-rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_SCALE:g}x the iterations, results in /tmp/onnxdns-dns-lenet-quick")
    args = parser.parse_args(argv)
    if args.quick:
        global PATHS, SCALE
        quick = Path(tempfile.gettempdir()) / "onnxdns-dns-lenet-quick"
        PATHS, SCALE = Paths(quick / "dns_lenet.json", quick / "dns_lenet"), QUICK_SCALE
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.fresh:
        for model in models:
            for folder in (PATHS.files, PATHS.stages, PATHS.work):
                for path in folder.glob(f"{model}-*"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    PATHS.files.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    old = json.loads(PATHS.report.read_text()) if PATHS.report.exists() else {}
    previous = old.get("models", [])
    fresh = {model: {**run_model(model, args.threads), "date": time.strftime("%Y-%m-%d %H:%M:%S")} for model in models}
    # models not run this time keep their previous report (each model's "date" says when it ran)
    reports = sorted([*fresh.values(), *(m for m in previous if m["model"] not in fresh)],
                     key=lambda r: MODELS.index(r["model"]))
    report: dict[str, Any] = {
        "benchmark": "dns_lenet",
        "command": "python benchmarks/dns_lenet.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "iteration_scale": SCALE,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "models": reports,
    }
    if not args.no_throughput:
        stage = Stage("throughput", {"threads": [args.threads, 1], "rounds": args.throughput_rounds}, [], [],
                      lambda: throughput([args.threads, 1], args.throughput_rounds, args.quick), PATHS.stages)
        report["throughput"] = stage()
    elif "throughput" in old:
        report["throughput"] = old["throughput"]
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["stage_seconds_total"] = round(_stage_seconds(report), 1)
    out = PATHS.report
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_summary(report)
    return 0


def _stage_seconds(report: dict[str, Any]) -> float:
    total = 0.0
    for record in PATHS.stages.glob("*.json"):
        total += json.loads(record.read_text())["result"].get("stage_seconds", 0.0)
    return total


if __name__ == "__main__":
    sys.exit(main())
