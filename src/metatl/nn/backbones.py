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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import BACKBONES
from .fast import (  # noqa: F401
    BatchStatsNorm2d,
    MaxPool2d,
    _compiling,
    _in_func_transform,
    _transforms_active,
    autocast_enabled,
    conv_batch_stats_norm,
    first_block,
    fold_batch_stats_norm,
    to_channels_last,
)

BN_MODES = ("batch", "running", "none")
FOLD_MAX_PATCH = 9  # input patch size up to which ConvNet folds its first BatchNorm (1 channel, 3 x 3)


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

    ``fast=True`` (the default) runs the same function through the kernels of :mod:`metatl.nn.fast`:
    the input in the channels-last layout outside ``torch.func`` transforms (oneDNN's CPU
    convolutions are faster so for batches of tens of images) and the convolution kernels stored
    so too (as are the adapted kernels derived from them, which each convolution would otherwise
    convert), the channels-last max-pool, and,
    with ``bn_mode="batch"``, one input channel and float32 or float64 outside autocast, the first
    convolution and BatchNorm computed as one convolution (:func:`conv_batch_stats_norm`), on CPUs
    with its ReLU (and pool) as one C kernel (:func:`metatl.nn.fast.first_block`). Those modules are
    then not called as modules, so hooks on them do not run; ``fast=False`` runs every layer as it
    is. Parameters, buffers and their names are the same either way.
    ``input_check`` (default ``None``): a callable run on each input batch before anything else
    (:func:`metatl.build.load_learner` sets one that checks the image shape).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        filters: int = 64,
        variant: str = "stride",
        bn_mode: str = "batch",
        image_size: int = 28,
        fast: bool = True,
    ):
        super().__init__()
        if variant not in ("stride", "pool"):
            raise ValueError(f"unknown conv variant {variant!r}; use 'stride' or 'pool'.")
        if variant == "pool" and image_size < 16:
            raise ValueError(
                f"the max-pool conv net halves the image four times, so image_size must be at least 16, "
                f"got {image_size}; resize the images (data.image_size) or use conv4_stride."
            )
        blocks, c, size = [], in_channels, image_size
        for _ in range(4):
            if variant == "stride":
                blocks += [nn.Conv2d(c, filters, 3, stride=2, padding=1), _norm(filters, bn_mode), nn.ReLU()]
                size = (size + 1) // 2
            else:
                # ReLU after the pool: max and ReLU commute (ReLU is monotone), so the outputs and
                # gradients are those of conv-BN-ReLU-pool, with the ReLU on a quarter of the values
                blocks += [
                    nn.Conv2d(c, filters, 3, padding=1),
                    _norm(filters, bn_mode),
                    MaxPool2d(2) if fast else nn.MaxPool2d(2),
                    nn.ReLU(),
                ]
                size = size // 2
            c = filters
        self.features = nn.Sequential(*blocks)
        self.variant = variant
        self.embedding_dim = filters if variant == "stride" else filters * size * size
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else nn.Identity()
        self.fast = fast
        if fast:  # the kernels in the layout of the inputs, so that no convolution converts them
            self.to(memory_format=torch.channels_last)
        # the first block's BatchNorm folded into its convolution when the input patches are small
        self.fold_first_norm = fast and bn_mode == "batch" and in_channels * 9 <= FOLD_MAX_PATCH
        self.input_check = None

    def embed(self, x: Tensor) -> Tensor:
        if self.input_check is not None:
            self.input_check(x)
        if self.fast:
            x = to_channels_last(x)  # not inside vmap, which keeps its own layout
        if self.fold_first_norm and x.dtype in (torch.float32, torch.float64) and not autocast_enabled(x.device.type):
            weight, bias = fold_batch_stats_norm(x, self.features[0], self.features[1])
            h = first_block(x, weight, bias, pool=self.variant == "pool")
            if h is None:
                conv = self.features[0]
                h = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)
                rest = 2
            else:
                rest = 4 if self.variant == "pool" else 3  # past the ReLU
            for layer in itertools.islice(self.features, rest, None):
                h = layer(h)
        else:
            h = self.features(x)
        return h.mean(dim=(2, 3)) if self.variant == "stride" else h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


@BACKBONES.register("conv4_stride")
def conv4_stride(
    in_channels: int = 1,
    out_features: int = 5,
    bn_mode: str = "batch",
    image_size: int = 28,
    filters: int = 64,
    fast: bool = True,
    **_,
) -> nn.Module:
    """MAML's Omniglot net: 4 x (3x3 conv stride 2, BN, ReLU), mean over space, linear head."""
    return ConvNet(in_channels, out_features, filters, "stride", bn_mode, image_size, fast)


@BACKBONES.register("conv4_pool")
def conv4_pool(
    in_channels: int = 1,
    out_features: int = 5,
    bn_mode: str = "batch",
    image_size: int = 28,
    filters: int = 64,
    fast: bool = True,
    **_,
) -> nn.Module:
    """The Prototypical Networks net: 4 x (3x3 conv, BN, ReLU, 2x2 max-pool), linear head."""
    return ConvNet(in_channels, out_features, filters, "pool", bn_mode, image_size, fast)


class Pixels(nn.Module):
    """Raw pixels as the features: images ``(n, c, S, S)``, resized to ``size`` x ``size`` when
    ``size`` differs from ``S`` (bilinear, antialiased), then flattened to ``(n, c * size * size)``.
    No parameters. The MANN paper fed Omniglot this way, at 20 x 20."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, size: int = 0):
        super().__init__()
        self.size = size or image_size
        self.embedding_dim = in_channels * self.size * self.size

    def embed(self, x: Tensor) -> Tensor:
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
