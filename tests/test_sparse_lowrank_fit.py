"""sparse-lowrank fitting math: exactness, error bounds against direct computations, ADMM, allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxdns.lowrank import budget
from onnxdns.lowrank.fit import (LayerData, Problem, activate, admm, linear_fit, post_activation_error,
                                 prox_activation, relative_error, truncated_svd)
from onnxdns.lowrank.layers import Geometry


def relu_layer(m=24, channels=12, k=9, n=3000, n_eval=1000, rank=6, seed=0, activation="relu"):
    """A layer whose inputs are correlated ReLU outputs and whose weight has a decaying spectrum."""
    rng = np.random.default_rng(seed)
    d = channels * k
    latent = rng.standard_normal((n + n_eval, 20)) @ rng.standard_normal((20, d)) / 4
    x = np.maximum(latent + 0.3 * rng.standard_normal((n + n_eval, d)), 0).astype(np.float32)
    w = (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, d)) / 3
         + 0.2 * rng.standard_normal((m, d))).astype(np.float32) / np.sqrt(d)
    b = (0.2 * rng.standard_normal(m) - 0.2).astype(np.float32)
    z = x @ w.T + b
    return LayerData(x[:n], z[:n], x[n:], z[n:], k, activation), w, b


def whitened_layer(m=16, channels=10, k=4, n=2000, seed=1):
    """Identity activation, zero bias, input rows with exactly identity covariance and zero mean."""
    rng = np.random.default_rng(seed)
    d = channels * k
    g = rng.standard_normal((n, d))
    g -= g.mean(axis=0)
    q, _ = np.linalg.qr(g)
    x = (np.sqrt(n) * q).astype(np.float32)
    w = rng.standard_normal((m, d)).astype(np.float32) * np.linspace(2, 0.1, d, dtype=np.float32)
    z = x @ w.T
    return LayerData(x, z, x, z, k, "identity"), w


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_full_rank_or_every_group_kept_is_exact(activation):
    data, w, b = relu_layer(activation=activation)
    problem = Problem(data, w)
    for rank, keep in ((min(w.shape), 0), (0, data.groups)):
        f = linear_fit(problem, data.z, rank, keep)
        np.testing.assert_allclose(f.dense(data.dim), w, atol=1e-4 * np.abs(w).max())
        np.testing.assert_allclose(f.bias, b, atol=1e-4)
        assert post_activation_error(f, data.x_eval, data.z_eval, activation) < 1e-4
        result = admm(problem, rank, keep, iterations=5)
        assert result.eval_error < 1e-4


def test_lowrank_fit_error_is_the_singular_value_tail():
    """With identity covariance the data-aware low-rank fit is the truncated SVD: rel. error^2 =
    sum of the dropped squared singular values / sum of all."""
    data, w = whitened_layer()
    problem = Problem(data, w)
    sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    for rank in (1, 3, 8, 15):
        expected = np.sqrt(np.sum(sv[rank:] ** 2) / np.sum(sv ** 2))
        f = linear_fit(problem, data.z, rank, 0)
        assert post_activation_error(f, data.x, data.z, "identity") == pytest.approx(expected, rel=1e-4)
        svd = truncated_svd(w, np.zeros(w.shape[0], np.float32), rank, data.group_size)
        assert post_activation_error(svd, data.x, data.z, "identity") == pytest.approx(expected, rel=1e-4)


def test_sparse_fit_error_is_the_dropped_group_energy():
    data, w = whitened_layer()
    problem = Problem(data, w)
    k = data.group_size
    energy = np.sum(w.astype(np.float64).reshape(w.shape[0], -1, k) ** 2, axis=(0, 2))
    for keep in (1, 4, 9):
        f = linear_fit(problem, data.z, 0, keep)
        top = np.sort(np.argsort(-energy)[:keep])
        np.testing.assert_array_equal(f.keep, top)
        expected = np.sqrt(1 - energy[top].sum() / energy.sum())
        assert post_activation_error(f, data.x, data.z, "identity") == pytest.approx(expected, rel=1e-4)


def test_sparse_plus_lowrank_recovers_a_structured_weight():
    rng = np.random.default_rng(3)
    data, _ = whitened_layer()
    m, d, k = 16, data.dim, data.group_size
    w = rng.standard_normal((m, 2)) @ rng.standard_normal((2, d))
    w[:, 3 * k:4 * k] += 5 * rng.standard_normal((m, k))
    w = w.astype(np.float32)
    z = data.x @ w.T
    data = LayerData(data.x, z, data.x, z, k, "identity")
    f = linear_fit(Problem(data, w), z, 2, 1, inner=10)
    assert list(f.keep) == [3]
    assert post_activation_error(f, data.x, data.z, "identity") < 1e-3


def test_relu_error_is_bounded_by_the_preactivation_error():
    """ReLU is 1-Lipschitz: ||relu(a) - relu(b)|| <= ||a - b||, checked on the reported quantities."""
    data, w, b = relu_layer()
    problem = Problem(data, w)
    f = linear_fit(problem, data.z, 4, 2)
    pre = f.preact(data.x_eval)
    post = post_activation_error(f, data.x_eval, data.z_eval, "relu")
    y = activate(data.z_eval, "relu")
    bound = np.linalg.norm(pre.astype(np.float64) - data.z_eval) / np.linalg.norm(y)
    assert post <= bound
    assert post == pytest.approx(relative_error(np.maximum(pre, 0), y))


def test_prox_matches_a_brute_force_minimum():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(200) * 2
    y = np.maximum(rng.standard_normal(200), 0)
    grid = np.linspace(-8, 8, 32001)
    for rho in (0.3, 1.0, 7.0):
        z = prox_activation(v, y, rho, "relu")
        f = (np.maximum(grid[None, :], 0) - y[:, None]) ** 2 + rho / 2 * (grid[None, :] - v[:, None]) ** 2
        f_opt = f.min(axis=1)
        f_z = (np.maximum(z, 0) - y) ** 2 + rho / 2 * (z - v) ** 2
        assert np.all(f_z <= f_opt + 1e-5)


def test_admm_objective_decreases():
    data, w, _ = relu_layer()
    problem = Problem(data, w)
    for rank, keep in ((4, 0), (3, 2), (0, 5)):
        result = admm(problem, rank, keep, iterations=12)
        h = np.array(result.history)
        assert h[-1] < 0.98 * h[0], h  # ADMM improves on the activation-unaware start
        assert np.all(np.diff(h) <= 1e-3 * h[0]), h  # and the objective goes down step by step
        assert result.fit_error == pytest.approx(h.min())
        assert result.eval_error < 1.1 * post_activation_error(linear_fit(problem, data.z, rank, keep),
                                                              data.x_eval, data.z_eval, "relu")


def test_candidate_errors_agree_with_direct_fits():
    data, w, _ = relu_layer()
    problem = Problem(data, w)
    geometry = Geometry("Conv", data.groups, w.shape[0], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    pairs = [(4, 0), (8, 0), (0, 3), (0, 6)]
    errors = budget.candidate_errors(problem, geometry, pairs, hint_macs=geometry.macs(None, 0) / 2)
    for r, g in pairs:
        direct = post_activation_error(linear_fit(problem, data.z, r, g), data.x_eval, data.z_eval, "relu") ** 2
        assert errors[(r, g)] == pytest.approx(direct, rel=1e-3)


def test_grid_respects_rounding_and_cost():
    geometry = Geometry("Conv", 64, 96, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (64, 8, 8), 64)

    def macs(g, r, k):
        return float(g.macs(r, k))

    pairs = budget.grid(geometry, macs, round_to=8)
    assert pairs and all(r % 8 == 0 and k % 8 == 0 for r, k in pairs)
    assert all(geometry.macs(r, k) < geometry.macs(None, 0) for r, k in pairs)
    assert (0, 0) not in pairs and (0, 64) not in pairs


def test_allocation_is_optimal_on_small_tables():
    """Against brute force: within budget, and no worse than any choice costing <= budget - layers x unit."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        tables = []
        for _ in range(3):
            opts = [budget.Option(r, 0, float(c), float(e), 0, 0)
                    for r, (c, e) in enumerate(zip(rng.uniform(1, 10, 4), rng.uniform(0, 1, 4)), start=1)]
            opts.append(budget.Option(None, 0, 12.0, 0.0, 0, 0))
            tables.append(opts)
        limit = float(rng.uniform(5, 30))
        choice, ok = budget.allocate(tables, limit, resolution=512)
        combos = list(itertools.product(*(range(len(t)) for t in tables)))

        def cost(c):
            return sum(t[i].cost for t, i in zip(tables, c))

        def error(c):
            return sum(t[i].error for t, i in zip(tables, c))

        assert ok == any(cost(c) <= limit for c in combos)
        if not ok:
            continue
        assert cost(choice) <= limit
        margin = [c for c in combos if cost(c) <= limit - 3 * limit / 512]
        if margin:
            assert error(choice) <= min(error(c) for c in margin) + 1e-12


def test_allocation_with_a_parameter_limit_meets_both_limits():
    rng = np.random.default_rng(1)
    for _ in range(30):
        tables = []
        for _ in range(3):
            draws = zip(rng.uniform(1, 10, 4), rng.uniform(0, 1, 4), rng.integers(1, 100, 4))
            tables.append([budget.Option(r, 0, float(c), float(e), 0, int(p)) for r, (c, e, p) in enumerate(draws, 1)]
                          + [budget.Option(None, 0, 12.0, 0.0, 0, 120)])
        limit, params_limit = float(rng.uniform(8, 30)), float(rng.uniform(30, 250))
        choice, ok = budget.allocate(tables, limit, resolution=512, params_budget=params_limit)
        combos = list(itertools.product(*(range(len(t)) for t in tables)))
        fits = [c for c in combos if sum(t[i].cost for t, i in zip(tables, c)) <= limit - 3 * limit / 512
                and sum(t[i].params for t, i in zip(tables, c)) <= params_limit]
        if ok:
            assert sum(t[i].cost for t, i in zip(tables, choice)) <= limit
            assert sum(t[i].params for t, i in zip(tables, choice)) <= params_limit
        else:
            assert not fits
            alone, cost_ok = budget.allocate(tables, limit, resolution=512)
            if cost_ok:  # an unreachable parameter limit is dropped, the cost limit kept
                assert choice == alone
