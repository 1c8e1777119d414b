"""The small digits CNN used for MNIST <-> USPS adaptation (the PyTorch MNIST example net, as in
skada-bench's ``MNISTtoUSPSNet``).

``x (n, c, s, s)`` -> conv 3x3 (32), ReLU -> conv 3x3 (64), ReLU -> 2x2 max-pool -> dropout 0.25 ->
flatten -> linear (128), ReLU = ``embed(x)`` (n, 128) -> dropout 0.5 -> linear head (n, out).
For 28x28 inputs the flattened map has 64 * 12 * 12 = 9216 features.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import BACKBONES
from .dropout import Dropout
from .fast import _in_func_transform, to_channels_last


class DigitsCNN(nn.Module):
    """Two conv layers and two linear layers; ``embed`` gives the 128-d features the deep transfer
    losses align, ``head`` the classifier on them (``out_features=0``: no head).

    The second ReLU comes after the max-pool: max and ReLU commute (ReLU is monotone), so outputs and
    gradients are those of conv-ReLU-pool, with the ReLU on a quarter of the values. The dropout
    layers are :class:`metatl.nn.dropout.Dropout` (``nn.Dropout`` with a faster CPU mask).

    ``fast=True`` (``model.fast``, the default) runs the same function faster on CPUs: the input in
    the channels-last layout (oneDNN's convolutions and PyTorch's max-pool are vectorised over
    channels so), kept through the pooled map, which is flattened in that order (a view) against
    the linear layer's columns permuted to match. The flatten and linear modules are then not
    called as modules (hooks on them do not run); ``fast=False`` runs every layer as it is, and so
    does the fast net inside ``torch.func`` transforms and off the CPU. Parameters and their names
    are the same either way (measurements: docs/transfer.md).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 10,
        image_size: int = 28,
        hidden: int = 128,
        dropout: bool = True,
        fast: bool = True,
    ):
        super().__init__()
        side = (image_size - 4) // 2
        if side < 1:
            raise ValueError(f"digits_cnn needs images of at least 6x6 pixels; got {image_size}x{image_size}.")
        self.features = nn.Sequential(  # indices 0, 2 and 7 hold the weights (checkpoints' names)
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.MaxPool2d(2),
            nn.ReLU(),
            Dropout(0.25 if dropout else 0.0),
            nn.Flatten(),
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(),
        )
        self.dropout = Dropout(0.5 if dropout else 0.0)
        self.embedding_dim = hidden
        self.head = nn.Linear(hidden, out_features) if out_features else nn.Identity()
        self.fast = fast

    def embed(self, x: Tensor) -> Tensor:
        if not self.fast or x.device.type != "cpu" or x.dim() != 4 or _in_func_transform(x):
            return self.features(x)
        h = to_channels_last(x)
        for layer in self.features[:6]:  # conv, ReLU, conv, pool, ReLU, dropout: channels-last
            h = layer(h)
        linear = self.features[7]
        n, c, height, width = h.shape
        # flattened in (h, w, c) order, a view of channels-last memory; the weight's columns to match
        weight = linear.weight.view(-1, c, height, width).permute(0, 2, 3, 1).reshape(-1, c * height * width)
        return self.features[8](F.linear(h.permute(0, 2, 3, 1).reshape(n, -1), weight, linear.bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.embed(x)))


@BACKBONES.register("digits_cnn")
def digits_cnn(
    in_channels: int = 1,
    out_features: int = 10,
    image_size: int = 28,
    hidden: int = 128,
    dropout: bool = True,
    fast: bool = True,
    **_,
) -> nn.Module:
    """Small digits CNN (conv32-conv64-pool-fc128), skada-bench's MNIST/USPS net."""
    return DigitsCNN(in_channels, out_features, image_size, hidden, dropout, fast)
