"""Short CPU runs: each method beats source-only on a problem with the shift it is built for."""

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from metatl.data.domains import make_covariate_shift_regression, make_shifted_blobs, make_shifted_moons
from metatl.transfer import CORAL, KLIEP, KMM, SourceOnly, TrAdaBoost, TransferLogisticRegression, TransferRidge


def _mean_acc(make, gen, seeds=range(3), pass_domain=True):
    accs = []
    for seed in seeds:
        X, y, sd, yt = gen(random_state=seed, return_target_labels=True)
        est = make().fit(X, y, sample_domain=sd) if pass_domain else make().fit(X, y)  # else: from the mask
        accs.append(np.mean(est.predict(X[sd < 0]) == yt))
    return np.mean(accs)


def test_reweighting_beats_source_only_on_covariate_shift_regression():
    # misspecified linear model + covariate shift: the textbook case for importance weighting
    errs = {"source": [], "kmm": [], "kliep": []}
    for seed in range(3):
        X, y, sd, yt = make_covariate_shift_regression(150, 150, random_state=seed, return_target_labels=True)
        for name, est in [
            ("source", SourceOnly(LinearRegression())),
            ("kmm", KMM(LinearRegression(), gamma=1.0)),
            ("kliep", KLIEP(LinearRegression(), random_state=0)),
        ]:
            pred = est.fit(X, y, sample_domain=sd).predict(X[sd < 0])
            errs[name].append(np.mean((pred - yt) ** 2))
    src = np.mean(errs["source"])
    assert np.mean(errs["kmm"]) < 0.7 * src
    assert np.mean(errs["kliep"]) < 0.7 * src


def test_reweighting_beats_source_only_on_covariate_shift_blobs():
    gen = lambda **kw: make_shifted_blobs(200, 200, noise=1.2, **kw)  # noqa: E731
    src = _mean_acc(lambda: SourceOnly(LogisticRegression()), gen)
    assert _mean_acc(lambda: KMM(LogisticRegression()), gen) >= src
    assert _mean_acc(lambda: KLIEP(LogisticRegression(), random_state=0), gen) >= src


def test_coral_beats_source_only_on_rotated_moons():
    gen = lambda **kw: make_shifted_moons(200, 200, angle=np.pi / 4, **kw)  # noqa: E731
    src = _mean_acc(lambda: SourceOnly(SVC()), gen)
    coral = _mean_acc(lambda: make_pipeline(CORAL(reg=0.01, center=True), SourceOnly(SVC())), gen, pass_domain=False)
    assert coral > src + 0.02


def test_supervised_transfer_beats_target_only_with_few_target_labels():
    accs = {"target": [], "tradaboost": [], "l2sp": []}
    for seed in range(3):
        X, y, sd, yt = make_shifted_moons(200, 300, angle=np.pi / 8, random_state=seed, return_target_labels=True)
        t = np.flatnonzero(sd < 0)
        lab, test = t[:12], t[12:]
        y = y.copy()
        y[lab] = yt[:12]
        keep = np.r_[np.flatnonzero(sd > 0), lab]
        if len(np.unique(y[lab])) < 2:
            continue
        truth = yt[12:]
        base = DecisionTreeClassifier(max_depth=3, random_state=0)
        accs["target"].append(np.mean(clone(base).fit(X[lab], y[lab]).predict(X[test]) == truth))
        tr = TrAdaBoost(base, n_estimators=10, random_state=0).fit(X[keep], y[keep], sample_domain=sd[keep])
        accs["tradaboost"].append(np.mean(tr.predict(X[test]) == truth))
        l2 = TransferLogisticRegression(alpha=1.0).fit(X[keep], y[keep], sample_domain=sd[keep])
        accs["l2sp"].append(np.mean(l2.predict(X[test]) == truth))
    assert np.mean(accs["tradaboost"]) > np.mean(accs["target"])
    assert np.mean(accs["l2sp"]) > np.mean(accs["target"])


def test_transfer_ridge_interpolates_between_source_and_target():
    X, y, sd, yt = make_covariate_shift_regression(100, 100, random_state=0, return_target_labels=True)
    y = y.copy()
    y[sd < 0] = yt
    stiff = TransferRidge(alpha=1e8).fit(X, y, sample_domain=sd)
    np.testing.assert_allclose(stiff.coef_, stiff.source_coef_, atol=1e-5)
    free = TransferRidge(alpha=1e-10).fit(X, y, sample_domain=sd)
    np.testing.assert_allclose(free.coef_, LinearRegression().fit(X[sd < 0], yt).coef_, atol=1e-6)


def test_tradaboost_survives_a_learner_that_drops_a_class():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    y = np.r_[np.zeros(28, int), np.full(2, 2), rng.integers(0, 2, 30)]  # class 2 is rare, source only
    sd = np.r_[np.ones(30, int), -np.ones(30, int)]

    class NoWeights(DecisionTreeClassifier):  # forces the resampling path
        def fit(self, X, y):
            return super().fit(X, y)

    m = TrAdaBoost(NoWeights(max_depth=1), n_estimators=6, random_state=0).fit(X, y, sample_domain=sd)
    np.testing.assert_array_equal(m.classes_, [0, 1, 2])
    proba = m.predict_proba(X)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(1), 1)
    assert set(m.predict(X)) <= {0, 1, 2}
