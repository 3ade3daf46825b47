"""Fitting one layer as structured-sparse plus low-rank factors: linear subproblem, ADMM, baselines.

Notation (rows are samples, all matrices numpy arrays):

* ``X`` (N, d): input rows of the layer as the *approximated* model computes them (im2col patches
  of a convolution at sampled output positions, or the input rows of a Gemm/MatMul);
* ``Z0`` (N, m): pre-activations of the *original* model at the same positions; the target output
  is ``Y = h(Z0)`` with ``h`` the layer's activation (ReLU, or the identity);
* the layer computes ``h(X W^T + b)``; an approximation is ``W = S + P Q`` with ``P`` (m, r),
  ``Q`` (r, d) and ``S`` non-zero only in the columns of ``keep`` whole input groups (group ``c``
  holds columns ``c*k .. c*k+k-1``; a group is an input channel with its ``k`` kernel taps, or one
  input feature of a Gemm).

Objective: the post-activation reconstruction error ``||h(X W^T + b) - Y||_F^2`` over the
calibration rows, under ``rank(P Q) <= r`` and at most ``g`` groups in ``S``. ADMM splits it with
an auxiliary pre-activation ``Z = X W^T + b``::

    W-step   W, b = argmin ||X W^T + b - (Z + U)||^2        (S + low-rank, see ``linear_fit``)
    Z-step   Z    = argmin ||h(Z) - Y||^2 + rho/2 ||Z - (X W^T + b - U)||^2   (element-wise)
    U-step   U   += Z - (X W^T + b)

with ``rho`` growing geometrically; the best iterate by the true objective is returned. The
W-step is the *linear* problem ``min ||X W^T + b - T||^2`` (plus a proximal term, see
:class:`Problem`): after eliminating ``b`` it is ``min ||(W - M) Sigma^(1/2)||_F^2`` with
``Sigma`` the covariance of the centred input rows and ``M`` the least-squares solution. It is
solved by block coordinate descent:
the low-rank block exactly (``L = U_r U_r^T A`` with ``U_r`` the top eigenvectors of
``A Sigma A^T``, ``A = M - S``), the sparse block by choosing the groups of largest
``Sigma``-weighted energy of ``M - L`` and refitting them exactly by least squares.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ACTIVATIONS = ("relu", "identity")


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """``h(z)``: ReLU or the identity."""
    return np.maximum(z, 0) if activation == "relu" else z


@dataclasses.dataclass
class LayerData:
    """Calibration rows of one layer: fit rows and held-out rows (from other images)."""

    x: np.ndarray  # (N, d) float32
    z: np.ndarray  # (N, m) float32, original pre-activation
    x_eval: np.ndarray
    z_eval: np.ndarray
    group_size: int
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.x.shape[1] % self.group_size:
            raise ValueError(f"input dimension {self.x.shape[1]} is not a multiple of the group size "
                             f"{self.group_size}")

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def groups(self) -> int:
        return self.dim // self.group_size


@dataclasses.dataclass
class Factors:
    """``W = S + P Q`` and bias ``b``; ``S`` holds only the columns of the kept groups."""

    p: np.ndarray  # (m, r)
    q: np.ndarray  # (r, d)
    keep: np.ndarray  # (g,) sorted kept group indices
    s: np.ndarray  # (m, g * k): columns of the kept groups, in ``keep`` order
    bias: np.ndarray  # (m,)
    group_size: int

    @property
    def rank(self) -> int:
        return int(self.p.shape[1])

    @property
    def kept(self) -> int:
        return int(self.keep.size)

    def columns(self) -> np.ndarray:
        """Column indices (into ``d``) of the kept groups."""
        k = self.group_size
        return (self.keep[:, None] * k + np.arange(k)[None, :]).reshape(-1)

    def dense(self, dim: int) -> np.ndarray:
        """The full (m, d) matrix ``S + P Q``."""
        w = self.p @ self.q if self.rank else np.zeros((self.bias.shape[0], dim))
        if self.kept:
            w[:, self.columns()] += self.s
        return w

    def preact(self, x: np.ndarray) -> np.ndarray:
        """``x W^T + b`` computed through the factors (float32)."""
        out = np.broadcast_to(self.bias.astype(np.float32), (x.shape[0], self.bias.shape[0])).copy()
        if self.rank:
            out += (x @ self.q.T.astype(np.float32)) @ self.p.T.astype(np.float32)
        if self.kept:
            out += x[:, self.columns()] @ self.s.T.astype(np.float32)
        return out


def relative_error(fit_out: np.ndarray, target: np.ndarray) -> float:
    """``||fit_out - target||_F / ||target||_F`` (0 when both are zero)."""
    den = float(np.sum(np.square(target, dtype=np.float64)))
    num = float(np.sum(np.square(fit_out.astype(np.float64) - target)))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def post_activation_error(factors: Factors, x: np.ndarray, z: np.ndarray, activation: str) -> float:
    """Relative post-activation reconstruction error of ``factors`` on rows ``x`` against ``h(z)``."""
    return relative_error(activate(factors.preact(x), activation), activate(z, activation))


class Problem:
    """The precomputed statistics of one layer's input rows (covariance, means, group blocks).

    The linear W-step carries a proximal term ``mu ||W - W_prev||_F^2`` with
    ``mu = ridge * mean(diag(Sigma))``: ``W_prev`` is the original weight for the first fit and
    the previous iterate inside ADMM. It keeps the problem well posed when some input directions
    carry no variance (ReLU outputs that are always zero: those columns stay as in the original
    weight) and, unlike a plain ridge, it vanishes at a fixed point, so ADMM does not drift.
    ``sigma`` below is the covariance plus ``mu I``, the metric of the W-step.
    """

    def __init__(self, data: LayerData, weight: np.ndarray, ridge: float = 1e-3) -> None:
        x = data.x
        n, d = x.shape
        self.data = data
        self.n = n
        self.dim = d
        self.group_size = data.group_size
        self.groups = data.groups
        self.mean_x = x.mean(axis=0, dtype=np.float64)
        xc = x - self.mean_x.astype(np.float32)
        sigma = (xc.T @ xc).astype(np.float64) / n
        sigma = (sigma + sigma.T) / 2
        scale = float(np.trace(sigma)) / d
        self.mu = ridge * (scale if scale > 0 else 1.0)
        sigma[np.diag_indices(d)] += self.mu
        self.sigma = sigma
        self.weight = weight.astype(np.float64)
        self.sigma_inv = _spd_inverse(sigma)
        self.xc = xc
        k = self.group_size
        self.blocks = np.stack([sigma[c * k:(c + 1) * k, c * k:(c + 1) * k] for c in range(self.groups)])
        self._support: tuple[bytes, np.ndarray] | None = None

    def support_inverse(self, keep_idx: np.ndarray) -> np.ndarray:
        """``Sigma[J, J]^-1`` for the columns ``J`` of the groups ``keep_idx`` (the last one is cached:
        inside ADMM the kept groups stop changing)."""
        key = keep_idx.tobytes()
        if self._support is None or self._support[0] != key:
            cols = _cols(keep_idx, self.group_size)
            self._support = (key, _spd_inverse(self.sigma[np.ix_(cols, cols)]))
        return self._support[1]

    def least_squares(self, target: np.ndarray, w_prev: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For rows ``target`` (N, m): ``(M, M Sigma, mean of target)`` where
        ``M = argmin ||Xc W^T - Tc||^2 / N + mu ||W - w_prev||^2`` (``w_prev`` defaults to the
        original weight)."""
        rhs = (target.T @ self.xc).astype(np.float64) / self.n
        rhs += self.mu * (self.weight if w_prev is None else w_prev)
        return rhs @ self.sigma_inv, rhs, target.mean(axis=0, dtype=np.float64)

    def objective(self, w: np.ndarray, m: np.ndarray) -> float:
        """Linear objective ``tr((W - M) Sigma (W - M)^T)`` (up to a constant)."""
        e = w - m
        return float(np.sum((e @ self.sigma) * e))


def linear_fit(problem: Problem, target: np.ndarray, rank: int, keep: int, *, inner: int = 3,
               support: np.ndarray | None = None, warm: Factors | None = None, start: str = "lowrank",
               precomputed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Factors:
    """Minimise ``||X W^T + b - target||^2 / N + mu ||W - W_prev||^2`` over ``W = S + P Q``
    (rank <= ``rank``, ``keep`` groups); ``W_prev`` is ``warm``'s weight, else the original.

    Block coordinate descent, ``inner`` rounds of (low-rank block, sparse block). ``support``
    fixes the kept groups; otherwise they are re-chosen in every sparse step. The first round
    starts from ``warm``'s sparse part when it keeps as many groups, else from ``S = 0``
    (``start="lowrank"``) or from the sparse-only fit (``start="sparse"``). ``precomputed`` is
    :meth:`Problem.least_squares` of ``target`` when the caller already has it.
    """
    if precomputed is None:
        precomputed = problem.least_squares(target, None if warm is None else warm.dense(problem.dim))
    m_ls, cross, t_mean = precomputed  # cross = M Sigma
    m_out, d = m_ls.shape
    rank = int(min(rank, m_out, d))
    keep = int(min(keep, problem.groups))
    k = problem.group_size
    sigma = problem.sigma
    p, q = np.zeros((m_out, 0)), np.zeros((0, d))

    def sparse_step(keep_idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if keep_idx is None:
            keep_idx = _select_groups(m_ls - p @ q if rank else m_ls, problem, keep)
        cols = _cols(keep_idx, k)
        rhs = cross[:, cols] - p @ (q @ sigma[:, cols]) if rank else cross[:, cols]
        return keep_idx, rhs @ problem.support_inverse(keep_idx)

    keep_idx = np.sort(np.asarray(support, dtype=np.int64)) if support is not None else np.zeros(0, np.int64)
    s_cols = np.zeros((m_out, keep_idx.size * k))
    if keep and warm is not None and warm.kept == keep and (support is None or np.array_equal(warm.keep, keep_idx)):
        keep_idx, s_cols = warm.keep, warm.s.copy()
    elif keep and start == "sparse":
        keep_idx, s_cols = sparse_step(None if support is None else keep_idx)
    rounds = 1 if (rank == 0 or keep == 0) else max(1, inner)
    for _ in range(rounds):
        if rank:
            a = m_ls.copy()
            a_sigma = cross.copy()
            if keep_idx.size:
                cols = _cols(keep_idx, k)
                a[:, cols] -= s_cols
                a_sigma -= s_cols @ sigma[cols, :]
            p, q = _top_subspace(a, a_sigma, rank)
        if keep:
            keep_idx, s_cols = sparse_step(None if support is None else keep_idx)
    w = (p @ q) if rank else np.zeros((m_out, d))
    if keep_idx.size:
        w[:, _cols(keep_idx, k)] += s_cols
    bias = t_mean - w @ problem.mean_x
    return Factors(p, q, keep_idx, s_cols if keep_idx.size else np.zeros((m_out, 0)), bias, k)


def best_linear_fit(problem: Problem, target: np.ndarray, rank: int, keep: int, *, inner: int = 3,
                    precomputed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Factors:
    """:func:`linear_fit` from both starts (low-rank first, sparse first) when both parts are
    present; the one with the lower linear objective."""
    if precomputed is None:
        precomputed = problem.least_squares(target)
    first = linear_fit(problem, target, rank, keep, inner=inner, precomputed=precomputed)
    if not (rank and keep):
        return first
    second = linear_fit(problem, target, rank, keep, inner=inner, start="sparse", precomputed=precomputed)
    m_ls = precomputed[0]
    dim = problem.dim
    return first if problem.objective(first.dense(dim), m_ls) <= problem.objective(second.dense(dim), m_ls) else second


def _cols(keep_idx: np.ndarray, k: int) -> np.ndarray:
    return (keep_idx[:, None] * k + np.arange(k)[None, :]).reshape(-1)


def _top_subspace(a: np.ndarray, a_sigma: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` approximation of ``a`` in the ``Sigma`` metric (``a_sigma = a Sigma``):
    ``P = U_r``, ``Q = U_r^T a`` with ``U_r`` the top eigenvectors of ``a Sigma a^T``."""
    gram = a_sigma @ a.T
    gram = (gram + gram.T) / 2
    vals, vecs = np.linalg.eigh(gram)
    u = vecs[:, ::-1][:, :rank]
    return u, u.T @ a


def _select_groups(resid: np.ndarray, problem: Problem, keep: int) -> np.ndarray:
    """The ``keep`` groups of largest Sigma-weighted energy ``tr(R_c Sigma_cc R_c^T)``, sorted."""
    k = problem.group_size
    r3 = resid.reshape(resid.shape[0], problem.groups, k)
    energy = np.einsum("mci,cij,mcj->c", r3, problem.blocks, r3)
    order = np.argsort(-energy, kind="stable")[:keep]
    return np.sort(order).astype(np.int64)


def _spd_inverse(sigma: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix (Cholesky; eigen-clipped if that fails)."""
    try:
        chol = np.linalg.cholesky(sigma)
        inv_chol = np.linalg.solve(chol, np.eye(sigma.shape[0]))
        return inv_chol.T @ inv_chol
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(sigma)
        floor = max(float(vals.max()), 1e-30) * 1e-10
        return (vecs / np.maximum(vals, floor)) @ vecs.T


# --------------------------------------------------------------------------- ADMM


def prox_activation(v: np.ndarray, y: np.ndarray, rho: float, activation: str) -> np.ndarray:
    """Element-wise ``argmin_z (h(z) - y)^2 + rho/2 (z - v)^2``."""
    if activation == "identity":
        return (2 * y + rho * v) / (2 + rho)
    z_pos = np.maximum((2 * y + rho * v) / (2 + rho), 0)
    z_neg = np.minimum(v, 0)
    f_pos = np.square(z_pos - y) + (rho / 2) * np.square(z_pos - v)
    f_neg = np.square(y) + (rho / 2) * np.square(z_neg - v)
    return np.where(f_pos <= f_neg, z_pos, z_neg)


@dataclasses.dataclass
class AdmmResult:
    """Outcome of :func:`admm`: the best factors and the objective trace.

    ``history[i]`` is the relative post-activation error on the fit rows after W-step ``i``
    (``history[0]``: the activation-unaware linear fit that ADMM starts from).
    """

    factors: Factors
    history: list[float]
    best_iteration: int
    fit_error: float
    eval_error: float


def admm(problem: Problem, rank: int, keep: int, *, iterations: int = 10, rho: float = 1.0,
         growth: float = 1.4, inner: int = 2, freeze_support: float = 0.5) -> AdmmResult:
    """Fit ``rank`` + ``keep`` groups minimising the post-activation error with ADMM.

    ``freeze_support`` is the fraction of the iterations after which the kept groups stop
    changing (the sparse block then only refits its values).
    """
    data = problem.data
    x, z0, act = data.x, data.z, data.activation
    y = activate(z0, act)
    y_norm = float(np.sum(np.square(y, dtype=np.float64))) or 1.0

    def error(v: np.ndarray) -> float:
        return float(np.sqrt(np.sum(np.square(activate(v, act).astype(np.float64) - y)) / y_norm))

    factors = best_linear_fit(problem, z0, rank, keep, inner=inner)
    v = factors.preact(x)
    history = [error(v)]
    best, best_it = factors, 0
    if act == "identity":  # the linear fit already minimises the objective up to the group choice
        iterations = 0
    z = z0.astype(np.float32, copy=True)
    u = np.zeros_like(z)
    frozen_after = int(freeze_support * iterations)
    for it in range(1, iterations + 1):
        z = prox_activation(v - u, y, rho, act).astype(np.float32)
        u += z - v
        support = factors.keep if (it > frozen_after and factors.kept) else None
        factors = linear_fit(problem, z + u, rank, keep, inner=inner, support=support, warm=factors)
        v = factors.preact(x)
        history.append(error(v))
        if history[-1] < history[best_it]:
            best, best_it = factors, it
        rho *= growth
    return AdmmResult(best, history, best_it, history[best_it],
                      post_activation_error(best, data.x_eval, data.z_eval, act))


# --------------------------------------------------------------------------- baselines


def truncated_svd(weight: np.ndarray, bias: np.ndarray, rank: int, group_size: int) -> Factors:
    """Data-free low-rank baseline: the truncated SVD of the original weight, original bias."""
    u, s, vt = np.linalg.svd(weight.astype(np.float64), full_matrices=False)
    rank = min(rank, s.size)
    m = weight.shape[0]
    return Factors(u[:, :rank] * s[:rank], vt[:rank], np.zeros(0, np.int64), np.zeros((m, 0)),
                   bias.astype(np.float64), group_size)
