"""scikit-learn's own estimator checks (``check_estimator``) on every classical estimator.

The checks call ``fit(X, y)`` without domains, so a thin wrapper supplies ``sample_domain``: rows
``i % 4 in (1, 2)`` are target, the others source (both domains from the same distribution, every
class of the checks' small label patterns on both sides). Target rows keep their labels; the
unsupervised methods mask them (their ``TargetLabelLeakWarning`` is silenced here). The wrapper
passes the same domains to ``transform`` so that ``fit_transform(X)`` and ``fit(X).transform(X)``
see the same rows as source. Everything else (validation, errors, attributes) is the estimator's own.

The few checks that still fail are expected failures with their reason, listed in ``XFAIL`` and
explained in docs/transfer.md ("scikit-learn contract").
"""

import warnings

import numpy as np
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import _num_samples

import metatl.transfer  # noqa: F401  (registers the estimators)
from metatl.registry import ESTIMATORS
from metatl.transfer import (
    CORAL,
    KLIEP,
    KMM,
    SourceOnly,
    TargetLabelLeakWarning,
    TrAdaBoost,
    TransferLogisticRegression,
    TransferRidge,
)


def _domains(X):
    n = _num_samples(X)
    return np.where(np.isin(np.arange(n) % 4, (1, 2)), -1, 1)


def _fit(cls, self, X, y, sample_domain, **kw):
    if sample_domain is None:
        sample_domain = _domains(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetLabelLeakWarning)
        return cls.fit(self, X, y, sample_domain=sample_domain, **kw)


class DomainedSourceOnly(SourceOnly):
    def fit(self, X, y=None, sample_domain=None, sample_weight=None):
        return _fit(SourceOnly, self, X, y, sample_domain, sample_weight=sample_weight)


class DomainedKMM(KMM):
    def fit(self, X, y=None, sample_domain=None, sample_weight=None):
        return _fit(KMM, self, X, y, sample_domain, sample_weight=sample_weight)


class DomainedKLIEP(KLIEP):
    def fit(self, X, y=None, sample_domain=None, sample_weight=None):
        return _fit(KLIEP, self, X, y, sample_domain, sample_weight=sample_weight)


class DomainedTrAdaBoost(TrAdaBoost):
    def fit(self, X, y=None, sample_domain=None):
        return _fit(TrAdaBoost, self, X, y, sample_domain)


class DomainedTransferLogisticRegression(TransferLogisticRegression):
    def fit(self, X, y=None, sample_domain=None):
        return _fit(TransferLogisticRegression, self, X, y, sample_domain)


class DomainedTransferRidge(TransferRidge):
    def fit(self, X, y=None, sample_domain=None):
        return _fit(TransferRidge, self, X, y, sample_domain)


class DomainedCORAL(CORAL):
    def fit(self, X, y=None, sample_domain=None):
        return _fit(CORAL, self, X, y, sample_domain)

    def transform(self, X, sample_domain=None):
        return super().transform(X, sample_domain=_domains(X) if sample_domain is None else sample_domain)

    def fit_transform(self, X, y=None, sample_domain=None):
        return self.fit(X, y, sample_domain).transform(X, sample_domain)


WRAPPED = {
    "source_only": DomainedSourceOnly,
    "kmm": DomainedKMM,
    "kliep": DomainedKLIEP,
    "tradaboost": DomainedTrAdaBoost,
    "transfer_logistic": DomainedTransferLogisticRegression,
    "transfer_ridge": DomainedTransferRidge,
    "coral": DomainedCORAL,
}

_MINUS_ONE = "-1 is the masked label (an unlabelled target row), so a source row labelled -1 is refused"
_BY_POSITION = (
    "the wrapper assigns domains by row position, so repeating, reordering or subsetting rows "
    "moves rows between source and target"
)
XFAIL = {
    name: {"check_classifiers_classes": _MINUS_ONE}
    for name in ("source_only", "kmm", "kliep", "tradaboost", "transfer_logistic")
}
for name in ("source_only", "kmm", "kliep"):
    XFAIL[name]["check_sample_weight_equivalence_on_dense_data"] = _BY_POSITION
XFAIL["coral"] = {
    "check_methods_sample_order_invariance": _BY_POSITION,
    "check_methods_subset_invariance": _BY_POSITION,
}


def test_every_registered_estimator_is_checked():
    assert set(WRAPPED) == set(ESTIMATORS)


@parametrize_with_checks(
    [WRAPPED[name]() for name in WRAPPED],
    expected_failed_checks=lambda est: XFAIL.get(next(n for n, c in WRAPPED.items() if isinstance(est, c)), {}),
)
def test_sklearn_estimator_checks(estimator, check):
    assert check(estimator) is None  # scikit-learn's check raises when the contract is broken


def test_at_most_three_expected_failures_each():
    assert all(len(v) <= 3 for v in XFAIL.values())
