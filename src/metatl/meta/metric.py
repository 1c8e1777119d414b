"""Pure helpers of the metric-based meta-learners (Prototypical, Matching and Relation Networks).

Shapes: ``embeddings`` ``(n, d)``, ``labels`` ``(n,)`` int64 in ``0..n_classes-1``; ``a`` ``(n, d)``,
``b`` ``(m, d)``. Nothing here holds parameters. Under mixed precision (``train.precision:
bfloat16``) these helpers still compute in float32: a squared distance written as
``||a||^2 + ||b||^2 - 2 a.b`` loses every digit it has in bfloat16 once the points are close.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METRICS = ("sqeuclidean", "euclidean", "cosine")


def full_precision(fn):
    """Run ``fn`` with autocast off and its half-precision tensor arguments cast to float32."""

    def up(t):
        return t.float() if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper


@full_precision
def prototypes(embeddings: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """Class means ``c_k = 1/|S_k| sum_{i: y_i = k} f(x_i)``, shape ``(n_classes, d)``.

    Classes may have different numbers of examples; a class with none is an error.
    """
    onehot = F.one_hot(labels, n_classes).to(embeddings.dtype)  # (n, K)
    counts = onehot.sum(0)  # (K,)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"class(es) {empty} have no support examples; every class 0..{n_classes - 1} "
            f"needs at least one (check the support labels)."
        )
    return onehot.t() @ embeddings / counts[:, None]


@full_precision
def pairwise_distances(a: Tensor, b: Tensor, metric: str = "sqeuclidean") -> Tensor:
    """Distances ``D[i, j] = d(a_i, b_j)``, shape ``(n, m)``.

    - ``"sqeuclidean"``: ``||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j`` (clamped at 0
      against rounding);
    - ``"euclidean"``: its square root;
    - ``"cosine"``: ``1 - a_i . b_j / (||a_i|| ||b_j||)`` (norms clamped at 1e-8).
    """
    if metric in ("sqeuclidean", "euclidean"):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.t()
        sq = sq.clamp_min(0)
        return sq if metric == "sqeuclidean" else sq.sqrt()
    if metric == "cosine":
        return 1 - cosine_similarity(a, b)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")


@full_precision
def cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``S[i, j] = a_i . b_j / (||a_i|| ||b_j||)``, shape ``(n, m)``."""
    return F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).t()


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Features of ``x`` from a backbone: ``model.embed(x)`` when it has one, else ``model(x)``."""
    return model.embed(x) if hasattr(model, "embed") else model(x)


def n_ways(support_y: Tensor) -> int:
    """The number of classes of a support set labelled ``0..N-1`` (checked)."""
    n = int(support_y.max()) + 1
    present = torch.unique(support_y)
    if len(present) != n:
        raise ValueError(f"support labels must be 0..N-1 with every class present; got {present.tolist()}.")
    return n
