r"""Model selection without target labels: scorers for ``GridSearchCV(scoring=...)``.

Each scorer is called as ``scorer(estimator, X_val, y_val, sample_domain=None)`` on a validation
fold that holds labelled source rows and unlabelled (masked) target rows; it never reads a target
label. ``sample_domain`` is routed to it when sklearn metadata routing is enabled; otherwise it is
inferred from the mask (``y = -1`` / NaN -> target). Greater is better for every scorer.

* :class:`ImportanceWeightedScorer` -- importance-weighted validation (Sugiyama, Krauledat and
  Mueller, JMLR 2007): :math:`\sum_i w(x_i)\,[f(x_i) = y_i] / \sum_i w(x_i)` over source rows.
* :class:`DEVScorer` -- deep embedded validation (You, Wang, Long and Jordan, ICML 2019):
  :math:`L_i = w_i \ell_i`, :math:`\eta = -\widehat{\mathrm{Cov}}(L, w)/\widehat{\mathrm{Var}}(w)`,
  :math:`R = \bar L + \eta \bar w - \eta`; the score is :math:`-R`.
* :class:`ReverseValidationScorer` -- reverse validation (Zhong et al., ECML-PKDD 2010): pseudo-label
  the target with :math:`f`, train :math:`f^r` (a clone) with domains swapped, score :math:`f^r` on the
  labelled source rows.

The importance :math:`w(x) = \frac{n_s}{n_t}\frac{P(t \mid x)}{P(s \mid x)}` comes from a
probabilistic domain classifier fitted on the fold (default: logistic regression) -- the
discriminative density-ratio estimate used by DEV.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.metadata_routing import MetadataRequest

from metatl.transfer._validation import MASKED_LABEL, check_X, is_masked


def domain_classifier_weights(
    X_source: ArrayLike, X_target: ArrayLike, classifier: BaseEstimator | None = None
) -> np.ndarray:
    """``w(x) = n_s/n_t * P(t|x) / P(s|x)`` at ``X_source`` from a classifier of source vs target."""
    clf = clone(classifier) if classifier is not None else LogisticRegression()
    Z = np.vstack([X_source, X_target])
    d = np.r_[np.zeros(len(X_source)), np.ones(len(X_target))]
    p = np.clip(clf.fit(Z, d).predict_proba(X_source)[:, 1], 1e-6, 1 - 1e-6)
    return len(X_source) / len(X_target) * p / (1 - p)


class _DomainScorer:
    """Base: splits the fold, requests ``sample_domain`` for metadata routing."""

    def get_metadata_routing(self):
        request = MetadataRequest(owner=type(self).__name__)
        request.score.add_request(param="sample_domain", alias=True)
        return request

    def __call__(
        self,
        estimator: BaseEstimator,
        X: ArrayLike,
        y: ArrayLike,
        sample_domain: ArrayLike | None = None,
        **kwargs: Any,
    ) -> float:
        X, y = check_X(X), np.asarray(y)
        sd = np.where(is_masked(y), -1, 1) if sample_domain is None else np.asarray(sample_domain)
        s, t = sd > 0, sd < 0
        if not s.any() or not t.any():
            raise ValueError(
                f"{type(self).__name__} needs source and target rows in every validation fold; "
                "use a split that keeps both in each fold, e.g. cv=StratifiedKFold(5, shuffle=True) (the "
                "masked label -1 acts as one more class) or an explicit list of (train, test) indices."
            )
        return float(self._score(estimator, X[s], y[s], X[t]))

    def __repr__(self):
        return f"{type(self).__name__}()"


class ImportanceWeightedScorer(_DomainScorer):
    """Importance-weighted validation accuracy (Sugiyama et al., JMLR 2007).

    Parameters
    ----------
    domain_classifier : classifier with ``predict_proba``, default=LogisticRegression()
    """

    def __init__(self, domain_classifier: BaseEstimator | None = None) -> None:
        self.domain_classifier = domain_classifier

    def _score(self, estimator, Xs, ys, Xt):
        w = domain_classifier_weights(Xs, Xt, self.domain_classifier)
        return np.sum(w * (estimator.predict(Xs) == ys)) / np.sum(w)


class DEVScorer(_DomainScorer):
    """Deep embedded validation with its control variate (You et al., ICML 2019); returns ``-R_DEV``.

    Loss ``l_i``: cross-entropy when the estimator has ``predict_proba``, else 0-1 error. The
    embedding is the input ``X`` (pass ``embed``, a callable ``X -> features``, for another one).

    Parameters
    ----------
    domain_classifier : classifier with ``predict_proba``, default=LogisticRegression()
    embed : callable or None
    """

    def __init__(
        self,
        domain_classifier: BaseEstimator | None = None,
        embed: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.domain_classifier = domain_classifier
        self.embed = embed

    def _score(self, estimator, Xs, ys, Xt):
        f = self.embed or (lambda Z: Z)
        w = domain_classifier_weights(f(Xs), f(Xt), self.domain_classifier)
        if hasattr(estimator, "predict_proba"):
            proba = estimator.predict_proba(Xs)
            k = np.searchsorted(estimator.classes_, ys)
            loss = -np.log(np.clip(proba[np.arange(len(ys)), k], 1e-12, 1.0))
        else:
            loss = (estimator.predict(Xs) != ys).astype(float)
        return -dev_risk(loss, w)


def dev_risk(loss: np.ndarray, w: np.ndarray) -> float:
    """``R = mean(w l) + eta mean(w) - eta`` with ``eta = -Cov(w l, w) / Var(w)`` (You et al. 2019, Alg. 1)."""
    L = w * loss
    var = np.var(w, ddof=1)
    eta = -np.cov(L, w)[0, 1] / var if var > 0 else 0.0
    return L.mean() + eta * w.mean() - eta


class ReverseValidationScorer(_DomainScorer):
    """Reverse validation accuracy (Zhong et al., ECML-PKDD 2010).

    On the validation fold: ``y_t = f(X_t)``; ``f_r = clone(f)`` is fitted with the target rows as a
    labelled source (labels ``y_t``) and the source rows as an unlabelled target; the score is the
    accuracy of ``f_r`` on the true source labels. ``sample_domain`` is passed to ``f_r.fit`` when
    its signature takes it, otherwise the domains are carried by the label mask.
    """

    def _score(self, estimator, Xs, ys, Xt):
        pseudo = estimator.predict(Xt)
        if len(np.unique(pseudo)) < 2:  # the reverse model can only predict this class
            return np.mean(ys == pseudo[0])
        X = np.vstack([Xt, Xs])
        y = np.concatenate([pseudo, np.full(len(Xs), MASKED_LABEL, dtype=pseudo.dtype)])
        sd = np.r_[np.ones(len(Xt), int), -np.ones(len(Xs), int)]
        reverse = clone(estimator)
        if "sample_domain" in inspect.signature(reverse.fit).parameters:
            reverse.fit(X, y, sample_domain=sd)
        else:
            reverse.fit(X, y)
        return np.mean(reverse.predict(Xs) == ys)
