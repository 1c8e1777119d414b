"""Helpers shared by the sequence (RNN-based) meta-learners: the image encoder, label one-hots and
the order in which an episode is fed.

An episode of N ways becomes a sequence: the support set in a shuffled order, then each query.
The encoder is the learner's backbone: ``model.embed(x)`` when it has one (conv4 nets, width
``model.embedding_dim``), else ``model(x)`` (an MLP, width = its ``out_features``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def feature_dim(model: nn.Module) -> int:
    """Width of the features :func:`encode` returns for ``model``."""
    if hasattr(model, "embedding_dim"):
        return int(model.embedding_dim)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"cannot tell the feature width of backbone {type(model).__name__}: give it an "
            f"`embedding_dim` attribute and an `embed(x)` method, or end it with nn.Linear."
        )
    return linears[-1].out_features


def infer_ways(model: nn.Module, ways: int | None) -> int:
    """``ways`` if given, else the width of the backbone's linear head (built for the training ways)."""
    if ways is not None:
        return ways
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "cannot infer the number of ways from this backbone; pass ways=N (algorithm.ways in a config)."
        )
    return head.out_features


def encode(model: nn.Module, x: Tensor) -> Tensor:
    """Features ``(n, feature_dim)`` of inputs ``x`` ``(n, *x_shape)``."""
    return model.embed(x) if hasattr(model, "embed") else model(x)


def one_hot(y: Tensor, n_classes: int, where: str = "support_y") -> Tensor:
    """``(..., n_classes)`` float one-hots, with a clear error for a label outside ``0..n_classes-1``."""
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(
            f"{where} must hold integer class labels, got dtype {y.dtype}; RNN-based "
            f"meta-learners are for classification episodes."
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"{where} has labels {int(y.min())}..{int(y.max())} but the model was built for "
            f"{n_classes}-way one-hot labels (0..{n_classes - 1}); build it for the episodes' "
            f"ways (the backbone's out_features / data.ways), or remap the labels to 0..N-1."
        )
    return F.one_hot(y.long(), n_classes).float()


def check_ways(support_y: Tensor, ways: int, learner: str) -> None:
    """Episodes must have exactly the ``ways`` classes the one-hot labels were built for: with fewer,
    the model can answer a label that no support example has."""
    n = len(torch.unique(support_y))
    if n != ways:
        raise ValueError(
            f"the support set has {n} classes but this {learner} was built for {ways}-way "
            f"episodes (one-hot labels of size {ways}); use {ways}-way episodes (data.ways="
            f"{ways}, or {ways} class sub-folders for `metatl adapt`), or train a {n}-way model "
            f"(algorithm.ways={n})."
        )


def shuffle_order(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    return torch.randperm(n, generator=generator).to(device)
