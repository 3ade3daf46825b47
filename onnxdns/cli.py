"""The ``onnxdns`` command line: parses arguments, calls :mod:`onnxdns.api`, prints the results.

Exit status: 0 success, 1 internal error (traceback with ``--debug``), 2 user mistake or missing
extra (one line on stderr), 3 validation of an optimized model failed (the output file is kept),
130 interrupted. Library modules log through ``logging``; the CLI shows their warnings on stderr
(``--quiet``: errors only, ``--verbose``: each pass and its time).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator, Sequence

from onnxdns import __version__, argtypes, extras
from onnxdns.data import VALIDATION_CHOICES as DATA_CHOICES
from onnxdns.errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_VALIDATION,
                            OnnxdnsError)
from onnxdns.slimming_cli import add_slim_arguments, run_slim
from onnxdns.training.cli import add_train_arguments, run_train


class _UsageError(Exception):
    """An argparse error, reported like any other user mistake."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


DATA_HELP = ("a folder of images (class subfolders give labels), FILE.npy, module:function or FILE.npz (one array "
             "per model input, named after it, optional 'labels')")


def _data_choice(text: str) -> str:
    """--data: a dataset name, ``random``, or a data source of :func:`onnxdns.sources.open_source`."""
    from onnxdns.sources import is_source_spec

    if text in DATA_CHOICES or is_source_spec(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(DATA_CHOICES)}, "
                                     f"a folder of images, FILE.npy, module:function or FILE.npz)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got '{text}'") from None


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                   help="images of a folder: per-channel mean subtracted after scaling to [0, 1] (default 0)")
    p.add_argument("--std", type=_floats, metavar="S[,S,S]",
                   help="images of a folder: per-channel standard deviation divided by (default 1)")


def _open_data(spec, model: Path, args: argparse.Namespace, split: str = "test"):
    """``spec`` as given, or opened as a :class:`~onnxdns.sources.Source` when --mean/--std
    normalise its images (the library opens a folder with the defaults itself)."""
    if spec is None or (args.mean is None and args.std is None) or not os.path.isdir(str(spec)):
        return spec
    from onnxdns import sources

    if not model.is_file():
        return spec  # the command reports the missing model
    try:
        inputs = sources.model_inputs(model)
    except Exception:  # noqa: BLE001 - the command reports an unreadable model
        return spec
    return sources.open_source(spec, inputs, split=split, mean=args.mean, std=args.std)


def _check_image_options(args: argparse.Namespace, *specs) -> None:
    if (args.mean is not None or args.std is not None) and not any(s and os.path.isdir(str(s)) for s in specs):
        raise OnnxdnsError("--mean and --std normalise the images of a folder (--data DIR or --calib-data DIR)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of internal errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="show only errors on stderr (no warnings, no progress bars)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log what the library does (each pass, its time); -vv for debug messages")
    parser = _Parser(
        prog="onnxdns",
        description="Make ONNX models smaller and faster (Dynamic Network Surgery, Network Slimming, "
                    "sparse plus low-rank), measured on onnxruntime.",
        epilog="exit status: 0 ok, 1 internal error, 2 usage or input error, 3 validation failed, 130 interrupted",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"onnxdns {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("optimize", parents=[common], help="run a target pipeline and save the optimized model",
                       description="Run the target's pass pipeline (or --passes), save atomically, validate.")
    p.add_argument("input", type=Path, metavar="IN.onnx")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--passes", metavar="A,B,...", help="comma-separated pass names instead of the target pipeline")
    p.add_argument("--pass-option", action="append", default=[], metavar="PASS.OPTION=VALUE",
                   help="a constructor option of a pass in the pipeline, e.g. slim-channels.ratio=0.3 (repeatable; "
                        "`onnxdns passes` lists every pass's options)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison with the input")
    p.add_argument("--data", type=_data_choice, default="random", metavar="DATA",
                   help=f"validation inputs: {', '.join(DATA_CHOICES)}, {DATA_HELP} (default: random)")
    _add_image_options(p)
    p.add_argument("--data-dir", type=Path, help="folder with the dataset's files (default: the loader's)")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--samples", type=argtypes.positive_int, help="number of validation samples")
    p.add_argument("--external-data", action="store_true", default=None,
                   help="write the weights to OUT.onnx.data (default: when the input has external data "
                        "or the output exceeds 2 GB)")
    _add_sparse_lowrank_options(p)
    p.set_defaults(func=_optimize)

    p = sub.add_parser("inspect", parents=[common], help="per-layer parameters, non-zeros and MACs",
                       description="Per-layer table (params, non-zeros, density, MACs at batch 1), totals, file size.")
    p.add_argument("model", type=Path, metavar="M.onnx")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("validate", parents=[common], help="compare two models in onnxruntime",
                       description="Output differences, top-1 agreement, accuracy and latency of A and B side by side.")
    p.add_argument("model_a", type=Path, metavar="A.onnx")
    p.add_argument("model_b", type=Path, metavar="B.onnx")
    p.add_argument("--data", type=_data_choice, default="random", metavar="DATA",
                   help=f"inputs: {', '.join(DATA_CHOICES)}, {DATA_HELP}")
    _add_image_options(p)
    p.add_argument("--data-dir", type=Path, help="folder with the dataset's files (default: the loader's)")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--batch", type=argtypes.positive_int, default=32)
    p.add_argument("--samples", type=argtypes.positive_int, help="number of samples (default: test split, or 256 random)")
    p.add_argument("--repeats", type=argtypes.positive_int, default=20, help="timed runs per model and batch size")
    p.add_argument("--threads", type=argtypes.threads, default=0,
                   help=f"onnxruntime intra-op threads, 0 to {argtypes.MAX_THREADS} (0: onnxruntime decides)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("passes", parents=[common], help="list the registered passes")
    p.set_defaults(func=_passes)

    p = sub.add_parser("export", parents=[common], help="export a model of the zoo to ONNX")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-o", "--output", type=Path, metavar="FILE")
    p.add_argument("--list", action="store_true", help="list the models")
    p.set_defaults(func=_export)

    p = sub.add_parser("train", parents=[common], help="train or prune with onnxruntime-training (dns, magnitude, slim, none)",
                       description="Train an ONNX classifier with onnxruntime-training: Dynamic Network Surgery, "
                                   "magnitude pruning, Network Slimming sparsity training or plain training.")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("slim", parents=[common], help="Network Slimming: sparsity training, channel pruning, fine-tuning",
                       description="Train with an L1 penalty on BatchNorm scales, prune the channels with small scales "
                                   "(coupled channels as whole groups), fine-tune, optimize and validate. Finished "
                                   "stages are skipped when the command is run again.")
    add_slim_arguments(p)
    p.set_defaults(func=run_slim)
    return parser


# --------------------------------------------------------------------------- commands


def _optimize(args: argparse.Namespace) -> int:
    from onnxdns import api, report

    passes = None if args.passes is None else args.passes.split(",")
    _check_image_options(args, args.data, args.calib_data)
    result = api.optimize(args.input, args.output, target=args.target, precision=args.precision, passes=passes,
                          validate=not args.no_validate, data=_open_data(args.data, args.input, args),
                          data_dir=args.data_dir,
                          download=args.download, samples=args.samples, pass_options=_all_pass_options(args),
                          external_data=args.external_data)
    print(report.optimize_summary(result))
    _print_sparse_lowrank(result)
    if not result.ok:
        _error(f"validation failed ({result.validation.message}); output kept at {result.output_path}")
        return EXIT_VALIDATION
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from onnxdns import api, report

    stats = api.inspect(args.model)
    print(f"{args.model}\n\n{report.layer_table(stats)}\n\n{report.totals(stats)}")
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from onnxdns import api, report

    _check_image_options(args, args.data)
    cmp = api.validate(args.model_a, args.model_b, data=_open_data(args.data, args.model_a, args),
                       data_dir=args.data_dir, download=args.download,
                       batch=args.batch, samples=args.samples, repeats=args.repeats, threads=args.threads)
    print(f"A = {args.model_a}\nB = {args.model_b}")
    print(report.comparison(cmp))
    return EXIT_OK


def _passes(args: argparse.Namespace) -> int:
    from onnxdns import registry, report

    from onnxdns.passoptions import options_help

    print(report.passes_table(registry.pass_classes().values()))
    from onnxdns.pipelines import option_classes

    print(f"\noptions (optimize --pass-option PASS.OPTION=VALUE):\n{options_help(option_classes().values())}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from onnxdns import models, report

    if args.list:
        print(report.models_table(models.MODELS, models.INPUT_SHAPES))
        return EXIT_OK
    if not args.name:
        raise OnnxdnsError("export needs a model NAME (see onnxdns export --list)")
    if args.name not in models.MODELS:
        raise OnnxdnsError(f"unknown model '{args.name}'; known models: {', '.join(models.MODELS)}")
    if args.output is None:
        raise OnnxdnsError("export needs -o FILE")
    if args.output.is_dir():
        raise OnnxdnsError(f"{args.output}: is a directory; give an output file name")
    path = models.export_model(args.name, args.output)
    print(f"{args.name} -> {path}")
    return EXIT_OK


# --------------------------------------------------------------------------- sparse-lowrank options


def _add_sparse_lowrank_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sparse-lowrank", "options of the sparse-lowrank pass (name it in --passes)")
    g.add_argument("--calib-data", metavar="DATA",
                   help="calibration inputs: a dataset name (mnist, fashion-mnist), a folder of images, "
                        "module:function, a .npy file of inputs of a one-input model, or a .npz file of arrays "
                        "named after the model inputs")
    g.add_argument("--calib-samples", type=argtypes.positive_int, metavar="N", help="calibration inputs to use (default 512)")
    g.add_argument("--target-speedup", type=argtypes.real(1.0, low_open=True), metavar="X",
                   help="estimated onnxruntime speed-up to reach (default 2 unless --target-compression)")
    g.add_argument("--target-compression", type=argtypes.real(1.0, low_open=True), metavar="X",
                   help="parameter reduction to reach (instead, or as well)")
    g.add_argument("--finetune-epochs", type=argtypes.non_negative_real, metavar="E",
                   help="fine-tune the split model with onnxruntime-training on --calib-data (cross-entropy with labels, "
                        "else distillation from the model before the split)")
    g.add_argument("--no-speed-check", dest="speed_check", action="store_false", default=None,
                   help="do not time the split model against its input (by default splits that do not make "
                        "it faster on onnxruntime CPU are undone)")


def _all_pass_options(args: argparse.Namespace) -> dict[str, dict] | None:
    """--pass-option items, with the sparse-lowrank flags below on top (None when none is given)."""
    from onnxdns.passoptions import parse_pass_options

    options = parse_pass_options(args.pass_option)
    for name, opts in (_pass_options(args) or {}).items():
        options.setdefault(name, {}).update(opts)
    return options or None


def _pass_options(args: argparse.Namespace) -> dict[str, dict] | None:
    """Constructor options of sparse-lowrank from the command line (None when none is given)."""
    opts: dict = {}
    if args.calib_data is not None:
        opts["calib_data"] = _calib_data(args.calib_data, args)
    for name in ("calib_samples", "target_speedup", "target_compression", "finetune_epochs", "speed_check"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if not opts:
        return None
    if args.finetune_epochs and args.calib_data is not None:
        opts["finetune_data"] = args.calib_data  # read again, by name, by the training loop
        opts["finetune_options"] = {k: getattr(args, k) for k in ("mean", "std") if getattr(args, k) is not None}
    if args.data_dir is not None:
        opts["data_dir"] = str(args.data_dir)
    opts["progress"] = sys.stderr.isatty()
    return {"sparse_lowrank": opts}


def _calib_data(text: str, args: argparse.Namespace):
    from onnxdns.sources import is_source_spec
    from onnxdns.sources.arrays import read_arrays

    if text in DATA_CHOICES[1:]:
        return text
    if text.endswith((".npz", ".npy")):
        arrays = read_arrays(text, "calibration inputs")
        return arrays[""] if text.endswith(".npy") else arrays
    if is_source_spec(text):
        return _open_data(text, args.input, args, split="train")
    raise OnnxdnsError(f"--calib-data: expected {', '.join(DATA_CHOICES[1:])}, a folder of images, module:function, "
                       f"a .npy or a .npz file, got '{text}'")


def _print_sparse_lowrank(result) -> None:
    from onnxdns.lowrank.report import layer_table

    for run in result.passes:
        if run.name == "sparse-lowrank" and run.details.get("layers"):
            print(f"\nsparse-lowrank\n{layer_table(run.details)}")


# --------------------------------------------------------------------------- optional parts


def _required_part(args: argparse.Namespace) -> str | None:
    """The optional part (see :mod:`onnxdns.extras`) the command needs before it starts."""
    if args.command in ("train", "slim"):
        return "train"
    if args.command == "export":
        return "zoo"
    if args.command == "optimize" and args.finetune_epochs is not None:
        return "train"
    if args.command in ("validate", "optimize"):  # optimize loads its output in onnxruntime, always
        return "runtime"
    return None


def _configure_logging(args: argparse.Namespace) -> None:
    """Library modules log under ``onnxdns``; the command line shows warnings unless --quiet."""
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.ERROR if getattr(args, "quiet", False) else (
        logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG)
    logger = logging.getLogger("onnxdns")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("onnxdns: %(message)s"))
        logger.addHandler(handler)
    if getattr(args, "quiet", False) and hasattr(args, "no_progress"):
        args.no_progress = True


class _StderrHandler(logging.Handler):
    """Log records on stderr, above any progress bar (tqdm.write keeps the bar intact)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


# --------------------------------------------------------------------------- entry point

#: Commands that run onnxruntime (whose C++ log is silenced, see _quiet_onnxruntime).
_ONNXRUNTIME_COMMANDS = ("optimize", "validate", "train", "slim")
#: OSErrors without a file name that still mean "your disk or your limits", not a bug.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                       errno.ENAMETOOLONG, errno.EMFILE}


@contextlib.contextmanager
def _robust_output() -> Iterator[None]:
    """Printing never fails: characters the terminal's encoding lacks (a file name with invalid
    UTF-8 bytes under LC_ALL=C, say) are written as backslash escapes instead of raising."""
    saved = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors is not None and hasattr(stream, "reconfigure"):
            with contextlib.suppress(Exception):
                stream.reconfigure(errors="backslashreplace")
                saved.append((stream, errors))
    try:
        yield
    finally:
        for stream, errors in saved:
            with contextlib.suppress(Exception):
                stream.reconfigure(errors=errors)


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Route Python warnings (numpy RuntimeWarnings, torch, onnx-ir) to logging and keep them, and
    onnx-ir's log, off stderr unless --debug: an error must print just its one line."""
    loggers = [logging.getLogger(name) for name in ("py.warnings", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    logging.captureWarnings(True)
    if not debug:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quiet_onnxruntime(debug: bool) -> None:
    """onnxruntime's default logger (every session, inference and training, that does not set its
    own level) prints only fatal errors; its errors reach the user as exceptions, in one line."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3 if debug else 4)



def _error(message: str) -> None:
    print(f"onnxdns: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    with _robust_output(), _quiet_libraries(debug):
        return _main(argv, debug)


def _main(argv: Sequence[str] | None, debug: bool) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError("missing COMMAND: optimize, inspect, validate, passes, export, train or slim (see onnxdns --help)")
        _configure_logging(args)
        part = _required_part(args)
        if part is not None:
            extras.require(part, f"onnxdns {args.command}")
        if args.command in _ONNXRUNTIME_COMMANDS:
            _quiet_onnxruntime(debug)
        return args.func(args)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    except (_UsageError, OnnxdnsError, extras.MissingExtraError) as e:
        _error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `onnxdns passes | head -1`: stop quietly, like other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        if e.filename is None and e.errno not in _ENVIRONMENT_ERRNOS:
            return _internal_error(e, debug)
        # the operating system refused a path the user gave (or space on its disk): a user mistake
        where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
        _error(f"{where}{e.strerror or e}")
        return EXIT_USAGE
    except Exception as e:
        part = extras.part_of_import_error(e) if isinstance(e, ModuleNotFoundError) else None
        if part is not None and not debug:  # an optional part that the checks above did not foresee
            _error(str(extras.error_for(part, "this command")))
            return EXIT_USAGE
        return _internal_error(e, debug)


def _internal_error(e: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        first = str(e).strip().splitlines()
        _error(f"internal error: {type(e).__name__}: {first[0] if first else ''} (rerun with --debug for the traceback)")
    return EXIT_INTERNAL
