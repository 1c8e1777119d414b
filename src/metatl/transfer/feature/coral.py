r"""CORrelation ALignment, closed form (Sun, Feng and Saenko, "Return of frustratingly easy domain
adaptation", AAAI 2016, Algorithm 1).

With regularised covariances :math:`C_s = \mathrm{cov}(X_s) + \lambda I` and
:math:`C_t = \mathrm{cov}(X_t) + \lambda I`, the source is whitened and re-coloured:

.. math::

    D_s^* = X_s\, C_s^{-1/2}\, C_t^{1/2} ,

so that :math:`\mathrm{cov}(X_s A) = C_t` (exactly when :math:`\lambda = 0` and :math:`C_s` is
invertible). Target rows are left unchanged. Matrix powers use the symmetric eigendecomposition.
As in the paper the transform is linear (no re-centering); set ``center=True`` to also move the
source mean onto the target mean.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from metatl.registry import ESTIMATORS
from metatl.transfer._validation import check_domains, check_n_features, check_X


def sym_power(C: np.ndarray, power: float) -> np.ndarray:
    """``C^power`` of a symmetric positive definite matrix via ``V diag(lambda^power) V^T``."""
    lam, V = np.linalg.eigh(C)
    return (V * np.maximum(lam, 1e-12) ** power) @ V.T


def coral_matrix(X_source, X_target, reg=1.0):
    """``A = C_s^{-1/2} C_t^{1/2}`` (shape ``(d, d)``) with ``C = cov + reg * I``."""
    d = X_source.shape[1]
    Cs = np.cov(X_source, rowvar=False).reshape(d, d) + reg * np.eye(d)
    Ct = np.cov(X_target, rowvar=False).reshape(d, d) + reg * np.eye(d)
    return sym_power(Cs, -0.5) @ sym_power(Ct, 0.5)


@ESTIMATORS.register("coral")
class CORAL(TransformerMixin, BaseEstimator):
    """CORAL transformer: maps source rows to ``X A`` with ``A = C_s^{-1/2} C_t^{1/2}``.

    Use it before a source-trained estimator, e.g. ``make_pipeline(CORAL(), SourceOnly(SVC()))``.
    ``transform(X)`` without ``sample_domain`` treats every row as target (identity), which is what
    ``predict`` on target data needs; ``fit_transform`` / ``transform`` with ``sample_domain`` map the
    source rows.

    Parameters
    ----------
    reg : float, default=1.0
        ``lambda`` added to both covariances (the paper's default is 1).
    center : bool, default=False
        Also shift the source mean onto the target mean.

    Attributes
    ----------
    A_ : ndarray (d, d); mean_source_, mean_target_ : ndarray (d,)
    """

    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__transform = {"sample_domain": True}

    def __init__(self, reg=1.0, center=False):
        self.reg = reg
        self.center = center

    def fit(self, X, y=None, sample_domain=None):
        """Learn ``A_`` from the source and target rows; returns ``self``."""
        X, _, sd = check_domains(X, y, sample_domain, classification=False, who="CORAL")
        self.A_ = coral_matrix(X[sd > 0], X[sd < 0], self.reg)
        self.mean_source_, self.mean_target_ = X[sd > 0].mean(0), X[sd < 0].mean(0)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X, sample_domain=None):
        """Source rows (``sample_domain > 0``) -> ``X A``; other rows unchanged."""
        check_is_fitted(self, "A_")
        X = check_X(X).copy()
        check_n_features(X, self.n_features_in_, "CORAL")
        if sample_domain is None:
            return X
        s = np.asarray(sample_domain) > 0
        Xs = X[s] - self.mean_source_ if self.center else X[s]
        X[s] = Xs @ self.A_ + (self.mean_target_ if self.center else 0.0)
        return X

    def fit_transform(self, X, y=None, sample_domain=None):
        X_checked, _, sd = check_domains(X, y, sample_domain, classification=False, who="CORAL")
        return self.fit(X_checked, None, sd).transform(X_checked, sd)
