"""Test markers for the optional parts of onnxdns (see onnxdns/extras.py and pyproject.toml).

* ``torch``: builds or exports models with torch (``onnxdns[zoo]``);
* ``train``: runs onnxruntime-training (``onnxdns[train]``, which includes torch).

The core environment (no torch, newest onnx and onnxruntime) runs ``-m "not torch and not train"``;
an unmarked test that imports torch fails there, which is how the suite proves the compiler runs
without it. A module whose every test needs a part says so with a ``pytestmark = pytest.mark.X``
line; when the part is missing such a module is not even imported (its imports would fail), and
the run's header lists it. A marked test whose part is missing is skipped with the extra to
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
_not_collected: list[str] = []


def _module_mark(path: Path) -> str | None:
    match = _MODULE_MARK.search(path.read_text(encoding="utf-8"))
    return match.group(1) if match and match.group(1) in PARTS else None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    mark = _module_mark(collection_path)
    if mark is not None and not extras.available(PARTS[mark][0]):
        _not_collected.append(f"{collection_path.name} ({mark})")
        return True
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark, (part, extra) in PARTS.items():
        if item.get_closest_marker(mark) is not None and not extras.available(part):
            pytest.skip(f"needs {extra}: pip install '{extra}'")


def pytest_report_collectionfinish(config: pytest.Config, start_path: Path, items) -> list[str]:
    if not _not_collected:
        return []
    return [f"not collected (optional part not installed): {', '.join(sorted(_not_collected))}"]
