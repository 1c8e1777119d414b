r"""Parameter transfer for linear models: stay close to the source solution (the L2-SP idea of
Li, Grandvalet and Davoine, ICML 2018, in its classical form; also Evgeniou and Pontil, KDD 2004,
"regularized multi-task learning").

A source model :math:`w_s` is fitted on the source rows (or given as ``source_coef``), then the
target model minimises the target loss plus a pull towards it:

.. math::

    \hat w = \arg\min_w \; \frac{1}{m}\sum_{i \in T} \ell(y_i, w^\top x_i + c)
    + \frac{\alpha}{2} \|w - w_s\|^2 .

The intercept :math:`c` is not penalised. :math:`\alpha \to \infty` returns the source model,
:math:`\alpha \to 0` the unregularised target fit.

* :class:`TransferRidge`: squared loss :math:`\ell = \frac12 (y - w^\top x - c)^2`; closed form on
  centred data, :math:`\hat w = (X_c^\top X_c + m\alpha I)^{-1}(X_c^\top y_c + m\alpha w_s)`.
* :class:`TransferLogisticRegression`: binary logistic loss (``K = 2``, labels as the sign of
  :math:`w^\top x + c`) or multinomial softmax cross-entropy (``K > 2``, :math:`W \in R^{K \times d}`,
  penalty :math:`\frac{\alpha}{2}\|W - W_s\|_F^2`); minimised by L-BFGS. The source model is the same
  objective on the source with :math:`w_s = 0` and strength ``alpha_source``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from metatl.registry import ESTIMATORS
from metatl.transfer._base import LabelledScoreMixin
from metatl.transfer._validation import check_domains, check_fitted_X, is_masked

if TYPE_CHECKING:  # typing.Self is Python 3.11+; metatl supports 3.10
    from typing_extensions import Self


def _labelled_split(estimator, X, y, sample_domain, classification):
    X, y, sd = check_domains(
        X,
        y,
        sample_domain,
        target_labels="require",
        classification=classification,
        requires_y=True,
        estimator=estimator,
        who=type(estimator).__name__,
    )
    t = (sd < 0) & ~is_masked(y, classification)
    return X[sd > 0], y[sd > 0], X[t], y[t]


def ridge_to_prior(X: np.ndarray, y: np.ndarray, w_prior: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``argmin_{w,c} 1/(2m) ||y - Xw - c||^2 + alpha/2 ||w - w_prior||^2`` in closed form."""
    xm, ym = X.mean(0), y.mean()
    Xc, yc = X - xm, y - ym
    m, d = X.shape
    w = np.linalg.solve(Xc.T @ Xc + m * alpha * np.eye(d), Xc.T @ yc + m * alpha * w_prior)
    return w, ym - xm @ w


def logistic_to_prior(X: np.ndarray, Y: np.ndarray, W_prior: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``argmin_{W,c} mean cross-entropy + alpha/2 ||W - W_prior||_F^2``.

    ``Y`` is one-hot ``(m, K)`` for ``K > 2`` or ``(m, 1)`` of {0, 1} for the binary (sigmoid) model;
    ``W_prior`` has shape ``(K', d)`` with ``K' = Y.shape[1]``. Returns ``W (K', d)``, ``c (K',)``.
    """
    m, d = X.shape
    k = Y.shape[1]
    Xb = np.hstack([X, np.ones((m, 1))])

    def objective(theta):
        Wc = theta.reshape(k, d + 1)
        Z = Xb @ Wc.T
        if k == 1:  # sigmoid: loss = log(1 + e^z) - y z
            loss = np.mean(np.logaddexp(0.0, Z) - Y * Z)
            G = (1.0 / (1.0 + np.exp(-Z)) - Y) / m
        else:
            loss = -np.mean(np.sum(Y * log_softmax(Z, axis=1), axis=1))
            G = (softmax(Z, axis=1) - Y) / m
        diff = Wc[:, :d] - W_prior
        grad = G.T @ Xb
        grad[:, :d] += alpha * diff
        return loss + 0.5 * alpha * np.sum(diff * diff), grad.ravel()

    theta0 = np.hstack([W_prior, np.zeros((k, 1))]).ravel()
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-8})
    Wc = res.x.reshape(k, d + 1)
    return Wc[:, :d], Wc[:, d]


@ESTIMATORS.register("transfer_ridge")
class TransferRidge(LabelledScoreMixin, RegressorMixin, BaseEstimator):
    """Ridge regression pulled towards a source model (equation in the module docstring).

    Parameters
    ----------
    alpha : float, default=1.0
        Strength of ``alpha/2 ||w - w_s||^2`` on the target.
    alpha_source : float, default=1e-3
        Plain ridge strength for the source fit (``w_prior = 0``).
    source_coef : ndarray (d,) or None
        Use this ``w_s`` instead of fitting on the source rows.

    Attributes
    ----------
    coef_, intercept_ : target model; source_coef_ : the ``w_s`` used.
    """

    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__score = {"sample_domain": True}
    _scores_target_labels = True

    def __init__(self, alpha: float = 1.0, alpha_source: float = 1e-3, source_coef: ArrayLike | None = None) -> None:
        self.alpha = alpha
        self.alpha_source = alpha_source
        self.source_coef = source_coef

    def fit(self, X: ArrayLike, y: ArrayLike, sample_domain: ArrayLike | None = None) -> Self:
        """Fit ``w_s`` on the source rows (unless given), then the target model; returns ``self``."""
        y = None if y is None else np.asarray(y, dtype=float)
        Xs, ys, Xt, yt = _labelled_split(self, X, y, sample_domain, False)
        d = Xs.shape[1]
        if self.source_coef is None:
            ws, _ = ridge_to_prior(Xs, ys, np.zeros(d), self.alpha_source)
        else:
            ws = np.asarray(self.source_coef, dtype=float).reshape(d)
        self.source_coef_ = ws
        self.coef_, self.intercept_ = ridge_to_prior(Xt, yt, ws, self.alpha)
        return self

    def predict(self, X: ArrayLike) -> np.ndarray:
        X = check_fitted_X(self, X)
        return X @ self.coef_ + self.intercept_


@ESTIMATORS.register("transfer_logistic")
class TransferLogisticRegression(LabelledScoreMixin, ClassifierMixin, BaseEstimator):
    """Logistic regression pulled towards a source model (equation in the module docstring).

    Parameters
    ----------
    alpha : float, default=1.0
        Strength of ``alpha/2 ||W - W_s||^2`` on the target.
    alpha_source : float, default=1e-2
        L2 strength for the source fit (``W_prior = 0``).
    source_coef : ndarray or None
        ``W_s`` of shape ``(1, d)`` (binary) or ``(K, d)``; fitted on the source rows when None.

    Attributes
    ----------
    classes_, coef_, intercept_, source_coef_
    """

    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__score = {"sample_domain": True}
    _scores_target_labels = True

    def __init__(self, alpha: float = 1.0, alpha_source: float = 1e-2, source_coef: ArrayLike | None = None) -> None:
        self.alpha = alpha
        self.alpha_source = alpha_source
        self.source_coef = source_coef

    def _targets(self, y):
        k = np.searchsorted(self.classes_, y)
        if len(self.classes_) == 2:
            return k[:, None].astype(float)
        return np.eye(len(self.classes_))[k]

    def fit(self, X: ArrayLike, y: ArrayLike, sample_domain: ArrayLike | None = None) -> Self:
        """Fit ``W_s`` on the source rows (unless given), then the target model; returns ``self``."""
        Xs, ys, Xt, yt = _labelled_split(self, X, y, sample_domain, True)
        self.classes_ = np.unique(np.concatenate([ys, yt]))
        k, d = (1 if len(self.classes_) == 2 else len(self.classes_)), Xs.shape[1]
        if self.source_coef is None:
            Ws, _ = logistic_to_prior(Xs, self._targets(ys), np.zeros((k, d)), self.alpha_source)
        else:
            Ws = np.asarray(self.source_coef, dtype=float).reshape(k, d)
        self.source_coef_ = Ws
        self.coef_, self.intercept_ = logistic_to_prior(Xt, self._targets(yt), Ws, self.alpha)
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        X = check_fitted_X(self, X)
        Z = X @ self.coef_.T + self.intercept_
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        Z = self.decision_function(X)
        if Z.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-Z))
            return np.column_stack([1 - p, p])
        return softmax(Z, axis=1)

    def predict(self, X: ArrayLike) -> np.ndarray:
        proba = self.predict_proba(X)  # checks fitted first
        return self.classes_[np.argmax(proba, axis=1)]
