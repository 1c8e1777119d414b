"""Reference tests: MAML / first-order MAML meta-gradients and the Reptile update against
independent computations (finite differences, hand-unrolled loops, the paper's equation)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatl.data.episode import Episode
from metatl.engine.executors import ExecutorError, make_executor
from metatl.meta import MAML, Adam, Reptile


def run(learner, batch, executor="loop"):
    """``(loss, metrics)`` of a meta-batch through ``executor`` (``train.executor``)."""
    return make_executor(executor, learner)(learner, batch)


class threads_count:
    """``torch.get_num_threads()`` set to ``n`` inside the block (the thread executors use that many)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def episode(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 1, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x) + 0.1 * torch.randn(10, 1, generator=g, dtype=torch.float64)
    return Episode(x[:5], y[:5], x[5:], y[5:])


def mlp_apply(flat, shapes, x):
    """The tiny MLP written out by hand from a flat parameter vector (independent of nn.Module)."""
    ps, i = [], 0
    for s in shapes:
        n = int(torch.tensor(s).prod())
        ps.append(flat[i : i + n].view(s))
        i += n
    w1, b1, w2, b2 = ps
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def unrolled_objective(flat, shapes, ep, alpha, steps):
    """L_query(theta_k) with theta_{j+1} = theta_j - alpha grad L_support(theta_j), by hand."""
    theta = flat
    for _ in range(steps):
        loss = F.mse_loss(mlp_apply(theta, shapes, ep.support_x), ep.support_y)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - alpha * g
    return F.mse_loss(mlp_apply(theta, shapes, ep.query_x), ep.query_y)


@pytest.mark.parametrize("executor", ["plain", "loop", "vmap", "inner_vmap"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(steps, executor):
    model, ep, alpha = tiny_mlp(), episode(), 0.3
    learner = MAML(model, "regression", inner_lr=alpha, inner_steps=steps)
    loss, _ = learner.meta_loss([ep]) if executor == "plain" else run(learner, [ep], executor)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    analytic = torch.cat([g.flatten() for g in grads])

    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).requires_grad_(True)
    eps = 1e-6
    numeric = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        plus = unrolled_objective((flat + e).detach().requires_grad_(True), shapes, ep, alpha, steps)
        minus = unrolled_objective((flat - e).detach().requires_grad_(True), shapes, ep, alpha, steps)
        numeric[i] = (plus - minus) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic - numeric).abs().max()
    # the second-order term matters here: first-order MAML must differ from it
    fo = MAML(copy.deepcopy(model), "regression", inner_lr=alpha, inner_steps=steps, first_order=True)
    fo_loss, _ = fo.meta_loss([ep])
    fo_grad = torch.cat([g.flatten() for g in torch.autograd.grad(fo_loss, list(fo.model.parameters()))])
    assert not torch.allclose(fo_grad, numeric, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
def test_first_order_maml_drops_the_second_order_term(steps):
    """FOMAML's gradient is grad L_query at theta_k, with the inner gradients treated as constants."""
    model, ep, alpha = tiny_mlp(), episode(), 0.3
    learner = MAML(model, "regression", inner_lr=alpha, inner_steps=steps, first_order=True)
    loss, _ = learner.meta_loss([ep])
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    for _ in range(steps):
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.mse_loss(mlp_apply(t, shapes, ep.support_x), ep.support_y), t)
        theta = theta - alpha * g
    t = theta.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.mse_loss(mlp_apply(t, shapes, ep.query_x), ep.query_y), t)
    assert torch.allclose(analytic, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_batch_loss_is_the_mean_over_tasks_and_vmap_agrees(first_order):
    model = tiny_mlp()
    learner = MAML(model, "regression", inner_lr=0.1, first_order=first_order)
    eps = [episode(1), episode(2), episode(3)]
    both, _ = learner.meta_loss(eps)
    one = [learner.meta_loss([e])[0] for e in eps]
    assert torch.allclose(both, sum(one) / 3)
    g_loop = torch.autograd.grad(both, list(model.parameters()))
    for executor in ("loop", "vmap", "inner_vmap"):
        batched, _ = run(learner, eps, executor)
        g_vmap = torch.autograd.grad(batched, list(model.parameters()))
        assert torch.allclose(batched, both)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_loop, g_vmap))


def test_vmap_refuses_batchnorm_running_statistics():
    from metatl.nn import conv4_stride

    for executor in ("vmap", "inner_vmap", "compile", "threads_inner_vmap"):
        with pytest.raises(ExecutorError, match="bn_mode 'batch'"):
            make_executor(executor, MAML(conv4_stride(bn_mode="running")))


@pytest.mark.parametrize("meta_batch", [1, 3])
def test_reptile_step_equals_the_equation(meta_batch):
    """theta <- theta + eps (mean_i theta'_i - theta), theta'_i from k hand-written SGD steps."""
    model, k, lr, eps_outer = tiny_mlp(), 3, 0.05, 0.7
    learner = Reptile(model, "regression", inner_lr=lr, inner_steps=k, inner_optimizer="sgd", inner_batch=None)
    batch = [episode(s) for s in range(meta_batch)]
    theta0 = [p.detach().clone() for p in model.parameters()]

    adapted = []
    for ep in batch:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(k):
            opt.zero_grad()
            F.mse_loss(m(ep.support_x), ep.support_y).backward()
            opt.step()
        adapted.append([p.detach() for p in m.parameters()])
    expected = [t + eps_outer * (torch.stack([a[i] for a in adapted]).mean(0) - t) for i, t in enumerate(theta0)]

    opt = torch.optim.SGD(model.parameters(), lr=eps_outer)
    loss, _ = learner.meta_loss(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-12)


def test_adam_rule_matches_torch_optim_adam():
    model = tiny_mlp()
    ref = copy.deepcopy(model)
    ep = episode()
    rule = Adam(lr=0.01, betas=(0.0, 0.999))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = rule.init(params)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.0, 0.999))
    for _ in range(4):
        p = {k: v.requires_grad_(True) for k, v in params.items()}
        loss = F.mse_loss(torch.func.functional_call(model, p, (ep.support_x,)), ep.support_y)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        updates, state = rule.update(grads, state, p)
        params = {k: (p[k] + updates[k]).detach() for k in p}
        opt.zero_grad()
        F.mse_loss(ref(ep.support_x), ep.support_y).backward()
        opt.step()
    for k, v in ref.named_parameters():
        assert torch.allclose(params[k], v.detach(), atol=1e-10)


def test_adaptation_leaves_the_model_untouched():
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    learner = MAML(model, "regression", inner_lr=0.1, inner_steps_test=5)
    ep = episode()
    predictor = learner.adapt(ep.support_x, ep.support_y)
    after_loss = F.mse_loss(predictor(ep.support_x), ep.support_y)
    before_loss = F.mse_loss(learner.adapt(ep.support_x, ep.support_y, steps=0)(ep.support_x), ep.support_y)
    assert after_loss < before_loss
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_running_batchnorm_statistics_update_in_training_but_not_when_adapting():
    from metatl.nn import conv4_stride

    torch.manual_seed(0)
    learner = MAML(conv4_stride(out_features=3, filters=4, image_size=12, bn_mode="running"), inner_lr=0.1)
    x, y = torch.randn(6, 1, 12, 12), torch.arange(3).repeat(2)
    before = {k: v.clone() for k, v in learner.model.named_buffers()}
    learner.adapt(x, y, steps=2)(x)
    assert all(torch.equal(v, before[k]) for k, v in learner.model.named_buffers())
    learner.meta_loss([Episode(x, y, x, y)])[0].backward()
    assert not torch.equal(learner.model.features[1].running_mean, before["features.1.running_mean"])


def small_conv_episodes(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Episode(
            torch.randn(3, 1, 12, 12, generator=g, dtype=torch.float64),
            torch.arange(3),
            torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(2),
        )
        for _ in range(n)
    ]


def maml_grads(model, eps, inner_steps=2, executor="plain", **kw):
    """Loss, the parameters' gradients after ``loss.backward()``, and the metrics."""
    learner = MAML(model, inner_lr=0.5, inner_steps=inner_steps, **kw)
    model.zero_grad()
    loss, metrics = learner.meta_loss(eps) if executor == "plain" else run(learner, eps, executor)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], metrics


def test_vmap_second_order_meta_gradient_through_batchnorm_equals_the_loop():
    """The conv net's BatchNorm (batch statistics) differentiated twice under vmap: the gradient
    equals the per-task loop's, including the exactly zero gradient of the conv biases (BatchNorm
    cancels them). PyTorch's fused batch_norm got these wrong by 2-7% of the gradient."""
    from metatl.nn import conv4_stride

    torch.manual_seed(0)
    model = conv4_stride(out_features=3, filters=4, image_size=12).double()
    eps = small_conv_episodes()
    _, loop, _ = maml_grads(model, eps)
    for batch_tasks in ("vmap", "inner_vmap"):  # all of the meta-batch in vmap; only the inner loops
        _, vmapped, _ = maml_grads(model, eps, executor=batch_tasks)
        for (name, _), a, b in zip(model.named_parameters(), vmapped, loop):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), (batch_tasks, name)
        assert all(
            g.abs().max() < 1e-12
            for (name, _), g in zip(model.named_parameters(), vmapped)
            if name.startswith("features.") and name.endswith(".bias") and int(name.split(".")[1]) % 3 == 0
        )


@pytest.mark.parametrize("batch_tasks", ["loop", "vmap", "inner_vmap"])
def test_folding_the_first_batchnorm_gives_the_same_meta_gradient(batch_tasks):
    """The conv nets' first BatchNorm folded into its convolution (``fast=True``, the
    default): the second-order meta-gradient of the two layers run as they are, for every
    ``batch_tasks`` (so also differentiated twice under vmap)."""
    from metatl.nn import conv4_stride

    torch.manual_seed(0)
    model = conv4_stride(out_features=3, filters=4, image_size=12, fast=False).double()
    folding = conv4_stride(out_features=3, filters=4, image_size=12).double()
    folding.load_state_dict(model.state_dict())
    assert folding.fold_first_norm and not model.fold_first_norm
    eps = small_conv_episodes()
    loss_ref, reference, _ = maml_grads(model, eps)
    loss, grads, _ = maml_grads(folding, eps, executor=batch_tasks)
    assert torch.allclose(loss, loss_ref, rtol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), grads, reference):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), name


@pytest.mark.parametrize("batch_tasks", ["loop", "vmap", "inner_vmap"])
def test_channels_last_gives_the_same_meta_gradient(batch_tasks):
    """``model.fast`` (outside vmap the layers run channels-last; inside, as they are):
    the second-order meta-gradient of the standard layout, for every ``batch_tasks``."""
    from metatl.nn import conv4_stride

    torch.manual_seed(0)
    model = conv4_stride(out_features=3, filters=4, image_size=12, fast=False).double()
    fast = conv4_stride(out_features=3, filters=4, image_size=12).double()
    fast.load_state_dict(model.state_dict())
    eps = small_conv_episodes()
    _, reference, _ = maml_grads(model, eps)
    _, grads, _ = maml_grads(fast, eps, executor=batch_tasks)
    for (name, _), a, b in zip(model.named_parameters(), grads, reference):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), name


@pytest.mark.parametrize("batch_tasks", ["loop", "inner_vmap"])
def test_channels_last_runs_the_query_passes_channels_last(batch_tasks):
    """With the option, every query set reaches the first convolution channels-last (one-channel
    images included); inside vmap the input is left as it is."""
    from metatl.nn import conv4_stride
    from metatl.nn.backbones import _in_func_transform

    model = conv4_stride(out_features=3, filters=4, image_size=12).double()
    seen = []  # the first block's output (its conv and BatchNorm run as one convolution)
    model.features[2].register_forward_pre_hook(
        lambda m, args: seen.append(None if _in_func_transform(args[0]) else (len(args[0]), args[0].stride(1) == 1))
    )
    eps = small_conv_episodes()
    maml_grads(model, eps, executor=batch_tasks)
    queries = [entry for entry in seen if entry is not None and entry[0] == len(eps[0].query_y)]
    assert len(queries) == len(eps) and all(channels_last for _, channels_last in queries)


def test_inner_vmap_runs_the_query_sets_through_the_fused_batchnorm(monkeypatch):
    """``train.executor=inner_vmap``: the support sets go through the exact elementary BatchNorm under
    vmap, each query set through PyTorch's fused kernel (the fast one outside transforms)."""
    from metatl.nn import conv4_stride

    calls = []
    fused = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda x, *a, **k: calls.append(x.shape[0]) or fused(x, *a, **k))
    eps = small_conv_episodes()
    maml_grads(conv4_stride(out_features=3, filters=4, image_size=12).double(), eps, executor="inner_vmap")
    # the 3 BatchNorm layers after the first (folded into its conv), one query set each
    assert calls == [len(eps[0].query_y)] * (3 * len(eps))


@pytest.mark.parametrize("value", ["yes", "all", "batch"])
def test_an_unknown_executor_names_the_valid_ones(value):
    with pytest.raises(ExecutorError, match="auto or one of loop, inner_vmap, vmap"):
        make_executor(value, MAML(tiny_mlp(), "regression"))


@pytest.mark.parametrize(
    "norm", [nn.BatchNorm2d(4, track_running_stats=False), nn.LayerNorm([4, 10, 10])], ids=["batchnorm", "layernorm"]
)
def test_second_order_vmap_refuses_torch_norm_layers(norm):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.Flatten(), nn.Linear(400, 3))
    with pytest.raises(ExecutorError, match="functorch#534.*BatchStatsNorm2d.*first_order=true.*executor=threads"):
        make_executor("vmap", MAML(model))
    make_executor("vmap", MAML(model, first_order=True))  # first order differentiates once: exact
    make_executor("loop", MAML(model))


def _has_cxx_compiler():
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


needs_compiler = pytest.mark.skipif(not _has_cxx_compiler(), reason="torch.compile on CPU needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_compiled_meta_gradient_equals_the_eager_one_with_batchnorm(first_order):
    """The compile executor on a one-block conv net with BatchNorm (batch statistics; small, so that
    it compiles in seconds): the gradient that reaches the parameters through ``loss.backward()``
    equals the per-task loop's autograd one, and it is not the one of the other order (a graph cut
    by the compiler gave zeros here once)."""
    from metatl.nn import BatchStatsNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), BatchStatsNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()
    eps = small_conv_episodes()

    def grads(**kw):  # one inner step: the graph compiles in seconds
        return maml_grads(model, eps, inner_steps=1, **kw)

    loss_ref, ref, metrics_ref = grads(first_order=first_order)
    loss_c, compiled, metrics_c = grads(first_order=first_order, executor="compile")
    other = grads(first_order=not first_order)[1]
    assert torch.allclose(loss_c, loss_ref, atol=1e-12)
    assert metrics_c["query_acc"] == metrics_ref["query_acc"]
    assert all(torch.allclose(a, b, rtol=1e-7, atol=1e-10) for a, b in zip(compiled, ref))
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(compiled, other))


class _FoldedBlockNet(nn.Module):
    """One conv block whose BatchNorm is folded into the convolution, and a linear head."""

    def __init__(self):
        super().__init__()
        from metatl.nn import BatchStatsNorm2d

        self.conv, self.norm = nn.Conv2d(1, 4, 3, stride=2, padding=1), BatchStatsNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        from metatl.nn.backbones import conv_batch_stats_norm

        return self.head(torch.relu(conv_batch_stats_norm(x, self.conv, self.norm)).flatten(1))


@needs_compiler
def test_compiled_meta_gradient_through_the_folded_batchnorm_equals_the_eager_one():
    """The fold's moments (unfold, small matrix products) under ``torch.compile`` and vmap,
    differentiated twice: the gradient of the eager per-task loop."""
    torch.manual_seed(0)
    model = _FoldedBlockNet().double()
    eps = small_conv_episodes()
    loss_ref, ref, _ = maml_grads(model, eps, inner_steps=1)
    loss_c, compiled, _ = maml_grads(model, eps, inner_steps=1, executor="compile")
    assert torch.allclose(loss_c, loss_ref, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-7, atol=1e-10) for a, b in zip(compiled, ref))


@needs_compiler
def test_compiled_meta_gradient_is_one_graph_compiled_once():
    """The compile executor traces the meta-gradient as one graph (a graph break runs the rest eagerly:
    the task threads' replica lookup once did that to all of it) and the next steps reuse it (the
    lighter ``functional_call``'s bookkeeping, traced, once made every step recompile)."""
    from torch._dynamo.utils import counters

    from metatl.nn import BatchStatsNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), BatchStatsNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()
    eps = small_conv_episodes()
    learner = MAML(model, inner_lr=0.5, inner_steps=1)
    executor = make_executor("compile", learner)
    torch._dynamo.reset()  # no graph cached by earlier tests
    counters.clear()
    for _ in range(3):
        executor(learner, eps)[0].backward()
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1


def test_known_gradient_scales_with_the_upstream_gradient():
    from metatl.engine.executors import with_gradient

    p = {"a": torch.ones(2, requires_grad=True), "b": torch.zeros(3, requires_grad=True)}
    value = with_gradient(torch.tensor(5.0), p, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 0.0, -1.0])})
    assert value.item() == 5.0
    (2 * value).backward()
    assert torch.equal(p["a"].grad, torch.tensor([2.0, 4.0])) and torch.equal(
        p["b"].grad, torch.tensor([6.0, 0.0, -2.0])
    )


@pytest.mark.parametrize("batch_tasks", ["loop", "inner_vmap"])
def test_threaded_meta_gradient_matches_finite_differences(batch_tasks):
    """Three tasks shared between two threads; the meta-gradient of the mean query loss against
    finite differences of the hand-unrolled objective."""
    model, alpha = tiny_mlp(), 0.3
    eps = [episode(s) for s in (1, 2, 3)]
    learner = MAML(model, "regression", inner_lr=alpha, inner_steps=2)
    with threads_count(2):
        loss, _ = run(learner, eps, "threads" if batch_tasks == "loop" else "threads_inner_vmap")
    analytic = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    objective = lambda f: sum(unrolled_objective(f.requires_grad_(True), shapes, ep, alpha, 2) for ep in eps) / 3
    assert torch.allclose(loss, objective(flat.clone()).detach(), rtol=1e-12)
    numeric = torch.zeros_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = 1e-6
        numeric[i] = (objective(flat + e) - objective(flat - e)).detach() / 2e-6
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic - numeric).abs().max()


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("batch_tasks", ["loop", "inner_vmap"])
def test_task_threads_give_the_one_thread_meta_gradient(batch_tasks, first_order):
    """The conv net (folded first BatchNorm, channels-last queries) over five tasks: 2 and 3 threads
    give the loss, the metrics and the meta-gradient of the tasks run one after another, and the
    tasks do run in the worker threads."""
    import threading

    from metatl.nn import conv4_stride

    before = torch.get_num_threads()
    torch.manual_seed(0)
    model = conv4_stride(out_features=3, filters=4, image_size=12).double()
    threads_seen = set()
    model.head.register_forward_pre_hook(lambda m, args: threads_seen.add(threading.current_thread().name))
    eps = small_conv_episodes(n=5)
    threaded = "threads" if batch_tasks == "loop" else "threads_inner_vmap"
    with threads_count(1):
        loss_ref, reference, metrics_ref = maml_grads(model, eps, executor=threaded, first_order=first_order)
    assert threads_seen == {threading.current_thread().name}
    for threads in (2, 3):
        threads_seen.clear()
        with threads_count(threads):
            loss, grads, metrics = maml_grads(model, eps, executor=threaded, first_order=first_order)
        assert len(threads_seen) == threads
        assert torch.allclose(loss, loss_ref, rtol=1e-12) and metrics == pytest.approx(metrics_ref, rel=1e-12)
        for (name, _), a, b in zip(model.named_parameters(), grads, reference):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13), (threads, name)
    assert torch.get_num_threads() == before


def test_task_threads_refuse_models_that_are_not_thread_safe():
    """Running BatchNorm statistics (updated in place) and dropout (random draws) would make the
    result depend on the threads' order: auto does not pick threads for them, threads are refused."""
    from metatl.engine.executors.threads import thread_count
    from metatl.nn import conv4_stride

    running = conv4_stride(out_features=3, filters=4, image_size=12, bn_mode="running")
    dropout = nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.1), nn.Linear(4, 1))
    x = torch.zeros(3, 1)
    with threads_count(8):
        assert thread_count(MAML(tiny_mlp(), "regression"), 3, x) == 3
    for model, reason in ((running, "buffers"), (dropout, "dropout")):
        with threads_count(2):
            assert thread_count(MAML(model), 4, x) == 1
        assert make_executor("auto", MAML(model)).name in ("loop", "inner_vmap")
        for learner in (MAML(model), Reptile(model)):
            with pytest.raises(ExecutorError, match=reason):
                make_executor("threads", learner)
    with torch.no_grad(), threads_count(2):
        assert thread_count(MAML(tiny_mlp(), "regression"), 4, x) == 1


@pytest.mark.parametrize("batch_tasks", ["loop", "inner_vmap"])
def test_meta_loss_under_no_grad_gives_the_loss_and_metrics(batch_tasks):
    """Under ``torch.no_grad()`` the per-task path computes the same loss and metrics, and no
    meta-gradient (the inner loops still take their gradients)."""
    from metatl.nn import conv4_stride

    torch.manual_seed(0)
    learner = MAML(conv4_stride(out_features=3, filters=4, image_size=12).double(), inner_lr=0.5)
    eps = small_conv_episodes(n=3)
    loss, metrics = run(learner, eps, batch_tasks)
    with torch.no_grad():
        quiet, quiet_metrics = run(learner, eps, batch_tasks)
    assert not quiet.requires_grad and torch.allclose(quiet, loss.detach(), rtol=1e-12)
    assert quiet_metrics == pytest.approx(metrics, rel=1e-12)


def test_a_model_that_cannot_be_copied_for_a_thread_says_what_to_set():
    import threading

    model = tiny_mlp()
    model.lock = threading.Lock()  # deepcopy cannot copy a lock
    learner = MAML(model, "regression")
    with threads_count(2), pytest.raises(ExecutorError, match="cannot copy the MAML.*train.executor=loop"):
        run(learner, [episode(1), episode(2)], "threads")
    run(learner, [episode(1), episode(2)], "loop")[0].backward()


def test_an_error_in_a_task_thread_reaches_the_caller():
    from metatl.nn import conv4_stride

    before = torch.get_num_threads()
    eps = small_conv_episodes(n=4)
    eps[3] = Episode(eps[3].support_x, eps[3].support_y, eps[3].query_x, eps[3].query_y + 7)  # labels 7-9 of 3 classes
    learner = MAML(conv4_stride(out_features=3, filters=4, image_size=12).double())
    with threads_count(2), pytest.raises(IndexError, match="out of bounds"):
        run(learner, eps, "threads")
    assert torch.get_num_threads() == before
    with pytest.raises(IndexError, match="out of bounds"):
        run(learner, eps, "threads")
    assert torch.get_num_threads() == before


def test_map_shards_splits_the_items_and_the_intra_op_threads():
    """Each thread gets every n-th item and an equal share of the intra-op threads (at least one);
    CPU autocast is carried into the threads; the caller's thread count comes back."""
    from metatl.engine.executors.threads import map_shards
    from metatl.nn.backbones import autocast_enabled

    learner = MAML(tiny_mlp(), "regression")
    with threads_count(4):
        seen = map_shards(
            learner, lambda r, items: (items, torch.get_num_threads(), autocast_enabled("cpu")), list(range(7)), 3
        )
        assert [items for items, _, _ in seen] == [[0, 3, 6], [1, 4], [2, 5]]
        assert [n for _, n, _ in seen] == [1, 1, 1] and torch.get_num_threads() == 4
        assert [
            n
            for _, n, _ in map_shards(
                learner, lambda r, items: (items, torch.get_num_threads(), False), list(range(7)), 2
            )
        ] == [2, 2]
        assert torch.get_num_threads() == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(
            on for _, _, on in map_shards(learner, lambda r, items: (items, 0, autocast_enabled("cpu")), [1, 2], 2)
        )


@pytest.mark.parametrize("inner_batch", [None, 2])
def test_reptile_task_threads_give_the_one_thread_update(inner_batch):
    """Reptile's tasks in two threads, with minibatches drawn in the inner loop: the same update
    as one thread, since each task has its own generator seeded before the threads start."""
    results = []
    for threads in (1, 2):
        model = tiny_mlp()
        learner = Reptile(
            model, "regression", inner_lr=0.05, inner_steps=3, inner_optimizer="sgd", inner_batch=inner_batch
        )
        torch.manual_seed(3)
        with threads_count(threads):
            loss, _ = run(learner, [episode(s) for s in range(5)], "threads")
        results.append(torch.autograd.grad(loss, list(model.parameters())))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*results))
