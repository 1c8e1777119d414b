"""Label-free model selection scorers."""

import numpy as np
import pytest
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

from metatl.data.domains import make_shifted_blobs
from metatl.transfer import CORAL, KMM, DEVScorer, ImportanceWeightedScorer, ReverseValidationScorer, SourceOnly

SCORERS = [ImportanceWeightedScorer(), DEVScorer(), ReverseValidationScorer()]


@pytest.mark.parametrize("scorer", SCORERS, ids=repr)
def test_scorer_never_reads_target_labels(scorer, blobs):
    X, y, sd, yt = blobs
    est = KMM(LogisticRegression()).fit(X, y, sample_domain=sd)
    y_a, y_b = y.copy(), y.copy()
    y_a[sd < 0], y_b[sd < 0] = yt, 1 - yt  # two different "leaks"
    a = scorer(est, X, y_a, sample_domain=sd)
    b = scorer(est, X, y_b, sample_domain=sd)
    c = scorer(est, X, y)  # domains inferred from the mask
    assert a == b == pytest.approx(c)


@pytest.mark.parametrize("scorer", SCORERS, ids=repr)
@pytest.mark.parametrize("routing", [False, True])
def test_scorers_in_grid_search(scorer, routing, blobs):
    X, y, sd, _ = blobs
    cv = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, sd))
    est = KMM(LogisticRegression())
    with sklearn.config_context(enable_metadata_routing=routing):
        search = GridSearchCV(est, {"gamma": [0.1, 1.0]}, scoring=scorer, cv=cv).fit(X, y, sample_domain=sd)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_sample_domain_is_routed_to_the_scorer(blobs):
    X, y, sd, _ = blobs
    seen = []

    class Spy(ImportanceWeightedScorer):
        def __call__(self, estimator, X, y, sample_domain=None, **kw):
            seen.append(sample_domain is not None)
            return super().__call__(estimator, X, y, sample_domain=sample_domain)

    cv = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, sd))
    with sklearn.config_context(enable_metadata_routing=True):
        GridSearchCV(KMM(LogisticRegression()), {"B": [10.0]}, scoring=Spy(), cv=cv).fit(X, y, sample_domain=sd)
    assert seen and all(seen)


def test_reverse_validation_on_a_pipeline(blobs):
    X, y, sd, _ = blobs
    pipe = make_pipeline(CORAL(), SourceOnly(SVC())).fit(X, y)
    assert 0.0 <= ReverseValidationScorer()(pipe, X, y) <= 1.0


def test_importance_weighted_accuracy_without_shift_is_plain_accuracy():
    X, y, sd, yt = make_shifted_blobs(300, 300, shift="covariate", random_state=0, return_target_labels=True)
    sd = np.where(np.random.default_rng(0).random(len(X)) < 0.5, 1, -1)  # random split: no shift
    y = np.where(sd > 0, np.r_[y[:300], yt], -1)
    est = SourceOnly(LogisticRegression()).fit(X, y, sample_domain=sd)
    s = sd > 0
    plain = np.mean(est.predict(X[s]) == y[s])
    assert ImportanceWeightedScorer()(est, X, y, sample_domain=sd) == pytest.approx(plain, abs=0.02)


def test_scorer_explains_folds_without_target():
    X, y, sd, _ = make_shifted_blobs(30, 30, random_state=0, return_target_labels=True)
    est = SourceOnly(LogisticRegression()).fit(X, y, sample_domain=sd)
    s = sd > 0
    with pytest.raises(ValueError, match="StratifiedKFold"):
        DEVScorer()(est, X[s], y[s], sample_domain=sd[s])
