"""``onnxdns train``: arguments and command (wired into :mod:`onnxdns.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from onnxdns import argtypes
from onnxdns.errors import EXIT_INTERRUPTED, EXIT_OK
from onnxdns.training.config import BATCHNORM_MODES, DATASETS, DEFAULT_SMOOTH_BETA, METHODS, SCHEDULES, TrainConfig
from onnxdns.training.losses import DEFAULT_TEMPERATURE, LOSSES
from onnxdns.training.optim import OPTIMIZERS

_DEFAULTS = TrainConfig()


def _default(name: str) -> str:
    value = getattr(_DEFAULTS, name)
    return f" (default: {value})" if value is not None else ""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``. Options left out keep their defaults, or on
    ``--resume`` the values stored in the checkpoint."""
    parser.add_argument("input", type=Path, nargs="?", metavar="IN.onnx",
                        help="model to train (any inputs and outputs; the batch on axis 0)")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT.onnx",
                        help="trained model (masks kept as Mul(W, mask) for 'onnxdns optimize')")
    parser.add_argument("--method", choices=METHODS, help=f"pruning method{_default('method')}")
    add_data_arguments(parser, default=_DEFAULTS.data)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=argtypes.positive_real, help="training length in epochs (default: 10)")
    budget.add_argument("--iterations", type=argtypes.positive_int, help="training length in optimizer steps")
    parser.add_argument("--lr", type=argtypes.positive_real, help=f"learning rate{_default('lr')}")
    add_optimizer_arguments(parser, dataclasses.asdict(_DEFAULTS))
    parser.add_argument("--lr-gamma", type=argtypes.positive_real, help="step: factor per step (0.1); inv: gamma (1e-4)")
    parser.add_argument("--lr-step", type=argtypes.positive_int, help="step schedule: steps between decays (default: a third of the run); "
                                                      "cosine: steps at full lr before the decay (default: 0)")
    parser.add_argument("--test-subset", type=argtypes.positive_int, help="evaluate on this many examples of the test split")
    parser.add_argument("--batchnorm", choices=BATCHNORM_MODES,
                        help="BatchNorm statistics while training: batch statistics with running statistics written "
                             "back (train), or the stored ones (frozen) (default: train for slim, frozen otherwise)")
    parser.add_argument("--prune-biases", action=argparse.BooleanOptionalAction, default=None,
                        help="mask biases too (default: yes for dns, as the reference; no for magnitude)")
    dns = parser.add_argument_group("dns", "Dynamic Network Surgery")
    dns.add_argument("--dns-c", metavar="SPEC",
                     help="sensitivity c per layer: 'conv=3,fc=4,fc1=2.5' (a layer name beats its kind; default conv=3,fc=4)")
    dns.add_argument("--dns-gamma", type=argtypes.non_negative_real, help=f"surgery probability (1+gamma*t)^-power{_default('dns_gamma')}")
    dns.add_argument("--dns-power", type=argtypes.non_negative_real, help=f"exponent of the surgery probability{_default('dns_power')}")
    dns.add_argument("--dns-iter-stop", type=argtypes.non_negative_int, help="no surgery after this many steps of a phase (default: phase end)")
    dns.add_argument("--dns-ramp", type=argtypes.non_negative_int, metavar="STEPS",
                     help="thresholds rise linearly from 0 over this many steps of a phase (default 0: fixed, as published)")
    dns.add_argument("--dns-phases", metavar="SPEC",
                     help="pruning phases, e.g. 'conv:0.4,fc:0.4' (fractions) or 'conv:6000,fc:6000' (steps), "
                          "'all:0.8' prunes both kinds at once; the rest fine-tunes with frozen masks")
    mag = parser.add_argument_group("magnitude", "magnitude pruning (Han et al. 2015)")
    mag.add_argument("--sparsity", metavar="SPEC", help="final sparsity per layer, e.g. 'conv=0.6,fc=0.9' (the default)")
    mag.add_argument("--quality", type=argtypes.non_negative_real, help="prune |w| < quality x std of the layer instead of a sparsity")
    mag.add_argument("--rounds", type=argtypes.positive_int, help=f"prune-retrain rounds{_default('rounds')}")
    add_slim_penalty_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                     help="artifacts and checkpoints (default: OUT.ckpt beside the output)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the run saved in DIR")
    run.add_argument("--threads", type=argtypes.threads, default=0,
                     help=f"onnxruntime intra-op threads, 0 to {argtypes.MAX_THREADS} (0: all cores)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_optimizer_arguments(group, defaults) -> None:
    """Batch size, momentum, weight decay, schedule, seed and subset (``train`` and both training
    stages of ``slim``; ``defaults`` maps the dests to the values shown in the help)."""
    group.add_argument("--batch-size", type=argtypes.positive_int, help=f"training batch size (default: {defaults['batch_size']})")
    group.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="sgd: heavy-ball momentum, as the papers; adamw: per-weight step sizes, for models whose "
                            "layers want very different learning rates (BatchNorm folded into the weights, "
                            "sparse-lowrank factors); it moves every weight by about --lr per step, even where the "
                            "gradient is only rounding noise, so use a --lr well below the weights' scale, e.g. 1e-5 "
                            "(default: sgd)")
    group.add_argument("--momentum", type=argtypes.real(0.0, 1.0, high_open=True),
                       help=f"SGD momentum; AdamW's beta1 (default: {defaults['momentum']})")
    group.add_argument("--weight-decay", type=argtypes.non_negative_real,
                       help=f"weight decay: L2 for sgd, decoupled for adamw (default: {defaults['weight_decay']})")
    group.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default: {defaults['schedule']})")
    group.add_argument("--seed", type=argtypes.non_negative_int,
                       help=f"data order, validation split and method randomness (default: {defaults.get('seed', 0)})")
    group.add_argument("--subset", type=argtypes.positive_int, help="train on this many examples drawn from the training data")


def add_data_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """The data and loss options shared by ``train`` and ``slim`` (dests are :class:`TrainConfig` fields)."""
    from onnxdns.cli import _floats  # the parser is built after onnxdns.cli is loaded

    data = parser.add_argument_group("data and loss")
    data.add_argument("--data", metavar="SPEC",
                      help=f"training data: {', '.join(DATASETS)}, a folder of images (class subfolders give labels), "
                           f"FILE.npz (one array per model input, optional 'labels'), FILE.npy or file.py:function "
                           f"(default: {default})")
    val = data.add_mutually_exclusive_group()
    val.add_argument("--val-data", metavar="SPEC", help="validation data, same kinds as --data (default: the test "
                                                         "split of mnist/fashion-mnist, else --val-fraction 0.1)")
    val.add_argument("--val-fraction", type=argtypes.real(0.0, 1.0, low_open=True, high_open=True), metavar="F",
                     help="hold out this fraction of the training data for validation (default for your data: 0.1)")
    data.add_argument("--loss", choices=LOSSES,
                      help="ce: cross-entropy with the labels; distill: learn the input model's outputs "
                           "(default: ce when the data has labels, else distill)")
    data.add_argument("--loss-output", dest="loss_outputs", action="append", metavar="NAME",
                      help="model output the loss applies to; repeat for several (default: every float output for "
                           "distill, the classifier output for ce)")
    data.add_argument("--temperature", type=argtypes.positive_real, metavar="T",
                      help=f"distillation temperature of classifier outputs (default: {DEFAULT_TEMPERATURE:g})")
    data.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                      help="images of a folder: per-channel mean subtracted after scaling to [0, 1] (default 0)")
    data.add_argument("--std", type=_floats, metavar="S[,S,S]",
                      help="images of a folder: per-channel standard deviation divided by (default 1)")
    data.add_argument("--data-dir", type=Path, help="folder with mnist/fashion-mnist files (default: the loader's)")


def add_slim_penalty_arguments(parser: argparse.ArgumentParser) -> None:
    """``--slim-lambda``, ``--smooth-l1`` and ``--smooth-l1-beta`` (dest ``slim_lambda``, ``smooth_l1``)."""
    slim = parser.add_argument_group("slim", "Network Slimming sparsity training (Liu et al. 2017)")
    slim.add_argument("--slim-lambda", type=argtypes.non_negative_real, metavar="L",
                      help=f"weight of the L1 penalty on BatchNorm scales{_default('slim_lambda')}")
    slim.add_argument("--smooth-l1", dest="smooth_l1", action="store_const", const=DEFAULT_SMOOTH_BETA,
                      help=f"smooth penalty sqrt(gamma^2 + beta^2) - beta (beta {DEFAULT_SMOOTH_BETA:g})")
    slim.add_argument("--smooth-l1-beta", dest="smooth_l1", type=argtypes.positive_real, metavar="BETA",
                      help="smooth penalty with this beta")


def run_train(args: argparse.Namespace) -> int:
    """Run ``onnxdns train``; returns the exit status (130 when interrupted after saving)."""
    from onnxdns.errors import OnnxdnsError
    from onnxdns.workflows.train import train

    if args.resume is None and (args.input is None or args.output is None):
        raise OnnxdnsError("train needs IN.onnx and -o OUT.onnx (or --resume DIR)")
    options = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    result = train(args.input, args.output, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                   progress=not args.no_progress, threads=args.threads, data_dir=args.data_dir, **options)
    print(format_result(result))
    if result.interrupted:
        print(f"continue with: onnxdns train --resume {result.checkpoint_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def format_result(result) -> str:
    """Per-epoch table, final per-layer density and what the method did (of a ``TrainResult``):
    validation accuracy with labels, else fidelity to the input model (agreement, cosine and
    relative L2 error of each loss output)."""
    split = result.val_split if result.history else "validation"
    short = "test" if split == "test" else "val"
    labelled = any(r.val_accuracy is not None for r in result.history)
    fidelity = sorted({k for r in result.history for k in r.metrics if k != "accuracy"})
    head = [f"{'epoch':>5}", f"{'step':>7}", f"{'lr':>9}", f"{'train loss':>10}"]
    if any(r.train_accuracy is not None for r in result.history):
        head.append(f"{'train acc':>9}")
    head.append(f"{short + ' loss':>10}")
    if labelled:
        head.append(f"{short + ' acc':>9}")
    head += [f"{k:>{max(10, len(k))}}" for k in fidelity]
    head.append(f"{'density':>8}")
    lines = [" ".join(head)]
    for r in result.history:
        row = [f"{r.epoch:>5}", f"{r.step:>7}", f"{r.lr:>9.3g}", f"{r.train_loss:>10.4f}"]
        if any(x.train_accuracy is not None for x in result.history):
            row.append(f"{r.train_accuracy:>9.2%}" if r.train_accuracy is not None else f"{'-':>9}")
        row.append(f"{r.val_loss:>10.4f}")
        if labelled:
            row.append(f"{r.val_accuracy:>9.2%}" if r.val_accuracy is not None else f"{'-':>9}")
        for k in fidelity:
            v = r.metrics.get(k)
            w = max(10, len(k))
            row.append(f"{'-':>{w}}" if v is None else (f"{v:>{w}.2%}" if k.startswith("agreement/") else f"{v:>{w}.4f}"))
        row.append(f"{r.total_density:>8.2%}")
        lines.append(" ".join(row))
    lines.append(f"loss: {result.loss} on {', '.join(result.loss_outputs)}; {short}: "
                 + ("the test split" if split == "test" else "held-out validation data"))
    if result.density:
        lines.append("density: " + ", ".join(f"{name} {d:.2%}" for name, d in result.density.items()))
    summary = result.method_summary
    if "spliced" in summary:
        lines.append(f"surgery: {summary['pruned']} prunings, {summary['spliced']} splicings")
    if "slim" in summary:
        s = summary["slim"]
        q = s["abs_gamma_quantiles"]
        lines.append(f"BatchNorm |gamma| over {s['bn_channels']} channels: {s['small_fraction']:.1%} below 0.01; "
                     f"quantiles 10% {q['q10']:.3g}, 50% {q['q50']:.3g}, 90% {q['q90']:.3g}; penalty {s['penalty']:.4g}")
    if result.output is not None:
        lines.append(f"{result.method}: {result.steps} steps in {result.seconds:.1f} s -> {result.output}")
    return "\n".join(lines)
