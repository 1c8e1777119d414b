"""Fine-tuning a pretrained network on labelled (usually target) rows, with the usual strategies.

``L = CE(f(x; w), y)`` over the labelled rows chosen by ``labels`` (default: the revealed target
labels, ``data.target_labels_fraction``), starting from ``init_checkpoint``. What is trained is a
filter over parameter names (``fnmatch`` patterns on ``model.named_parameters()`` names such as
``features.0.weight`` or ``head.bias``), never module surgery:

* ``strategy="all"``: every parameter;
* ``strategy="head"``: only ``head.*``;
* ``strategy="filter"``: every parameter except those matching one of ``freeze``.

Frozen parameters get ``requires_grad=False`` and are left out of the optimizer. Discriminative
learning rates: ``lr_scales={pattern: scale}`` puts the parameters matching ``pattern`` (first match
wins) in an optimizer group whose learning rate is ``scale * train.lr`` (the trainer's schedule
multiplied by the group's ``lr_scale``). ``reset_head=True`` re-initialises the head (a new task)
and loads only the rest of the checkpoint, so the checkpoint's head may have other classes or none
(a meta-learned MAML or ProtoNet backbone as the starting point).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ALGORITHMS
from .._deep import DeepTransfer, accuracy, labelled_rows

STRATEGIES = ("all", "head", "filter")


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def freeze_by_filter(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter whose name matches a pattern; returns their names."""
    frozen = [name for name, p in model.named_parameters() if matches(name, patterns)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def param_groups(named_params, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters: one per ``lr_scales`` pattern (first match wins)
    with ``lr_scale`` set, and one with scale 1 for the rest; empty groups are dropped."""
    lr_scales = dict(lr_scales or {})
    groups = {pattern: [] for pattern in lr_scales}
    rest = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        pattern = next((q for q in lr_scales if fnmatch(name, q)), None)
        (groups[pattern] if pattern is not None else rest).append(p)
    out = [{"params": ps, "lr_scale": float(lr_scales[q]), "pattern": q} for q, ps in groups.items() if ps]
    return out + ([{"params": rest, "lr_scale": 1.0}] if rest else [])


@ALGORITHMS.register("finetune")
class Finetune(DeepTransfer):
    """Fine-tuning: all layers, head only, or a freeze filter (fnmatch); per-pattern lr scales."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        init_checkpoint: str | None = None,
        strategy: str = "all",
        freeze: Sequence[str] = (),
        lr_scales: dict[str, float] | None = None,
        labels: str = "target",
        reset_head: bool = False,
    ):
        # a new head is not read from the checkpoint, so its classes may differ from the checkpoint's
        super().__init__(model, task_type, init_checkpoint, keep_head=reset_head)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
        if freeze and strategy != "filter":
            raise ValueError(
                "freeze patterns need strategy: filter (strategy all trains everything, head only the head)."
            )
        if reset_head:
            model.head.reset_parameters()
        names = [n for n, _ in model.named_parameters()]
        patterns = {"all": [], "head": [n for n in names if not n.startswith("head.")], "filter": list(freeze)}[
            strategy
        ]
        self.frozen = freeze_by_filter(model, patterns)
        if len(self.frozen) == len(names):
            raise ValueError(f"the freeze filter {list(freeze)} freezes every parameter; nothing would train.")
        self.lr_scales, self.labels, self.reset_head = dict(lr_scales or {}), labels, reset_head

    def param_groups(self) -> list[dict]:
        return param_groups(self.model.named_parameters(), self.lr_scales)

    def regularizer(self) -> Tensor | None:
        """Extra penalty added to the loss (none here; see :class:`~metatl.transfer.parameter.l2sp.L2SP`)."""
        return None

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = labelled_rows(batch, self.labels)
        logits = self(x)
        ce = F.cross_entropy(logits, y)
        reg = self.regularizer()
        loss = ce if reg is None else ce + reg
        metrics = {"loss": loss.item(), "ce": ce.item(), "train_acc": accuracy(logits, y)}
        if reg is not None:
            metrics["penalty"] = reg.item()
        return loss, metrics
