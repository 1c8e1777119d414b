r"""CORrelation ALignment, closed form (Sun, Feng and Saenko, "Return of frustratingly easy domain
adaptation", AAAI 2016, Algorithm 1).

With regularised covariances :math:`C_s = \mathrm{cov}(X_s) + \lambda I` and
:math:`C_t = \mathrm{cov}(X_t) + \lambda I`, the source is whitened and re-coloured:

.. math::

    D_s^* = X_s\, C_s^{-1/2}\, C_t^{1/2} ,

so that :math:`\mathrm{cov}(X_s A) = C_t` (exactly when :math:`\lambda = 0` and :math:`C_s` is
invertible). Matrix powers use the symmetric eigendecomposition.

Centring (``center=True``, the default): the covariances are about each domain's mean, so the map
that gives the source the target's covariance is affine, :math:`D_s^* = (X_s - \mu_s) A + \mu_t`.
skada's ``CORALAdapter`` (``assume_centered=False`` by default; ``skada/_mapping.py``) centres the
source, whitens and re-colours it, and centres the target rows; that is this map followed by the
same shift :math:`-\mu_t` of every row, so a translation-invariant classifier (RBF SVC, a linear model
with an intercept) sees the same problem. Sun, Feng and Saenko's book chapter (2017,
arXiv:1612.01939) also normalises both domains to zero mean before re-colouring; the AAAI paper's
four-line Algorithm 1 applies the linear map to features it does not re-centre (``center=False``).
On the simulated covariate shift of docs/transfer.md the centred map scores higher (numbers there).
Target rows are left unchanged either way.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, TransformerMixin

from metatl.registry import ESTIMATORS
from metatl.transfer._validation import (
    TargetLabelLeakWarning,
    check_domains,
    check_fitted_X,
    is_masked,
)

if TYPE_CHECKING:  # typing.Self is Python 3.11+; metatl supports 3.10
    from typing_extensions import Self


def sym_power(C: np.ndarray, power: float) -> np.ndarray:
    """``C^power`` of a symmetric positive definite matrix via ``V diag(lambda^power) V^T``."""
    lam, V = np.linalg.eigh(C)
    return (V * np.maximum(lam, 1e-12) ** power) @ V.T


def coral_matrix(X_source: np.ndarray, X_target: np.ndarray, reg: float = 1.0) -> np.ndarray:
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
    source rows. So ``fit_transform(X, y, sample_domain=sd)`` equals
    ``fit(X, y, sample_domain=sd).transform(X, sample_domain=sd)``; without ``sample_domain``,
    ``fit_transform(X, y)`` takes the domains from the label mask (it has ``y``) while
    ``transform(X)`` has no labels and treats every row as target, as skada's ``transform`` does by
    default (``allow_source=False``). That is what a ``Pipeline`` needs: the mapped source at
    ``fit``, the target untouched at ``predict``.

    Parameters
    ----------
    reg : float, default=1.0
        ``lambda`` added to both covariances (the paper's default is 1).
    center : bool, default=True
        Map source rows to ``(x - mu_s) A + mu_t`` (centred covariances, as skada does); ``False``:
        ``x A``, the AAAI paper's Algorithm 1 taken literally (see the module docstring).

    Attributes
    ----------
    A_ : ndarray (d, d); mean_source_, mean_target_ : ndarray (d,)
    """

    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__transform = {"sample_domain": True}

    def __init__(self, reg: float = 1.0, center: bool = True) -> None:
        self.reg = reg
        self.center = center

    def fit(self, X: ArrayLike, y: ArrayLike | None = None, sample_domain: ArrayLike | None = None) -> Self:
        """Learn ``A_`` from the source and target rows; returns ``self``."""
        X, _, sd = check_domains(X, None, _domains(y, sample_domain), classification=False, estimator=self, who="CORAL")
        for name, rows in (("source", sd > 0), ("target", sd < 0)):
            if rows.sum() < 2:
                raise ValueError(
                    f"CORAL estimates a covariance per domain and got {int(rows.sum())} {name} row; "
                    f"it needs at least 2 {name} rows."
                )
        self.A_ = coral_matrix(X[sd > 0], X[sd < 0], self.reg)
        self.mean_source_, self.mean_target_ = X[sd > 0].mean(0), X[sd < 0].mean(0)
        return self

    def transform(self, X: ArrayLike, sample_domain: ArrayLike | None = None) -> np.ndarray:
        """Source rows (``sample_domain > 0``) -> ``X A``; other rows unchanged."""
        X = check_fitted_X(self, X).copy()
        if sample_domain is None:
            return X
        sample_domain = np.asarray(sample_domain)
        if sample_domain.shape != (len(X),):
            raise ValueError(
                f"sample_domain has shape {sample_domain.shape}; expected ({len(X)},), one domain per row of X."
            )
        s = sample_domain > 0
        Xs = X[s] - self.mean_source_ if self.center else X[s]
        X[s] = Xs @ self.A_ + (self.mean_target_ if self.center else 0.0)
        return X

    def fit_transform(
        self, X: ArrayLike, y: ArrayLike | None = None, sample_domain: ArrayLike | None = None
    ) -> np.ndarray:
        """``fit(X, y, sample_domain)`` then ``transform`` of the same rows with the same domains (taken
        from the label mask of ``y`` when ``sample_domain`` is None)."""
        X_checked, _, sd = check_domains(X, None, _domains(y, sample_domain), classification=False, who="CORAL")
        return self.fit(X_checked, None, sd).transform(X_checked, sd)


def _domains(y, sample_domain):
    """CORAL reads no labels: ``y`` only tells the domains apart when ``sample_domain`` is None (masked
    rows, -1 or NaN, are target; any label type), so with ``sample_domain`` it is dropped, with the
    usual :class:`TargetLabelLeakWarning` when target rows carry labels."""
    if y is None:
        return sample_domain
    y = np.asarray(y)
    y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    if sample_domain is None:
        return np.where(is_masked(y), -1, 1)
    sd = np.asarray(sample_domain)
    if y.shape == sd.shape and (~is_masked(y)[sd < 0]).any():
        warnings.warn(
            "CORAL is unsupervised on the target but target rows carry labels; they were ignored. Mask them "
            "(y=-1, NaN for regression) or check sample_domain, so that model selection does not leak target labels.",
            TargetLabelLeakWarning,
            stacklevel=3,
        )
    return sample_domain
