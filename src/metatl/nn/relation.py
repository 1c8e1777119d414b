"""The Relation Network's two modules (Sung et al., CVPR 2018, Fig. 2 and the official code).

- ``conv4_relation`` (registered backbone), the embedding ``f_phi``: four blocks of 3x3 conv
  (``filters`` channels), BatchNorm, ReLU; the first two unpadded and followed by 2x2 max-pool,
  the last two padded. It returns feature maps ``(n, filters, s, s)`` with
  ``s = ((image_size - 2) // 2 - 2) // 2`` (5 for 28x28 Omniglot), not pooled vectors.
- :class:`RelationModule`, ``g_phi``: two blocks of 3x3 conv (padding 1), BatchNorm, ReLU, 2x2
  max-pool on the concatenated pair of maps, then ``FC(hidden) -> ReLU -> FC(1) -> sigmoid``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import BACKBONES
from .backbones import MaxPool2d, _norm


class RelationEmbedding(nn.Module):
    """``f_phi``: images ``(n, c, S, S)`` -> feature maps ``(n, filters, s, s)``."""

    def __init__(self, in_channels: int = 1, filters: int = 64, bn_mode: str = "batch", image_size: int = 28):
        super().__init__()
        blocks, c = [], in_channels
        for i in range(4):
            pad = 0 if i < 2 else 1
            blocks += [nn.Conv2d(c, filters, 3, padding=pad), _norm(filters, bn_mode)]
            # pool before ReLU: they commute, and the ReLU then runs on a quarter of the values
            blocks += [MaxPool2d(2), nn.ReLU()] if i < 2 else [nn.ReLU()]
            c = filters
        self.features = nn.Sequential(*blocks)
        s = ((image_size - 2) // 2 - 2) // 2
        if s < 1:
            raise ValueError(f"image_size {image_size} is too small for conv4_relation (needs >= 10).")
        self.map_shape: tuple[int, int, int] = (filters, s, s)
        self.bn_mode = bn_mode

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@BACKBONES.register("conv4_relation")
def conv4_relation(
    in_channels: int = 1, out_features: int = 0, bn_mode: str = "batch", image_size: int = 28, filters: int = 64, **_
) -> nn.Module:
    """The Relation Network embedding: 4 x (3x3 conv, BN, ReLU), max-pool after the first two; feature maps out."""
    return RelationEmbedding(in_channels, filters, bn_mode, image_size)


class RelationModule(nn.Module):
    """``g_phi``: pairs of maps ``(n, 2c, s, s)`` -> relation scores ``(n,)`` in (0, 1)."""

    def __init__(self, map_shape: tuple[int, int, int], filters: int = 64, hidden: int = 8, bn_mode: str = "batch"):
        super().__init__()
        c, h, w = map_shape
        self.convs = nn.Sequential(
            nn.Conv2d(2 * c, filters, 3, padding=1),
            _norm(filters, bn_mode),
            MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(filters, filters, 3, padding=1),
            _norm(filters, bn_mode),
            MaxPool2d(2),
            nn.ReLU(),
        )
        flat = filters * (h // 4) * (w // 4)
        if flat == 0:
            raise ValueError(
                f"feature maps of {h}x{w} are too small for the relation module's two "
                f"2x2 max-pools (need >= 4x4); use larger images."
            )
        self.fc = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(self.convs(pairs).flatten(1))).squeeze(1)
