"""iMAML against closed forms: on ridge regression (a linear model, squared loss) the inner problem
``argmin_phi L_s(phi) + lam/2 ||phi - theta||^2`` and the meta-gradient
``d L_q(phi*(theta)) / d theta`` have closed forms (torch.linalg.solve, differentiated by
autograd), which the implicit meta-gradient must match to the CG tolerance."""

import pytest
import torch
from torch import nn

from metatl.data.episode import Episode
from metatl.engine.executors import ExecutorError, make_executor
from metatl.meta import IMAML
from metatl.meta.imaml import conjugate_gradient

D, LAM = 4, 2.0


def ridge_episode(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, 1, generator=g, dtype=torch.float64)
    x = torch.randn(14, D, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 + 0.1 * torch.randn(14, 1, generator=g, dtype=torch.float64)
    return Episode(x[:6], y[:6], x[6:], y[6:])


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(D, 1).double()


def closed_form(theta, ep, lam):
    """phi*(theta) of the ridge problem with a bias (augmented features), and L_q(phi*)."""
    xs = torch.cat([ep.support_x, torch.ones(len(ep.support_x), 1, dtype=torch.float64)], 1)
    xq = torch.cat([ep.query_x, torch.ones(len(ep.query_x), 1, dtype=torch.float64)], 1)
    n = len(xs)
    # grad of mean (xs phi - y)^2 + lam/2 ||phi - theta||^2 = 0
    a = 2 / n * xs.T @ xs + lam * torch.eye(D + 1, dtype=torch.float64)
    phi = torch.linalg.solve(a, 2 / n * xs.T @ ep.support_y + lam * theta)
    return phi, ((xq @ phi - ep.query_y) ** 2).mean()


def exact_meta_gradient(model, batch, lam):
    theta = torch.cat([model.weight.detach().T, model.bias.detach()[:, None]]).requires_grad_(True)
    loss = torch.stack([closed_form(theta, ep, lam)[1] for ep in batch]).mean()
    (grad,) = torch.autograd.grad(loss, theta)
    return loss.detach(), grad


def imaml(model, **kwargs):
    # the inner objective's curvature lies between lam and ~10: 150 steps of 0.15 reach its minimum
    return IMAML(model, "regression", **{"lam": LAM, "inner_lr": 0.15, "inner_steps": 150, "cg_steps": 20, **kwargs})


def test_inner_solution_and_meta_gradient_match_the_closed_form():
    batch = [ridge_episode(s) for s in range(3)]
    learner = imaml(linear())
    theta = torch.cat([learner.model.weight.detach().T, learner.model.bias.detach()[:, None]])
    phi = learner.adapted(learner.params(), *batch[0].support)
    exact_phi, _ = closed_form(theta, batch[0], LAM)
    torch.testing.assert_close(torch.cat([phi["weight"].T, phi["bias"][:, None]]), exact_phi, rtol=0, atol=1e-12)

    loss, _ = learner.meta_loss(batch)
    loss.backward()
    exact_loss, exact = exact_meta_gradient(learner.model, batch, LAM)
    torch.testing.assert_close(loss.detach(), exact_loss, rtol=1e-12, atol=0)
    got = torch.cat([learner.model.weight.grad.T, learner.model.bias.grad[:, None]])
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-12)


def test_meta_gradient_is_not_the_first_order_one():
    """The test above can tell: the query gradient at phi* alone (what dropping the Hessian term
    (or dividing by lam twice) gives) is far from the exact meta-gradient."""
    batch = [ridge_episode(s) for s in range(3)]
    learner = imaml(linear(), cg_steps=1)  # one CG step from 0: x = (b.b / b.Ab) b, not the solution
    learner.meta_loss(batch)[0].backward()
    _, exact = exact_meta_gradient(learner.model, batch, LAM)
    got = torch.cat([learner.model.weight.grad.T, learner.model.bias.grad[:, None]])
    assert (got - exact).abs().max() > 1e-3


@pytest.mark.parametrize("executor", ["loop", "threads", "auto"])
def test_executors_give_the_closed_form(executor):
    batch = [ridge_episode(s) for s in range(4)]
    learner = imaml(linear())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loss, _ = make_executor(executor, learner)(learner, batch)
        loss.backward()
    finally:
        torch.set_num_threads(before)
    _, exact = exact_meta_gradient(learner.model, batch, LAM)
    got = torch.cat([learner.model.weight.grad.T, learner.model.bias.grad[:, None]])
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-12)


def test_vmap_executors_refuse_with_the_setting_to_use():
    with pytest.raises(ExecutorError, match="IMAML.*vmap.*train.executor=threads"):
        make_executor("vmap", imaml(linear()))


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(lambda v: a @ v, b, 6), torch.linalg.solve(a, b), rtol=1e-9, atol=0)


def test_bad_options_say_what_to_set():
    with pytest.raises(ValueError, match="lam must be > 0"):
        IMAML(linear(), "regression", lam=0.0)
    with pytest.raises(ValueError, match="cg_steps"):
        IMAML(linear(), "regression", cg_steps=0)


def test_learns_a_family_of_linear_tasks():
    """Tasks whose weights scatter around a common w0: meta-training moves theta toward w0, and the
    adapted query loss falls (a fraction of a second)."""
    g = torch.Generator().manual_seed(0)
    w0 = 3 * torch.randn(D, 1, generator=g, dtype=torch.float64)

    def task():
        x = torch.randn(10, D, generator=g, dtype=torch.float64)
        y = x @ (w0 + 0.1 * torch.randn(D, 1, generator=g, dtype=torch.float64))
        return Episode(x[:3], y[:3], x[3:], y[3:])

    learner = imaml(linear(), inner_steps=5, inner_lr=0.05, cg_steps=3)
    fixed = [task() for _ in range(20)]
    before = learner.meta_loss(fixed)[0].item()
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.1)
    for _ in range(60):
        optimizer.zero_grad()
        learner.meta_loss([task() for _ in range(4)])[0].backward()
        optimizer.step()
    after = learner.meta_loss(fixed)[0].item()
    assert after < 0.05 * before, (before, after)


@pytest.mark.slow  # ~35 s of CPU: python -m pytest -m slow tests/test_imaml.py
def test_learns_sinusoids(tmp_path):
    """The sinusoid regression of the MAML paper: the adapted MSE on validation tasks falls to
    about a third in 300 iterations."""
    from metatl.config import from_dict
    from metatl.engine import Trainer, evaluate

    cfg = from_dict(
        {
            "algorithm": {"name": "imaml", "lam": 0.5, "inner_lr": 0.01, "inner_steps": 10, "cg_steps": 3},
            "model": {"name": "mlp"},
            "data": {"name": "sinusoid", "shots": 10, "queries": 20},
            "train": {"iterations": 300, "meta_batch": 5, "lr": 0.003, "val_every": 0, "ckpt_every": 0},
        }
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    before = evaluate(trainer.learner, trainer.val_tasks, episodes=100, progress=False)["mean"]
    trainer.fit()
    after = evaluate(trainer.learner, trainer.val_tasks, episodes=100, progress=False)["mean"]
    assert after < 0.6 * before, (before, after)


def test_damped_solve_is_the_authors_system():
    """cg_damping / lam_damping solve ((1 + d) I + H / (lam + e)) x = g (the authors' code, d = 1,
    e = 10): against that system solved by hand with the ridge problem's support Hessian."""
    batch = [ridge_episode(s) for s in range(3)]
    learner = imaml(linear(), cg_damping=1.0, lam_damping=10.0)
    theta = torch.cat([learner.model.weight.detach().T, learner.model.bias.detach()[:, None]])
    learner.meta_loss(batch)[0].backward()
    want = torch.zeros(D + 1, 1, dtype=torch.float64)
    for ep in batch:
        phi, _ = closed_form(theta, ep, LAM)
        xs = torch.cat([ep.support_x, torch.ones(len(ep.support_x), 1, dtype=torch.float64)], 1)
        xq = torch.cat([ep.query_x, torch.ones(len(ep.query_x), 1, dtype=torch.float64)], 1)
        hessian = 2 / len(xs) * xs.T @ xs
        query_grad = 2 / len(xq) * xq.T @ (xq @ phi - ep.query_y)
        system = 2.0 * torch.eye(D + 1, dtype=torch.float64) + hessian / (LAM + 10.0)
        want += torch.linalg.solve(system, query_grad) / len(batch)
    got = torch.cat([learner.model.weight.grad.T, learner.model.bias.grad[:, None]])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    _, exact = exact_meta_gradient(learner.model, batch, LAM)
    assert (got - exact).abs().max() > 1e-3  # the damped system is not the exact gradient
    with pytest.raises(ValueError, match="cg_damping and lam_damping must be >= 0"):
        imaml(linear(), cg_damping=-1.0)


@pytest.mark.parametrize("damping", [(0.0, 0.0), (1.0, 10.0)])
def test_system_eigenvalues_are_those_of_the_solved_matrix(damping):
    """The extreme eigenvalues of ((1 + d) I + H / (lam + e)) with the ridge problem's support
    Hessian (constant in phi), against torch.linalg.eigvalsh of that matrix."""
    ep = ridge_episode(0)
    learner = imaml(linear(), cg_damping=damping[0], lam_damping=damping[1])
    xs = torch.cat([ep.support_x, torch.ones(len(ep.support_x), 1, dtype=torch.float64)], 1)
    hessian = 2 / len(xs) * xs.T @ xs
    matrix = (1 + damping[0]) * torch.eye(D + 1, dtype=torch.float64) + hessian / (LAM + damping[1])
    want = torch.linalg.eigvalsh(matrix)
    low, high = learner.system_eigenvalues(learner.params(), ep.support_x, ep.support_y, tol=1e-10)
    assert low == pytest.approx(want[0].item(), rel=1e-6)
    assert high == pytest.approx(want[-1].item(), rel=1e-6)
