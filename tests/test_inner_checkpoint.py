"""Gradient checkpointing of the inner loop (``train.inner_checkpoint``): the same meta-gradient as
keeping every inner step's graph, in float64, for an MLP and a conv net, through every executor
that runs it; refused with a message by the vmap executors."""

import pytest
import torch

from metatl.data.episode import Episode
from metatl.engine.executors import ExecutorError, make_executor
from metatl.engine.recompute import set_inner_checkpoint
from metatl.meta import ANIL, MAML, MAMLPlusPlus, MetaSGD, Reptile
from metatl.nn import conv4_stride, mlp


def episodes(kind, n):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        x = [torch.randn(12, 1, generator=g, dtype=torch.float64) for _ in range(n)]
        return [Episode(xi[:5], torch.sin(xi[:5]), xi[5:], torch.sin(xi[5:])) for xi in x]
    images = [torch.randn(15, 1, 12, 12, generator=g, dtype=torch.float64) for _ in range(n)]
    return [Episode(xi[:6], torch.arange(3).repeat(2), xi[6:], torch.arange(3).repeat(3)) for xi in images]


MODELS = {
    "mlp": (lambda: mlp(hidden=(8, 8)).double(), "regression"),
    "conv": (lambda: conv4_stride(out_features=3, filters=4, image_size=12).double(), "classification"),
}


def meta_gradient(learner, batch, executor):
    learner.zero_grad()
    loss, _ = make_executor(executor, learner)(learner, batch)
    loss.backward()
    return loss.detach(), {
        k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in learner.named_parameters()
    }


@pytest.mark.parametrize("executor", ["loop", "threads"])
@pytest.mark.parametrize("model", list(MODELS))
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(model, executor):
    build, task = MODELS[model]
    torch.manual_seed(0)
    learner = MAML(build(), task, inner_lr=0.3, inner_steps=4)
    batch = episodes(model, n=3)
    loss, grads = meta_gradient(learner, batch, "loop")
    set_inner_checkpoint(learner, True)
    assert learner.inner_step_runner is not None
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got_loss, got = meta_gradient(learner, batch, executor)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
    for k in grads:
        torch.testing.assert_close(got[k], grads[k], rtol=1e-10, atol=1e-13, msg=k)


LEARNERS = {  # a learned rule (meta_sgd), a fixed body (anil), per-step rates and BatchNorm weights (maml_pp)
    "meta_sgd": lambda model, task: MetaSGD(model, task, inner_lr_range=(0.1, 0.3), inner_steps=3),
    "anil": lambda model, task: ANIL(model, task, inner_lr=0.3, inner_steps=3),
    "maml_pp": lambda model, task: MAMLPlusPlus(
        model, task, inner_lr=0.3, inner_steps=3, lslr=True, multi_step_loss=True, bn_per_step_weights=True
    ),
}


@pytest.mark.parametrize("algorithm", list(LEARNERS))
def test_gradients_reach_parameters_outside_the_adapted_ones(algorithm):
    build, task = MODELS["conv"]
    torch.manual_seed(0)
    learner = LEARNERS[algorithm](build(), task).double()
    batch = episodes("conv", n=2)
    loss, grads = meta_gradient(learner, batch, "loop")
    set_inner_checkpoint(learner, True)
    got_loss, got = meta_gradient(learner, batch, "loop")
    torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
    for k in grads:
        torch.testing.assert_close(got[k], grads[k], rtol=1e-10, atol=1e-13, msg=k)


def test_the_second_order_term_is_in_the_checkpointed_gradient():
    """The comparison above can tell: first-order MAML's gradient differs from it."""
    build, task = MODELS["mlp"]
    torch.manual_seed(0)
    second = MAML(build(), task, inner_lr=0.3, inner_steps=4)
    first = MAML(build(), task, inner_lr=0.3, inner_steps=4, first_order=True)
    first.load_state_dict(second.state_dict())
    set_inner_checkpoint(second, True)
    batch = episodes("mlp", n=3)
    _, g2 = meta_gradient(second, batch, "loop")
    _, g1 = meta_gradient(first, batch, "loop")
    assert max((g2[k] - g1[k]).abs().max() for k in g1) > 1e-3


def test_vmap_executors_refuse_checkpointing():
    learner = MAML(MODELS["mlp"][0](), "regression")
    set_inner_checkpoint(learner, True)
    with pytest.raises(ExecutorError, match="train.inner_checkpoint.*vmap.*train.executor=threads"):
        make_executor("vmap", learner)
    assert make_executor("auto", learner).name in ("threads", "loop")
    set_inner_checkpoint(learner, False)
    assert make_executor("auto", learner).name == "vmap"


def test_learners_without_a_second_order_graph_are_unchanged():
    """First-order inner loops keep no graph across steps; checkpointing leaves them alone."""
    torch.manual_seed(0)
    learner = Reptile(MODELS["mlp"][0](), "regression", inner_steps=3, inner_batch=None, inner_optimizer="sgd")
    batch = episodes("mlp", n=2)
    torch.manual_seed(1)
    loss, grads = meta_gradient(learner, batch, "loop")
    set_inner_checkpoint(learner, True)
    torch.manual_seed(1)
    got_loss, got = meta_gradient(learner, batch, "loop")
    torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
    assert all(torch.equal(got[k], grads[k]) for k in grads)


def test_models_that_a_recomputation_would_change_are_refused():
    from metatl.config import ConfigError

    learner = MAML(conv4_stride(out_features=3, filters=4, image_size=12, bn_mode="running"))
    with pytest.raises(ConfigError, match="train.inner_checkpoint.*running statistics.*bn_mode: batch"):
        set_inner_checkpoint(learner, True)


def test_the_trainer_turns_it_on_from_the_config(tmp_path):
    from metatl.config import from_dict
    from metatl.engine import Trainer

    cfg = from_dict(
        {
            "algorithm": {"name": "maml", "inner_steps": 3},
            "model": {"name": "mlp"},
            "data": {"name": "sinusoid"},
            "train": {"iterations": 1, "inner_checkpoint": True, "val_every": 0, "ckpt_every": 0},
        }
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.learner.inner_step_runner is not None
    assert trainer.executor.name in ("loop", "threads")
