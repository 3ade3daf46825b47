"""Cost of a layer option: MACs, parameters, or estimated onnxruntime CPU latency.

``latency`` is a deterministic roofline-style model of onnxruntime's CPU provider, whose
constants come from timing single convolutions with onnxruntime 1.19 on this project's machine
(AMD EPYC with AVX-512, one intra-op thread, batch 8; ``docs/sparse_lowrank.md`` has the table):

* a convolution runs at about ``PEAK_MACS`` multiply-accumulates per microsecond after
  rounding its input and output channel counts up to the NCHWc block (16 with AVX-512, else 8;
  inputs with fewer channels than a block are not rounded: onnxruntime reads them as NCHW), plus
  ``BYTES_PER_US`` of memory traffic for its input and output (its packed weights stay in cache),
  plus ``NODE_US`` fixed; 1x1 convolutions are bound by that traffic, which is why they run below
  the peak;
* a Gemm/MatMul: the same without channel rounding, its weights counted in the traffic;
* a Gather of input channels costs its bytes read and written; the branch sum is fused into the
  last convolution by onnxruntime, so it costs reading one more output-sized tensor.

On 28 measured convolutions (3x3 and 1x1, 8 to 512 channels, 1x1 to 56x56 outputs, batch 8) the
estimate was within -14% / +19% of the measured time (median -3%), except two tiny ones: a 1x1
convolution on a 1x1 map (18 us measured, -40%) and the 1x1 8->24 one (-25%)
(``docs/sparse_lowrank.md`` has the table). Timing
options on the machine itself is not offered: timings on a shared machine are noisy and would
make the pass non-deterministic.
"""

from __future__ import annotations

import functools
import math

from onnxdns.lowrank.layers import Geometry

PEAK_MACS = 58_000.0  # multiply-accumulates per microsecond and thread (3x3 conv, AVX-512)
BYTES_PER_US = 16_000.0  # memory traffic per microsecond and thread
NODE_US = 5.0  # fixed cost of one node
COSTS = ("latency", "macs", "params")


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """onnxruntime's NCHWc channel block on this CPU: 16 with AVX-512, else 8."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return 16 if "avx512f" in fh.read() else 8
    except OSError:
        return 8


def _pad(channels: int, block: int) -> int:
    return int(math.ceil(channels / block) * block)


def conv_us(batch: int, c_in: int, c_out: int, kernel_area: int, positions: int, in_positions: int) -> float:
    """Estimated microseconds of one convolution (see the module docstring)."""
    block = nchwc_block()
    c_in_eff = c_in if c_in < block else _pad(c_in, block)
    macs = batch * positions * c_in_eff * _pad(c_out, block) * kernel_area
    traffic = 4.0 * (batch * c_in * in_positions + batch * c_out * positions)
    return NODE_US + macs / PEAK_MACS + traffic / BYTES_PER_US


def matmul_us(rows: int, k: int, n: int) -> float:
    return NODE_US + rows * k * n / PEAK_MACS + 4.0 * (rows * k + rows * n + k * n) / BYTES_PER_US


def latency_us(geometry: Geometry, rank: int | None, keep: int, batch: int = 8) -> float:
    """Estimated microseconds of the layer at ``batch`` (``rank=None``: the dense layer)."""
    g = geometry
    m, c, area, pos = g.out_channels, g.in_channels, g.group_size, g.positions
    in_pos = int(math.prod(g.input_shape[1:])) if g.op == "Conv" and len(g.input_shape) == 3 else pos
    if g.op == "Conv":
        def layer(ci: int, co: int, a: int, ip: int) -> float:
            return conv_us(batch, ci, co, a, pos, ip)
    else:
        def layer(ci: int, co: int, a: int, ip: int) -> float:
            return matmul_us(batch * pos, ci * a, co)
    if rank is None:
        return layer(c, m, area, in_pos)
    total = 0.0
    if rank:
        total += layer(c, rank, area, in_pos) + layer(rank, m, 1, pos)
    if keep:
        if keep < c:
            total += NODE_US + 8.0 * batch * keep * in_pos / BYTES_PER_US
        total += layer(keep, m, area, in_pos)
    if rank and keep:
        total += 4.0 * batch * m * pos / BYTES_PER_US
    return total


def option_cost(kind: str, geometry: Geometry, rank: int | None, keep: int, batch: int = 8) -> float:
    """Cost of an option under ``kind`` (one of :data:`COSTS`)."""
    if kind == "macs":
        return float(geometry.macs(rank, keep))
    if kind == "params":
        return float(geometry.params(rank, keep))
    if kind == "latency":
        return latency_us(geometry, rank, keep, batch)
    raise ValueError(f"unknown cost {kind!r}; choose one of {', '.join(COSTS)}")
