"""Bad input fails loudly, and the message names the fix."""

import numpy as np
import pytest
from sklearn.svm import SVC

from metatl.data.domains import to_domain
from metatl.transfer import (
    CORAL,
    KLIEP,
    KMM,
    TargetLabelLeakWarning,
    TrAdaBoost,
    TransferLogisticRegression,
    TransferRidge,
)

UNSUPERVISED = [lambda: KMM(SVC()), lambda: KLIEP(SVC(), n_centers=10, random_state=0), lambda: CORAL()]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    Xs, Xt = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 1
    ys = (Xs[:, 0] > 0).astype(int)
    return to_domain(Xs, ys, Xt)


def test_different_feature_counts():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same feature space"):
        to_domain(rng.normal(size=(5, 3)), np.arange(5) % 2, rng.normal(size=(5, 4)))
    X, y, sd = _data()
    est = KMM(SVC()).fit(X, y, sample_domain=sd)
    with pytest.raises(ValueError, match="same feature space"):
        est.predict(X[:, :2])


@pytest.mark.parametrize("make", UNSUPERVISED)
def test_source_with_one_class(make):
    X, y, sd = _data()
    y[sd > 0] = 1
    if isinstance(make(), CORAL):
        make().fit(X, y, sample_domain=sd)  # a transformer does not care about classes
        return
    with pytest.raises(ValueError, match="single class"):
        make().fit(X, y, sample_domain=sd)


@pytest.mark.parametrize("make", UNSUPERVISED)
def test_no_target_samples(make):
    X, y, sd = _data()
    s = sd > 0
    with pytest.raises(ValueError, match="no target samples.*negative sample_domain"):
        make().fit(X[s], y[s], sample_domain=sd[s])
    with pytest.raises(ValueError, match="no target samples"):
        make().fit(X[s], y[s])  # nothing masked: nothing is target


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("make", UNSUPERVISED)
def test_nan_or_infinite_features(make, bad):
    X, y, sd = _data()
    X[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite.*impute"):
        make().fit(X, y, sample_domain=sd)


@pytest.mark.parametrize("make", UNSUPERVISED)
def test_target_labels_leak_warns_and_are_ignored(make):
    X, y, sd = _data()
    y_leak = y.copy()
    y_leak[sd < 0] = 1  # labels where none are allowed
    with pytest.warns(TargetLabelLeakWarning, match="sample_domain"):
        leaky = make().fit(X, y_leak, sample_domain=sd)
    clean = make().fit(X, y, sample_domain=sd)
    if hasattr(clean, "weights_"):
        np.testing.assert_allclose(leaky.weights_, clean.weights_)


def test_supervised_methods_need_labelled_target_and_sample_domain():
    X, y, sd = _data()
    for est in (TrAdaBoost(n_estimators=2), TransferLogisticRegression()):
        with pytest.raises(ValueError, match="labelled target"):
            est.fit(X, y, sample_domain=sd)
        with pytest.raises(ValueError, match="pass sample_domain"):
            est.fit(X, y)


def test_bad_sample_domain():
    X, y, sd = _data()
    with pytest.raises(ValueError, match="one domain per row"):
        KMM(SVC()).fit(X, y, sample_domain=sd[:-1])
    with pytest.raises(ValueError, match="contains 0"):
        KMM(SVC()).fit(X, y, sample_domain=np.where(sd > 0, 0, -1))
    with pytest.raises(ValueError, match="masked labels"):
        y2 = y.copy()
        y2[0] = -1
        KMM(SVC()).fit(X, y2, sample_domain=sd)
    with pytest.raises(ValueError, match="reshape"):
        KMM(SVC()).fit(X[:, 0], y, sample_domain=sd)


def test_crash_cases_get_clear_errors():
    """The inputs that crashed deep inside (issue 23, item 7) now fail with a named cause."""
    X, y, sd = _data()
    with pytest.raises(ValueError, match="at least cv=5 target rows"):
        KLIEP(SVC()).fit(X[:34], y[:34], sample_domain=sd[:34])  # 30 source + 4 target rows
    one_target = np.r_[np.flatnonzero(sd > 0), np.flatnonzero(sd < 0)[:1]]
    with pytest.raises(ValueError, match="at least 2 target rows"):
        CORAL().fit(X[one_target], sample_domain=sd[one_target])
    for est in (TrAdaBoost(n_estimators=2), TransferLogisticRegression()):
        with pytest.raises(ValueError, match="requires y"):
            est.fit(X, None, sample_domain=sd)
    y_reg = np.where(sd > 0, X[:, 0], np.nan)
    y_reg[np.flatnonzero(sd < 0)[:5]] = 1.0
    y_reg[0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        TransferRidge().fit(X, y_reg, sample_domain=sd)
    with pytest.raises(ValueError, match="0 feature"):
        KMM(SVC()).fit(X[:, :0], y, sample_domain=sd)


def test_coral_ignores_string_labels_of_target_rows():
    X, _, sd = _data()
    names = np.array(["cat", "dog"])[(X[:, 0] > 0).astype(int)]  # every row labelled, target too
    with pytest.warns(TargetLabelLeakWarning):
        Z = CORAL().fit_transform(X, names, sample_domain=sd)
    np.testing.assert_allclose(Z, CORAL().fit_transform(X, sample_domain=sd))


def test_sparse_complex_and_column_y():
    from scipy import sparse
    from sklearn.exceptions import DataConversionWarning, NotFittedError

    X, y, sd = _data()
    with pytest.raises(TypeError, match="dense data is required"):
        KMM(SVC()).fit(sparse.csr_matrix(X), y, sample_domain=sd)
    with pytest.raises(ValueError, match="Complex data not supported"):
        CORAL().fit(X + 1j, sample_domain=sd)
    with pytest.warns(DataConversionWarning):
        est = KMM(SVC()).fit(X, y[:, None], sample_domain=sd)
    assert est.predict(X).shape == y.shape
    for est in (KMM(SVC()), TransferRidge(), TransferLogisticRegression(), TrAdaBoost(), CORAL()):
        with pytest.raises(NotFittedError):
            (est.transform if isinstance(est, CORAL) else est.predict)(X)


def test_minus_one_is_an_ordinary_regression_target():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    sd = np.where(np.arange(40) < 30, 1, -1)
    y = X @ np.array([1.0, -0.5])
    y[[0, 35]] = -1.0  # a source and a target row with the value -1, not masked
    y[36:] = np.nan  # masked target rows
    est = TransferRidge(alpha=0.1).fit(X, y, sample_domain=sd)
    assert np.isfinite(est.coef_).all()
    labelled = ~np.isnan(y)
    assert est.score(X, y, sample_domain=sd) == pytest.approx(
        1 - np.sum((y[labelled] - est.predict(X[labelled])) ** 2) / np.sum((y[labelled] - y[labelled].mean()) ** 2)
    )
