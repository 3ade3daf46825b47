"""argparse ``type=`` converters that refuse what the commands cannot use (NaN, infinities,
negative counts, absurd thread counts) with a one-line message naming the accepted range."""

from __future__ import annotations

import argparse
import math
from typing import Callable

#: Upper bound of ``--threads``: onnxruntime creates one OS thread per intra-op thread, and
#: 100000 of them crashed the process (SIGSEGV); 256 is beyond any CPU this stack runs on.
MAX_THREADS = 256


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high] (either bound may be None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer{_range(low, high)}, got '{text}'") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer{_range(low, high)}, got '{text}'")
        return value

    return convert


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval given by ``low`` and ``high`` (open ends as asked)."""

    def convert(text: str) -> float:
        what = f"a finite number{_range(low, high, low_open, high_open)}"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        return value

    return convert


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


positive_int = integer(1)
non_negative_int = integer(0)
threads = integer(0, MAX_THREADS)
positive_real = real(0.0, low_open=True)
non_negative_real = real(0.0)
