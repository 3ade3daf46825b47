"""Test markers for the optional parts of onnxdns (see onnxdns/extras.py and pyproject.toml).

* ``torch``: builds or exports models with torch (``onnxdns[zoo]``);
* ``train``: runs onnxruntime-training (``onnxdns[train]``, which includes torch).

The core environment (no torch, newest onnx and onnxruntime) runs ``-m "not torch and not train"``;
an unmarked test that imports torch fails there, which is how the suite proves the compiler runs
without it. A module whose every test needs a part says so with a ``pytestmark = pytest.mark.X``
line; when the part is missing such a module is not imported (its imports would fail) and shows
as one skipped entry naming the extra. A marked test whose part is missing is skipped with the extra to
install, so a plain ``pytest`` in a smaller environment still runs everything it can.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from onnxdns import extras

#: marker -> the part of onnxdns.extras it needs, and the extra that provides it
PARTS = {"torch": ("zoo", "onnxdns[zoo]"), "train": ("train", "onnxdns[train]")}
_MODULE_MARK = re.compile(r"^pytestmark\s*=\s*pytest\.mark\.(\w+)\b", re.MULTILINE)


def _module_mark(path: Path) -> str | None:
    match = _MODULE_MARK.search(path.read_text(encoding="utf-8"))
    return match.group(1) if match and match.group(1) in PARTS else None


class _ModuleNeedingMissingPart(pytest.Module):
    """A test module that is not imported because a part it needs at import time is missing."""

    reason = ""

    def collect(self):
        pytest.skip(self.reason)


def pytest_pycollect_makemodule(module_path: Path, parent):
    mark = _module_mark(module_path)
    if mark is not None and not extras.available(PARTS[mark][0]):
        module = _ModuleNeedingMissingPart.from_parent(parent, path=module_path)
        module.reason = f"{module_path.name} not imported: every test needs {PARTS[mark][1]} (marker {mark})"
        return module
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark, (part, extra) in PARTS.items():
        if item.get_closest_marker(mark) is not None and not extras.available(part):
            pytest.skip(f"needs {extra}: pip install '{extra}'")
