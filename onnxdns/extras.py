"""Optional parts of onnxdns and the ``pip install`` extra that provides each.

The compiler (passes, inspect) needs only onnx, onnx-ir and numpy. onnxruntime comes in mutually
exclusive flavours that all install the one ``onnxruntime`` module, so the user chooses one with
an extra: ``[cpu]`` (onnxruntime), ``[cuda]`` (onnxruntime-gpu) or ``[train]``
(onnxruntime-training-cpu 1.19.2, which also brings torch). ``[zoo]`` adds torch for the model
zoo. A missing part is reported as :class:`MissingExtraError`: one line naming the extra, never an
ImportError traceback. Checks use :func:`importlib.util.find_spec`, so they import nothing heavy.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: What each part needs (modules) and how to get it.
PARTS = {
    "runtime": (("onnxruntime",), "pip install 'onnxdns[cpu]' (or 'onnxdns[cuda]' for onnxruntime-gpu)"),
    "train": (("onnxruntime.training", "torch"),
              "pip install 'onnxdns[train]' (onnxruntime-training 1.19.2, Python 3.10 to 3.12)"),
    "zoo": (("torch",), "pip install 'onnxdns[zoo]'"),
}
#: The part to name when an import of this top-level module fails.
_PART_OF_MODULE = {"onnxruntime.training": "train", "torch": "zoo", "onnxruntime": "runtime"}
_WHAT = {"runtime": "onnxruntime", "train": "onnxruntime-training", "zoo": "torch"}


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed (the message names the extra).

    Deliberately not an :class:`~onnxdns.errors.OnnxdnsError`: passes treat those as "cannot do
    this here" and carry on, while a missing runtime must stop the run (the CLI reports it in one
    line, exit status 2)."""


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # the parent package is missing (or blocked)
        return False


def missing(part: str) -> list[str]:
    """The modules of ``part`` (``runtime``, ``train`` or ``zoo``) that cannot be imported."""
    return [m for m in PARTS[part][0] if not is_installed(m)]


def available(part: str) -> bool:
    return not missing(part)


def error_for(part: str, feature: str) -> MissingExtraError:
    return MissingExtraError(f"{feature} needs {_WHAT[part]}, which is not installed: {PARTS[part][1]}")


def require(part: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra unless ``part`` is installed."""
    if missing(part):
        raise error_for(part, feature)


def part_of_import_error(error: ModuleNotFoundError) -> str | None:
    """The part whose absence caused ``error`` (None when it is not an optional dependency)."""
    name = error.name or ""
    for module, part in _PART_OF_MODULE.items():
        if name == module or name.startswith(module + "."):
            return part
    return None


class _OptionalModule:
    """Stands in for an optional module: imports it on first use, or raises MissingExtraError there
    when it is not installed (so importing onnxdns never loads onnxruntime, nor torch with it)."""

    def __init__(self, module: str, part: str, feature: str) -> None:
        self._module_name, self._part, self._feature = module, part, feature
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            if not is_installed(self._module_name):
                raise error_for(self._part, self._feature)
            self._module = importlib.import_module(self._module_name)
        return getattr(self._module, attr)


def optional_import(module: str, part: str, feature: str) -> _OptionalModule:
    """A lazy stand-in for ``module``: the first attribute access imports it, or raises
    :class:`MissingExtraError` naming the extra when it is not installed (``feature`` says what
    needed it)."""
    return _OptionalModule(module, part, feature)
