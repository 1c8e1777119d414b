"""Conformance: every estimator in the registry follows the scikit-learn contract."""

import numpy as np
import pytest
import sklearn
from sklearn.base import clone, is_classifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

import metatl.transfer  # noqa: F401  (registers the estimators)
from metatl.registry import ESTIMATORS
from metatl.transfer import CORAL, SourceOnly

REGRESSION = {"transfer_ridge"}

NAMES = list(ESTIMATORS)
# one small grid per estimator, over a real hyper-parameter
GRIDS = {
    "coral": {"coral__reg": [0.1, 1.0]},
    "kliep": {"n_centers": [10, 20]},
    "kmm": {"B": [10.0, 1000.0]},
    "source_only": {"estimator": [SVC(C=0.1), SVC(C=1.0)]},
    "tradaboost": {"n_estimators": [2, 4]},
    "transfer_logistic": {"alpha": [0.1, 10.0]},
    "transfer_ridge": {"alpha": [0.1, 10.0]},
}


def make(name):
    est = ESTIMATORS.get(name)()
    if name == "coral":  # a transformer: give it a source-trained head
        return make_pipeline(CORAL(), SourceOnly(SVC()))
    if name in ("kmm", "kliep", "source_only"):
        est.set_params(estimator=SVC())
    if name == "tradaboost":
        est.set_params(n_estimators=3, random_state=0)
    return est


def test_registry_holds_the_classical_estimators():
    assert {"kmm", "kliep", "tradaboost", "coral", "transfer_logistic", "transfer_ridge"} <= set(NAMES)
    assert set(GRIDS) == set(NAMES), "add a grid for the new estimator"


@pytest.mark.parametrize("name", NAMES)
def test_clone_and_params_roundtrip(name):
    est = ESTIMATORS.get(name)()
    params = est.get_params()
    twin = clone(est)
    assert twin is not est and twin.get_params().keys() == params.keys()
    key = sorted(params)[0]
    assert est.set_params(**{key: params[key]}) is est
    assert not any(k.endswith("_") and hasattr(est, k) for k in vars(est)), "learned state set in __init__"


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_self_and_predicts(name, make_problem):
    X, y, sd = make_problem(name)
    est = ESTIMATORS.get(name)()
    assert est.fit(X, y, sample_domain=sd) is est
    if name == "coral":
        Z = est.transform(X, sample_domain=sd)
        assert Z.shape == X.shape
        np.testing.assert_array_equal(est.transform(X), X)  # no domain: target rows, unchanged
        return
    pred = est.predict(X[sd < 0])
    assert pred.shape == ((sd < 0).sum(),)
    if name not in REGRESSION:
        assert set(np.unique(pred)) <= set(np.unique(y[sd > 0]))
        assert is_classifier(est) or name == "source_only"
    with pytest.raises(ValueError, match="features"):
        est.predict(np.hstack([X, X[:, :1]]))


@pytest.mark.parametrize("name", NAMES)
def test_grid_search_without_routing(name, make_problem):
    X, y, sd = make_problem(name)
    cv = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, sd))
    search = GridSearchCV(make(name), GRIDS[name], cv=cv)
    fit_params = {} if name == "coral" else {"sample_domain": sd}  # coral: domains from the label mask
    search.fit(X, y, **fit_params)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


@pytest.mark.parametrize("name", NAMES)
def test_grid_search_with_metadata_routing(name, make_problem):
    X, y, sd = make_problem(name)
    cv = list(StratifiedKFold(3, shuffle=True, random_state=0).split(X, sd))
    with sklearn.config_context(enable_metadata_routing=True):
        search = GridSearchCV(make(name), GRIDS[name], cv=cv).fit(X, y, sample_domain=sd)
        scores = cross_val_score(make(name), X, y, cv=cv, params={"sample_domain": sd})
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert np.all(np.isfinite(scores))


def test_wrapper_score_skips_masked_target_rows(blobs):
    X, y, sd, yt = blobs
    est = SourceOnly(SVC()).fit(X, y, sample_domain=sd)
    s = sd > 0
    assert est.score(X, y) == pytest.approx(np.mean(est.predict(X[s]) == y[s]))
