"""Joint pre-training baseline (the MAML paper's comparison, section 5.1).

One model is trained on all tasks at once, ``min_theta mean_i L_i(theta)`` over the support and
query points of every task in the meta-batch, with no adaptation in the loop. At test time it is
fine-tuned on the support set with the same SGD inner loop as MAML.

:func:`joint_loss` is that objective for any logits function; Chen et al.'s Baseline and
Baseline++ (:mod:`metatl.meta.baseline`) pretrain with it over all base classes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data.episode import Episode
from ..registry import ALGORITHMS
from ._types import Metrics
from .base import GradientMetaLearner
from .rules import SGD


def joint_loss(
    logits: Callable[[Tensor], Tensor], batch: list[Episode], loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``1/|B| sum_i loss_fn(logits(x_i), y_i)`` with ``(x_i, y_i)`` the support and query rows of task ``i``
    together: every labelled example of the meta-batch, no adaptation."""
    return torch.stack(
        [loss_fn(logits(torch.cat([ep.support_x, ep.query_x])), torch.cat([ep.support_y, ep.query_y])) for ep in batch]
    ).mean()


@ALGORITHMS.register("pretrain")
class Pretrain(GradientMetaLearner):
    """Pretrained on all tasks jointly, fine-tuned with ``inner_steps_test`` SGD steps of ``inner_lr``."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        inner_lr: float = 0.01,
        inner_steps_test: int | None = 1,
    ):
        super().__init__(model, task_type, SGD(inner_lr), 0, inner_steps_test)
        self.inner_lr = inner_lr

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        theta = self.params()
        loss = joint_loss(lambda x: self.functional(theta, x), batch, self.loss_fn)
        return loss, {"loss": loss.item()}
