"""DANN: domain-adversarial training with a gradient reversal layer (Ganin et al., JMLR 2016).

Features ``z = G_f(x)`` (the ``embed`` features after the backbone's dropout), label classifier
``G_y``, domain classifier ``G_d`` (probability that a row comes from the source). The objective,
minimised by every parameter with the gradient reversal layer ``R_lambda`` (forward: identity;
backward: multiply the gradient by ``-lambda``) between the features and ``G_d``::

    L = CE(G_y(z_s), y_s) + weight * BCE(G_d(R_lambda(z)), d),    d = 1 (source), 0 (target)

so ``G_d`` minimises the domain loss while ``G_f`` maximises it (scaled by ``lambda``). The
adaptation factor follows the paper's schedule over training progress ``p`` in [0, 1]::

    lambda_p = 2 / (1 + exp(-gamma p)) - 1,    gamma = 10

The domain classifier is ``d -> hidden -> BatchNorm -> ReLU -> 1`` (as in skada).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ALGORITHMS
from .._deep import DeepTransfer, accuracy


class GradientReversal(torch.autograd.Function):
    """``R_lambda(x) = x``; ``dR/dx = -lambda I`` (no gradient for ``lambda``)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    return GradientReversal.apply(x, lambd)


def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """``2 / (1 + exp(-gamma p)) - 1``: 0 at the start, -> 1 at the end of training."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def domain_classifier(in_features: int, hidden: int = 100) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1))


def domain_loss(source_logits: Tensor, target_logits: Tensor) -> Tensor:
    """``BCE`` of the domain classifier with source = 1, target = 0, averaged over all rows."""
    logits = torch.cat([source_logits, target_logits]).flatten()
    d = torch.cat([torch.ones(len(source_logits)), torch.zeros(len(target_logits))]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, d)


@ALGORITHMS.register("dann")
class DANN(DeepTransfer):
    """DANN (Ganin et al. 2016): gradient reversal, domain classifier, lambda schedule 2/(1+exp(-10p))-1."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        weight: float = 1.0,
        gamma: float = 10.0,
        hidden: int = 100,
        init_checkpoint: str | None = None,
    ):
        super().__init__(model, task_type, init_checkpoint)
        if not hasattr(model, "embedding_dim"):
            raise ValueError("dann needs model.embedding_dim (the feature width) to size its domain classifier.")
        self.weight, self.gamma = weight, gamma
        self.discriminator = domain_classifier(model.embedding_dim, hidden)

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        zs, zt = self.source_and_target_features(batch)
        logits = self.classify(zs, dropped=True)
        ce = F.cross_entropy(logits, batch["source_y"])
        lambd = dann_lambda(self.progress, self.gamma)
        d = self.discriminator(grad_reverse(torch.cat([zs, zt]), lambd))
        dom = domain_loss(d[: len(zs)], d[len(zs) :])
        loss = ce + self.weight * dom
        d_acc = torch.cat([d[: len(zs)] > 0, d[len(zs) :] <= 0]).float().mean().item()
        return loss, {
            "loss": loss.item(),
            "ce": ce.item(),
            "domain_loss": dom.item(),
            "domain_acc": d_acc,
            "lambda": lambd,
            "source_acc": accuracy(logits, batch["source_y"]),
        }
