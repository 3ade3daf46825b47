"""Limit numpy's BLAS threads while fitting (OpenBLAS busy-waits badly on a shared machine).

On 2 shared cores, OpenBLAS with 2 threads made a 288x288 ``eigh`` take 2 s instead of 12 ms
(other processes held the cores); small and medium problems are faster single-threaded anyway.
:func:`blas_threads` sets the thread count of the OpenBLAS that numpy loaded, found in the process
memory map, and restores it afterwards; where that is not possible it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")


def _openblas() -> tuple[object, object] | None:
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded)

    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        getter = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        if setter is not None and getter is not None:
            return setter, getter
    return None


@contextlib.contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` BLAS threads (0: the number of CPUs)."""
    funcs = _openblas()
    if funcs is None:
        yield
        return
    setter, getter = funcs
    before = int(getter())
    setter(int(threads) if threads > 0 else (os.cpu_count() or 1))
    try:
        yield
    finally:
        setter(before)
