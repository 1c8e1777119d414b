"""Backbones: plain ``nn.Module`` factories, registered by name.

BatchNorm is an explicit choice, ``bn_mode``:

- ``"batch"`` (default, as the reference MAML code): normalise with the statistics of the set being
  processed, in training and at test; no running statistics are kept. At test this is transductive
  (the query set is normalised with its own statistics); the evaluator can also classify each query
  together with the support set only (``eval.transductive: false``). The layer is
  :class:`BatchStatsNorm2d`, which gives exact second-order gradients under ``torch.func.vmap``.
- ``"running"``: keep running statistics during meta-training and use them in ``eval()`` mode.
- ``"none"``: no normalisation layers.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from ..registry import BACKBONES

BN_MODES = ("batch", "running", "none")
FOLD_MAX_PATCH = 9  # input patch size up to which ConvNet folds its first BatchNorm (1 channel, 3 x 3)


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return is_compiling is not None and is_compiling()


def _in_func_transform(x) -> bool:
    """Whether ``x`` is wrapped by a ``torch.func`` transform (grad, vmap) or traced by
    ``torch.compile``. Without the private check (a future torch), answer True: the exact path."""
    if _compiling():
        return True
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return True if check is None else bool(check(x))


def _transforms_active() -> bool:
    """Whether any ``torch.func`` transform is running (even if a given tensor is not wrapped by
    it); an ``autograd.Function`` without a vmap rule must not run then. Without the private
    check (a future torch), answer True."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if check is None else bool(check())


def to_channels_last(x):
    """``x`` (N, C, H, W) stored in the channels-last layout, differentiably. Unlike
    ``x.contiguous(memory_format=torch.channels_last)`` this also restrides one-channel tensors,
    which count as channels-last contiguous already: oneDNN picks a convolution's layout from the
    strides, so a grey-scale image batch left as it is keeps every layer in the slower (N, C, H, W)
    layout. Tensors that are not 4-D, and any tensor inside ``torch.func`` transforms or
    ``torch.compile`` (where layouts are the transform's business), come back unchanged."""
    if x.dim() != 4 or _in_func_transform(x):
        return x
    if x.is_contiguous(memory_format=torch.channels_last) and (x.shape[1] > 1 or x.stride(1) == 1):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


class BatchStatsNorm2d(nn.BatchNorm2d):
    """BatchNorm over the statistics of the current batch, with no running statistics: the same
    function, parameters and state-dict keys as ``nn.BatchNorm2d(C, track_running_stats=False)``,

        y = (x - mean) / sqrt(var + eps) * weight + bias,  mean and biased var over (N, H, W).

    PyTorch's fused batch_norm gives wrong gradients when it is differentiated twice under
    ``torch.func.vmap`` (its backward's batching rule for the input gradient;
    pytorch/functorch#534, still so in torch 2.13), which is what MAML's meta-batch as one vmap over
    tasks does. Inside ``torch.func`` transforms (and ``torch.compile``) this layer therefore
    computes the formula with elementary operations, whose rules are exact (and faster there);
    elsewhere it calls the fused kernel, which is faster under plain autograd (1.3-1.7 times for
    MAML's second-order per-task loop)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"BatchStatsNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}.")
        if not _in_func_transform(x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as the fused kernel
            x = x.float()
        # Sums times 1/n rather than means, a product rather than square(), and scale * weight per
        # channel: their backward and double backward make fewer full-size passes (MAML's vmap step
        # 11% faster than the plain formula on 2 CPU threads).
        dims, inv_n = (0, 2, 3), 1.0 / (x.shape[0] * x.shape[2] * x.shape[3])
        centred = x - x.sum(dim=dims, keepdim=True) * inv_n
        scale = torch.rsqrt((centred * centred).sum(dim=dims, keepdim=True) * inv_n + self.eps)
        y = torch.addcmul(self.bias.view(1, -1, 1, 1), centred, scale * self.weight.view(1, -1, 1, 1))
        return y.to(dtype)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no per-device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch 2.3
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _observed(*modules: nn.Module) -> bool:
    """Whether a forward or backward hook would see these modules called (their own hooks or
    global ones): then they must run as modules."""
    return any(getattr(_module_hooks, "_global" + name, None) for name in _CALL_HOOKS) or any(
        getattr(m, name, None) for m in modules for name in _CALL_HOOKS)


def conv_batch_stats_norm(x, conv: nn.Conv2d, norm: BatchStatsNorm2d):
    """``norm(conv(x))`` computed as one convolution, for a convolution with few input channels.

    BatchNorm with the batch's statistics is an affine map per channel, and the mean and variance
    of a convolution's output follow from the first two moments of its input patches (the
    ``C_in x k x k`` windows the kernel sees, zero padding included): with ``mu`` their mean and
    ``Sigma`` their (biased) covariance over the batch and positions, output channel ``c`` of
    weight ``w_c`` and bias ``b_c`` has ``mean_c = w_c . mu + b_c`` and ``var_c = w_c' Sigma w_c``,
    so that

        norm(conv(x)) = conv(x, s * w) + s * (b - mean) + beta,   s = gamma / sqrt(var + eps).

    For grey-scale images the patches have 9 values: their moments cost little beside the
    convolution, and the full-size passes of BatchNorm's forward and backward (and, for
    second-order MAML, of their derivatives) go away: second-order MAML's 15-query step 10% faster
    with the strided net and 23% with the max-pool net (``benchmarks/fold_batchnorm.py``). The
    same function as the two layers (tests in float64). The conv bias cancels, and gets a zero
    gradient."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"conv_batch_stats_norm needs a convolution with groups=1 and zero padding, got "
                         f"groups={conv.groups}, padding_mode={conv.padding_mode!r}; run the two layers instead.")
    size = conv.weight[0].numel()  # C_in k k
    windows = torch.eye(size, dtype=x.dtype, device=x.device).view(size, *conv.weight.shape[1:])
    # each output position's input window, by a convolution with one-hot kernels (faster than
    # unfold), as the rows of a (N H' W', C_in k k) matrix
    patches = F.conv2d(x, windows, None, conv.stride, conv.padding, conv.dilation)
    patches = patches.permute(0, 2, 3, 1).reshape(-1, size)
    inv_n = 1.0 / patches.shape[0]
    mu = patches.sum(dim=0) * inv_n
    centred = patches - mu
    sigma = (centred.T @ centred) * inv_n
    w = conv.weight.flatten(1)
    var = ((w @ sigma) * w).sum(dim=1)
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.bias)
    shift = scale * (bias - (w @ mu + bias)) + norm.bias
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift, conv.stride, conv.padding, conv.dilation)


class _MaxPoolChannelsLast(torch.autograd.Function):
    """Max-pooling over non-overlapping windows through PyTorch's channels-last CPU kernel
    (vectorised over channels); the backward scatters with ``max_unpool2d``, which is itself
    differentiable, so the result can be differentiated twice (second-order MAML)."""

    @staticmethod
    def forward(ctx, x, kernel_size):
        y, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, return_indices=True)
        ctx.save_for_backward(indices.contiguous())
        ctx.kernel_size, ctx.input_size = kernel_size, x.shape[-2:]
        # the output in the input's layout (the conv nets' channels_last option keeps it)
        keep = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return y.contiguous(memory_format=torch.channels_last if keep else torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad_y):
        (indices,) = ctx.saved_tensors
        return F.max_unpool2d(grad_y, indices, ctx.kernel_size, output_size=ctx.input_size), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(k)`` (stride k, no padding) that is faster on CPUs: the same outputs and
    gradients (on ties, the first maximum of a window gets the gradient, as PyTorch's), computed
    through the channels-last kernel and ``max_unpool2d``. PyTorch's default kernel for the usual
    (N, C, H, W) layout is not vectorised: for a 2x2 pool of (75, 64, 28, 28), forward and backward
    took 15.5 ms against 7.6 ms this way (2 CPU threads; ``benchmarks/max_pool.py``). Inside
    ``torch.func`` transforms, under ``torch.compile`` and off the CPU it is plain ``F.max_pool2d``."""

    def __init__(self, kernel_size: int):
        super().__init__(kernel_size)

    def forward(self, x):
        if x.dim() != 4 or x.device.type != "cpu" or _in_func_transform(x) or _transforms_active():
            return super().forward(x)
        return _MaxPoolChannelsLast.apply(x, self.kernel_size)


def _norm(channels: int, bn_mode: str) -> nn.Module:
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {', '.join(BN_MODES)}.")
    if bn_mode == "none":
        return nn.Identity()
    if bn_mode == "batch":
        return BatchStatsNorm2d(channels)
    return nn.BatchNorm2d(channels)


@BACKBONES.register("mlp")
def mlp(in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (40, 40), **_) -> nn.Module:
    """The MAML sinusoid regressor: ``in -> 40 -> 40 -> out`` with ReLU."""
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Four conv blocks of ``filters`` channels and an optional linear head.

    ``stride`` variant (MAML's Omniglot net): 3x3 conv with stride 2, BatchNorm, ReLU; features
    are averaged over space (as the MAML code does). ``pool`` variant (Prototypical Networks):
    3x3 conv, BatchNorm, ReLU, 2x2 max-pool; features are flattened.
    ``out_features=0`` leaves the head off and returns the embedding (metric-based methods).
    ``channels_last=True`` runs the layers in the channels-last memory layout: the input is stored
    that way (:func:`to_channels_last`), and the convolutions, BatchNorm and max-pool keep it. The
    parameters stay in the standard layout, so that inside ``torch.func`` transforms (MAML's vmap
    over tasks, where the input is left as it is) nothing changes. Same results up to rounding;
    oneDNN's CPU convolutions are faster this way for batches of tens of images (MAML's 75-image
    query sets: 0.34 against 0.39 s for the 32 forward and backward passes, 2 CPU threads;
    ``benchmarks/maml_step_floor.py``).
    ``fold_first_norm=True`` (the default; it applies with ``bn_mode="batch"``, one input channel
    and float32 or float64 outside autocast) computes the first conv and BatchNorm as one
    convolution (:func:`conv_batch_stats_norm`): the same function, faster. Those two modules are
    then not called, so while a hook watches either of them they run as they are.
    ``input_check`` (default ``None``): a callable run on each input batch before anything else
    (:func:`metatl.engine.build.load_learner` sets one that checks the image shape); unlike a hook
    on the first convolution, it leaves the fold on.
    """

    def __init__(self, in_channels: int = 1, out_features: int = 5, filters: int = 64,
                 variant: str = "stride", bn_mode: str = "batch", image_size: int = 28,
                 channels_last: bool = False, fold_first_norm: bool = True):
        super().__init__()
        if variant not in ("stride", "pool"):
            raise ValueError(f"unknown conv variant {variant!r}; use 'stride' or 'pool'.")
        blocks, c, size = [], in_channels, image_size
        for _ in range(4):
            if variant == "stride":
                blocks += [nn.Conv2d(c, filters, 3, stride=2, padding=1), _norm(filters, bn_mode), nn.ReLU()]
                size = (size + 1) // 2
            else:
                # ReLU after the pool: max and ReLU commute (ReLU is monotone), so the outputs and
                # gradients are those of conv-BN-ReLU-pool, with the ReLU on a quarter of the values
                blocks += [nn.Conv2d(c, filters, 3, padding=1), _norm(filters, bn_mode), MaxPool2d(2),
                           nn.ReLU()]
                size = size // 2
            c = filters
        self.features = nn.Sequential(*blocks)
        self.variant = variant
        self.embedding_dim = filters if variant == "stride" else filters * size * size
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else nn.Identity()
        self.channels_last = channels_last
        # the first block's BatchNorm folded into its convolution (conv_batch_stats_norm) when
        # the input patches are small: grey-scale images
        self.fold_first_norm = fold_first_norm and bn_mode == "batch" and in_channels * 9 <= FOLD_MAX_PATCH
        self.input_check = None

    def embed(self, x):
        if self.input_check is not None:
            self.input_check(x)
        if self.channels_last:
            x = to_channels_last(x)  # not inside vmap, which keeps its own layout
        if (self.fold_first_norm and x.dtype in (torch.float32, torch.float64) and not autocast_enabled(x.device.type)
                and not _observed(self.features[0], self.features[1])):
            h = conv_batch_stats_norm(x, self.features[0], self.features[1])
            for layer in itertools.islice(self.features, 2, None):
                h = layer(h)
        else:
            h = self.features(x)
        return h.mean(dim=(2, 3)) if self.variant == "stride" else h.flatten(1)

    def forward(self, x):
        return self.head(self.embed(x))


@BACKBONES.register("conv4_stride")
def conv4_stride(in_channels: int = 1, out_features: int = 5, bn_mode: str = "batch",
                 image_size: int = 28, filters: int = 64, channels_last: bool = False,
                 fold_first_norm: bool = True, **_) -> nn.Module:
    """MAML's Omniglot net: 4 x (3x3 conv stride 2, BN, ReLU), mean over space, linear head."""
    return ConvNet(in_channels, out_features, filters, "stride", bn_mode, image_size, channels_last,
                   fold_first_norm)


@BACKBONES.register("conv4_pool")
def conv4_pool(in_channels: int = 1, out_features: int = 5, bn_mode: str = "batch",
               image_size: int = 28, filters: int = 64, channels_last: bool = False,
               fold_first_norm: bool = True, **_) -> nn.Module:
    """The Prototypical Networks net: 4 x (3x3 conv, BN, ReLU, 2x2 max-pool), linear head."""
    return ConvNet(in_channels, out_features, filters, "pool", bn_mode, image_size, channels_last,
                   fold_first_norm)


class Pixels(nn.Module):
    """Raw pixels as the features: images ``(n, c, S, S)``, resized to ``size`` x ``size`` when
    ``size`` differs from ``S`` (bilinear, antialiased), then flattened to ``(n, c * size * size)``.
    No parameters. The MANN paper fed Omniglot this way, at 20 x 20."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, size: int = 0):
        super().__init__()
        self.size = size or image_size
        self.embedding_dim = in_channels * self.size * self.size

    def embed(self, x):
        if x.dim() != 4:
            raise ValueError(f"pixels expects image batches (n, c, h, w), got shape {tuple(x.shape)}.")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x.flatten(1)

    forward = embed


@BACKBONES.register("pixels")
def pixels(in_channels: int = 1, image_size: int = 28, size: int = 0, **_) -> nn.Module:
    """No learned encoder: the flattened pixels, resized to ``size`` (0: keep ``image_size``)."""
    return Pixels(in_channels, image_size, size)
