"""The fused first block of the grey-scale conv nets (metatl/nn/kernels.c through metatl.nn.native)
against PyTorch's convolution, max-pool and ReLU, in float64: values, first and second derivatives,
ties, NaN, odd sizes, a batch split over threads, torch.func transforms, and MAML's
meta-gradient; and the loader's fallbacks."""

import pytest
import torch
import torch.nn.functional as F

from metatl.nn import conv4_pool, conv4_stride, native
from metatl.nn.fast import first_block

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no C compiler: the kernels are not built")


def layers(x, weight, bias, pool=True):
    if pool:
        return F.relu(F.max_pool2d(F.conv2d(x, weight, bias, padding=1), 2))
    return F.relu(F.conv2d(x, weight, bias, stride=2, padding=1))


def inputs(n=5, h=10, w=10, channels=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(channels, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(channels, generator=g, dtype=torch.float64, requires_grad=True)
    return x, weight, bias


@needs_kernels
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("size", [(10, 10), (7, 9), (2, 3)])
def test_values_and_gradients_equal_the_layers(size, pool):
    x, weight, bias = inputs(h=size[0], w=size[1])
    out = first_block(x, weight, bias, pool)
    ref = layers(x, weight, bias, pool)
    assert (ref == 0).any() and (ref > 0).any()  # the ReLU both passes and stops
    assert out.shape == ref.shape and out.stride(1) == 1  # channels-last, as the next convolution wants
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, (weight, bias), g), torch.autograd.grad(ref, (weight, bias), g), rtol=0, atol=1e-12
    )


@needs_kernels
@pytest.mark.parametrize("pool", [True, False])
def test_second_derivatives_by_finite_differences(pool):
    """The backward is itself differentiable (twice: the adjoint pair conv_at / wgrad_at)."""
    x, weight, bias = inputs(n=2, h=6, w=6)
    assert torch.autograd.gradcheck(lambda w, b: first_block(x, w, b, pool), (weight, bias))
    assert torch.autograd.gradgradcheck(lambda w, b: first_block(x, w, b, pool), (weight, bias))
    # and the same second derivatives as the layers: a gradient's gradient through a nonlinearity
    g = torch.randn(2, 32, 3, 3, dtype=torch.float64, requires_grad=True)

    def second(f):
        gw, gb = torch.autograd.grad(f(x, weight, bias, pool), (weight, bias), g, create_graph=True)
        return torch.autograd.grad((gw.sin().sum() + gb.square().sum()), (g, weight, bias), allow_unused=True)

    def dense(grads):  # unused (None) is zero: the max-pool's second derivative in the weights
        return [torch.zeros_like(t) if d is None else d for d, t in zip(grads, (g, weight, bias))]

    ours, theirs = dense(second(first_block)), dense(second(layers))
    assert ours[0].abs().sum() > 0  # the derivative in g is not trivially zero
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("pool", [True, False])
def test_under_torch_func_transforms(pool):
    """vmap over tasks with per-task weights (MAML's inner loops), gradients under vmap, jvp and a
    Hessian-vector product forward-over-reverse: the kernels' rules against the layers'."""
    from functools import partial

    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 1, 8, 8, generator=g, dtype=torch.float64)  # 3 tasks of 4 images
    weight = torch.randn(3, 32, 1, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(3, 32, generator=g, dtype=torch.float64)

    def block(f, w, b, x):
        out = f(x, w, b, pool)
        assert out is not None  # the kernels run inside the transforms
        return out

    def loss(f, w, b, x):  # not linear in the block's output, so second derivatives are not zero
        out = block(f, w, b, x)
        return ((out**2) * 0.3 + out).mean().sin() * (out.mean(dim=(0, 2, 3)) ** 2).sum()

    ours, theirs = partial(block, first_block), partial(block, layers)
    torch.testing.assert_close(torch.func.vmap(ours)(weight, bias, x), torch.func.vmap(theirs)(weight, bias, x))
    grads = [torch.func.vmap(torch.func.grad(partial(loss, f), argnums=(0, 1))) for f in (first_block, layers)]
    torch.testing.assert_close(grads[0](weight, bias, x), grads[1](weight, bias, x), rtol=0, atol=1e-12)
    w, b, xs = weight[0], bias[0], x[0]
    tangents = torch.randn_like(w), torch.randn_like(b)

    def jvp(f):
        return torch.func.jvp(lambda w, b: block(f, w, b, xs), (w, b), tangents)[1]

    def hvp(f):  # forward over reverse
        return torch.func.jvp(lambda w: torch.func.grad(partial(loss, f))(w, b, xs), (w,), tangents[:1])[1]

    torch.testing.assert_close(jvp(first_block), jvp(layers), rtol=0, atol=1e-12)
    assert hvp(layers).abs().max() > 0
    torch.testing.assert_close(hvp(first_block), hvp(layers), rtol=0, atol=1e-12)

    # images that are differentiated (reverse or forward mode) go to the layers
    seen = []

    def record(x):
        seen.append(first_block(x, w, b, pool))
        return x.sum()

    torch.func.grad(record)(xs)
    torch.func.jvp(record, (xs,), (torch.ones_like(xs),))
    assert seen == [None, None]


@needs_kernels
def test_ties_go_to_the_first_maximum_and_nan_wins():
    """Only the centre tap is non-zero, so windows with two equal pixels tie between different
    patches: the gradient of the other taps shows which one got it (PyTorch's: the first)."""
    weight = torch.zeros(32, 1, 3, 3, dtype=torch.float64)
    weight[:, 0, 1, 1] = torch.linspace(0.5, 2, 32, dtype=torch.float64)
    weight.requires_grad_(True)
    bias = torch.zeros(32, dtype=torch.float64, requires_grad=True)
    x = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    x = x * torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    x[0, 0, :2, :2] = 0.75  # a window of four equal pixels
    out, ref = first_block(x, weight, bias, True), layers(x, weight, bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(out, weight, g)[0], torch.autograd.grad(ref, weight, g)[0], rtol=0, atol=1e-12
    )
    x[1, 0, 3, 4] = float("nan")
    for pool in (True, False):
        out, ref = first_block(x, weight, bias, pool), layers(x, weight, bias, pool)
        assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("tasks", [1, 3])
def test_a_batch_split_over_threads_gives_the_same_result(pool, tasks):
    """Also with several tasks (under vmap), whose images the split cuts across."""
    x, weight, bias = inputs(n=7 * tasks)
    x = x.view(tasks, 7, *x.shape[1:])
    weight = (weight * torch.linspace(0.5, 1.5, tasks, dtype=weight.dtype).view(-1, 1, 1, 1, 1)).detach()
    bias = bias.detach().expand(tasks, -1).clone()
    weight.requires_grad_()
    bias.requires_grad_()

    def run():
        out = torch.func.vmap(lambda x, w, b: first_block(x, w, b, pool))(x, weight, bias)
        return out, torch.autograd.grad(out, (weight, bias), torch.ones_like(out))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, g_one = run()
        torch.set_num_threads(3)
        three, g_three = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    torch.testing.assert_close(g_three, g_one, rtol=0, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("factory", [conv4_pool, conv4_stride])
@pytest.mark.parametrize("executor", ["loop", "threads", "inner_vmap", "threads_inner_vmap"])
def test_maml_meta_gradient_through_the_fused_block(executor, factory):
    """Second-order MAML on the conv nets with the fused block (query passes, and the support
    passes, task by task or vmapped over tasks, whose gradient is differentiated again) against
    every layer run as it is."""
    from metatl.data.episode import Episode
    from metatl.engine.executors import make_executor
    from metatl.meta import MAML

    g = torch.Generator().manual_seed(0)
    batch = [
        Episode(
            torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(2),
            torch.rand(9, 1, 16, 16, generator=g, dtype=torch.float64),
            torch.arange(3).repeat(3),
        )
        for _ in range(2)
    ]
    grads = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = factory(out_features=3, filters=32, image_size=16, fast=fast).double()
        learner = MAML(model, "classification", inner_lr=0.3, inner_steps=2)
        loss, _ = make_executor(executor, learner)(learner, batch)
        loss.backward()
        grads.append([p.grad for p in learner.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_off_where_it_does_not_apply(monkeypatch):
    x, weight, bias = inputs()
    assert first_block(x.requires_grad_(), weight, bias, True) is None  # an input gradient: the layers
    assert first_block(x.detach(), weight[:12], bias[:12], True) is None  # channels not a multiple of 8
    assert first_block(x.detach().float(), weight.float(), bias.float(), False) is None  # 32, not 64
    assert first_block(x.detach().float(), weight, bias, True) is None  # mixed dtypes
    monkeypatch.setenv("METATL_NATIVE", "0")
    assert native.library() is None and first_block(x.detach(), weight, bias, True) is None


def test_the_loader_builds_once_and_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("METATL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails: no library, no error
    assert native.library() is None
    assert not list((tmp_path / "cache").glob("*.so"))
    if native.shutil.which("cc") is None:
        return
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("CC", native.shutil.which("cc"))
    assert native.library() is not None
    (built,) = (tmp_path / "cache").glob("kernels-*.so")
    assert not [p for p in (tmp_path / "cache").iterdir() if p != built]  # no temporary left
    monkeypatch.setattr(native, "_loaded", [])
    stamp = built.stat().st_mtime_ns
    assert native.library() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_kernels
def test_the_c_functions_refuse_a_channel_count_they_would_overrun():
    """The kernels take 16-64 channels at a time; the C side checks that, not only Python."""
    from metatl.nn.fast import _FirstBlock

    x, weight, bias = inputs(channels=32)
    with pytest.raises(ValueError, match="refused"):
        # one task: the function takes the tasks' images, weights and biases stacked
        _FirstBlock.apply(x.float()[None], weight.detach().float()[None], bias.detach().float()[None], 1)


@needs_kernels
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(28, 28), (9, 7), (2, 3)])
def test_patch_moments_in_c_equal_the_patches_statistics(stride, size):
    """The folded first BatchNorm takes the mean and covariance of the 3x3 patches from C; against
    the patches themselves (unfold), and the folded layer against the two layers."""
    from torch import nn

    from metatl.nn.fast import BatchStatsNorm2d, _native_patch_moments, conv_batch_stats_norm

    x, _, _ = inputs(n=6, h=size[0], w=size[1])
    x = x * 0.5 + 0.4  # a mean far from zero, as in real images, where cancellation would show
    conv = nn.Conv2d(1, 8, 3, stride, 1).double()
    norm = BatchStatsNorm2d(8).double()
    mu, sigma = _native_patch_moments(x, conv)
    patches = F.unfold(x, 3, padding=1, stride=stride).transpose(1, 2).reshape(-1, 9)
    centred = patches - patches.mean(0)
    torch.testing.assert_close(mu, patches.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(sigma, centred.T @ centred / len(patches), rtol=0, atol=1e-14)
    torch.testing.assert_close(conv_batch_stats_norm(x, conv, norm), norm(conv(x)), rtol=1e-10, atol=1e-10)
    assert _native_patch_moments(x.requires_grad_(), conv) is None  # an input gradient: PyTorch's way
    assert _native_patch_moments(x.detach(), nn.Conv2d(1, 8, 3, 1, 2).double()) is None  # other padding
