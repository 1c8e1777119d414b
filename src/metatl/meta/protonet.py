"""Prototypical Networks (Snell, Swersky and Zemel, NeurIPS 2017).

For an episode with support set ``S`` (N classes, ``S_k`` the examples of class k) and embedding
``f_phi`` (the backbone, without a classification head)::

    c_k = 1/|S_k| * sum_{(x_i, y_i) in S_k} f_phi(x_i)                   (prototypes)
    p(y = k | x) = softmax_k( -d(f_phi(x), c_k) )                          (logits = -d)
    L(phi) = 1/|B| sum_{episodes} 1/|Q| sum_{(x, y) in Q} -log p(y | x)    (cross-entropy)

with ``d`` the squared Euclidean distance (the paper's choice) or ``1 - cos`` (``distance:
cosine``, the paper's comparison). Adaptation to a new task is computing the prototypes: there
is no inner loop, and any number of classes works at test time, so the paper trains with more
ways than it tests (60-way episodes for Omniglot: ``data.train_ways: 60``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.episode import Episode
from ..registry import ALGORITHMS
from ._types import Metrics
from .base import MetaLearner, Predictor, check_support, task_metric
from .metric import METRICS, embed, n_ways, pairwise_distances, prototypes


@ALGORITHMS.register("protonet")
class ProtoNet(MetaLearner):
    """Prototypical Networks.

    Parameters
    ----------
    model : the embedding ``f_phi``; built without a head (``out_features=0``).
    task_type : ``"classification"`` only.
    distance : ``"sqeuclidean"`` (paper), ``"euclidean"`` or ``"cosine"``.
    """

    uses_head = False  # metatl.build builds the backbone with out_features=0: embeddings out

    def __init__(self, model: nn.Module, task_type: str = "classification", distance: str = "sqeuclidean"):
        if task_type != "classification":
            raise ValueError("protonet classifies; it has no regression form (use maml or reptile).")
        if distance not in METRICS:
            raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(METRICS)}.")
        super().__init__(model, task_type)
        self.distance = distance

    def logits(self, protos: Tensor, x: Tensor) -> Tensor:
        """``-d(f_phi(x), c_k)``, shape ``(len(x), N)``."""
        return -pairwise_distances(embed(self.model, x), protos, self.distance)

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        losses, scores = [], []
        for ep in batch:
            protos = prototypes(embed(self.model, ep.support_x), ep.support_y, n_ways(ep.support_y))
            out = self.logits(protos, ep.query_x)
            losses.append(self.loss_fn(out, ep.query_y))
            scores.append(task_metric(self.task_type, out.detach(), ep.query_y))
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item(), "query_acc": sum(scores) / len(scores)}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """The prototypes of the support set (``steps`` is accepted and ignored: no inner loop)."""
        support_y = check_support(support_x, support_y, self.task_type)
        with torch.no_grad():
            protos = prototypes(embed(self.model, support_x), support_y, n_ways(support_y))
        return Predictor(lambda x: self.logits(protos, x), self.task_type)
