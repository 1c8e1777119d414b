"""DAN: deep adaptation with multi-kernel MMD (Long et al., ICML 2015).

Multi-kernel ``k = sum_u beta_u k_u`` of Gaussian kernels ``k_u(a, b) = exp(-||a - b||^2 / sigma_u^2)``
with equal weights ``beta_u = 1/m`` (the paper learns ``beta`` by a QP; fixed equal weights are
what common implementations use). Bandwidths ``sigma_u^2 = c_u * mean_{i != j} ||h_i - h_j||^2``
over the pooled batch (detached), ``c_u`` in ``multipliers`` (default 1/8 ... 2), unless
``bandwidths`` gives the ``sigma_u^2`` directly.

Two estimators of ``MMD^2(p_s, p_t)`` for source rows ``s (n_s, d)`` and target rows ``t (n_t, d)``:

* ``estimator="unbiased"`` (default): the U-statistic (Gretton et al. 2012)::

      MMD_u^2 = 1/(n_s(n_s-1)) sum_{i != j} k(s_i, s_j) + 1/(n_t(n_t-1)) sum_{i != j} k(t_i, t_j)
                - 2/(n_s n_t) sum_{i, j} k(s_i, t_j)

* ``estimator="linear"``: the linear-time unbiased estimator DAN uses (Long et al. 2015, eq. 6),
  over quad-tuples ``(s_{2i-1}, s_{2i}, t_{2i-1}, t_{2i})``, ``i = 1 .. n/2`` (``n`` = the even
  ``min(n_s, n_t)``)::

      MMD_l^2 = 2/n sum_i [k(s_{2i-1}, s_{2i}) + k(t_{2i-1}, t_{2i}) - k(s_{2i-1}, t_{2i}) - k(s_{2i}, t_{2i-1})]

The objective (on the ``embed`` features after the backbone's dropout, and on the logits too when
``layers`` has ``logits``)::

    L = CE(f(x_s), y_s) + weight * sum_{layer} MMD^2(h_s^layer, h_t^layer)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ALGORITHMS
from .._deep import DeepTransfer, accuracy

MULTIPLIERS = (0.125, 0.25, 0.5, 1.0, 2.0)


def default_bandwidths(source: Tensor, target: Tensor, multipliers: Sequence[float] = MULTIPLIERS) -> Tensor:
    """``sigma_u^2 = c_u * mean_{i != j} ||h_i - h_j||^2`` over the pooled rows (no gradient)."""
    with torch.no_grad():
        h = torch.cat([source, target])
        n = len(h)
        mean_sq = torch.cdist(h, h).pow(2).sum() / (n * (n - 1))
        return mean_sq.clamp_min(1e-12) * torch.tensor(multipliers, dtype=h.dtype, device=h.device)


def multi_kernel(a: Tensor, b: Tensor, bandwidths: Tensor) -> Tensor:
    """``(n_a, n_b)`` matrix of ``1/m sum_u exp(-||a_i - b_j||^2 / sigma_u^2)``."""
    sq = torch.cdist(a, b).pow(2)
    return torch.stack([torch.exp(-sq / s) for s in bandwidths]).mean(0)


def mk_mmd(
    source: Tensor,
    target: Tensor,
    bandwidths: Tensor | None = None,
    estimator: str = "unbiased",
    multipliers: Sequence[float] = MULTIPLIERS,
) -> Tensor:
    """Multi-kernel ``MMD^2`` between ``source (n_s, d)`` and ``target (n_t, d)`` (see the module docstring)."""
    if bandwidths is None:
        bandwidths = default_bandwidths(source, target, multipliers)
    bandwidths = torch.as_tensor(bandwidths, dtype=source.dtype, device=source.device)
    if estimator == "unbiased":
        ns, nt = len(source), len(target)
        if ns < 2 or nt < 2:
            raise ValueError("the unbiased MMD needs at least 2 source and 2 target rows.")
        kss, ktt = multi_kernel(source, source, bandwidths), multi_kernel(target, target, bandwidths)
        kst = multi_kernel(source, target, bandwidths)
        return (
            (kss.sum() - kss.diagonal().sum()) / (ns * (ns - 1))
            + (ktt.sum() - ktt.diagonal().sum()) / (nt * (nt - 1))
            - 2 * kst.mean()
        )
    if estimator == "linear":
        n = min(len(source), len(target)) // 2 * 2
        if n < 2:
            raise ValueError("the linear-time MMD needs at least 2 source and 2 target rows.")
        s1, s2, t1, t2 = source[0:n:2], source[1:n:2], target[0:n:2], target[1:n:2]

        def k(a, b):  # paired kernel values k(a_i, b_i)
            sq = (a - b).pow(2).sum(1)
            return torch.stack([torch.exp(-sq / s) for s in bandwidths]).mean(0)

        return (k(s1, s2) + k(t1, t2) - k(s1, t2) - k(s2, t1)).sum() * 2 / n
    raise ValueError(f"unknown estimator {estimator!r}; use 'unbiased' or 'linear'.")


@ALGORITHMS.register("dan")
class DAN(DeepTransfer):
    """DAN (Long et al. 2015): CE + weight * multi-kernel MMD^2 (unbiased U-statistic by default)."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        weight: float = 1.0,
        estimator: str = "unbiased",
        layers: Sequence[str] = ("features",),
        multipliers: Sequence[float] = MULTIPLIERS,
        init_checkpoint: str | None = None,
    ):
        super().__init__(model, task_type, init_checkpoint)
        unknown = set(layers) - {"features", "logits"}
        if unknown or not layers:
            raise ValueError(f"dan layers must be a non-empty subset of features, logits; got {list(layers)}.")
        if estimator not in ("unbiased", "linear"):
            raise ValueError(f"unknown estimator {estimator!r}; use 'unbiased' or 'linear'.")
        self.weight, self.estimator, self.layers, self.multipliers = (
            weight,
            estimator,
            tuple(layers),
            tuple(multipliers),
        )

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        zs, zt = self.source_and_target_features(batch)
        logits = self.classify(torch.cat([zs, zt]), dropped=True)
        ls, lt = logits[: len(zs)], logits[len(zs) :]
        ce = F.cross_entropy(ls, batch["source_y"])
        pairs = {"features": (zs, zt), "logits": (ls, lt)}
        mmd = sum(mk_mmd(*pairs[name], estimator=self.estimator, multipliers=self.multipliers) for name in self.layers)
        loss = ce + self.weight * mmd
        return loss, {
            "loss": loss.item(),
            "ce": ce.item(),
            "mmd": mmd.item(),
            "source_acc": accuracy(ls, batch["source_y"]),
        }
