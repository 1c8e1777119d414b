"""MAML++ against independent computations: MAML with every switch off, a hand-unrolled inner loop
for the multi-step loss with per-step rates and BatchNorm weights, finite differences for the
learned rates, the reference code's schedules at chosen points; then its configs and a smoke run."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metatl.config import ConfigError, from_dict, load_config
from metatl.data.episode import Episode
from metatl.engine import evaluate
from metatl.engine.executors import ExecutorError, make_executor
from metatl.meta import MAML, MAMLPlusPlus
from metatl.meta.maml_pp import multi_step_loss_weights
from metatl.nn import conv4_stride, mlp

ROOT = Path(__file__).resolve().parents[1]


def conv(bn_mode="batch"):
    return conv4_stride(out_features=3, filters=4, image_size=12, bn_mode=bn_mode).double()


def episodes(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Episode(
            torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(2),
            torch.randn(9, 1, 12, 12, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(3),
        )
        for _ in range(n)
    ]


def meta_gradient(learner, batch):
    loss, _ = learner.meta_loss(batch)
    params = [p for p in learner.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("first_order", [False, True])
def test_every_switch_off_is_maml(first_order):
    torch.manual_seed(0)
    model = conv()
    maml = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2, first_order=first_order)
    plus = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, first_order=first_order)
    plus.set_progress(0.01)  # inside the multi-step-loss epochs: off all the same
    batch = episodes()
    (loss_a, grads_a), (loss_b, grads_b) = meta_gradient(maml, batch), meta_gradient(plus, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-13, atol=0)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    ep = batch[0]
    adapted_a = maml.adapted(maml.params(), *ep.support)
    adapted_b = plus.adapted(plus.params(), *ep.support)
    for k in adapted_a:
        torch.testing.assert_close(adapted_b[k], adapted_a[k], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(plus.adapt(*ep.support)(ep.query_x), maml.adapt(*ep.support)(ep.query_x))


# -- the multi-step loss, by hand --------------------------------------------------------------------
def hand_meta_loss(learner, batch, steps, weights):
    """``1/|B| sum_i sum_j weights[j] L_i^query(theta_{j+1}, bn_j)``: the inner loop unrolled here,
    with the learner's tensors (model parameters, per-step rates, per-step BatchNorm rows)."""
    model = learner.model
    bn = {n: learner.per_step.affine[n.replace(".", "-")] for n in learner.per_step.affine_names}
    rates = {
        n: learner.rule.rates[n.replace(".", "-")] for n in (k for k, _ in model.named_parameters()) if n not in bn
    }
    total = 0.0
    for ep in batch:
        params = dict(model.named_parameters())
        for j in range(steps):
            bn_j = {n: bn[n][j] for n in bn}
            support = F.cross_entropy(functional_call(model, {**params, **bn_j}, (ep.support_x,)), ep.support_y)
            names = list(rates)
            grads = torch.autograd.grad(support, [params[n] for n in names], create_graph=True)
            params = {**params, **{n: params[n] - rates[n][j] * g for n, g in zip(names, grads)}}
            query = F.cross_entropy(functional_call(model, {**params, **bn_j}, (ep.query_x,)), ep.query_y)
            total = total + weights[j] * query
    return total / len(batch)


def test_multi_step_loss_is_the_weighted_sum_of_the_per_step_query_losses():
    torch.manual_seed(0)
    learner = MAMLPlusPlus(
        conv(),
        inner_lr=0.3,
        inner_steps=3,
        lslr=True,
        multi_step_loss=True,
        multi_step_loss_epochs=4,
        bn_per_step_weights=True,
        epochs=40,
    ).double()
    with torch.no_grad():  # distinct rates and BatchNorm rows, so that a wrong index shows
        for p in [*learner.rule.rates.values(), *learner.per_step.affine.values()]:
            p.add_(0.1 * torch.randn_like(p))
    learner.set_progress(0.025)  # epoch 1 of 40; S = 3, N = 4: v = (1/3 - 1/12, 1/3 - 1/12, 1/3 + 2/12)
    batch = episodes()
    loss, grads = meta_gradient(learner, batch)
    hand = hand_meta_loss(learner, batch, 3, [0.25, 0.25, 0.5])
    params = [p for p in learner.parameters() if p.requires_grad]
    expected = torch.autograd.grad(hand, params, allow_unused=True)
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=0)
    for (name, _), g, e in zip([(n, p) for n, p in learner.named_parameters() if p.requires_grad], grads, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-10, atol=1e-13, msg=name)
    named = dict(zip([n for n, p in learner.named_parameters() if p.requires_grad], grads))
    # every per-step rate of a weight and every per-step BatchNorm row gets a gradient (a conv bias
    # before BatchNorm has none: the normalisation cancels it)
    per_step = {n: g for n, g in named.items() if n.startswith("per_step.") or n.startswith("rule.") and "weight" in n}
    assert len(per_step) > 10 and all(
        (g.abs().flatten(1) if g.dim() > 1 else g.abs()[:, None]).sum(1).min() > 0 for g in per_step.values()
    )
    learner.set_progress(0.1)  # epoch 4: the last step's loss alone
    torch.testing.assert_close(learner.meta_loss(batch)[0], hand_meta_loss(learner, batch, 3, [0, 0, 1.0]))


def test_learned_rates_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    learner = MAMLPlusPlus(mlp(hidden=(6, 6)), "regression", inner_lr=0.05, inner_steps=2, lslr=True)
    learner = learner.double()
    learner.multi_step_loss = True  # the rates of both steps then reach the objective directly
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(10, 1, generator=g, dtype=torch.float64) for _ in range(2)]
    batch = [Episode(xi[:5], torch.sin(3 * xi[:5]), xi[5:], torch.sin(3 * xi[5:])) for xi in x]
    loss, _ = learner.meta_loss(batch)
    rates = list(learner.rule.rates.values())
    grads = torch.autograd.grad(loss, rates)
    eps = 1e-6
    for rate, grad in zip(rates, grads):
        for j in range(2):
            with torch.no_grad():
                rate[j] += eps
                up = learner.meta_loss(batch)[0]
                rate[j] -= 2 * eps
                down = learner.meta_loss(batch)[0]
                rate[j] += eps
            assert grad[j].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5, abs=1e-9)


# -- the schedules -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, [0.2, 0.2, 0.2, 0.2, 0.2]),
        (5, [0.1, 0.1, 0.1, 0.1, 0.6]),
        (9, [0.02, 0.02, 0.02, 0.02, 0.92]),
        (10, [0.006, 0.006, 0.006, 0.006, 0.976]),  # the floor 0.03 / S and its complement
        (30, [0.006, 0.006, 0.006, 0.006, 0.976]),
    ],
)
def test_multi_step_loss_weights_follow_the_reference_formula(epoch, expected):
    """S = 5 steps annealed over N = 10 epochs: non-final weights 1/S - e/(S N), at least 0.03/S;
    the last 1/S + e (S-1)/(S N), at most 1 - (S-1) 0.03/S."""
    assert multi_step_loss_weights(epoch, 5, 10) == pytest.approx(expected, abs=1e-12)


def test_epochs_follow_the_trainers_progress():
    learner = MAMLPlusPlus(
        conv(), multi_step_loss=True, derivative_order_annealing=True, first_order_epochs=50, epochs=100
    )
    for progress, epoch, msl, second in [
        (0.0, 0, True, False),
        (0.05, 5, True, False),
        (0.099, 9, True, False),
        (0.1, 10, False, False),
        (0.29, 29, False, False),  # 0.29 * 100 is 28.999... in floating point
        (0.499, 49, False, False),
        (0.5, 50, False, True),
        (1.0, 100, False, True),
    ]:
        learner.set_progress(progress)
        assert (learner.epoch, learner.multi_step_active(), learner.second_order_now()) == (epoch, msl, second)
    learner.set_progress(0.05)
    assert learner.loss_weights() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    learner.set_progress(0.2)
    assert learner.loss_weights() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert learner.second_order  # what the executors check: where training ends


def test_derivative_order_annealing_is_first_order_maml_first():
    torch.manual_seed(0)
    model = conv()
    fomaml = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2, first_order=True)
    maml = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2)
    plus = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, derivative_order_annealing=True, first_order_epochs=5)
    batch = episodes()
    for progress, reference in ((0.04, fomaml), (0.05, maml)):
        plus.set_progress(progress)
        for a, b in zip(meta_gradient(reference, batch)[1], meta_gradient(plus, batch)[1]):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


# -- per-step BatchNorm statistics ---------------------------------------------------------------------
def test_per_step_statistics_collect_per_step_and_serve_the_last_step_at_test():
    torch.manual_seed(0)
    learner = MAMLPlusPlus(conv("running"), inner_lr=0.3, inner_steps=2, bn_per_step_stats=True).double()
    model_stats = {k: b.clone() for k, b in learner.model.named_buffers()}
    before = {k: b.clone() for k, b in learner.per_step.named_buffers()}
    loss, _ = learner.meta_loss(episodes())
    loss.backward()
    for k, b in learner.per_step.named_buffers():  # each step's row moved, and the rows differ
        assert not torch.equal(b[0], before[k][0]) and not torch.equal(b[1], before[k][1]), k
        assert not torch.allclose(b[0], b[1]), k
    for k, b in learner.model.named_buffers():
        if "running" in k:
            assert torch.equal(b, model_stats[k]), k  # replaced at every step: untouched
    ep = episodes(1, seed=3)[0]
    kept = {k: b.clone() for k, b in learner.per_step.named_buffers()}
    learner.adapt(*ep.support)(ep.query_x)  # in training mode BatchNorm updates what it is given
    learner.eval()
    predictor = learner.adapt(*ep.support, steps=4)  # past the last step: the last step's statistics
    got = predictor(ep.query_x)
    for k, b in learner.per_step.named_buffers():
        assert torch.equal(b, kept[k]), k  # adapting does not change the meta-learned statistics
    adapted = learner.adapt_params(
        {k: p.detach() for k, p in learner.params().items()}, *ep.support, 4, step_params=learner.per_step.at
    )
    expected = learner.functional({**adapted, **learner.per_step.at(1)}, ep.query_x)
    torch.testing.assert_close(got, expected)
    wrong = learner.functional({**adapted, **learner.per_step.at(0)}, ep.query_x)
    assert not torch.allclose(got, wrong)


def test_per_step_statistics_run_task_by_task_and_are_refused_elsewhere():
    learner = MAMLPlusPlus(conv("running"), inner_steps=2, bn_per_step_stats=True)
    with pytest.raises(ExecutorError, match="vmap.*train.executor=threads"):
        make_executor("vmap", learner)
    assert make_executor("auto", learner).name == "loop"
    with pytest.raises(ValueError, match="bn_mode: running"):
        MAMLPlusPlus(conv("batch"), bn_per_step_stats=True)
    with pytest.raises(ConfigError, match="model.bn_mode: running"):
        from_dict(
            {
                "algorithm": {"name": "maml_pp", "bn_per_step_stats": True},
                "model": {"name": "conv4_stride", "bn_mode": "batch"},
                "data": {"name": "omniglot"},
            }
        )


def test_bad_switches_say_what_to_set():
    with pytest.raises(ValueError, match="no BatchNorm.*bn_per_step_weights=false"):
        MAMLPlusPlus(mlp(), "regression", bn_per_step_weights=True)
    with pytest.raises(ValueError, match="first_order=false"):
        MAMLPlusPlus(mlp(), "regression", first_order=True, derivative_order_annealing=True)
    with pytest.raises(ValueError, match="inner_steps >= 1"):
        MAMLPlusPlus(mlp(), "regression", inner_steps=0, multi_step_loss=True)
    with pytest.raises(ExecutorError, match="compile.*train.executor=vmap"):
        make_executor("compile", MAMLPlusPlus(mlp(), "regression", lslr=True))


# -- configs and a smoke run -----------------------------------------------------------------------------
CONFIGS = [f"maml_pp_omniglot_{s}.yaml" for s in ("5w1s", "5w5s", "20w1s", "20w5s")]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_state_the_reference_settings(name):
    cfg = load_config(ROOT / "configs" / name)
    a = cfg.algorithm
    assert a["name"] == "maml_pp" and a["inner_steps"] == 5 and a["inner_lr"] == 0.1
    assert a["lslr"] and a["multi_step_loss"] and a["bn_per_step_weights"]
    assert (a["multi_step_loss_epochs"], a["epochs"]) == (10, 100)
    assert (cfg.train.meta_batch, cfg.train.iterations, cfg.train.lr_schedule) == (8, 50000, "cosine")
    assert (cfg.train.lr, cfg.train.lr_final) == (0.001, 1e-5)


@pytest.mark.data
@pytest.mark.parametrize("name", CONFIGS)
def test_configs_train_a_few_iterations_on_omniglot(name, omniglot_dir, tmp_path):
    from metatl.engine import Trainer

    cfg = load_config(
        ROOT / "configs" / name,
        [
            "model.filters=4",
            "train.iterations=2",
            "train.meta_batch=2",
            "train.val_every=0",
            "train.ckpt_every=0",
            "eval.episodes=2",
            f"data.data_dir={omniglot_dir}",
        ],
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    assert trainer.iteration == 2
    assert math.isfinite(trainer.history[-1]["loss"]) if getattr(trainer, "history", None) else True


def test_maml_pp_learns_few_shot_classification():
    """Every switch on but BNRS, on learnable random patterns: accuracy rises within ~100 steps."""
    from test_meta_smoke import blob_tasks

    torch.manual_seed(0)
    sampler = blob_tasks()
    learner = MAMLPlusPlus(
        conv4_stride(out_features=5, filters=16, image_size=12),
        inner_lr=0.4,
        inner_steps=2,
        lslr=True,
        multi_step_loss=True,
        bn_per_step_weights=True,
        derivative_order_annealing=True,
        first_order_epochs=30,
    )
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    before = evaluate(learner, sampler, episodes=40, progress=False)["mean"]
    g = torch.Generator().manual_seed(1)
    steps = 100
    for i in range(steps):
        learner.set_progress(i / steps)
        loss, _ = learner.meta_loss(sampler.sample_batch(4, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate(learner, sampler, episodes=40, progress=False)["mean"]
    assert after > max(0.5, before + 0.15), (before, after)
