r"""Kernel Mean Matching (Huang, Smola, Gretton, Borgwardt and Schoelkopf, NIPS 2007).

KMM picks source weights :math:`\beta` so that the weighted source mean in the RKHS matches the
target mean. With :math:`K_{ij} = k(x^s_i, x^s_j)` and
:math:`\kappa_i = \frac{n_s}{n_t}\sum_{j=1}^{n_t} k(x^s_i, x^t_j)` it solves the QP (paper eq. 6)

.. math::

    \min_\beta \tfrac12 \beta^\top K \beta - \kappa^\top \beta
    \quad \text{s.t.} \quad 0 \le \beta_i \le B,\quad
    \Big|\sum_i \beta_i - n_s\Big| \le n_s \epsilon .

Solver (no dense ``n x n`` matrix is needed): accelerated projected gradient (FISTA with adaptive
restart, Beck & Teboulle 2009; O'Donoghue & Candes 2015) with step ``1 / L``, ``L`` the top
eigenvalue of ``K`` from power iteration. The projection onto the box-and-slab set is exact:
``clip(v - lambda, 0, B)`` with the scalar ``lambda`` found by bisection. The product ``K @ beta`` is

* ``'dense'``: ``K`` held in memory (when ``n_s^2 * 8`` bytes fits ``max_dense_memory``);
* ``'chunked'``: recomputed ``chunk`` rows at a time each iteration (exact, slow, memory ``chunk x n_s``);
* ``'rff'``: random Fourier features ``K ~ Z Z^T`` (Rahimi & Recht 2007), ``Z`` of shape
  ``(n_s, n_components)``, so each product is ``O(n_s D)``; ``kappa`` uses the same features.

``'auto'`` uses ``'dense'`` when it fits, else ``'rff'``. The kernel is Gaussian,
``k(x, z) = exp(-gamma ||x - z||^2)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from metatl.registry import ESTIMATORS
from metatl.transfer._base import BaseReweighter, rbf_kernel, rbf_matvec, resolve_gamma


def project_box_slab(v: np.ndarray, B: float, lo: float, hi: float, n_bisect: int = 100) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{0 <= b <= B, lo <= sum(b) <= hi}``: ``clip(v - lam, 0, B)``."""
    b = np.clip(v, 0.0, B)
    s = b.sum()
    if lo <= s <= hi:
        return b
    goal = hi if s > hi else lo
    left, right = v.min() - B, v.max()  # sum(clip(v - lam)) is n*B at left and 0 at right
    for _ in range(n_bisect):
        lam = 0.5 * (left + right)
        if np.clip(v - lam, 0.0, B).sum() > goal:
            left = lam
        else:
            right = lam
    return np.clip(v - 0.5 * (left + right), 0.0, B)


def _rff(X: np.ndarray, W: np.ndarray, phase: np.ndarray, chunk: int) -> np.ndarray:
    Z = np.empty((len(X), W.shape[1]), dtype=np.float32)
    scale = np.sqrt(2.0 / W.shape[1])
    for i in range(0, len(X), chunk):
        Z[i : i + chunk] = scale * np.cos(X[i : i + chunk] @ W + phase)
    return Z


def kmm_weights(
    X_source: ArrayLike,
    X_target: ArrayLike,
    *,
    gamma: float = 1.0,
    B: float = 1000.0,
    eps: float | None = None,
    solver: str = "auto",
    n_components: int = 1000,
    max_iter: int = 1000,
    tol: float = 1e-4,
    max_dense_memory: float = 5e8,
    chunk: int = 2048,
    random_state: int | np.random.RandomState | None = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict]:
    """KMM weights ``beta`` (shape ``(n_s,)``) for ``X_source`` against ``X_target``; see the module docstring.

    ``eps=None`` uses ``(sqrt(n_s) - 1) / sqrt(n_s)``. With ``return_info`` also returns a dict with
    ``n_iter``, ``solver`` and the objective ``1/2 b'Kb - kappa'b`` (under the solver's ``K``).
    """
    Xs, Xt = np.asarray(X_source, float), np.asarray(X_target, float)
    n_s, n_t = len(Xs), len(Xt)
    eps = (np.sqrt(n_s) - 1) / np.sqrt(n_s) if eps is None else float(eps)
    lo, hi = max(n_s * (1 - eps), 0.0), n_s * (1 + eps)
    if B * n_s < lo:
        raise ValueError(f"KMM constraints are infeasible: B={B} is too small for eps={eps}; raise B or eps.")
    if solver == "auto":
        solver = "dense" if 8.0 * n_s * n_s <= max_dense_memory else "rff"
    if solver == "dense":
        K = rbf_kernel(Xs, Xs, gamma)
        Kv = lambda v: K @ v  # noqa: E731
        kappa = (n_s / n_t) * rbf_matvec(Xs, Xt, np.ones(n_t), gamma, chunk)
    elif solver == "chunked":
        Kv = lambda v: rbf_matvec(Xs, Xs, v, gamma, chunk)  # noqa: E731
        kappa = (n_s / n_t) * rbf_matvec(Xs, Xt, np.ones(n_t), gamma, chunk)
    elif solver == "rff":
        rng = check_random_state(random_state)
        W = rng.normal(scale=np.sqrt(2 * gamma), size=(Xs.shape[1], n_components))
        phase = rng.uniform(0, 2 * np.pi, size=n_components)
        Zs = _rff(Xs, W, phase, chunk)
        zt_mean = _rff(Xt, W, phase, chunk).mean(axis=0, dtype=np.float64)
        Kv = lambda v: Zs @ (Zs.T @ v.astype(np.float32)).astype(np.float64)  # noqa: E731
        kappa = n_s * (Zs @ zt_mean.astype(np.float32)).astype(np.float64)
    else:
        raise ValueError(f"solver must be 'auto', 'dense', 'chunked' or 'rff'; got {solver!r}.")

    # Lipschitz constant of the gradient K b - kappa: top eigenvalue of K by power iteration
    v = np.random.default_rng(0).random(n_s) + 0.1
    for _ in range(30):
        v = Kv(v)
        L = np.linalg.norm(v)
        v /= L
    L = 1.05 * L + 1e-12

    beta = project_box_slab(np.ones(n_s), B, lo, hi)
    z, t = beta.copy(), 1.0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        beta_new = project_box_slab(z - (Kv(z) - kappa) / L, B, lo, hi)
        if (z - beta_new) @ (beta_new - beta) > 0:  # adaptive restart of the momentum
            t = 1.0
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        z = beta_new + ((t - 1) / t_new) * (beta_new - beta)
        step = np.linalg.norm(beta_new - beta)
        beta, t = beta_new, t_new
        if step <= tol * max(1.0, np.linalg.norm(beta)):
            break
    if not return_info:
        return beta
    return beta, {"n_iter": n_iter, "solver": solver, "objective": 0.5 * beta @ Kv(beta) - kappa @ beta}


@ESTIMATORS.register("kmm")
class KMM(BaseReweighter):
    """Kernel Mean Matching reweighting (Huang et al., NIPS 2007) around a base estimator.

    ``fit`` solves the KMM QP for the source weights (``weights_``), then fits ``estimator`` on the
    source rows with ``sample_weight=weights_``. Solver: accelerated projected gradient with chunked
    or random-Fourier-feature kernel products, see :mod:`metatl.transfer.instance.kmm`.

    Parameters
    ----------
    estimator : estimator accepting ``sample_weight``, default=LogisticRegression()
    gamma : float or 'scale', default='scale'
        Gaussian kernel ``exp(-gamma ||x - z||^2)``; 'scale' is ``1 / (d Var(X))`` over source + target.
    B : float, default=1000
        Upper bound on each weight.
    eps : float or None, default=None
        Slack on ``sum(beta) = n_s``; None means ``(sqrt(n_s) - 1) / sqrt(n_s)``.
    solver : {'auto', 'dense', 'chunked', 'rff'}, default='auto'
    n_components : int, default=1000
        Random Fourier features for ``solver='rff'``.
    max_iter : int, default=1000
    tol : float, default=1e-4
        Stop when ``||beta_new - beta|| <= tol * max(1, ||beta||)``.
    max_dense_memory : float, default=5e8
        Bytes allowed for the dense ``K`` under ``solver='auto'``.
    random_state : int, RandomState or None

    Attributes
    ----------
    weights_ : ndarray of shape (n_source,)
    estimator_ : fitted estimator
    gamma_ : float
    n_iter_ : int
    """

    def __init__(
        self,
        estimator: BaseEstimator | None = None,
        gamma: float | str = "scale",
        B: float = 1000.0,
        eps: float | None = None,
        solver: str = "auto",
        n_components: int = 1000,
        max_iter: int = 1000,
        tol: float = 1e-4,
        max_dense_memory: float = 5e8,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.estimator = estimator
        self.gamma = gamma
        self.B = B
        self.eps = eps
        self.solver = solver
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.max_dense_memory = max_dense_memory
        self.random_state = random_state

    def _source_weights(self, X_source, X_target):
        self.gamma_ = resolve_gamma(self.gamma, np.vstack([X_source, X_target]))
        beta, info = kmm_weights(
            X_source,
            X_target,
            gamma=self.gamma_,
            B=self.B,
            eps=self.eps,
            solver=self.solver,
            n_components=self.n_components,
            max_iter=self.max_iter,
            tol=self.tol,
            max_dense_memory=self.max_dense_memory,
            random_state=self.random_state,
            return_info=True,
        )
        self.n_iter_, self.solver_ = info["n_iter"], info["solver"]
        return beta
