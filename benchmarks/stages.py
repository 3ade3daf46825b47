"""Cached benchmark stages, shared by the benchmarks that train (``dns_lenet.py``, ``sparse_lowrank.py``).

A :class:`Stage` is a unit of work whose record (``<folder>/<name>.json``) holds its key (its
configuration and the SHA-256 of its input files), the SHA-256 of the files it wrote and the JSON
result it returned. Calling the stage returns the recorded result when the key matches and the
output files are unchanged; otherwise it runs the work and writes the record atomically. An
interrupted benchmark therefore restarts where it stopped, and changing a setting or an input
redoes what depends on it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from onnxdns.modelio import file_sha256

REPO = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    """``path`` relative to the repository (absolute when outside it)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path.resolve())


@dataclasses.dataclass
class Stage:
    """A cached unit of work: ``run()`` returns a JSON record; ``outputs`` are files it writes;
    the record goes to ``folder``."""

    name: str
    config: dict[str, Any]
    inputs: list[Path]
    outputs: list[Path]
    run: Callable[[], dict[str, Any]]
    folder: Path
    reused: bool | None = dataclasses.field(default=None, init=False)  # set by the last call

    @property
    def record_path(self) -> Path:
        return self.folder / f"{self.name}.json"

    def key(self) -> dict[str, Any]:
        return {"config": self.config, "inputs": {rel(p): file_sha256(p) for p in self.inputs}}

    def cached(self) -> dict[str, Any] | None:
        if not self.record_path.exists() or not all(p.exists() for p in self.outputs):
            return None
        record = json.loads(self.record_path.read_text())
        if record.get("key") != self.key():
            return None
        if any(file_sha256(p) != record.get("outputs", {}).get(rel(p)) for p in self.outputs):
            return None
        return record["result"]

    def __call__(self) -> dict[str, Any]:
        result = self.cached()
        self.reused = result is not None
        if result is not None:
            log(f"[{self.name}] done before: skipped (record {rel(self.record_path)})")
            return result
        log(f"[{self.name}] running")
        start = time.perf_counter()
        result = self.run()
        result.setdefault("stage_seconds", round(time.perf_counter() - start, 1))
        record = {"key": self.key(), "outputs": {rel(p): file_sha256(p) for p in self.outputs}, "result": result}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.record_path)
        return result
