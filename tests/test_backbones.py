"""Backbone choices that must not change results: the channels-last memory layout, and the max-pool
blocks that apply ReLU after the pool (the papers write conv-BN-ReLU-pool)."""

import pytest
import torch
import torch.nn.functional as F

from metatl.nn import native
from metatl.nn.backbones import BatchStatsNorm2d, conv4_pool, conv4_stride, conv_batch_stats_norm, to_channels_last
from metatl.nn.relation import RelationEmbedding


@pytest.mark.parametrize("factory", [conv4_stride, conv4_pool])
@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_fast_kernels_give_the_same_outputs_and_gradients(factory, bn_mode):
    """``fast=True`` (channels-last layers and pool, the folded first BatchNorm) against every
    layer run as it is; a checkpoint of either loads into the other."""
    torch.manual_seed(0)
    plain = factory(out_features=5, bn_mode=bn_mode, filters=64, fast=False)
    fast = factory(out_features=5, bn_mode=bn_mode, filters=64)
    fast.load_state_dict(plain.state_dict())
    layouts = []
    for block in list(fast.features)[2:]:  # every later layer's output in the channels-last layout
        block.register_forward_hook(lambda m, i, out: layouts.append(out.stride(1) == 1 and out.shape[1] > 1))
    x = torch.rand(12, 1, 28, 28)
    out_plain, out_fast = plain(x), fast(x)
    # the first block is conv + BN (folded), or the fused C kernel up to its ReLU where it is built
    fused = bn_mode == "batch" and native.library() is not None
    assert all(layouts) and len(layouts) == len(fast.features) - (2 + fused * (2 if factory is conv4_pool else 1))
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    out_plain.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        # conv biases before BatchNorm have (near-)zero gradients: compare on the scale of the others
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_to_channels_last_restrides_one_channel_images_and_keeps_values_and_gradients():
    """``x.contiguous(memory_format=torch.channels_last)`` leaves a one-channel batch as it is (it
    counts as channels-last already), and oneDNN then runs every layer in the standard layout."""
    x = torch.rand(4, 1, 5, 5, requires_grad=True)
    assert x.contiguous(memory_format=torch.channels_last).stride(1) != 1  # why the helper exists
    y = to_channels_last(x)
    assert y.stride() == (25, 1, 5, 1) and torch.equal(y, x)
    (y * torch.arange(100.0).view(4, 1, 5, 5)).sum().backward()
    assert torch.equal(x.grad, torch.arange(100.0).view(4, 1, 5, 5))
    z = torch.rand(2, 3, 4, 4)
    assert to_channels_last(z).stride() == (48, 1, 12, 3) and torch.equal(to_channels_last(z), z)
    z = z.contiguous(memory_format=torch.channels_last)
    assert to_channels_last(z) is z and to_channels_last(y) is y
    flat = torch.rand(2, 3)
    assert to_channels_last(flat) is flat  # not an image batch: unchanged
    # inside vmap the layout is vmap's business: unchanged, and no error (vmap cannot query it)
    out = torch.func.vmap(to_channels_last)(torch.rand(3, 2, 1, 4, 4))
    assert out.shape == (3, 2, 1, 4, 4)


@pytest.mark.parametrize("executor", ["vmap", "inner_vmap"])
def test_vmap_executors_refuse_bfloat16_autocast_with_the_fix(executor):
    from metatl.data import Episode
    from metatl.engine.executors import make_executor
    from metatl.meta import MAML

    ep = Episode(torch.rand(3, 1, 28, 28), torch.arange(3), torch.rand(3, 1, 28, 28), torch.arange(3))
    maml = MAML(conv4_stride(out_features=3, bn_mode="batch", filters=8))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="precision=float32"):
        make_executor(executor, maml)(maml, [ep, ep])


def test_inner_vmap_takes_query_sets_of_different_sizes():
    """``train.executor=inner_vmap`` stacks the support sets only; the query losses run task by task."""
    from metatl.data import Episode
    from metatl.engine.executors import make_executor
    from metatl.meta import MAML

    torch.manual_seed(0)
    eps = [
        Episode(torch.rand(3, 1, 12, 12), torch.arange(3), torch.rand(3 * q, 1, 12, 12), torch.arange(3).repeat(q))
        for q in (1, 2)
    ]
    model = conv4_stride(out_features=3, bn_mode="batch", filters=4, image_size=12)
    maml = MAML(model)
    loop, inner = (make_executor(b, maml)(maml, eps)[0] for b in ("loop", "inner_vmap"))
    torch.testing.assert_close(inner, loop)


@pytest.mark.filterwarnings("ignore:torch.is_autocast_cpu_enabled:DeprecationWarning")  # torch 2.3's API
def test_autocast_check_works_without_the_device_argument_of_torch_2_3(monkeypatch):
    from metatl.nn.backbones import autocast_enabled

    def no_argument():  # torch 2.3's signature
        return False

    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast itself needs the real function
        with monkeypatch.context() as patch:
            patch.setattr(torch, "is_autocast_enabled", no_argument)
            assert autocast_enabled("cpu") is True  # from torch.is_autocast_cpu_enabled()
    monkeypatch.setattr(torch, "is_autocast_enabled", no_argument)
    assert autocast_enabled("cpu") is False and autocast_enabled("cuda") is False


def _papers_order(blocks, x, pool_after):
    """conv -> BN (batch statistics) -> ReLU -> [2x2 max-pool], written out with the functional ops."""
    convs = [m for m in blocks if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in blocks if isinstance(m, torch.nn.BatchNorm2d)]
    for i, (conv, bn) in enumerate(zip(convs, norms)):
        x = F.conv2d(x, conv.weight, conv.bias, padding=conv.padding)
        x = F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True))
        if pool_after(i):
            x = F.max_pool2d(x, 2)
    return x


@pytest.mark.parametrize("net", ["conv4_pool", "conv4_relation"])
def test_relu_after_the_pool_equals_the_papers_order(net):
    torch.manual_seed(0)
    if net == "conv4_pool":
        model, pool_after = conv4_pool(out_features=0, bn_mode="batch", filters=8), (lambda i: True)
    else:
        model, pool_after = RelationEmbedding(filters=8, bn_mode="batch"), (lambda i: i < 2)
    model = model.double()
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        torch.nn.init.uniform_(bn.weight, -1, 1)  # negative scales too: BN must stay before the pool
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    ours = model.features(x)
    ref = _papers_order(model.features, x, pool_after)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * w).sum(), list(model.parameters()))
    g_ref = torch.autograd.grad((ref * w).sum(), list(model.parameters()))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [28, 7, 5])
def test_max_pool_equals_torchs_with_ties_and_second_derivatives(size):
    """metatl's MaxPool2d (channels-last kernel, max_unpool2d backward) against F.max_pool2d: the
    same outputs, the same gradient where a window's maximum is tied (binary images, as Omniglot's;
    the first maximum gets it), the same second derivatives, odd sizes included."""
    from metatl.nn import MaxPool2d

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (3, 4, size, size), generator=g).double().requires_grad_()
    ours, ref = MaxPool2d(2)(x), F.max_pool2d(x, 2)
    assert "MaxPoolChannelsLast" in type(ours.grad_fn).__name__  # the fast path ran
    assert torch.equal(ours, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64, requires_grad=True)
    (grad_ours,) = torch.autograd.grad((ours * w).sum(), x, create_graph=True)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), x, create_graph=True)
    assert torch.equal(grad_ours, grad_ref)
    assert (grad_ref.flatten(1).ne(0).sum(1) == ref[0].numel()).all()  # one entry per window, ties or not
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (second_ours,) = torch.autograd.grad((grad_ours * v).sum(), w)
    (second_ref,) = torch.autograd.grad((grad_ref * v).sum(), w)
    assert torch.equal(second_ours, second_ref)
    assert torch.autograd.gradgradcheck(
        MaxPool2d(2), (torch.randn(2, 3, size, size, dtype=torch.float64, generator=g, requires_grad=True),)
    )


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_max_pool_gradient_for_other_layouts_and_bfloat16(layout):
    from metatl.nn import MaxPool2d

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 3, (2, 8, 7, 7), generator=g).double()
    x = base.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else base.transpose(2, 3)
    for dtype in (torch.float64, torch.bfloat16):
        xd = x.to(dtype).detach().requires_grad_()  # a leaf in the layout of x
        ref = xd.detach().clone().requires_grad_()
        assert xd.stride() == x.stride() and ref.stride() == x.stride()
        w = torch.randn(2, 8, 3, 3, generator=g).to(dtype)
        (MaxPool2d(2)(xd) * w).sum().backward()
        (F.max_pool2d(ref, 2) * w).sum().backward()
        assert xd.grad.dtype == dtype and torch.equal(xd.grad, ref.grad), (layout, dtype)


def test_max_pool_keeps_channels_last_and_is_plain_under_vmap():
    from metatl.nn import MaxPool2d

    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    y = MaxPool2d(2)(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, F.max_pool2d(x, 2))
    assert MaxPool2d(2)(x.contiguous()).is_contiguous()
    tasks = torch.randn(3, 2, 8, 6, 6)
    torch.testing.assert_close(
        torch.func.vmap(MaxPool2d(2))(tasks), F.max_pool2d(tasks.flatten(0, 1), 2).view(3, 2, 8, 3, 3)
    )


def test_pixels_backbone_flattens_and_resizes():
    from metatl.nn import pixels

    x = torch.rand(3, 1, 28, 28)
    same = pixels(image_size=28)
    assert same.embedding_dim == 784 and torch.equal(same(x), x.flatten(1))
    small = pixels(image_size=28, size=20)
    out = small(x)
    assert out.shape == (3, 400) and small.embedding_dim == 400 and not list(small.parameters())
    flat = torch.ones(2, 1, 28, 28)  # a constant image stays constant after resizing
    torch.testing.assert_close(small(flat), torch.ones(2, 400))
    with pytest.raises(ValueError, match="image batches"):
        small(torch.rand(3, 784))


def test_batch_stats_norm_equals_torch_batchnorm_and_keeps_its_state_dict():
    """Outside torch.func it is the fused kernel; inside (grad, vmap) its elementary operations
    must give the same values and gradients as torch's BatchNorm under plain autograd."""
    from metatl.nn import BatchStatsNorm2d

    torch.manual_seed(0)
    ours, ref = BatchStatsNorm2d(3).double(), torch.nn.BatchNorm2d(3, track_running_stats=False).double()
    torch.nn.init.uniform_(ref.weight, -1, 1)
    torch.nn.init.uniform_(ref.bias, -1, 1)
    ours.load_state_dict(ref.state_dict())  # same keys: checkpoints of either load into the other
    ours.eval(), ref.eval()  # no running statistics: batch statistics in eval mode too
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y_ref = ref(x)
    torch.testing.assert_close(ours(x), y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(ours)(x[None])[0], y_ref, rtol=0, atol=1e-12)

    def objective(x, w, b):
        return (torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,)) * wt).sum()

    g_ours = torch.func.grad(objective, argnums=(0, 1, 2))(x.detach(), ours.weight.detach(), ours.bias.detach())
    g_ref = torch.autograd.grad((y_ref * wt).sum(), [x, ref.weight, ref.bias])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    xb = x.detach().float().bfloat16()  # low precision: float32 statistics, result in the input's dtype
    out = torch.func.vmap(BatchStatsNorm2d(3))(xb[None])[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.batch_norm(xb.float(), None, None, training=True), rtol=0, atol=0.02)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ours(torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("executor", ["loop", "inner_vmap"])
def test_second_order_maml_through_the_max_pool_net_equals_torchs_pool(executor):
    """The meta-gradient of second-order MAML on conv4_pool (support sets differentiated twice
    through the pools) is the same with metatl's MaxPool2d as with torch.nn.MaxPool2d."""
    import copy

    from metatl.data.episode import Episode
    from metatl.engine.executors import make_executor
    from metatl.meta import MAML
    from metatl.nn import MaxPool2d

    torch.manual_seed(0)
    ours = conv4_pool(out_features=3, filters=4, image_size=16).double()
    theirs = copy.deepcopy(ours)
    swapped = [i for i, m in enumerate(theirs.features) if isinstance(m, MaxPool2d)]
    for i in swapped:
        theirs.features[i] = torch.nn.MaxPool2d(2)
    assert len(swapped) == 4
    g = torch.Generator().manual_seed(0)
    eps = [
        Episode(
            torch.randint(0, 2, (3, 1, 16, 16), generator=g).double(),
            torch.arange(3),
            torch.randint(0, 2, (6, 1, 16, 16), generator=g).double(),
            torch.arange(3).repeat(2),
        )
        for _ in range(2)
    ]
    grads = []
    for model in (ours, theirs):
        maml = MAML(model, inner_lr=0.5, inner_steps=2)
        loss, _ = make_executor(executor, maml)(maml, eps)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for (name, _), a, b in zip(ours.named_parameters(), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_batch_stats_norm_equals_the_conv_and_batchnorm_layers(stride, channels):
    """BatchNorm of a convolution folded into the convolution (the moments of the input patches):
    the outputs and every gradient of ``norm(conv(x))`` in float64, the input's included, and the
    conv bias's exactly zero (BatchNorm cancels it)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 6, 3, stride=stride, padding=1).double()
    norm = BatchStatsNorm2d(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.normal_()
    x = (torch.rand(5, channels, 9, 9, dtype=torch.float64) + 3.0).requires_grad_()  # a mean far from 0
    target = torch.randn(5, 6, (9 + stride - 1) // stride, (9 + stride - 1) // stride, dtype=torch.float64)
    params = [x, conv.weight, norm.weight, norm.bias]
    reference = norm(conv(x))
    grads_ref = torch.autograd.grad((reference * target).sum().square(), params)
    folded = conv_batch_stats_norm(x, conv, norm)
    torch.testing.assert_close(folded, reference, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((folded * target).sum().square(), params + [conv.bias])
    for name, a, b in zip(["x", "conv.weight", "norm.weight", "norm.bias"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert torch.equal(grads[-1], torch.zeros(6, dtype=torch.float64))


def test_conv_batch_stats_norm_refuses_grouped_convolutions():
    with pytest.raises(ValueError, match="groups=1"):
        conv_batch_stats_norm(torch.rand(2, 2, 5, 5), torch.nn.Conv2d(2, 4, 3, groups=2), BatchStatsNorm2d(4))


@pytest.mark.parametrize("factory", [conv4_stride, conv4_pool])
def test_conv_nets_fold_the_first_batchnorm_for_grey_scale_float_input_only(factory, monkeypatch):
    """The fold runs for one-channel float32/float64 input with ``bn_mode`` batch; not for three
    channels, other modes, ``fast=False`` or under autocast. Same outputs either way."""
    calls = []
    fused = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda x, *a, **k: calls.append(1) or fused(x, *a, **k))

    def count(model, x):
        calls.clear()
        out = model(x)
        return len(calls), out

    torch.manual_seed(0)
    grey = torch.rand(6, 1, 28, 28)
    folding = factory(filters=8)
    plain = factory(filters=8, fast=False)
    plain.load_state_dict(folding.state_dict())
    n, out = count(folding, grey)
    assert n == 3 and folding.fold_first_norm  # the 3 BatchNorm layers after the first
    n, out_plain = count(plain, grey)
    assert n == 4
    torch.testing.assert_close(out, out_plain, rtol=1e-4, atol=1e-5)
    assert count(factory(filters=8, in_channels=3), torch.rand(6, 3, 28, 28))[0] == 4
    assert count(factory(filters=8, bn_mode="running"), grey)[0] == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert count(folding, grey)[0] == 4
    assert count(folding, grey)[0] == 3
    assert count(folding.double(), grey.double())[0] == 3
    assert count(folding.bfloat16(), grey.bfloat16())[0] == 4


def test_pool_net_refuses_images_too_small_for_four_poolings():
    with pytest.raises(ValueError, match="image_size must be at least 16, got 8"):
        conv4_pool(image_size=8)
    assert conv4_pool(out_features=2, filters=2, image_size=16)(torch.zeros(1, 1, 16, 16)).shape == (1, 2)
