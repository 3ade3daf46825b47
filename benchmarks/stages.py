"""Cached benchmark stages: :class:`onnxdns.workflows.stages.Stage` with records relative to the
repository (so the committed records under ``benchmarks/results/*/stages/`` are reused by a
fresh clone), and the benchmarks' console helpers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from onnxdns.workflows import stages

REPO = Path(__file__).resolve().parent.parent

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(message)s"))
stages.log.addHandler(_handler)
stages.log.setLevel(logging.INFO)
stages.log.propagate = False


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    """``path`` relative to the repository (absolute when outside it)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path.resolve())


def Stage(name: str, config: dict[str, Any], inputs: list[Path], outputs: list[Path],
          run: Callable[[], dict[str, Any]], folder: Path) -> stages.Stage:
    """A cached benchmark stage (see :mod:`onnxdns.workflows.stages`)."""
    return stages.Stage(name, config, inputs, outputs, run, folder, root=REPO)
