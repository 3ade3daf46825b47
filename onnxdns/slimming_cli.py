"""``onnxdns slim``: arguments, command and summary (wired into :mod:`onnxdns.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnxdns import argtypes
from onnxdns.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_VALIDATION
from onnxdns.training.cli import add_data_arguments, add_optimizer_arguments, add_slim_penalty_arguments


def add_slim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``slim`` options to ``parser``."""
    from onnxdns.workflows.slim import ROUND_TO, TRAIN_DEFAULTS

    parser.add_argument("input", type=Path, metavar="IN.onnx", help="classifier with BatchNormalization layers")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="slimmed, optimized model")
    add_data_arguments(parser, default="fashion-mnist")
    parser.add_argument("--target", choices=("cpu", "cuda"), default="cpu", help="optimize target (default: cpu)")
    add_slim_penalty_arguments(parser)
    sel = parser.add_argument_group("channel selection", "slim-channels options")
    how = sel.add_mutually_exclusive_group()
    how.add_argument("--prune-ratio", type=argtypes.real(0.0, 1.0, high_open=True), metavar="R",
                     help="prune the channels below the R-quantile of all prunable |gamma| (default: 0.5)")
    how.add_argument("--threshold", type=argtypes.non_negative_real, metavar="T", help="prune the channels with |gamma| below T")
    sel.add_argument("--min-keep", type=argtypes.positive_int, default=1, help="channels kept per layer at least (default: 1)")
    sel.add_argument("--min-keep-ratio", type=argtypes.real(0.0, 1.0), default=0.05,
                     help="fraction of each layer's channels kept at least (default: 0.05)")
    sel.add_argument("--round-to", type=argtypes.positive_int, metavar="N",
                     help=f"round kept channel counts up to a multiple of N (default: {ROUND_TO['cpu']} for cpu, "
                          f"{ROUND_TO['cuda']} for cuda)")
    tr = parser.add_argument_group("training", "both training stages (sparsity, fine-tuning)")
    tr.add_argument("--epochs", type=argtypes.positive_real, default=10.0, help="sparsity training epochs (default: 10)")
    tr.add_argument("--finetune-epochs", type=argtypes.positive_real, help="fine-tuning epochs (default: --epochs)")
    tr.add_argument("--lr", type=argtypes.positive_real, help=f"learning rate (default: {TRAIN_DEFAULTS['lr']})")
    tr.add_argument("--finetune-lr", type=argtypes.positive_real, help="fine-tuning learning rate (default: --lr)")
    add_optimizer_arguments(tr, TRAIN_DEFAULTS)
    run = parser.add_argument_group("run")
    run.add_argument("--work-dir", type=Path, metavar="DIR",
                     help="stage models and checkpoints (default: OUT.slim beside the output); finished stages "
                          "with unchanged settings are skipped, an interrupted training resumes")
    run.add_argument("--fresh", action="store_true", help="start over: empty the work folder first")
    run.add_argument("--no-validate", action="store_true", help="skip optimize's comparison with the fine-tuned model")
    run.add_argument("--no-evaluate", action="store_true", help="skip measuring each stage's test accuracy")
    run.add_argument("--threads", type=argtypes.threads, default=0,
                     help=f"onnxruntime intra-op threads, 0 to {argtypes.MAX_THREADS} (0: all cores)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_slim(args: argparse.Namespace) -> int:
    """Run ``onnxdns slim``; returns the exit status."""
    from onnxdns.workflows.slim import slim

    train_options = {k: getattr(args, k) for k in ("batch_size", "optimizer", "momentum", "weight_decay", "schedule", "seed", "subset",
                                                   "val_data", "val_fraction", "loss", "loss_outputs", "temperature",
                                                   "mean", "std")
                     if getattr(args, k) is not None}
    penalty = {k: getattr(args, k) for k in ("slim_lambda", "smooth_l1") if getattr(args, k) is not None}
    result = slim(
        args.input, args.output, data=args.data or "fashion-mnist", target=args.target, **penalty,
        prune_ratio=0.5 if args.prune_ratio is None and args.threshold is None else args.prune_ratio,
        threshold=args.threshold, min_keep=args.min_keep, min_keep_ratio=args.min_keep_ratio, round_to=args.round_to,
        epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr, finetune_lr=args.finetune_lr,
        work_dir=args.work_dir, fresh=args.fresh, validate=not args.no_validate, evaluate=not args.no_evaluate,
        progress=not args.no_progress, threads=args.threads, data_dir=args.data_dir, **train_options,
    )
    print(format_slim_result(result))
    if result.interrupted:
        print(f"interrupted; rerun the same command to continue (work folder {result.work_dir})", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.optimize is not None and not result.optimize.ok:
        print(f"onnxdns: error: validation failed ({result.optimize.validation.message}); output kept at {result.output}",
              file=sys.stderr)
        return EXIT_VALIDATION
    return EXIT_OK


def format_slim_result(result) -> str:
    """Per-stage table (parameters, MACs, test accuracy, time) of a :class:`~onnxdns.workflows.slim.SlimResult`."""
    from onnxdns import report

    rows = [("input", report.count(result.input_params), report.count(result.input_macs), "-", "-", "")]
    for s in result.stages:
        rows.append((s.name, report.count(s.params), report.count(s.macs), report.percent(s.accuracy),
                     f"{s.seconds:.1f}", "reused" if s.reused else ""))
    lines = [report.table(("stage", "params", "MACs", "accuracy", "seconds", ""), rows),
             "accuracy: the built-in data set's test split; with your data, the validation data (--val-data) "
             "for the optimized model (the training stages' histories hold their validation figures)"]
    prune = result.stage("prune")
    if prune is not None:
        d = prune.details
        lines.append(f"threshold |gamma| < {d.get('threshold', float('nan')):.4g}: {d.get('total_pruned_channels', 0)} of "
                     f"{d.get('prunable_channels', d.get('prunable_bn_channels', '?'))} prunable channels removed")
    last = result.stages[-1] if result.stages else None
    if last is not None and last.name == "optimize":
        lines.append(f"params {report.ratio(result.input_params, last.params)} fewer, "
                     f"MACs {report.ratio(result.input_macs, last.macs)} fewer; validation: {last.details.get('message', '')}")
    if result.output is not None:
        lines.append(f"slim: {result.input_path} -> {result.output} in {result.seconds:.1f} s (work folder {result.work_dir})")
    return "\n".join(lines)
