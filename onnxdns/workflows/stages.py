"""The one stage cache of every workflow and benchmark: a stage runs once per configuration and inputs.

A :class:`Stage` is a unit of work (train, prune, fine-tune, optimize, evaluate...) with a JSON
record ``<folder>/<name>.json`` holding its key (its configuration and the SHA-256 of its input
files), the SHA-256 of the files it wrote and the JSON result it returned. Calling the stage
returns the recorded result when the key matches and its output files are unchanged; otherwise
it runs the work and writes the record atomically (a temporary file renamed into place). A run
that was interrupted therefore restarts where it stopped, and a changed setting or input redoes
the stage and, because its outputs are the next stage's inputs, every stage that depends on it.
Training stages keep their own checkpoints (see :func:`onnxdns.training.train`) and resume them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from onnxdns.modelio import file_sha256

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stage:
    """A cached unit of work: ``run()`` returns a JSON-serialisable dict; ``outputs`` are files it
    writes; ``inputs`` files it reads; the record goes to ``folder``. Paths in records are written
    relative to ``root`` (default: ``folder``) so that a folder can be moved or committed."""

    name: str
    config: Mapping[str, Any]
    inputs: list[Path]
    outputs: list[Path]
    run: Callable[[], dict[str, Any]]
    folder: Path
    root: Path | None = None
    reused: bool | None = dataclasses.field(default=None, init=False)  # set by the last call

    @property
    def record_path(self) -> Path:
        return Path(self.folder) / f"{self.name}.json"

    def rel(self, path: Path) -> str:
        """``path`` relative to the root (absolute when outside it)."""
        root = Path(self.root if self.root is not None else self.folder).resolve()
        try:
            return str(Path(path).resolve().relative_to(root))
        except ValueError:
            return str(Path(path).resolve())

    def key(self) -> dict[str, Any]:
        return {"config": jsonable(self.config), "inputs": {self.rel(p): file_sha256(p) for p in self.inputs}}

    def cached(self, key: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The recorded result, or None when the stage has to run (``key``: :meth:`key`, when
        the caller has it already: computing it hashes every input file)."""
        if not self.record_path.exists() or not all(Path(p).exists() for p in self.outputs):
            return None
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable stage record (%s); redoing the stage", self.record_path, e)
            return None
        if not isinstance(record, dict) or record.get("key") != (key if key is not None else self.key()):
            return None
        if any(file_sha256(p) != record.get("outputs", {}).get(self.rel(p)) for p in self.outputs):
            return None
        return record.get("result")

    def forget(self) -> None:
        """Delete the record (the stage runs on its next call)."""
        self.record_path.unlink(missing_ok=True)

    def __call__(self) -> dict[str, Any]:
        key = self.key()  # the inputs are hashed once: the run reads them, it does not change them
        result = self.cached(key)
        self.reused = result is not None
        if result is not None:
            log.info("[%s] done before: reused (record %s)", self.name, self.record_path)
            return result
        log.info("[%s] running", self.name)
        self.forget()  # a stage cut short leaves no record that could match
        start = time.perf_counter()
        result = jsonable(self.run())
        result.setdefault("stage_seconds", round(time.perf_counter() - start, 1))
        record = {"key": key, "outputs": {self.rel(p): file_sha256(p) for p in self.outputs}, "result": result}
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.record_path)
        return result


def jsonable(value: Any) -> Any:
    """``value`` as JSON reads it back: tuples become lists, numpy scalars and arrays numbers and
    lists, paths strings, non-finite floats None (so that a key compares equal to its record)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if isinstance(o, Mapping):
            return dict(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"not JSON-serialisable: {type(o).__name__}")

    def finite(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, list):
            return [finite(v) for v in o]
        return o

    return finite(json.loads(json.dumps(value, default=default)))
