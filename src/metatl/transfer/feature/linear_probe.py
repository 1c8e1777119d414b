"""Feature extraction from a pretrained network with a linear probe.

The pretrained backbone (``init_checkpoint``) is frozen and run in eval mode (no dropout, fixed
BatchNorm statistics) as a fixed feature map ``phi``; only the linear head ``W, b`` is trained::

    L = CE(W phi(x) + b, y)          phi = model.embed, no gradient

on the labelled rows chosen by ``labels`` (default ``target``: the revealed target labels; use
``source`` to probe on the source labels). :func:`extract_features` gives ``phi(x)`` for any other
use (e.g. a scikit-learn classifier or a classical estimator from :mod:`metatl.transfer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ALGORITHMS
from .._deep import DeepTransfer, accuracy, labelled_rows


@torch.no_grad()
def extract_features(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """``model.embed(x)`` in eval mode, in batches, without gradient: ``(n, embedding_dim)``."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


@ALGORITHMS.register("linear_probe")
class LinearProbe(DeepTransfer):
    """Linear probe: a frozen pretrained feature extractor (eval mode) and a trained linear head."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        init_checkpoint: str | None = None,
        labels: str = "target",
        reset_head: bool = True,
    ):
        super().__init__(model, task_type, init_checkpoint)
        if reset_head:
            model.head.reset_parameters()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
        self.labels = labels

    def forward(self, x: Tensor) -> Tensor:
        return self.model.head(extract_features(self.model, x, batch_size=len(x) or 1))

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = labelled_rows(batch, self.labels)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.item(), "train_acc": accuracy(logits, y)}
