"""Meta-SGD, ANIL and NIL against independent computations: finite differences of the meta-loss,
a hand-written inner loop, and a classifier worked out by hand."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metatl.config import from_dict, load_config
from metatl.data.episode import Episode
from metatl.engine import Trainer, evaluate
from metatl.meta import ANIL, MAML, MetaSGD
from metatl.meta.nil import find_head
from metatl.nn import conv4_stride, mlp


def regression_tasks(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        x = torch.randn(10, 1, generator=g, dtype=torch.float64)
        a = 1 + torch.rand(1, generator=g, dtype=torch.float64)
        tasks.append(Episode(x[:5], a * torch.sin(x[:5]), x[5:], a * torch.sin(x[5:])))
    return tasks


# -- Meta-SGD ----------------------------------------------------------------------------------------


def flat_meta_loss(learner, batch, values):
    """The meta-loss as a function of every meta-parameter (theta and alpha), given as one vector."""
    params = list(learner.parameters())
    with torch.no_grad():
        saved = [p.clone() for p in params]
        torch.nn.utils.vector_to_parameters(values, params)
        loss = learner.meta_loss(batch)[0].item()
        for p, s in zip(params, saved):
            p.copy_(s)
    return loss


def finite_differences(f, x0, eps=1e-6):
    return torch.tensor(
        [(f(x0 + eps * e) - f(x0 - eps * e)) / (2 * eps) for e in torch.eye(len(x0), dtype=torch.float64)],
        dtype=torch.float64,
    )


def gradient_vector(learner, batch):
    learner.zero_grad()
    learner.meta_loss(batch)[0].backward()
    return torch.cat([p.grad.flatten() for p in learner.parameters()])


def test_meta_sgd_meta_gradient_matches_finite_differences():
    """Second order, two inner steps: d L / d theta and d L / d alpha against central differences."""
    torch.manual_seed(0)
    learner = MetaSGD(mlp(hidden=(6,)), "regression", inner_steps=2).double()
    assert [k for k, _ in learner.named_parameters() if k.startswith("rule.")] == [f"rule.alpha.{i}" for i in range(4)]
    batch = regression_tasks()
    analytic = gradient_vector(learner, batch)
    x0 = torch.nn.utils.parameters_to_vector(learner.parameters()).detach()
    numeric = finite_differences(lambda v: flat_meta_loss(learner, batch, v), x0)
    n_alpha = sum(p.numel() for p in learner.rule.parameters())
    assert analytic[-n_alpha:].abs().max() > 1e-3  # alpha gets a meta-gradient
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_first_order_meta_sgd_treats_the_inner_gradient_as_a_constant():
    """First order, one step: the meta-gradient is that of the query loss at theta - alpha * g with
    g = grad L^support(theta) computed once and held fixed (finite differences of that surrogate)."""
    torch.manual_seed(0)
    learner = MetaSGD(mlp(hidden=(6,)), "regression", inner_steps=1, first_order=True).double()
    batch = regression_tasks()
    analytic = gradient_vector(learner, batch)
    theta = learner.params()
    frozen = []
    for ep in batch:
        phi = {k: v.detach().requires_grad_() for k, v in theta.items()}
        loss = F.mse_loss(learner.functional(phi, ep.support_x), ep.support_y)
        frozen.append(dict(zip(phi, torch.autograd.grad(loss, list(phi.values())))))

    def surrogate(values):
        parts = torch.split(values, [p.numel() for p in learner.parameters()])
        th = {k: v.view_as(theta[k]) for k, v in zip(theta, parts)}
        alpha = {k: v.view_as(theta[k]) for k, v in zip(theta, parts[len(theta) :])}
        step = [{k: th[k] - alpha[k] * g[k] for k in th} for g in frozen]
        return torch.stack([F.mse_loss(learner.functional(p, ep.query_x), ep.query_y) for p, ep in zip(step, batch)])

    x0 = torch.nn.utils.parameters_to_vector(learner.parameters()).detach()
    numeric = finite_differences(lambda v: surrogate(v).mean().item(), x0)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_meta_sgd_initialisation():
    torch.manual_seed(0)
    model = mlp(hidden=(40, 40))
    drawn = MetaSGD(model, "regression")
    rates = torch.cat([a.flatten() for a in drawn.rule.alpha])
    assert 0.005 <= rates.min() and rates.max() <= 0.1 and rates.std() > 0.02  # the paper's uniform draw
    assert [a.shape for a in drawn.rule.alpha] == [p.shape for p in model.parameters()]
    constant = MetaSGD(mlp(), "regression", inner_lr=0.4)
    assert all(bool((a == 0.4).all()) for a in constant.rule.alpha)
    for bad in ((0.1, 0.01), (0.1,), (-0.1, 0.1)):
        with pytest.raises(ValueError, match=r"inner_lr_range must be \[low, high\].*or set inner_lr"):
            MetaSGD(mlp(), "regression", inner_lr_range=bad)
    assert MetaSGD(mlp(), "regression", inner_lr=0.1, inner_lr_range=(1, 0)).rule.rate("0.bias").eq(0.1).all()


def test_meta_sgd_with_alpha_equal_to_a_constant_is_maml():
    torch.manual_seed(0)
    net = mlp(hidden=(6,)).double()
    maml = MAML(net, "regression", inner_lr=0.3, inner_steps=2)
    meta_sgd = MetaSGD(net, "regression", inner_lr=0.3, inner_steps=2).double()
    batch = regression_tasks()
    torch.testing.assert_close(meta_sgd.meta_loss(batch)[0], maml.meta_loss(batch)[0], rtol=1e-12, atol=0)


# -- ANIL ----------------------------------------------------------------------------------------------


def hand_anil_loss(net, batch, lr, steps, second_order):
    """ANIL written out: SGD on the head's weight and bias, the body untouched."""
    losses = []
    for ep in batch:
        w, b = net[-1].weight, net[-1].bias
        features = net[:-1](ep.support_x)
        for _ in range(steps):
            loss = F.mse_loss(F.linear(features, w, b), ep.support_y)
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=second_order)
            w, b = w - lr * gw, b - lr * gb
        losses.append(F.mse_loss(F.linear(net[:-1](ep.query_x), w, b), ep.query_y))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_equals_maml_with_the_body_fixed_in_the_inner_loop(first_order):
    torch.manual_seed(0)
    net = mlp(hidden=(6, 6)).double()
    anil = ANIL(net, "regression", inner_lr=0.3, inner_steps=3, first_order=first_order)
    assert anil.head == "4"  # the last Linear of the MLP
    batch = regression_tasks()
    loss = anil.meta_loss(batch)[0]
    got = torch.autograd.grad(loss, list(net.parameters()))
    expected_loss = hand_anil_loss(net, batch, 0.3, 3, second_order=not first_order)
    expected = torch.autograd.grad(expected_loss, list(net.parameters()))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # MAML adapts the body too: a different function
    assert abs(MAML(net, "regression", inner_lr=0.3, inner_steps=3).meta_loss(batch)[0].item() - loss.item()) > 1e-6


def test_anil_body_gets_gradient_only_through_the_outer_loop():
    """The adapted body is theta's body itself; in first order the body's meta-gradient is the
    query loss's gradient at (body, adapted head): no inner-loop term."""
    torch.manual_seed(0)
    net = mlp(hidden=(6, 6)).double()
    anil = ANIL(net, "regression", inner_lr=0.3, inner_steps=2, first_order=True)
    theta = anil.params()
    ep = regression_tasks(1)[0]
    adapted = anil.adapted(theta, *ep.support)
    for k in theta:
        assert (adapted[k] is theta[k]) == (not k.startswith("4."))
    body = [k for k in theta if not k.startswith("4.")]
    loss = anil.query_loss(adapted, *ep.query)[0]
    got = torch.autograd.grad(loss, [theta[k] for k in body])
    head = {k: adapted[k].detach() for k in ("4.weight", "4.bias")}
    outer_only = anil.query_loss({**theta, **head}, *ep.query)[0]
    expected = torch.autograd.grad(outer_only, [theta[k] for k in body])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=0)


def test_anil_head_by_name_and_refusals():
    conv = conv4_stride(out_features=3, filters=4, image_size=12)
    assert find_head(conv) == "head" and ANIL(conv).head == "head"
    assert ANIL(mlp(), "regression", head="2").adapts("2.weight") and not ANIL(mlp(), "regression", head="2").adapts(
        "4.bias"
    )
    with pytest.raises(ValueError, match="head='classifier' names no module.*4"):
        ANIL(mlp(), "regression", head="classifier")
    with pytest.raises(ValueError, match="every parameter.*algorithm.head"):
        ANIL(torch.nn.Sequential(torch.nn.Linear(2, 2)), "regression")


def test_anil_test_time_adaptation_changes_the_head_only():
    torch.manual_seed(0)
    learner = ANIL(conv4_stride(out_features=3, filters=4, image_size=12), inner_lr=0.5, inner_steps_test=2)
    ep = Episode(torch.randn(6, 1, 12, 12), torch.arange(3).repeat(2), torch.randn(3, 1, 12, 12), torch.arange(3))
    seen = []
    learner.adapt_params = lambda params, *a, **kw: (
        seen.append(MAML.adapt_params(learner, params, *a, **kw)) or seen[-1]
    )
    learner.adapt(ep.support_x, ep.support_y)
    changed = {k for k, v in seen[0].items() if not torch.equal(v, learner.params()[k].detach())}
    assert changed == {"head.weight", "head.bias"}


# -- NIL -----------------------------------------------------------------------------------------------


def test_nil_classifies_by_cosine_similarity_worked_by_hand():
    """A body that returns its 2-d input, a head that is never used: the query (1, 1) has cosine
    1/sqrt(2) to both class-0 points (1, 0), (0, 1) and 0 to the class-1 point (-1, 1)... worked
    out below."""
    body = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2))
    learner = MAML(body, nil=True)
    assert learner.head == "1"
    sx = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    sy = torch.tensor([0, 0, 1])
    qx = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    predictor = learner.adapt(sx, sy)
    c = 1 / math.sqrt(2)
    cos = torch.tensor([[c, c, 0.0], [-1.0, 0.0, c]])  # the queries' cosines to the three support points
    a = cos.exp() / cos.exp().sum(1, keepdim=True)
    expected = torch.stack([a[:, 0] + a[:, 1], a[:, 2]], 1)
    torch.testing.assert_close(predictor.predict_proba(qx), expected)
    assert predictor.predict(qx).tolist() == [0, 1]  # the second query: one near class-1 point beats two
    # the head plays no part
    with torch.no_grad():
        body[1].weight.fill_(123.0)
    torch.testing.assert_close(learner.adapt(sx, sy).predict_proba(qx), expected)


def test_nil_on_a_conv_net_uses_the_features_before_the_head():
    torch.manual_seed(0)
    net = conv4_stride(out_features=3, filters=4, image_size=12)
    learner = ANIL(net, nil=True)
    sx, sy = torch.randn(6, 1, 12, 12), torch.arange(3).repeat(2)
    qx = torch.randn(4, 1, 12, 12)
    got = learner.adapt(sx, sy)(qx)
    with torch.no_grad():
        zs, zq = F.normalize(net.embed(sx), dim=-1), F.normalize(net.embed(qx), dim=-1)
        expected = ((zq @ zs.T).softmax(-1) @ F.one_hot(sy, 3).float()).log()
    torch.testing.assert_close(got, expected)


def test_nil_refuses_regression():
    with pytest.raises(ValueError, match="nil=true.*regression.*nil=false"):
        MAML(mlp(), "regression", nil=True)


# -- learning, configs and the command line ------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [f"{m}_omniglot_{s}.yaml" for m in ("meta_sgd", "anil") for s in ("5w1s", "5w5s", "20w1s", "20w5s")]


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "meta_sgd", "inner_steps": 1, "inner_steps_test": 1},
        {"name": "anil", "inner_lr": 0.05, "inner_steps": 5, "inner_steps_test": 5},
    ],
)
def test_learns_sinusoids(tmp_path, algorithm):
    cfg = from_dict(
        {
            "algorithm": algorithm,
            "model": {"name": "mlp"},
            "data": {"name": "sinusoid", "shots": 10, "queries": 20},
            "train": {"iterations": 300, "meta_batch": 10, "lr": 0.003, "val_every": 0, "ckpt_every": 0},
        }
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, tmp_path, progress=False)
    tasks = trainer.val_tasks
    before = evaluate(trainer.learner, tasks, episodes=100, progress=False)["mean"]
    trainer.fit()
    after = evaluate(trainer.learner, tasks, episodes=100, progress=False)["mean"]
    assert after < 0.6 * before, (before, after)


def test_every_config_exists_and_validates():
    for name in CONFIGS:
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.algorithm["name"] == name.split("_omniglot")[0]
        ways, shots = (int(v) for v in name[:-5].split("_")[-1][:-1].split("w"))
        assert (cfg.data.ways, cfg.data.shots) == (ways, shots)


@pytest.mark.data
@pytest.mark.parametrize("name", CONFIGS)
def test_configs_train_a_few_iterations_on_omniglot(tmp_path, name, omniglot_dir, monkeypatch):
    monkeypatch.setenv("METATL_DATA_DIR", str(omniglot_dir))
    small = ["model.filters=8", "train.iterations=2", "train.meta_batch=2", "train.val_every=0", "train.ckpt_every=0"]
    cfg = load_config(ROOT / "configs" / name, small)
    trainer = Trainer(cfg, tmp_path, progress=False).fit()
    assert trainer.iteration == 2
    assert all(torch.isfinite(p).all() for p in trainer.learner.parameters())


@pytest.mark.data
def test_train_with_a_time_budget_then_eval_with_nil_from_the_command_line(tmp_path, omniglot_dir, monkeypatch):
    from metatl.cli import main

    monkeypatch.setenv("METATL_DATA_DIR", str(omniglot_dir))
    out = tmp_path / "run"
    small = ["model.filters=8", "train.meta_batch=2", "train.val_every=0", "train.ckpt_every=0", "eval.episodes=3"]
    main(
        ["train", str(ROOT / "configs" / "meta_sgd_omniglot_5w1s.yaml"), "--out", str(out), "--no-progress"]
        + ["--set", "train.time_budget_min=0.02", "train.iterations=1000", *small]
    )
    assert (out / "last.pt").exists()
    main(["eval", str(out / "last.pt"), "--no-progress", "--out", str(tmp_path / "nil"), "--set", "algorithm.nil=true"])
    results = json.loads(next((tmp_path / "nil").glob("eval_*.json")).read_text())
    assert results["episodes"] == 3 and 0 <= results["metric"]["mean"] <= 1
