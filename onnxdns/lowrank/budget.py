"""Per-layer candidates (rank, kept groups), their measured errors, and the global allocation.

Each layer gets a grid of options (:func:`grid`): ranks 1, 2, 4 and steps of ``rank_step``,
kept input groups at :data:`KEEP_FRACTIONS` of the layer's groups (both rounded up to
``round_to``, 8 for the CUDA target), keeping
only options cheaper than the dense layer, plus the dense layer itself (error 0). The error of
an option is the squared relative post-activation error of a linear S + L fit on held-out
calibration rows (:func:`candidate_errors`); :func:`allocate` then picks one option per layer
minimising the summed error under a total cost budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from onnxdns.lowrank.fit import Problem, activate, linear_fit
from onnxdns.lowrank.layers import Geometry


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to emit a layer; ``rank=None`` is the dense layer left as it is."""

    rank: int | None
    keep: int
    cost: float
    error: float  # squared relative post-activation error (0 for the dense layer)
    macs: int
    params: int

    @property
    def dense(self) -> bool:
        return self.rank is None


def _round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step)


def rank_step(geometry: Geometry, round_to: int) -> int:
    """Rank granularity: ``round_to`` when above 1, else 8 / 4 / 2 / 1 by layer size."""
    if round_to > 1:
        return round_to
    full = geometry.full_rank
    return 8 if full >= 128 else 4 if full >= 32 else 2 if full >= 8 else 1


#: Kept fractions of a layer's input groups offered to the allocation (then rounded).
KEEP_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 12, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)


def grid(geometry: Geometry, cost: Callable[[Geometry, int | None, int], float],
         round_to: int = 1) -> list[tuple[int, int]]:
    """(rank, keep) pairs cheaper than the dense layer under ``cost`` (rank 0 = sparse only).

    Ranks: 1, 2, 4 (small low-rank parts next to a sparse part) and multiples of
    :func:`rank_step`; kept groups: :data:`KEEP_FRACTIONS` of the input groups. With
    ``round_to > 1`` both are multiples of it.
    """
    dense = cost(geometry, None, 0)
    step_r = rank_step(geometry, round_to)
    c = geometry.in_channels
    small = [r for r in (1, 2, 4) if r % round_to == 0 and r <= geometry.full_rank]
    ranks = sorted({0, *small, *range(step_r, geometry.full_rank + 1, step_r)})
    keeps = sorted({0} | {min(c, _round_up(max(1, round(f * c)), round_to)) for f in KEEP_FRACTIONS})
    out = []
    for g in keeps:
        for r in ranks:
            if (r == 0 and g == 0) or (r == 0 and g == c):
                continue
            if cost(geometry, r, g) < dense:
                out.append((r, g))
    return out


def candidate_errors(problem: Problem, geometry: Geometry, pairs: Sequence[tuple[int, int]],
                     hint_macs: float, inner: int = 2, mixed_per_keep: int = 4) -> dict[tuple[int, int], float]:
    """Squared relative post-activation error on held-out rows of (rank, keep) options from ``pairs``.

    Low-rank only options (keep 0): all ranks from one eigendecomposition (exact for the linear
    fit). Sparse only options (rank 0): one least-squares fit per kept count. Mixed options need
    a joint fit each (``inner`` alternations of the low-rank and sparse blocks, sparse first), so
    they are fitted only for kept counts whose sparse part alone is within ``hint_macs`` (the
    layer's share of the target), and per kept count for ``mixed_per_keep`` ranks spread over the
    options whose MACs lie between 1/4 and 2 times ``hint_macs``; other mixed options are not
    returned, i.e. not offered to the allocation.
    """
    data = problem.data
    act = data.activation
    y_eval = activate(data.z_eval, act).astype(np.float64)
    y_norm = float(np.sum(np.square(y_eval))) or 1.0
    precomputed = problem.least_squares(data.z)
    m_ls, cross, t_mean = precomputed
    errors: dict[tuple[int, int], float] = {}

    def err(pre: np.ndarray) -> float:
        return float(np.sum(np.square(activate(pre, act) - y_eval)) / y_norm)

    by_keep: dict[int, list[int]] = {}
    for r, g in pairs:
        by_keep.setdefault(g, []).append(r)
    for g, ranks in sorted(by_keep.items()):
        if 0 in ranks:  # sparse only
            f = linear_fit(problem, data.z, 0, g, precomputed=precomputed)
            errors[(0, g)] = err(f.preact(data.x_eval).astype(np.float64))
        ranks = sorted(r for r in ranks if r > 0)
        if not ranks:
            continue
        if g == 0:  # low-rank only: the best rank-r fit for every r from one eigendecomposition
            gram = cross @ m_ls.T
            _, vecs = np.linalg.eigh((gram + gram.T) / 2)
            u = vecs[:, ::-1][:, :ranks[-1]]
            q = u.T @ m_ls
            xq = data.x_eval.astype(np.float64) @ q.T
            qx_mean = q @ problem.mean_x
            for r in ranks:
                errors[(r, 0)] = err(xq[:, :r] @ u[:, :r].T + (t_mean - u[:, :r] @ qx_mean[:r]))
            continue
        if geometry.macs(0, g) > hint_macs:  # the sparse part alone is over the layer's share
            continue
        window = [r for r in ranks if hint_macs / 4 <= geometry.macs(r, g) <= 2 * hint_macs]
        if len(window) > mixed_per_keep:  # the smallest rank and others spread evenly
            picks = np.linspace(0, len(window) - 1, mixed_per_keep).round().astype(int)
            window = [window[i] for i in sorted(set(picks))]
        for r in window:
            f = linear_fit(problem, data.z, r, g, inner=inner, start="sparse", precomputed=precomputed)
            errors[(r, g)] = err(f.preact(data.x_eval).astype(np.float64))
    return errors


def allocate(tables: Sequence[Sequence[Option]], budget: float, resolution: int = 4096,
             params_budget: float | None = None) -> tuple[list[int], bool]:
    """Index of the chosen option per layer, minimising the summed error with total cost <= budget.

    A multiple-choice knapsack solved by dynamic programming over the budget split into
    ``resolution`` units, costs rounded *up* to whole units: the result always fits the budget and
    is at least as good as any choice costing at most ``budget - len(tables) * budget / resolution``.
    ``params_budget`` adds a second limit on the summed ``params``, handled by a Lagrange
    multiplier on the parameters (bisected to the smallest that meets it). The second value is
    False when a limit cannot be met: for the cost budget the cheapest options are then chosen;
    an unreachable parameter limit is dropped (the cost-limited optimum is returned).
    """
    choice, ok = _knapsack(tables, budget, resolution, 0.0)
    if params_budget is None or not ok:
        return choice, ok

    def params(c: list[int]) -> float:
        return sum(t[i].params for t, i in zip(tables, c))

    if params(choice) <= params_budget:
        return choice, True
    unconstrained = choice
    scale = max(o.error for t in tables for o in t) or 1.0
    per_param = scale / max(params_budget, 1.0)
    lo, hi = 0.0, per_param
    while True:
        choice, _ = _knapsack(tables, budget, resolution, hi)
        if params(choice) <= params_budget:
            break
        if hi > per_param * 1e12:
            return unconstrained, False
        lo, hi = hi, hi * 4
    best = choice
    for _ in range(40):
        mid = (lo + hi) / 2
        choice, _ = _knapsack(tables, budget, resolution, mid)
        if params(choice) <= params_budget:
            hi, best = mid, choice
        else:
            lo = mid
    return best, True


def _knapsack(tables: Sequence[Sequence[Option]], budget: float, resolution: int,
              per_param: float) -> tuple[list[int], bool]:
    """The DP of :func:`allocate` for the objective ``error + per_param * params``."""
    cheapest = [min(range(len(t)), key=lambda i: (t[i].cost, t[i].error)) for t in tables]
    if sum(t[i].cost for t, i in zip(tables, cheapest)) > budget or not tables:
        return cheapest, not tables
    unit = budget / resolution if budget > 0 else 1.0
    size = resolution + 1
    best = np.zeros(size)  # best[b]: least objective of the layers so far within b units
    picks = []
    for t in tables:
        costs = [min(size, int(math.ceil(o.cost / unit - 1e-9))) if o.cost > 0 else 0 for o in t]
        new = np.full(size, np.inf)
        arg = np.full(size, -1, dtype=np.int64)
        for oi, (o, c) in enumerate(zip(t, costs)):
            if c >= size:
                continue
            cand = np.full(size, np.inf)
            cand[c:] = best[:size - c] + o.error + per_param * o.params
            better = cand < new
            new[better] = cand[better]
            arg[better] = oi
        best = new
        picks.append(arg)
    b = int(np.argmin(best))
    if not np.isfinite(best[b]):
        return cheapest, False
    choice = []
    for t, arg in zip(reversed(tables), reversed(picks)):
        oi = int(arg[b])
        choice.append(oi)
        o = t[oi]
        b -= min(size, int(math.ceil(o.cost / unit - 1e-9))) if o.cost > 0 else 0
    return choice[::-1], True
