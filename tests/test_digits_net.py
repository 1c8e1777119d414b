"""The digits CNN's fast path and its dropout: the same function as the plain layers, checked
against a hand-written forward pass (float64), and dropout masks with the right law."""

import pytest
import torch
import torch.nn.functional as F

from metatl.nn.digits import DigitsCNN
from metatl.nn.dropout import Dropout, dropout, keep_mask

NAMES = [
    "features.0.weight",
    "features.0.bias",
    "features.2.weight",
    "features.2.bias",
    "features.7.weight",
    "features.7.bias",
    "head.weight",
    "head.bias",
]


def reference(net: DigitsCNN, x):
    """The net as first written: conv, ReLU, conv, ReLU, max-pool, flatten (N, C, H, W order),
    linear, ReLU, head (eval mode: no dropout)."""
    f = net.features
    h = F.relu(F.conv2d(F.relu(F.conv2d(x, f[0].weight, f[0].bias)), f[2].weight, f[2].bias))
    h = F.max_pool2d(h, 2).flatten(1)
    return F.linear(F.relu(F.linear(h, f[7].weight, f[7].bias)), net.head.weight, net.head.bias)


@pytest.mark.parametrize("fast", [True, False])
def test_digits_cnn_computes_the_reference_net(fast):
    torch.manual_seed(0)
    net = DigitsCNN(image_size=20, fast=fast).double().eval()
    assert list(net.state_dict()) == NAMES  # checkpoints of either version load
    x = torch.randn(6, 1, 20, 20, dtype=torch.float64)
    x[:, :, :4] = 0.0  # a blank band: tied maxima in the pooled windows
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = net(xa), reference(net, xb)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = list(net.parameters())
    got = torch.autograd.grad(out, [xa, *params], g)
    want = torch.autograd.grad(ref, [xb, *params], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fast_digits_cnn_keeps_the_pooled_map_channels_last():
    net = DigitsCNN().eval()
    seen = []
    net.features[5].register_forward_hook(
        lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last))
    )
    net(torch.randn(3, 1, 28, 28))
    assert seen == [True]


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_keeps_each_value_with_probability_1_minus_p_and_scales_as_pytorch(p):
    torch.manual_seed(0)
    x = torch.rand(800, 800) + 0.5  # no zeros: a zero output means a dropped value
    y = dropout(x, p)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    # neighbours in memory are independent: both kept with probability (1 - p)^2
    both = (kept.flatten()[1:] & kept.flatten()[:-1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * (((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5)
    scale = torch.ones(()).div_(1 - p)  # 1 / (1 - p) in float32, as PyTorch's dropout scales
    torch_y = F.dropout(x, p, training=True)
    torch.testing.assert_close(torch_y[torch_y != 0], x[torch_y != 0] * scale, rtol=0, atol=0)
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=0, atol=0)
    x.requires_grad_()
    torch.manual_seed(1)
    y = dropout(x, p)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() * scale, rtol=0, atol=0)


def test_dropout_is_seeded_follows_the_layout_and_falls_back():
    x = torch.randn(8, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    a = dropout(x, 0.25)
    torch.manual_seed(3)
    b = dropout(x, 0.25)
    assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
    mask = keep_mask(x, 0.75)
    assert mask.shape == x.shape and mask.stride() == x.stride()
    # p not a multiple of 1/256: PyTorch's own dropout, draw for draw
    torch.manual_seed(4)
    c = dropout(x, 0.3)
    torch.manual_seed(4)
    torch.testing.assert_close(c, F.dropout(x, 0.3, training=True), rtol=0, atol=0)
    layer = Dropout(0.5).eval()
    assert layer(x) is x and dropout(x, 0.5, training=False) is x
