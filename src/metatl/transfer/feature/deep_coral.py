"""Deep CORAL (Sun & Saenko, ECCV 2016 workshops): align second-order statistics of the features.

For source features ``D_S (n_s, d)`` and target features ``D_T (n_t, d)``::

    C = 1/(n - 1) (D^T D - 1/n (1^T D)^T (1^T D))          (unbiased covariance)
    L_CORAL = ||C_S - C_T||_F^2 / (4 d^2)
    L = CE(f(x_s), y_s) + weight * L_CORAL(z_s, z_t)

The loss is taken on the ``embed`` features after the backbone's dropout (the layer skada-bench
aligns on its digits net).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ALGORITHMS
from .._deep import DeepTransfer, accuracy


def covariance(d: Tensor) -> Tensor:
    """``1/(n-1) (D^T D - 1/n (1^T D)^T (1^T D))`` for ``D (n, d)``."""
    n = d.shape[0]
    s = d.sum(0, keepdim=True)
    return (d.T @ d - s.T @ s / n) / (n - 1)


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """``||C_S - C_T||_F^2 / (4 d^2)``."""
    dim = source.shape[1]
    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * dim * dim)


@ALGORITHMS.register("deep_coral")
class DeepCORAL(DeepTransfer):
    """Deep CORAL (Sun & Saenko 2016): CE + weight * ||C_s - C_t||_F^2 / (4 d^2) on the features."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        weight: float = 1.0,
        init_checkpoint: str | None = None,
    ):
        super().__init__(model, task_type, init_checkpoint)
        self.weight = weight

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        zs, zt = self.source_and_target_features(batch)
        logits = self.classify(zs, dropped=True)
        ce = F.cross_entropy(logits, batch["source_y"])
        coral = coral_loss(zs, zt)
        loss = ce + self.weight * coral
        return loss, {
            "loss": loss.item(),
            "ce": ce.item(),
            "coral": coral.item(),
            "source_acc": accuracy(logits, batch["source_y"]),
        }
