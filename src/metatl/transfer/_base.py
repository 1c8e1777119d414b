"""Shared pieces of the classical estimators: chunked RBF kernels and the reweighting wrapper.

Private: the public classes are re-exported from :mod:`metatl.transfer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, MetaEstimatorMixin, clone, is_regressor
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils import get_tags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import _check_sample_weight

from metatl.registry import ESTIMATORS
from metatl.transfer._validation import check_domains, check_fitted_X, is_masked

if TYPE_CHECKING:  # typing.Self is Python 3.11+; metatl supports 3.10
    from typing_extensions import Self

# --------------------------------------------------------------------------- kernels


def resolve_gamma(gamma, X: np.ndarray) -> float:
    """``gamma`` of ``k(x, z) = exp(-gamma ||x - z||^2)``; ``'scale'`` means ``1 / (d * Var(X))``."""
    if gamma == "scale":
        var = X.var()
        return 1.0 / (X.shape[1] * var) if var > 0 else 1.0
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma must be positive or 'scale'; got {gamma}.")
    return gamma


def _sq_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d, 0.0, out=d)


def rbf_kernel(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    """Dense ``K_ij = exp(-gamma ||a_i - b_j||^2)``; only for blocks that fit in memory."""
    return np.exp(-gamma * _sq_dist(A, B))


def rbf_matvec(A: np.ndarray, B: np.ndarray, v: np.ndarray, gamma: float, chunk: int = 2048) -> np.ndarray:
    """``K(A, B) @ v`` computed ``chunk`` rows of ``A`` at a time: memory ``chunk x len(B)``, never ``n x n``."""
    out = np.empty((len(A),) + v.shape[1:])
    for i in range(0, len(A), chunk):
        out[i : i + chunk] = rbf_kernel(A[i : i + chunk], B, gamma) @ v
    return out


# --------------------------------------------------------------------------- estimators


class LabelledScoreMixin:
    """``score(X, y)`` = accuracy (R^2 for regressors) on the labelled rows only.

    Masked rows (-1 / NaN) are skipped, so ``GridSearchCV``'s default score never errors on the
    unlabelled target and never uses target labels that are not there. With ``sample_domain``,
    only rows of domains that the estimator may learn from are scored: source rows for
    unsupervised methods (``_scores_target_labels = False``), any labelled row otherwise.
    """

    _scores_target_labels = False

    def score(
        self, X: ArrayLike, y: ArrayLike, sample_domain: ArrayLike | None = None, sample_weight: ArrayLike | None = None
    ) -> float:
        y = np.asarray(y)
        keep = ~is_masked(y, classification=not is_regressor(self))
        if sample_domain is not None and not self._scores_target_labels:
            keep &= np.asarray(sample_domain) > 0
        if not keep.any():
            raise ValueError("score needs labelled rows; every row of y is masked (-1 / NaN).")
        sw = None if sample_weight is None else np.asarray(sample_weight)[keep]
        pred = self.predict(np.asarray(X)[keep])
        if is_regressor(self):
            return r2_score(y[keep].astype(float), pred, sample_weight=sw)
        return accuracy_score(y[keep], pred, sample_weight=sw)


class _DomainEstimator(LabelledScoreMixin, MetaEstimatorMixin, BaseEstimator):
    """Wraps ``estimator``; ``predict`` & co. delegate to the fitted ``estimator_``.

    ``score(X, y)`` scores only the labelled rows (masked target rows are skipped), so the default
    ``GridSearchCV`` score is a source-validation score and never needs target labels.
    """

    # with sklearn metadata routing enabled, sample_domain is requested by default
    __metadata_request__fit = {"sample_domain": True}
    __metadata_request__score = {"sample_domain": True}

    def _base(self):
        return clone(self.estimator) if self.estimator is not None else LogisticRegression()

    def _fitted_or_base(self):
        return self.estimator_ if hasattr(self, "estimator_") else self._base()

    def __sklearn_tags__(self):
        # a classifier when the wrapped estimator is one (so cv=int stratifies, is_classifier works)
        tags = super().__sklearn_tags__()
        base = get_tags(self._base())
        tags.estimator_type = base.estimator_type
        tags.classifier_tags = base.classifier_tags
        tags.regressor_tags = base.regressor_tags
        return tags

    def _set_fitted(self, est, X):
        self.estimator_ = est
        if hasattr(est, "classes_"):
            self.classes_ = est.classes_

    def predict(self, X: ArrayLike) -> np.ndarray:
        X = check_fitted_X(self, X)
        return self.estimator_.predict(X)

    @available_if(lambda self: hasattr(self._fitted_or_base(), "predict_proba"))
    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        X = check_fitted_X(self, X)
        return self.estimator_.predict_proba(X)

    @available_if(lambda self: hasattr(self._fitted_or_base(), "decision_function"))
    def decision_function(self, X: ArrayLike) -> np.ndarray:
        X = check_fitted_X(self, X)
        return self.estimator_.decision_function(X)


@ESTIMATORS.register("source_only")
class SourceOnly(_DomainEstimator):
    """Baseline: fit ``estimator`` on the source rows only and ignore the target.

    Parameters
    ----------
    estimator : estimator, default=LogisticRegression()
    """

    def __init__(self, estimator: BaseEstimator | None = None) -> None:
        self.estimator = estimator

    def fit(
        self, X: ArrayLike, y: ArrayLike, sample_domain: ArrayLike | None = None, sample_weight: ArrayLike | None = None
    ) -> Self:
        """Fit on rows with ``sample_domain > 0``; returns ``self``."""
        X, y, sd = check_domains(
            X,
            y,
            sample_domain,
            classification=not is_regressor(self._base()),
            requires_y=True,
            estimator=self,
            who="SourceOnly",
        )
        s = sd > 0
        est = self._base()
        if sample_weight is None:
            est.fit(X[s], y[s])
        else:
            est.fit(X[s], y[s], sample_weight=_check_sample_weight(sample_weight, X)[s])
        self._set_fitted(est, X)
        return self


class BaseReweighter(_DomainEstimator):
    """Instance reweighting: learn weights ``w(x_i) ~ p_t(x_i) / p_s(x_i)`` for the source rows, then
    fit ``estimator`` on the source with ``sample_weight = w``. Subclasses implement ``_source_weights``.
    """

    def _source_weights(self, X_source, X_target):  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(
        self, X: ArrayLike, y: ArrayLike, sample_domain: ArrayLike | None = None, sample_weight: ArrayLike | None = None
    ) -> Self:
        """Learn ``weights_`` on ``X[source]`` vs ``X[target]`` and fit the estimator; returns ``self``."""
        X, y, sd = check_domains(
            X,
            y,
            sample_domain,
            classification=not is_regressor(self._base()),
            requires_y=True,
            estimator=self,
            who=type(self).__name__,
        )
        s, t = sd > 0, sd < 0
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X)
        w = self._source_weights(X[s], X[t])
        self.weights_ = w
        if sample_weight is not None:
            w = w * sample_weight[s]
        est = self._base()
        est.fit(X[s], y[s], sample_weight=w)
        self._set_fitted(est, X)
        return self
