r"""Kullback-Leibler Importance Estimation Procedure (Sugiyama, Nakajima, Kashima, von Buenau and
Kawanabe, NIPS 2007; Ann. Inst. Stat. Math. 2008).

The importance :math:`w(x) = p_t(x) / p_s(x)` is modelled as
:math:`\hat w(x) = \sum_{l=1}^{b} \alpha_l\, k(x, c_l)` with Gaussian kernels
:math:`k(x, c) = \exp(-\gamma \|x - c\|^2)` centred on ``b`` target points :math:`c_l`. With
:math:`A_{jl} = k(x^t_j, c_l)` (``n_t x b``) and :math:`\bar b_l = \frac{1}{n_s}\sum_i k(x^s_i, c_l)`,
KLIEP solves

.. math::

    \max_{\alpha \ge 0} \sum_{j=1}^{n_t} \log (A\alpha)_j \quad \text{s.t.} \quad \bar b^\top \alpha = 1 ,

by projected gradient ascent. The paper's step (Fig. 1, ``projection='paper'``) is

.. math::

    \alpha \leftarrow \alpha + \varepsilon A^\top (1 / A\alpha);\quad
    \alpha \leftarrow \alpha + (1 - \bar b^\top\alpha)\,\bar b / (\bar b^\top \bar b);\quad
    \alpha \leftarrow \max(0, \alpha);\quad \alpha \leftarrow \alpha / (\bar b^\top \alpha).

Its last three lines only approximate the projection onto :math:`\{\alpha \ge 0, \bar b^\top\alpha = 1\}`
and can stall before the optimum (the reference test shows it on a tiny problem), so the default
``projection='exact'`` replaces them by the Euclidean projection
:math:`\alpha \leftarrow \max(0, \alpha - \lambda \bar b)` with the scalar :math:`\lambda` set by
bisection so that :math:`\bar b^\top\alpha = 1`. Both use the authors' step schedule :math:`\varepsilon = 10^3, 10^2, \dots, 10^{-3}` (each step size is
used while the objective improves). The kernel width is chosen by likelihood cross-validation
(Fig. 2): the target is split in ``cv`` folds and the width maximising the held-out
:math:`\frac{1}{|T_r|}\sum_{x \in T_r} \log \hat w_r(x)` is kept. Memory is ``n x b``, never ``n x n``.
"""
from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from metatl.registry import ESTIMATORS
from metatl.transfer._base import BaseReweighter, rbf_kernel, resolve_gamma

STEP_SIZES = tuple(10.0 ** np.arange(3, -4, -1))


def project_weighted_simplex(v, b_bar):
    """Euclidean projection of ``v`` onto ``{alpha >= 0, b_bar' alpha = 1}`` (``b_bar > 0``).

    The solution is ``max(0, v - lam * b_bar)``; ``lam`` comes from the sorted breakpoints ``v / b_bar``.
    """
    order = np.argsort(-v / b_bar)
    vs, bs = v[order], b_bar[order]
    lam = (np.cumsum(bs * vs) - 1.0) / np.cumsum(bs * bs)  # lam if the first k entries are positive
    k = np.flatnonzero(vs / bs > lam)[-1]
    return np.maximum(0.0, v - lam[k] * b_bar)


def kliep_step(alpha, A, b_bar, step, projection="exact"):
    """One ascent step: ``alpha + step * A'(1 / A alpha)``, then the projection (see module docstring)."""
    alpha = alpha + step * A.T @ (1.0 / (A @ alpha))
    if projection == "exact":
        return project_weighted_simplex(alpha, b_bar)
    alpha = alpha + (1.0 - b_bar @ alpha) * b_bar / (b_bar @ b_bar)  # Fig. 1 of the paper
    alpha = np.maximum(0.0, alpha)
    return alpha / (b_bar @ alpha)


def kliep_fit_alpha(A, b_bar, *, max_iter=100, tol=1e-9, step_sizes=STEP_SIZES, projection="exact"):
    """``alpha`` maximising ``mean(log(A alpha))`` s.t. ``b_bar' alpha = 1, alpha >= 0``.

    Each step size is used while the objective improves by more than ``tol`` (at most ``max_iter``
    times), then the next, smaller one.
    """
    alpha = np.ones(A.shape[1]) / b_bar.sum()
    score = np.mean(np.log(A @ alpha))
    for step in step_sizes:
        for _ in range(max_iter):
            new = kliep_step(alpha, A, b_bar, step, projection)
            new_score = np.mean(np.log(np.maximum(A @ new, 1e-300)))
            if not new_score > score:
                break
            alpha, score, gain = new, new_score, new_score - score
            if gain < tol:
                break
    return alpha


def _kernel_mean(X, centers, gamma, chunk=4096):
    return sum(rbf_kernel(X[i : i + chunk], centers, gamma).sum(0) for i in range(0, len(X), chunk)) / len(X)


def kliep_weights(X_source, X_target, *, gamma=1.0, n_centers=100, cv=5, max_iter=100, chunk=4096,
                  random_state=None, return_info=False):
    """KLIEP weights ``w(x_i)`` for the source rows.

    ``gamma`` may be a float or a list; with a list the width is chosen by ``cv``-fold likelihood
    cross-validation on the target. Returns ``w`` (``(n_s,)``), and with ``return_info`` a dict with
    ``alpha``, ``centers``, ``gamma`` and ``cv_scores``.
    """
    Xs, Xt = np.asarray(X_source, float), np.asarray(X_target, float)
    rng = check_random_state(random_state)
    centers = Xt[rng.permutation(len(Xt))[: min(n_centers, len(Xt))]]
    gammas = np.atleast_1d(np.asarray(gamma, dtype=float))
    cv_scores = np.full(len(gammas), np.nan)
    if len(gammas) > 1:
        folds = rng.permutation(len(Xt)) % cv
        for g, gam in enumerate(gammas):
            b_bar = _kernel_mean(Xs, centers, gam, chunk)
            A = rbf_kernel(Xt, centers, gam)
            scores = []
            for r in range(cv):
                alpha = kliep_fit_alpha(A[folds != r], b_bar, max_iter=max_iter)
                scores.append(np.mean(np.log(np.maximum(A[folds == r] @ alpha, 1e-300))))
            cv_scores[g] = np.mean(scores)
        best = float(gammas[np.nanargmax(cv_scores)])
    else:
        best = float(gammas[0])
    alpha = kliep_fit_alpha(rbf_kernel(Xt, centers, best), _kernel_mean(Xs, centers, best, chunk), max_iter=max_iter)
    w = np.concatenate([rbf_kernel(Xs[i : i + chunk], centers, best) @ alpha for i in range(0, len(Xs), chunk)])
    if not return_info:
        return w
    return w, {"alpha": alpha, "centers": centers, "gamma": best, "cv_scores": cv_scores}


@ESTIMATORS.register("kliep")
class KLIEP(BaseReweighter):
    """KLIEP reweighting (Sugiyama et al. 2008) around a base estimator.

    ``fit`` estimates the importance ``w(x) = sum_l alpha_l k(x, c_l)`` with ``n_centers`` target
    centres, chooses ``gamma`` by likelihood cross-validation when a list is given, and fits
    ``estimator`` on the source rows with ``sample_weight = w(x_i)``.

    Parameters
    ----------
    estimator : estimator accepting ``sample_weight``, default=LogisticRegression()
    gamma : float, 'scale' or list, default=(0.1, 0.3, 1, 3, 10)
        Kernel ``exp(-gamma ||x - c||^2)``. Numbers in a list are *multiples of* ``1 / (d Var(X))``
        and are selected by likelihood cross-validation; a float is used as is.
    n_centers : int, default=100
    cv : int, default=5
    max_iter : int, default=100
        Iterations per step size.
    random_state : int, RandomState or None

    Attributes
    ----------
    weights_ : ndarray (n_source,); alpha_ : ndarray (n_centers,); centers_ : ndarray (n_centers, d);
    gamma_ : float; cv_scores_ : ndarray; estimator_ : fitted estimator
    """

    def __init__(self, estimator=None, gamma=(0.1, 0.3, 1.0, 3.0, 10.0), n_centers=100, cv=5, max_iter=100,
                 random_state=None):
        self.estimator = estimator
        self.gamma = gamma
        self.n_centers = n_centers
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state

    def _source_weights(self, X_source, X_target):
        scale = resolve_gamma("scale", np.vstack([X_source, X_target]))
        if isinstance(self.gamma, (list, tuple, np.ndarray)):
            gamma = [scale * g for g in self.gamma]
        else:
            gamma = resolve_gamma(self.gamma, np.vstack([X_source, X_target]))
        w, info = kliep_weights(X_source, X_target, gamma=gamma, n_centers=self.n_centers, cv=self.cv,
                                max_iter=self.max_iter, random_state=self.random_state, return_info=True)
        self.alpha_, self.centers_ = info["alpha"], info["centers"]
        self.gamma_, self.cv_scores_ = info["gamma"], info["cv_scores"]
        return w
