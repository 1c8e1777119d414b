"""The small digits CNN used for MNIST <-> USPS adaptation (the PyTorch MNIST example net, as in
skada-bench's ``MNISTtoUSPSNet``).

``x (n, c, s, s)`` -> conv 3x3 (32), ReLU -> conv 3x3 (64), ReLU -> 2x2 max-pool -> dropout 0.25 ->
flatten -> linear (128), ReLU = ``embed(x)`` (n, 128) -> dropout 0.5 -> linear head (n, out).
For 28x28 inputs the flattened map has 64 * 12 * 12 = 9216 features.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import BACKBONES


class DigitsCNN(nn.Module):
    """Two conv layers and two linear layers; ``embed`` gives the 128-d features the deep transfer
    losses align, ``head`` the classifier on them (``out_features=0``: no head)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 10,
        image_size: int = 28,
        hidden: int = 128,
        dropout: bool = True,
    ):
        super().__init__()
        side = (image_size - 4) // 2
        if side < 1:
            raise ValueError(f"digits_cnn needs images of at least 6x6 pixels; got {image_size}x{image_size}.")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25 if dropout else 0.0),
            nn.Flatten(),
            nn.Linear(64 * side * side, hidden),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.5 if dropout else 0.0)
        self.embedding_dim = hidden
        self.head = nn.Linear(hidden, out_features) if out_features else nn.Identity()

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.embed(x)))


@BACKBONES.register("digits_cnn")
def digits_cnn(
    in_channels: int = 1, out_features: int = 10, image_size: int = 28, hidden: int = 128, dropout: bool = True, **_
) -> nn.Module:
    """Small digits CNN (conv32-conv64-pool-fc128), skada-bench's MNIST/USPS net."""
    return DigitsCNN(in_channels, out_features, image_size, hidden, dropout)
