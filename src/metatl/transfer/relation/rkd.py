"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019).

For teacher features ``t_1..t_n`` and student features ``s_1..s_n`` of the same ``n`` inputs, with
the Huber loss ``l_delta`` (``delta = 1``, i.e. ``smooth_l1``):

* distance-wise: ``psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu``, ``mu = mean_{i != j} ||t_i - t_j||_2``::

      L_D = mean_{i != j} l_delta(psi_D(t_i, t_j), psi_D(s_i, s_j))

* angle-wise, the cosine of the angle at ``t_j``: ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>``,
  ``e_ij = (t_i - t_j) / ||t_i - t_j||_2``::

      L_A = mean_{i, j, k distinct} l_delta(psi_A(t_i, t_j, t_k), psi_A(s_i, s_j, s_k))

``L_RKD = distance_weight * L_D + angle_weight * L_A`` (the paper's 25 and 50). The teacher is
frozen (no gradient through it).

Two uses, one objective (:class:`RKD`), ``L = ce_weight * CE(f(x), y) + L_RKD(student(x_r), teacher(x_r))``:

* teacher -> student distillation: ``teacher_checkpoint`` is another trained network (its backbone
  may differ from the student's); ``on="source"`` (default) distils on the source rows;
* structure-preserving regulariser between the source model and the adapted model: with no
  ``teacher_checkpoint``, the teacher is a frozen copy of the starting model (``init_checkpoint``,
  e.g. a source-only run) and ``on="target"`` keeps the relations among target features that the
  source model sees while the network adapts (``both``: source and target rows).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...build import load_learner
from ...registry import ALGORITHMS
from .._deep import DeepTransfer, accuracy, labelled_rows


def normalised_distances(x: Tensor) -> Tensor:
    """``(n, n)`` matrix ``||x_i - x_j|| / mean_{i != j} ||x_i - x_j||`` (zero diagonal)."""
    d = torch.cdist(x, x)
    n = len(x)
    return d / (d.sum() / (n * (n - 1))).clamp_min(1e-12)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{i != j} huber(psi_D(t_i, t_j), psi_D(s_i, s_j))``."""
    n = len(student)
    with torch.no_grad():
        t = normalised_distances(teacher)
    s = normalised_distances(student)
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    return F.smooth_l1_loss(s[off], t[off])


def angles(x: Tensor) -> Tensor:
    """``(n, n, n)`` tensor ``a[j, i, k] = <e_ij, e_kj>``, ``e_ij = normalise(x_i - x_j)`` (vertex ``j``)."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[j, i] = normalise(x_i - x_j)
    return e @ e.transpose(1, 2)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``mean_{i, j, k distinct} huber(psi_A(t_i, t_j, t_k), psi_A(s_i, s_j, s_k))``."""
    n = len(student)
    with torch.no_grad():
        t = angles(teacher)
    s = angles(student)
    eye = torch.eye(n, dtype=torch.bool, device=student.device)
    distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
    return F.smooth_l1_loss(s[distinct], t[distinct])


@ALGORITHMS.register("rkd")
class RKD(DeepTransfer):
    """Relational KD (Park et al. 2019): distance- and angle-wise Huber losses to a frozen teacher."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        teacher_checkpoint: str | None = None,
        init_checkpoint: str | None = None,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        ce_weight: float = 1.0,
        on: str = "source",
        labels: str = "source",
    ):
        super().__init__(model, task_type, init_checkpoint)
        if on not in ("source", "target", "both"):
            raise ValueError(f"unknown on {on!r}; use source, target or both.")
        if teacher_checkpoint:
            teacher = load_learner(teacher_checkpoint).model
        elif init_checkpoint:
            teacher = copy.deepcopy(model)
        else:
            raise ValueError(
                "rkd needs a teacher: algorithm.teacher_checkpoint (distillation) or "
                "algorithm.init_checkpoint (the starting model as a frozen teacher)."
            )
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.distance_weight, self.angle_weight, self.ce_weight = distance_weight, angle_weight, ce_weight
        self.on, self.labels = on, labels

    def train(self, mode: bool = True) -> RKD:
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode
        return self

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = labelled_rows(batch, self.labels)
        logits = self(x)
        ce = F.cross_entropy(logits, y)
        rows = {
            "source": batch["source_x"],
            "target": batch["target_x"],
            "both": torch.cat([batch["source_x"], batch["target_x"]]),
        }[self.on]
        with torch.no_grad():
            t = self.teacher.embed(rows)
        s = self.features(rows)
        ld, la = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
        loss = self.ce_weight * ce + self.distance_weight * ld + self.angle_weight * la
        return loss, {
            "loss": loss.item(),
            "ce": ce.item(),
            "rkd_distance": ld.item(),
            "rkd_angle": la.item(),
            "train_acc": accuracy(logits, y),
        }
