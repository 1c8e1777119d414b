"""Reference tests: each method against an independent computation on a tiny problem."""

import math

import numpy as np
import pytest
from scipy.optimize import LinearConstraint, minimize
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from metatl.data.domains import make_shifted_blobs
from metatl.transfer import CORAL, KLIEP, TrAdaBoost
from metatl.transfer._base import rbf_kernel, rbf_matvec
from metatl.transfer.feature.coral import coral_matrix
from metatl.transfer.instance.kliep import kliep_fit_alpha, kliep_step, kliep_weights, project_weighted_simplex
from metatl.transfer.instance.kmm import kmm_weights, project_box_slab
from metatl.transfer.parameter.regularized_linear import logistic_to_prior, ridge_to_prior
from metatl.transfer.selection import dev_risk


def _tiny(seed=0, n_s=25, n_t=20, d=2):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n_s, d)), rng.normal(0.7, 0.6, (n_t, d))


def test_chunked_kernel_product_equals_dense():
    Xs, Xt = _tiny()
    v = np.arange(len(Xt), dtype=float)
    np.testing.assert_allclose(rbf_matvec(Xs, Xt, v, 0.5, chunk=7), rbf_kernel(Xs, Xt, 0.5) @ v)


def test_projection_is_euclidean_projection():
    v = np.random.default_rng(1).normal(1, 2, 30)
    p = project_box_slab(v, 3.0, 20.0, 25.0)
    res = minimize(
        lambda b: 0.5 * np.sum((b - v) ** 2),
        np.full(30, 0.7),
        jac=lambda b: b - v,
        method="SLSQP",
        bounds=[(0, 3)] * 30,
        constraints=[LinearConstraint(np.ones((1, 30)), 20, 25)],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    np.testing.assert_allclose(p, res.x, atol=1e-6)


@pytest.mark.parametrize("solver", ["dense", "chunked"])
def test_kmm_matches_scipy_qp(solver):
    Xs, Xt = _tiny()
    n_s, n_t, gamma, B, eps = len(Xs), len(Xt), 0.5, 5.0, 0.1
    K = rbf_kernel(Xs, Xs, gamma)
    kappa = n_s / n_t * rbf_kernel(Xs, Xt, gamma).sum(1)
    obj = lambda b: 0.5 * b @ K @ b - kappa @ b  # noqa: E731
    ref = minimize(
        obj,
        np.ones(n_s),
        jac=lambda b: K @ b - kappa,
        method="SLSQP",
        bounds=[(0, B)] * n_s,
        constraints=[LinearConstraint(np.ones((1, n_s)), n_s * (1 - eps), n_s * (1 + eps))],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    beta = kmm_weights(Xs, Xt, gamma=gamma, B=B, eps=eps, solver=solver, max_iter=20000, tol=1e-12)
    assert beta.min() >= 0 and beta.max() <= B + 1e-12
    assert n_s * (1 - eps) - 1e-8 <= beta.sum() <= n_s * (1 + eps) + 1e-8
    assert obj(beta) <= ref.fun + 1e-6 * abs(ref.fun)
    np.testing.assert_allclose(beta, ref.x, atol=2e-3)


def test_kmm_rff_approximates_exact_weights():
    Xs, Xt = _tiny(n_s=200, n_t=150)
    exact = kmm_weights(Xs, Xt, gamma=0.5, B=10, solver="dense")
    approx = kmm_weights(Xs, Xt, gamma=0.5, B=10, solver="rff", n_components=4000, random_state=0)
    assert np.corrcoef(exact, approx)[0, 1] > 0.9


def test_kliep_step_is_the_papers_update():
    rng = np.random.default_rng(0)
    A, b, alpha, eps = rng.random((6, 3)), rng.random(3), rng.random(3), 0.01
    # Sugiyama et al. 2008, Fig. 1, written out by hand
    a = alpha + eps * A.T.dot(1 / A.dot(alpha))
    a = a + (1 - b.dot(a)) * b / b.dot(b)
    a = np.where(a > 0, a, 0)
    a = a / b.dot(a)
    np.testing.assert_allclose(kliep_step(alpha, A, b, eps, projection="paper"), a)


def test_kliep_exact_projection_matches_scipy():
    rng = np.random.default_rng(3)
    v, b = rng.normal(size=7), rng.random(7) + 0.1
    p = project_weighted_simplex(v, b)
    ref = minimize(
        lambda a: 0.5 * np.sum((a - v) ** 2),
        np.ones(7) / b.sum(),
        jac=lambda a: a - v,
        method="SLSQP",
        bounds=[(0, None)] * 7,
        constraints=[LinearConstraint(b[None], 1, 1)],
        options={"ftol": 1e-15, "maxiter": 500},
    )
    np.testing.assert_allclose(p, ref.x, atol=1e-6)


def test_kliep_solves_the_papers_problem():
    Xs, Xt = _tiny()
    gamma = 0.5
    w, info = kliep_weights(
        Xs, Xt, gamma=gamma, n_centers=8, tol=1e-10, max_iter=10**6, random_state=0, return_info=True
    )
    assert info["converged"] and info["gap"] <= 1e-10
    C = info["centers"]
    A, b = rbf_kernel(Xt, C, gamma), rbf_kernel(Xs, C, gamma).mean(0)
    ref = minimize(
        lambda a: -np.sum(np.log(A @ a)),
        np.ones(len(C)) / b.sum(),
        jac=lambda a: -A.T @ (1 / (A @ a)),
        method="SLSQP",
        bounds=[(0, None)] * len(C),
        constraints=[LinearConstraint(b[None], 1, 1)],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    ours = np.sum(np.log(A @ info["alpha"]))
    assert abs(b @ info["alpha"] - 1) < 1e-10  # mean source weight is 1
    assert ours >= -ref.fun - 1e-6
    np.testing.assert_allclose(info["alpha"], ref.x, rtol=1e-4, atol=1e-6)
    # the paper's literal Fig. 1 update never does better, and here it stalls below the optimum
    paper = kliep_fit_alpha(A, b, solver="pg", max_iter=2000, projection="paper")
    assert np.sum(np.log(A @ paper)) <= ours + 1e-10
    np.testing.assert_allclose(w, rbf_kernel(Xs, C, gamma) @ info["alpha"])
    np.testing.assert_allclose(w.mean(), 1.0)


def test_kliep_on_the_covariate_shift_reaches_the_slsqp_optimum():
    """The estimator's own fit (default tol) on the simulated covariate shift of docs/transfer.md: its
    mean log-likelihood is within 1e-3 of an independent SLSQP optimum, and it says how it stopped."""
    for seed in (0, 3):
        X, y, sd = make_shifted_blobs(100, 100, shift="covariate", random_state=seed)
        est = KLIEP(random_state=0).fit(X, y, sample_domain=sd)
        assert est.gap_ <= est.tol and 0 < est.n_iter_ < est.max_iter
        A = rbf_kernel(X[sd < 0], est.centers_, est.gamma_)
        b = rbf_kernel(X[sd > 0], est.centers_, est.gamma_).mean(0)
        ref = minimize(
            lambda a, A=A: -np.mean(np.log(A @ a)),
            np.ones(len(b)) / b.sum(),
            jac=lambda a, A=A: -A.T @ (1 / (A @ a)) / len(A),
            method="SLSQP",
            bounds=[(0, None)] * len(b),
            constraints=[LinearConstraint(b[None], 1, 1)],
            options={"ftol": 1e-14, "maxiter": 2000},
        )
        assert ref.success
        assert abs(np.mean(np.log(A @ est.alpha_)) - (-ref.fun)) < 1e-3


def test_kliep_paper_solver_is_public_and_reports_a_stall():
    X, y, sd = make_shifted_blobs(60, 60, shift="covariate", random_state=0)
    est = KLIEP(solver="pg", projection="paper", gamma=1.0, max_iter=50, random_state=0)
    with pytest.warns(ConvergenceWarning, match="gap"):
        est.fit(X, y, sample_domain=sd)
    assert est.gap_ > est.tol
    with pytest.raises(ValueError, match="projection"):
        KLIEP(projection="nope", gamma=1.0).fit(X, y, sample_domain=sd)


def test_kliep_cv_picks_from_the_grid():
    Xs, Xt = _tiny(n_s=80, n_t=80)
    _, info = kliep_weights(Xs, Xt, gamma=[0.01, 0.5, 100.0], n_centers=20, random_state=0, return_info=True)
    assert info["gamma"] == 0.5  # too wide / too narrow kernels lose held-out likelihood
    assert np.argmax(info["cv_scores"]) == 1


def test_tradaboost_three_classes_is_samme():
    """make_blobs' three classes, every other row target: one depth-2 tree gets 0.947 on all rows; the
    paper's binary factor and second-half vote got 0.757, SAMME's factor and all-round vote get 0.95."""
    X, y = make_blobs(n_samples=300, random_state=0)
    X = StandardScaler().fit_transform(X)
    sd = np.where(np.arange(300) % 2 == 1, -1, 1)
    tree = DecisionTreeClassifier(max_depth=2, random_state=0).fit(X, y).score(X, y)
    est = TrAdaBoost(random_state=0).fit(X, y, sample_domain=sd)
    assert est.score(X, y) >= tree - 0.01
    K, eps = 3, est.errors_
    np.testing.assert_allclose(est.betas_, eps / ((1 - eps) * (K - 1)))
    votes = np.zeros((len(X), K))
    for h, beta in zip(est.estimators_, est.betas_):  # every round votes for K > 2
        votes[np.arange(len(X)), h.predict(X)] += np.log(1 / beta)
    np.testing.assert_array_equal(est.predict(X), np.argmax(votes, axis=1))
    paper = TrAdaBoost(vote="second_half", random_state=0).fit(X, y, sample_domain=sd)
    assert paper.score(X, y) < est.score(X, y)


def test_tradaboost_one_round_by_hand():
    rng = np.random.default_rng(0)
    Xs, Xt = rng.normal(size=(30, 2)), rng.normal(size=(10, 2)) + 0.5
    ys, yt = (Xs[:, 0] > 0).astype(int), (Xt[:, 0] + Xt[:, 1] > 0.5).astype(int)
    X, y = np.vstack([Xs, Xt]), np.r_[ys, yt]
    sd = np.r_[np.ones(30, int), -np.ones(10, int)]
    stump = DecisionTreeClassifier(max_depth=1, random_state=0)
    model = TrAdaBoost(stump, n_estimators=1, random_state=0).fit(X, y, sample_domain=sd)
    # by hand: p = uniform, h fitted with weights 1, eps on the target, paper's update
    h = DecisionTreeClassifier(max_depth=1, random_state=0).fit(X, y, sample_weight=np.ones(40))
    miss = (h.predict(X) != y).astype(float)
    eps = miss[30:].sum() / 10
    beta_t = eps / (1 - eps)
    beta = 1 / (1 + math.sqrt(2 * math.log(30) / 1))
    w = np.r_[beta ** miss[:30], beta_t ** (-miss[30:])]
    assert model.beta_ == pytest.approx(beta)
    assert model.errors_[0] == pytest.approx(eps)
    assert model.betas_[0] == pytest.approx(beta_t)
    np.testing.assert_allclose(model.sample_weights_[1], w)
    np.testing.assert_array_equal(model.predict(X), h.predict(X))


def test_tradaboost_vote_uses_rounds_ceil_half_to_N():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 2))
    y = (X[:, 0] > 0).astype(int)
    sd = np.r_[np.ones(40, int), -np.ones(20, int)]
    y[40:] = (X[40:, 1] > 0).astype(int)
    m = TrAdaBoost(n_estimators=5, random_state=0).fit(X, y, sample_domain=sd)
    first = math.ceil(5 / 2) - 1
    # paper: h_f = 1 iff prod_t beta_t^{-h_t} >= prod_t beta_t^{-1/2}, t = ceil(N/2)..N
    lhs = sum(-np.log(b) * h.predict(X) for h, b in zip(m.estimators_[first:], m.betas_[first:]))
    rhs = sum(-0.5 * np.log(b) for b in m.betas_[first:])
    np.testing.assert_array_equal(m.predict(X), (lhs >= rhs - 1e-12).astype(int))


def test_coral_recolours_source_to_target_covariance():
    rng = np.random.default_rng(0)
    Xs = rng.normal(size=(500, 3)) @ np.array([[2, 0, 0], [0.5, 1, 0], [0, 0.3, 0.2]])
    Xt = rng.normal(size=(400, 3)) @ np.array([[1, 0.2, 0], [0, 3, 0], [0, 0, 1]])
    X, sd = np.vstack([Xs, Xt]), np.r_[np.ones(500, int), -np.ones(400, int)]
    Z = CORAL(reg=0.0).fit_transform(X, sample_domain=sd)
    np.testing.assert_allclose(np.cov(Z[:500], rowvar=False), np.cov(Xt, rowvar=False), atol=1e-8)
    np.testing.assert_array_equal(Z[500:], Xt)
    # closed form, from scipy's matrix square root: A = Cs^{-1/2} Ct^{1/2}
    from scipy.linalg import inv, sqrtm

    Cs, Ct = np.cov(Xs, rowvar=False) + np.eye(3), np.cov(Xt, rowvar=False) + np.eye(3)
    np.testing.assert_allclose(coral_matrix(Xs, Xt, reg=1.0), inv(sqrtm(Cs)) @ sqrtm(Ct), atol=1e-10)


def test_coral_centred_map_moves_the_mean_and_agrees_with_fit_then_transform():
    rng = np.random.default_rng(1)
    Xs = rng.normal(size=(300, 2)) @ np.array([[2.0, 0.3], [0.0, 0.5]]) + 3.0
    Xt = rng.normal(size=(200, 2)) - 1.0
    X, sd = np.vstack([Xs, Xt]), np.r_[np.ones(300, int), -np.ones(200, int)]
    est = CORAL(reg=0.0)
    Z = est.fit_transform(X, sample_domain=sd)
    np.testing.assert_allclose(Z[:300].mean(0), Xt.mean(0), atol=1e-10)  # (x - mu_s) A + mu_t
    np.testing.assert_allclose(np.cov(Z[:300], rowvar=False), np.cov(Xt, rowvar=False), atol=1e-8)
    np.testing.assert_allclose((Xs - Xs.mean(0)) @ est.A_ + Xt.mean(0), Z[:300])
    np.testing.assert_array_equal(Z[300:], Xt)
    np.testing.assert_array_equal(CORAL(reg=0.0).fit(X, sample_domain=sd).transform(X, sample_domain=sd), Z)
    np.testing.assert_array_equal(est.transform(X), X)  # no domains: the prediction path, all target
    # the AAAI paper's literal map, no centring
    np.testing.assert_allclose(CORAL(reg=0.0, center=False).fit_transform(X, sample_domain=sd)[:300], Xs @ est.A_)


def test_ridge_to_prior_normal_equations():
    rng = np.random.default_rng(0)
    X, y, w0 = rng.normal(size=(15, 3)), rng.normal(size=15), np.array([1.0, -2.0, 0.5])
    w, c = ridge_to_prior(X, y, w0, alpha=0.3)
    # gradient of 1/(2m)||y - Xw - c||^2 + alpha/2||w - w0||^2 vanishes
    r = y - X @ w - c
    np.testing.assert_allclose(-X.T @ r / 15 + 0.3 * (w - w0), 0, atol=1e-10)
    assert abs(r.sum()) < 1e-10
    np.testing.assert_allclose(ridge_to_prior(X, y, w0, alpha=1e8)[0], w0, atol=1e-5)


def test_logistic_to_prior_stationarity_and_limits():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    y = (X[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(float)[:, None]
    W0 = np.array([[0.5, 3.0]])
    W, c = logistic_to_prior(X, y, W0, alpha=0.5)
    p = 1 / (1 + np.exp(-(X @ W.T + c)))
    np.testing.assert_allclose((p - y).T @ X / 40 + 0.5 * (W - W0), 0, atol=1e-6)
    np.testing.assert_allclose(logistic_to_prior(X, y, W0, alpha=1e6)[0], W0, atol=1e-4)


def test_dev_risk_control_variate_by_hand():
    loss, w = np.array([0.2, 1.0, 0.1, 0.7]), np.array([0.5, 2.0, 1.0, 0.5])
    L = w * loss
    eta = -np.sum((L - L.mean()) * (w - w.mean())) / np.sum((w - w.mean()) ** 2)
    assert dev_risk(loss, w) == pytest.approx(L.mean() + eta * w.mean() - eta)
