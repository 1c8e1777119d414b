"""The learned LSTM optimizer (Andrychowicz et al. 2016) as an update rule."""

import math

import pytest
import torch

from metatl.data.episode import EpisodeSampler, TensorClassPool
from metatl.meta.learned_optimizer import (
    LearnedOptimizer,
    MLPProblem,
    QuadraticProblem,
    UnrolledLossError,
    meta_train,
    preprocess,
    unroll,
)
from metatl.meta.maml import MAML
from metatl.nn.backbones import mlp


def test_preprocessing_by_hand():
    p = 10.0
    x = torch.tensor([2.0, -0.5, 1e-6, -1e-6, 0.0])
    out = preprocess(x, p)
    assert torch.allclose(out[0], torch.tensor([math.log(2.0) / p, 1.0]))
    assert torch.allclose(out[1], torch.tensor([math.log(0.5) / p, -1.0]))
    assert torch.allclose(out[2], torch.tensor([-1.0, math.exp(p) * 1e-6]))  # |x| < e^-10 = 4.5e-5
    assert torch.allclose(out[3], torch.tensor([-1.0, -math.exp(p) * 1e-6]))
    assert torch.allclose(out[4], torch.tensor([-1.0, 0.0]))


def test_update_shapes_and_coordinatewise_invariance():
    torch.manual_seed(0)
    rule = LearnedOptimizer()
    params = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    grads = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    updates, state = rule.update(grads, rule.init(params), params)
    assert {k: u.shape for k, u in updates.items()} == {k: p.shape for k, p in params.items()}
    assert all(h.shape == (16, 20) for layer in state for h in layer)
    # the same rule on the coordinates in another order (and as one flat tensor) gives permuted updates
    flat = torch.cat([grads["w"].flatten(), grads["b"]])
    perm = torch.randperm(16)
    u2, _ = rule.update({"all": flat[perm]}, rule.init({"all": flat}), {"all": flat})
    expected = torch.cat([updates["w"].flatten(), updates["b"]])[perm]
    assert torch.allclose(u2["all"], expected, atol=1e-6)
    # coordinates with the same gradient history get the same update
    same, _ = rule.update({"x": torch.full((5,), 0.3)}, rule.init({"x": torch.zeros(5)}), {"x": torch.zeros(5)})
    assert torch.allclose(same["x"], same["x"][0].expand(5))


def test_output_scale_multiplies_the_lstm_output():
    torch.manual_seed(0)
    rule = LearnedOptimizer(output_scale=0.1)
    g = {"x": torch.randn(7)}
    u1, _ = rule.update(g, rule.init(g), g)
    rule.output_scale = 1.0
    u2, _ = rule.update(g, rule.init(g), g)
    assert torch.allclose(u1["x"] * 10, u2["x"], atol=1e-6)


def test_maml_with_the_learned_optimizer_as_inner_rule():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40 * 6, 5, generator=g)
    pool = TensorClassPool(x, torch.arange(40).repeat_interleave(6))
    tasks = EpisodeSampler(pool, 3, 2, 2)
    learner = MAML(mlp(in_features=5, out_features=3, hidden=(8,)), inner_steps=3)
    learner.rule = LearnedOptimizer()  # the rule is the only difference
    loss, metrics = learner.meta_loss(tasks.sample_batch(2, g))
    assert math.isfinite(loss.item())
    loss.backward()
    assert learner.rule.out.weight.grad.abs().sum() > 0  # the meta-gradient reaches the optimizer
    assert all(p.grad is not None for p in learner.model.parameters())
    predictor = learner.adapt(*tasks.sample(g).support)
    assert predictor(x[:4]).shape == (4, 3)


def test_meta_training_on_quadratics_beats_the_untrained_optimizer():
    torch.manual_seed(0)
    rule = LearnedOptimizer(hidden=8)
    held_out = [QuadraticProblem(generator=torch.Generator().manual_seed(1000 + i)) for i in range(10)]

    def final_loss():
        out = []
        for prob in held_out:
            params, state, losses = unroll(
                rule, prob, prob.init_params(), rule.init(prob.init_params()), 20, meta=False
            )
            out.append(prob.loss(params).item())
        return sum(out) / len(out)

    before = final_loss()
    history = meta_train(
        rule, lambda g: QuadraticProblem(generator=g), iterations=40, unroll_steps=20, truncation=10, lr=1e-2
    )
    after = final_loss()
    assert after < 0.5 * before, (before, after)
    assert history["truncations"] == 80 and len(history["meta_loss"]) == 40


def test_exploding_unrolls_are_reported_not_continued():
    class Exploding(QuadraticProblem):
        def loss(self, params):
            return super().loss(params) * float("inf")

    rule = LearnedOptimizer()
    with pytest.raises(UnrolledLossError, match="NaN or infinite.*lower"):
        meta_train(rule, lambda g: Exploding(generator=g), iterations=1, unroll_steps=4, truncation=2)
    history = meta_train(
        rule, lambda g: QuadraticProblem(generator=g), iterations=2, unroll_steps=4, truncation=2, clip=1e-9
    )
    assert history["clipped"] == history["truncations"] == 4  # every meta-gradient was clipped, and said so
    with pytest.raises(ValueError, match="multiple of truncation"):
        meta_train(rule, lambda g: QuadraticProblem(generator=g), iterations=1, unroll_steps=5, truncation=2)


def test_mlp_problem_and_its_variants():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
    rule = LearnedOptimizer()
    for hidden, act in (((20,), "sigmoid"), ((40,), "sigmoid"), ((20, 20), "sigmoid"), ((20,), "relu")):
        prob = MLPProblem(x, y, hidden, act, batch=16, generator=torch.Generator().manual_seed(0))
        params, _, losses = unroll(rule, prob, prob.init_params(), rule.init(prob.init_params()), 3, meta=False)
        assert losses.shape == (3,) and torch.isfinite(losses).all()
        assert set(params) == set(prob.init_params())
    with pytest.raises(ValueError, match="activation"):
        MLPProblem(x, y, activation="swish")
