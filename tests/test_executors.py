"""Every executor against the plain loop (the learner's own ``meta_loss``), in float64, for every
gradient-based algorithm: the same loss, metrics and meta-gradient, or a refusal that says what to
set. The compiled executor is checked against the loop in tests/test_maml_reference.py."""

import pytest
import torch

from metatl.data.episode import Episode
from metatl.engine.executors import EXECUTORS, ExecutorError, choose, make_executor
from metatl.meta import ANIL, IMAML, MAML, MAMLPlusPlus, MetaLSTM, MetaSGD, Reptile
from metatl.nn import conv4_stride, mlp

ALGORITHMS = {
    "maml": lambda model, task: MAML(model, task, inner_lr=0.3, inner_steps=2),
    "fomaml": lambda model, task: MAML(model, task, inner_lr=0.3, inner_steps=2, first_order=True),
    # SGD inside: Adam divides the conv biases' rounding-level gradients (BatchNorm cancels them) by
    # their own size, so its result depends on the thread count at the level of its step size
    "reptile": lambda model, task: Reptile(
        model, task, inner_lr=0.05, inner_steps=3, inner_batch=2, inner_optimizer="sgd"
    ),
    "meta_lstm": lambda model, task: MetaLSTM(model, task, inner_steps=2, inner_batch=2, hidden=3),
    # the implicit meta-gradient is a backward of its own (conjugate gradient on Hessian-vector products)
    "imaml": lambda model, task: IMAML(model, task, lam=1.0, inner_lr=0.1, inner_steps=2, cg_steps=3),
    "meta_sgd": lambda model, task: MetaSGD(model, task, inner_lr_range=(0.1, 0.3), inner_steps=2),
    "anil": lambda model, task: ANIL(model, task, inner_lr=0.3, inner_steps=2),
    # MAML++ inside its multi-step-loss epochs (a trajectory of parameters per task), with learned
    # per-step rates and, where the model has BatchNorm, per-step BatchNorm weights that the query
    # losses use directly; and in its first-order epochs
    "maml_pp": lambda model, task: MAMLPlusPlus(
        model,
        task,
        inner_lr=0.3,
        inner_steps=2,
        lslr=True,
        multi_step_loss=True,
        bn_per_step_weights=any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
    ),
    "maml_pp_first_order_epochs": lambda model, task: MAMLPlusPlus(
        model, task, inner_lr=0.3, inner_steps=2, lslr=True, derivative_order_annealing=True
    ),
}
MODELS = {
    "mlp": (lambda: mlp(hidden=(8, 8)).double(), "regression"),
    "conv": (lambda: conv4_stride(out_features=3, filters=4, image_size=12).double(), "classification"),
}
RUNS = [name for name in EXECUTORS if name != "compile"]


def episodes(kind, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = [torch.randn(12, 1, generator=g, dtype=torch.float64) for _ in range(n)]
        return [Episode(xi[:5], torch.sin(xi[:5]), xi[5:], torch.sin(xi[5:])) for xi in x]
    return [
        Episode(
            torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(2),
            torch.randn(9, 1, 12, 12, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(3),
        )
        for _ in range(n)
    ]


def outcome(learner, batch, run):
    """Loss, metrics and the gradient of every parameter after ``loss.backward()``."""
    learner.zero_grad()
    torch.manual_seed(7)  # the tasks' minibatch generators are drawn from the global one
    loss, metrics = run(learner, batch)
    loss.backward()
    return (
        loss.detach(),
        metrics,
        {k: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for k, p in learner.named_parameters()},
    )


@pytest.mark.parametrize("executor", RUNS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_executor_computes_the_plain_loop(algorithm, model, executor):
    build, task = MODELS[model]
    torch.manual_seed(0)
    learner = ALGORITHMS[algorithm](build(), task).double()
    batch = episodes(model)
    try:
        run = make_executor(executor, learner)
    except ExecutorError as error:  # a refusal names what to use instead
        assert "train.executor" in str(error) and ("loop" in str(error) or "threads" in str(error))
        assert executor != "loop" and (algorithm in ("reptile", "meta_lstm", "imaml") and "vmap" in executor)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the thread executors then run three threads
    try:
        got = outcome(learner, batch, run)
        loss, metrics, grads = outcome(learner, batch, lambda lr, b: lr.meta_loss(b))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got[0], loss, rtol=1e-12, atol=1e-14)
    assert got[1] == pytest.approx(metrics, rel=1e-12)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for k in grads:
        torch.testing.assert_close(got[2][k], grads[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("executor", ["loop", "threads", "inner_vmap", "vmap"])
def test_executors_under_no_grad_give_the_loss_and_metrics(executor):
    torch.manual_seed(0)
    learner = ALGORITHMS["maml"](*[f() if callable(f) else f for f in MODELS["conv"]])
    batch = episodes("conv", n=3)
    run = make_executor(executor, learner)
    loss, metrics = run(learner, batch)
    with torch.no_grad():
        quiet, quiet_metrics = run(learner, batch)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, loss.detach(), rtol=1e-12, atol=0)
    assert quiet_metrics == pytest.approx(metrics, rel=1e-12)


def test_compile_refuses_a_learned_rule_and_auto_runs_it():
    """The compiled executor differentiates the model's parameters only: Meta-SGD's learning rates
    would get no gradient, so it refuses; auto picks an executor that covers them."""
    learner = MetaSGD(MODELS["mlp"][0](), "regression")
    with pytest.raises(ExecutorError, match="compile.*rule.alpha.0.*train.executor=vmap"):
        make_executor("compile", learner)
    assert choose(learner) == "vmap" and choose(ANIL(MODELS["conv"][0]())) == "threads_inner_vmap"


def test_auto_picks_by_learner_model_and_device():
    conv, net = MODELS["conv"][0], MODELS["mlp"][0]
    assert choose(MAML(net(), "regression")) == "vmap"
    assert choose(MAML(conv())) == "threads_inner_vmap"
    assert choose(MAML(conv()), small=True) == "vmap"  # one query per class: the vmap path is faster
    assert choose(MAML(conv()), precision="bfloat16") == "threads"
    assert choose(MAML(conv4_stride(bn_mode="running"))) == "loop"
    assert choose(Reptile(conv())) == "threads"
    assert choose(MetaLSTM(net(), "regression")) == "threads"
    assert choose(MAML(conv()), device="cuda") == "vmap"
    assert choose(Reptile(conv()), device="cuda") == "loop"
    assert choose(IMAML(conv())) == "threads"
    assert choose(IMAML(net(), "regression")) == "threads"


def test_auto_decides_by_the_episodes_shape_for_conv_nets():
    """Large query sets: task threads with the inner loops vmapped; small ones: one vmap. The same
    result as the plain loop either way."""
    torch.manual_seed(0)
    learner = MAML(MODELS["conv"][0](), inner_lr=0.3)
    run = make_executor("auto", learner)
    assert run.name == "auto"
    small = [Episode(ep.support_x, ep.support_y, ep.query_x[:3], ep.query_y[:3]) for ep in episodes("conv")]
    for batch, expected in ((episodes("conv"), "threads_inner_vmap"), (small, "vmap")):
        loss, _ = run(learner, batch)
        assert list(run.chosen.values())[-1].name == expected
        torch.testing.assert_close(loss, learner.meta_loss(batch)[0], rtol=1e-10, atol=0)


def test_non_gradient_learners_compute_their_own_meta_loss():
    from metatl.meta import Pretrain, ProtoNet

    learner = ProtoNet(conv4_stride(out_features=0, filters=4, image_size=12))
    assert make_executor("auto", learner).name == "direct"
    assert make_executor("auto", Pretrain(mlp(), "regression")).name == "direct"  # its own meta_loss
    with pytest.raises(ExecutorError, match="train.executor=vmap runs gradient-based.*auto"):
        make_executor("vmap", learner)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(batch):
    return [Episode(*(t.cuda() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y))) for ep in batch]


@CUDA
@pytest.mark.parametrize("executor", ["auto", "loop", "inner_vmap", "vmap"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_cuda_executors_compute_the_cpu_loop(algorithm, executor):
    """On a GPU, in float64: every executor's loss, metrics and meta-gradient are the CPU loop's."""
    build, task = MODELS["conv"]
    torch.manual_seed(0)
    learner = ALGORITHMS[algorithm](build(), task).double()
    batch = episodes("conv")
    loss, metrics, grads = outcome(learner, batch, lambda lr, b: lr.meta_loss(b))
    gpu = learner.cuda()
    try:
        run = make_executor(executor, gpu, device="cuda")
    except ExecutorError as error:  # Reptile, the meta-learner LSTM, iMAML: no vmap path
        assert "train.executor" in str(error) and "vmap" in executor
        pytest.skip(f"{executor} refuses {algorithm}, as on CPUs")
    got = outcome(gpu, to_cuda(batch), run)
    torch.testing.assert_close(got[0].cpu(), loss, rtol=1e-10, atol=1e-13)
    assert got[1] == pytest.approx(metrics, rel=1e-10)
    for k in grads:
        torch.testing.assert_close(got[2][k].cpu(), grads[k], rtol=1e-8, atol=1e-11, msg=k)


@CUDA
@pytest.mark.parametrize("variant", ["stride", "pool"])
def test_cuda_conv_nets_run_their_layers_where_the_cpu_runs_the_c_kernel(variant):
    """The Omniglot nets at full width: on the CPU the first block runs as one C kernel (where the
    kernels build); on a GPU as its layers. Second-order MAML's meta-gradient agrees in float64."""
    from metatl.nn import conv4_pool

    net = conv4_stride if variant == "stride" else conv4_pool
    torch.manual_seed(0)
    learner = MAML(net(out_features=5).double(), inner_lr=0.4)
    g = torch.Generator().manual_seed(1)
    batch = [
        Episode(
            torch.rand(5, 1, 28, 28, generator=g, dtype=torch.float64),
            torch.arange(5),
            torch.rand(10, 1, 28, 28, generator=g, dtype=torch.float64),
            torch.arange(5).repeat(2),
        )
        for _ in range(3)
    ]
    loss, _, grads = outcome(learner, batch, make_executor("auto", learner))
    gpu = learner.cuda()
    for executor in ("auto", "loop"):
        got = outcome(gpu, to_cuda(batch), make_executor(executor, gpu, device="cuda"))
        torch.testing.assert_close(got[0].cpu(), loss, rtol=1e-10, atol=1e-13)
        for k in grads:
            torch.testing.assert_close(got[2][k].cpu(), grads[k], rtol=1e-8, atol=1e-11, msg=f"{executor} {k}")
