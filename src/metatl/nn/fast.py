"""Faster kernels for the conv nets and the functional view of a module, in one place. The conv
nets use them with ``fast=True`` (``model.fast``, the default); each computes the same function as
the plain layers (tests in float64), and none changes parameters, buffers or their names, so
checkpoints load either way.

- :func:`conv_batch_stats_norm`: the first convolution and BatchNorm (batch statistics) of a
  grey-scale net as one convolution, from the moments of the input patches;
- :func:`first_block`: that convolution with its ReLU (and the max-pool net's pool between them)
  as one C kernel on CPUs (:mod:`metatl.nn.native`), so that the full-size convolution output is
  never stored; also inside ``torch.func`` transforms (vmap over tasks with per-task weights,
  grad, jvp), as MAML's inner loops run;
- :class:`BatchStatsNorm2d`: BatchNorm over the batch's statistics, computed with elementary
  operations inside ``torch.func`` transforms, where PyTorch's fused kernel differentiates wrongly
  twice (used with ``bn_mode="batch"`` whatever ``fast`` is: it is about exactness);
- :class:`MaxPool2d` and :func:`to_channels_last`: the channels-last layout on CPUs, where oneDNN's
  convolutions and PyTorch's pooling kernel are vectorised over channels;
- :func:`functional_call`: ``torch.func.functional_call`` with the module tree walked once per tree
  instead of twice per call.
"""

from __future__ import annotations

import ctypes
import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call as _torch_functional_call

from metatl.nn import native


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


def to_channels_last(x: Tensor) -> Tensor:
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


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no per-device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch 2.3
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


class BatchStatsNorm2d(nn.BatchNorm2d):
    """BatchNorm over the statistics of the current batch, with no running statistics: the same
    function, parameters and state-dict keys as ``nn.BatchNorm2d(C, track_running_stats=False)``,

        y = (x - mean) / sqrt(var + eps) * weight + bias,  mean and biased var over (N, H, W).

    PyTorch's fused batch_norm gives wrong gradients when it is differentiated twice under
    ``torch.func.vmap`` (its backward's batching rule for the input gradient;
    pytorch/functorch#534, still so in torch 2.13), which is what MAML's meta-batch as one vmap over
    tasks does. Inside ``torch.func`` transforms (and ``torch.compile``) this layer therefore
    computes the formula with elementary operations, whose rules are exact (and faster there);
    elsewhere it calls the fused kernel, which is faster under plain autograd (docs/performance.md)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchStatsNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}.")
        if not _in_func_transform(x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # statistics in float32, as the fused kernel
            x = x.float()
        # Sums times 1/n rather than means, a product rather than square(), and scale * weight per
        # channel: their backward and double backward make fewer full-size passes.
        dims, inv_n = (0, 2, 3), 1.0 / (x.shape[0] * x.shape[2] * x.shape[3])
        centred = x - x.sum(dim=dims, keepdim=True) * inv_n
        scale = torch.rsqrt((centred * centred).sum(dim=dims, keepdim=True) * inv_n + self.eps)
        y = torch.addcmul(self.bias.view(1, -1, 1, 1), centred, scale * self.weight.view(1, -1, 1, 1))
        return y.to(dtype)


def fold_batch_stats_norm(x: Tensor, conv: nn.Conv2d, norm: BatchStatsNorm2d) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution that computes ``norm(conv(x))``, for a convolution
    with few input channels.

    BatchNorm with the batch's statistics is an affine map per channel, and the mean and variance
    of a convolution's output follow from the first two moments of its input patches (the
    ``C_in x k x k`` windows the kernel sees, zero padding included): with ``mu`` their mean and
    ``Sigma`` their (biased) covariance over the batch and positions, output channel ``c`` of
    weight ``w_c`` and bias ``b_c`` has ``mean_c = w_c . mu + b_c`` and ``var_c = w_c' Sigma w_c``,
    so that

        norm(conv(x)) = conv(x, s * w) + s * (b - mean) + beta,   s = gamma / sqrt(var + eps).

    For grey-scale images the patches have 9 values: their moments (summed in C where the kernels
    of :mod:`metatl.nn.native` are built) cost little beside the convolution, and the full-size
    passes of BatchNorm's forward and backward (and, for second-order MAML, of their derivatives)
    go away (measurements: docs/performance.md). The same function as the two layers (tests in
    float64). The conv bias cancels, and gets a zero gradient. The statistics are those of ``x``:
    the weights are for this batch only."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(
            f"fold_batch_stats_norm needs a convolution with groups=1 and zero padding, got "
            f"groups={conv.groups}, padding_mode={conv.padding_mode!r}; run the two layers instead."
        )
    # C_in k k, from the shape: indexing the (shared) weight under task threads would take its
    # autograd lock while holding the GIL, which deadlocked against a thread doing the reverse
    moments = _native_patch_moments(x, conv)
    if moments is None:
        size = math.prod(conv.weight.shape[1:])
        windows = torch.eye(size, dtype=x.dtype, device=x.device).view(size, *conv.weight.shape[1:])
        # each output position's input window, by a convolution with one-hot kernels (faster than
        # unfold), as the rows of a (N H' W', C_in k k) matrix
        patches = F.conv2d(x, windows, None, conv.stride, conv.padding, conv.dilation)
        patches = patches.permute(0, 2, 3, 1).reshape(-1, size)
        inv_n = 1.0 / patches.shape[0]
        mu = patches.sum(dim=0) * inv_n
        centred = patches - mu
        moments = mu, (centred.T @ centred) * inv_n
    mu, sigma = moments
    w = conv.weight.flatten(1)
    var = ((w @ sigma) * w).sum(dim=1)
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.bias)
    shift = scale * (bias - (w @ mu + bias)) + norm.bias
    return conv.weight * scale.view(-1, 1, 1, 1), shift


def _summed(parts: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """The sums over the pieces of a :func:`metatl.nn.native.split` call of its tensors, position by
    position."""
    return tuple(sum(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]


def _native_patch_moments(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor] | None:
    """The mean and (biased) covariance of the 3x3 patches of grey-scale images ``x`` at the output
    positions of ``conv`` (padding 1, stride 1 or 2), summed in C (kernels.c, ``moments``) in
    float64; ``None`` where that does not apply (then the caller computes them with PyTorch): no
    compiled kernels, not on the CPU, ``x`` needing a gradient or inside ``torch.func``
    transforms, other shapes, dtypes or convolutions."""
    if (
        x.dim() != 4
        or x.shape[1] != 1
        or tuple(conv.weight.shape[1:]) != (1, 3, 3)
        or tuple(conv.padding) != (1, 1)
        or tuple(conv.dilation) != (1, 1)
        or tuple(conv.stride) not in ((1, 1), (2, 2))
        or x.dtype not in (torch.float32, torch.float64)
        or x.device.type != "cpu"
        or x.requires_grad
        or _in_func_transform(x)
        or _transforms_active()
        or native.library() is None
    ):
        return None
    images, (h, w), stride = _images(x), x.shape[-2:], conv.stride[0]
    function, ptr = native.function("moments", x.dtype), native.pointer
    sizes = [ctypes.c_int64(v) for v in (h, w, stride)]

    def sums(n0: int, n1: int) -> tuple[Tensor, Tensor]:
        s, g = torch.empty(9, dtype=torch.float64), torch.empty(9, 9, dtype=torch.float64)
        function(ptr(images), ptr(s), ptr(g), ctypes.c_int64(n0), ctypes.c_int64(n1), *sizes)
        return s, g

    s, g = _summed(native.split(x.shape[0], sums))
    count = x.shape[0] * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    mu = s / count
    sigma = g / count - torch.outer(mu, mu)
    return mu.to(x.dtype), sigma.to(x.dtype)


def conv_batch_stats_norm(x: Tensor, conv: nn.Conv2d, norm: BatchStatsNorm2d) -> Tensor:
    """``norm(conv(x))`` as one convolution with the weights of :func:`fold_batch_stats_norm`."""
    weight, bias = fold_batch_stats_norm(x, conv, norm)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)


class _MaxPoolChannelsLast(torch.autograd.Function):
    """Max-pooling over non-overlapping windows through PyTorch's channels-last CPU kernel
    (vectorised over channels); the backward scatters with ``max_unpool2d``, which is itself
    differentiable, so the result can be differentiated twice (second-order MAML)."""

    @staticmethod
    def forward(ctx, x, kernel_size):
        y, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, return_indices=True)
        # the indices stay channels-last: max_unpool2d scatters a channels-last gradient fastest
        # with them so, and converting them would cost a copy here and another one there
        ctx.save_for_backward(indices)
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
    (N, C, H, W) layout is not vectorised (measurements: docs/performance.md). Inside
    ``torch.func`` transforms, under ``torch.compile`` and off the CPU it is plain ``F.max_pool2d``."""

    def __init__(self, kernel_size: int):
        super().__init__(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.device.type != "cpu" or _in_func_transform(x) or _transforms_active():
            return super().forward(x)
        return _MaxPoolChannelsLast.apply(x, self.kernel_size)


# -- the first block of a grey-scale conv net, fused -----------------------------------------------
# conv 3x3 (one input channel, padding 1) with its folded BatchNorm, then ReLU, in C (kernels.c,
# native.py), with the max-pool net's 2x2 max-pool between them: the full-size convolution output is
# never written, read, zeroed or scattered into. With idx the window each output comes from, or
# "dead" where the ReLU gave 0 (it does not change under small changes of the weights),
#   y = conv_at(weight, bias; idx),  and the adjoint of conv_at in (weight, bias) is wgrad_at(g; idx),
# so the backward of either is the other: differentiable any number of times, and the second
# derivative in (weight, bias) is zero, as the layers' is (max-pool and ReLU are piecewise linear).


def _images(x: Tensor) -> Tensor:
    """(..., 1, H, W) images as one contiguous (n, H, W) batch."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _kernel(name: str, x: Tensor, *tensors: Tensor, windows: int, channels: int):
    """``part(n0, n1, *more)``: the C function ``name`` on the images ``[n0, n1)`` of the tasks'
    images ``x`` (T, N, 1, H, W), with the pointers of ``tensors`` (and ``more``) after the images'
    and the sizes after the range (each task's images use its own slice of the weights)."""
    images, (h, w) = _images(x), x.shape[-2:]
    function, ptr = native.function(name, x.dtype), native.pointer
    sizes = [ctypes.c_int64(v) for v in (h, w, channels, windows, x.shape[1])]

    def part(n0: int, n1: int, *more: Tensor) -> None:
        function(ptr(images), *map(ptr, tensors + more), ctypes.c_int64(n0), ctypes.c_int64(n1), *sizes)

    return part


def _out_size(n: int, windows: int) -> int:
    return n // 2 if windows == 4 else (n + 1) // 2


def _outputs(x: Tensor, channels: int, windows: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised (T, N, Ho, Wo, C) map for the tasks' images ``x`` (T, N, 1, H, W)."""
    (t, n), (h, w) = x.shape[:2], x.shape[-2:]
    return torch.empty(t, n, _out_size(h, windows), _out_size(w, windows), channels, dtype=dtype)


def _kernel_weights(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(T, C, 1, 3, 3), (T, C) -> the kernels' (T, 9, C) weights and contiguous biases."""
    return weight.flatten(2).transpose(1, 2).contiguous(), bias.contiguous()


def _wgrad_at(x: Tensor, idx: Tensor, grad: Tensor, windows: int) -> tuple[Tensor, Tensor]:
    """Each task's weight and bias gradients, (T, C, 1, 3, 3) and (T, C), from its map's ``grad``."""
    t, c = x.shape[0], grad.shape[2]
    rows = grad.permute(0, 1, 3, 4, 2).contiguous()  # (T, N, Ho, Wo, C): no copy when channels-last
    part = _kernel("wgrad_at", x, rows, idx.contiguous(), windows=windows, channels=c)

    def sums(n0, n1):
        gw, gb = torch.zeros(t, 9, c, dtype=torch.float64), torch.zeros(t, c, dtype=torch.float64)
        part(n0, n1, gw, gb)
        return gw, gb

    gw, gb = _summed(native.split(t * x.shape[1], sums))
    return gw.transpose(1, 2).reshape(t, c, 1, 3, 3).to(x.dtype), gb.to(x.dtype)


def _task_vmap(function, info, in_dims, tensors, rest):
    """The vmap rule of the functions below, which take a leading task dimension already: the
    vmapped dimension joins it (an unbatched input is shared by every task), one call for all."""
    flat = []
    for v, d in zip(tensors, in_dims):
        v = v.expand(info.batch_size, *v.shape) if d is None else v.movedim(d, 0)
        flat.append(v.flatten(0, 1))
    out = function.apply(*flat, *rest)
    unflat = lambda v: v.unflatten(0, (info.batch_size, -1))  # noqa: E731
    if isinstance(out, tuple):
        return tuple(map(unflat, out)), (0,) * len(out)
    return unflat(out), 0


# The three functions take the images, weights and maps of T tasks at once (x: (T, N, 1, H, W),
# weight: (T, C, 1, 3, 3), bias: (T, C), maps (T, N, C, Ho, Wo) stored channels-last), so that
# under vmap over tasks each is one autograd node, one output tensor and one C call. They have no
# derivative with respect to the images (first_block refuses images that need one).


def _conv_at_tangent(ctx, weight_t: Tensor | None, bias_t: Tensor | None) -> Tensor:
    """The forward-mode derivative of the block and of _ConvAt (both linear in the weights at
    fixed windows): _ConvAt of the weights' tangents, zero where a tangent is absent."""
    x, idx, weight, bias = ctx.saved_tensors
    weight_t = torch.zeros_like(weight) if weight_t is None else weight_t
    bias_t = torch.zeros_like(bias) if bias_t is None else bias_t
    return _ConvAt.apply(x, idx, weight_t, bias_t, ctx.windows)


class _WeightGradAt(torch.autograd.Function):
    """grad -> (grad_weight, grad_bias) of :class:`_ConvAt`; linear in grad."""

    @staticmethod
    def forward(x, idx, grad, windows):
        return _wgrad_at(x, idx, grad, windows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, idx, _, ctx.windows = inputs
        ctx.save_for_backward(x, idx)
        ctx.save_for_forward(x, idx)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        x, idx = ctx.saved_tensors
        return None, None, _ConvAt.apply(x, idx, grad_weight, grad_bias, ctx.windows), None

    @staticmethod
    def jvp(ctx, x_t, idx_t, grad_t, _):
        return _WeightGradAt.apply(*ctx.saved_tensors, grad_t, ctx.windows)

    @staticmethod
    def vmap(info, in_dims, x, idx, grad, windows):
        return _task_vmap(_WeightGradAt, info, in_dims[:3], (x, idx, grad), (windows,))


class _ConvAt(torch.autograd.Function):
    """(weight, bias) -> the convolution at the windows ``idx`` picks, 0 where it is dead; linear."""

    @staticmethod
    def forward(x, idx, weight, bias, windows):
        c = weight.shape[1]
        y = _outputs(x, c, windows, x.dtype)
        part = _kernel("conv_at", x, *_kernel_weights(weight, bias), idx.contiguous(), y, windows=windows, channels=c)
        native.split(x.shape[0] * x.shape[1], part)
        return y.permute(0, 1, 4, 2, 3)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, idx, weight, bias, ctx.windows = inputs
        ctx.save_for_backward(x, idx)
        ctx.save_for_forward(x, idx, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, idx = ctx.saved_tensors
        return None, None, *_WeightGradAt.apply(x, idx, grad, ctx.windows), None

    @staticmethod
    def jvp(ctx, x_t, idx_t, weight_t, bias_t, _):
        return _conv_at_tangent(ctx, weight_t, bias_t)

    @staticmethod
    def vmap(info, in_dims, x, idx, weight, bias, windows):
        return _task_vmap(_ConvAt, info, in_dims[:4], (x, idx, weight, bias), (windows,))


class _FirstBlock(torch.autograd.Function):
    """relu([max_pool2d(] conv2d(x, weight, bias, padding=1[, stride=2]) [, 2)]) and the window
    each output comes from (``idx``, not differentiable); no gradient for x."""

    @staticmethod
    def forward(x, weight, bias, windows):
        c = weight.shape[1]
        y, idx = _outputs(x, c, windows, x.dtype), _outputs(x, c, windows, torch.uint8)
        part = _kernel("block", x, *_kernel_weights(weight, bias), y, idx, windows=windows, channels=c)
        native.split(x.shape[0] * x.shape[1], part)
        return y.permute(0, 1, 4, 2, 3), idx

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.windows = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for idx at each backward
        ctx.save_for_backward(x, output[1])
        ctx.save_for_forward(x, output[1], weight, bias)

    @staticmethod
    def backward(ctx, grad, _):
        if grad is None:
            return None, None, None, None
        x, idx = ctx.saved_tensors
        return None, *_WeightGradAt.apply(x, idx, grad, ctx.windows), None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _):
        return _conv_at_tangent(ctx, weight_t, bias_t), None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, windows):
        return _task_vmap(_FirstBlock, info, in_dims[:3], (x, weight, bias), (windows,))


def first_block(x: Tensor, weight: Tensor, bias: Tensor, pool: bool) -> Tensor | None:
    """The first block of a grey-scale conv net in one pass, channels-last:
    ``relu(max_pool2d(conv2d(x, weight, bias, padding=1), 2))`` with ``pool``, else
    ``relu(conv2d(x, weight, bias, stride=2, padding=1))``; the same values, gradients for weight
    and bias to float rounding, on ties the first maximum of a window (as PyTorch's max-pool).
    Inside ``torch.func`` transforms too (vmap, grad, jvp in the weights). ``None`` where the
    fused kernel does not apply (then run the layers): no compiled kernels
    (:mod:`metatl.nn.native`), not on the CPU, ``x`` needing a gradient or carrying a forward-mode
    tangent, under ``torch.compile``, other shapes or dtypes, a number of channels that is not a
    multiple of what the kernel takes at once (64 for the strided net in float32)."""
    windows = 4 if pool else 1
    if (
        x.dim() != 4
        or x.shape[1] != 1
        or tuple(weight.shape[1:]) != (1, 3, 3)
        or x.dtype not in (torch.float32, torch.float64)
        or not (x.dtype == weight.dtype == bias.dtype)
        or x.device.type != "cpu"
        or x.requires_grad
        or forward_ad.unpack_dual(x).tangent is not None
        or min(x.shape[-2:]) < 2
        or _compiling()
        or native.library() is None
        or weight.shape[0] % native.channels(x.dtype, windows)  # taken 16 to 64 at a time
    ):
        return None
    # one task; squeeze, not [0], whose backward would write the gradient into a new zero tensor
    return _FirstBlock.apply(x[None], weight[None], bias[None], windows)[0].squeeze(0)


# -- functional_call ---------------------------------------------------------------------------
# PyTorch's version walks the whole module tree on every call, twice (to find tied tensors, then to
# swap each tensor in by its dotted name); MAML calls it once per task and step, and while it runs
# it holds Python's GIL, which the task threads then wait for. Here the walk is done once per module
# tree and kept (_Plan): each dotted name is resolved to the dictionary and key it lives in, and
# tied tensors are found. Each call checks, with one light pass over the submodules' dictionaries,
# that the tree is still the same, and rebuilds the plan when it is not. Models with tied or shared
# tensors, and names that are not a parameter or buffer of the model, go to PyTorch's version.

_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _structure(module: nn.Module) -> list:
    """The identity of every submodule and of every parameter and buffer (with its name) in
    ``module``'s tree, in a fixed order: it changes when anything in the tree is replaced, added
    or removed."""
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        out.append(id(m))
        for store in (m._parameters, m._buffers):
            out.extend(store)  # the names, then the tensors' identities
            out.extend(map(id, store.values()))
        stack.extend(sub for sub in m._modules.values() if sub is not None)
    return out


class _Plan:
    """Where each parameter and buffer of a module tree lives: dotted name -> (the dictionary,
    its key); ``tied``: some tensor is reachable under two names (tied weights, a shared
    submodule). Holding the dictionaries keeps their tensors alive, so while the plan exists no new
    tensor can take an old one's identity and leave the structure looking unchanged."""

    def __init__(self, module: nn.Module, structure: list):
        self.structure = structure
        self.slots: dict[str, tuple[dict, str]] = {}
        seen = set()
        self.tied = False
        for prefix, m in module.named_modules(remove_duplicate=False):
            for store in (m._parameters, m._buffers):
                for key, t in store.items():
                    if t is None:
                        continue
                    self.slots[f"{prefix}.{key}" if prefix else key] = (store, key)
                    self.tied = self.tied or id(t) in seen
                    seen.add(id(t))


def functional_call(
    module: nn.Module, params: dict[str, Tensor], args: tuple | Tensor, kwargs: dict | None = None
) -> Tensor:
    """``module(*args, **kwargs)`` with the tensors of ``params`` (dotted names, as
    ``named_parameters()``; a subset is fine: the rest come from the module) in place of its
    parameters and buffers, which are put back afterwards. The same as
    ``torch.func.functional_call(module, params, args, kwargs, strict=False)``, including
    ``torch.func`` transforms' tensors in ``params`` and a buffer the forward pass reassigns
    (written back to ``params``)."""
    if not isinstance(args, tuple):
        args = (args,)
    if _compiling():  # traced, the plans would become guards that fail at the next call: a recompile each time
        return _torch_functional_call(module, params, args, kwargs, strict=False)
    structure = _structure(module)
    plan = _PLANS.get(module)
    if plan is None or plan.structure != structure:
        plan = _PLANS[module] = _Plan(module, structure)
    if plan.tied or any(name not in plan.slots for name in params):
        return _torch_functional_call(module, params, args, kwargs, strict=False)
    swapped = []
    try:
        for name, value in params.items():
            store, key = plan.slots[name]
            swapped.append((name, store, key, store[key], value))
            store[key] = value
        return module(*args, **(kwargs or {}))
    finally:
        for name, store, key, original, value in reversed(swapped):
            if store[key] is not value:  # reassigned by the forward pass (a buffer)
                params[name] = store[key]
            store[key] = original
