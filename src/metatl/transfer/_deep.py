"""What the deep transfer objectives share, and the source-only baseline.

A deep transfer objective is an ``nn.Module`` holding ``model``, a backbone with ``embed(x)``
(features ``(n, d)``, ``model.embedding_dim = d``) and ``head`` (features -> logits), e.g.
``digits_cnn``. The one trainer calls

- ``meta_loss(batch) -> (loss, metrics)`` with a domain batch (``source_x``, ``source_y``,
  ``target_x`` and, when target labels are revealed, ``target_labelled_x`` / ``target_labelled_y``;
  see :mod:`metatl.data.adaptation`);
- ``set_progress(p)`` with ``p = iteration / iterations`` in [0, 1] (schedules such as DANN's);
- ``param_groups()`` for the optimizer (frozen parameters left out, per-group ``lr_scale``);

and the data source scores ``learner(x)`` (the logits). ``init_checkpoint`` starts the model from
the ``model.*`` weights of a metatl checkpoint (e.g. a source-only run); the file must exist
whenever the learner is rebuilt from its config (``metatl eval`` of the run included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load as load_checkpoint
from ..registry import ALGORITHMS


def load_model_weights(model: nn.Module, checkpoint: str, keep_head: bool = False) -> None:
    """Load the ``model.*`` entries of a metatl checkpoint's learner into ``model`` (strict).

    ``keep_head=True`` loads everything but ``head.*`` and keeps ``model``'s own head: the start of a
    new task whose classes differ from the checkpoint's (a 5-way MAML head, a 4,112-way Omniglot
    classifier or a headless ProtoNet backbone, fine-tuned on 10 digits)."""
    state = load_checkpoint(checkpoint)
    weights = {k[len("model.") :]: v for k, v in state["learner"].items() if k.startswith("model.")}
    if keep_head:
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
        weights.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(
            f"{checkpoint} does not fit this model ({str(err).splitlines()[0]}); use a checkpoint "
            f"trained with the same model.* settings."
        ) from err


class DeepTransfer(nn.Module):
    """Base class: ``model`` plus the hooks the trainer uses (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        init_checkpoint: str | None = None,
        keep_head: bool = False,
    ):
        super().__init__()
        if task_type != "classification":
            raise ValueError(f"{type(self).__name__} is for classification data; got task type {task_type!r}.")
        if not (hasattr(model, "embed") and hasattr(model, "head")):
            raise ValueError(
                f"{type(self).__name__} needs a backbone with embed() and head (e.g. model.name: "
                f"digits_cnn, conv4_pool); got {type(model).__name__}."
            )
        self.model, self.task_type = model, task_type
        self.progress = 0.0
        if init_checkpoint:
            load_model_weights(model, init_checkpoint, keep_head)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def features(self, x: Tensor) -> Tensor:
        return self.model.embed(x)

    def dropout(self, z: Tensor) -> Tensor:
        """The backbone's dropout before its head (identity when it has none, and in eval mode)."""
        drop = getattr(self.model, "dropout", None)
        return drop(z) if drop is not None else z

    def classify(self, z: Tensor, dropped: bool = False) -> Tensor:
        """Logits from ``features`` (the backbone's dropout, then its head); ``dropped=True``: ``z``
        already went through that dropout (:meth:`source_and_target_features`)."""
        return self.model.head(z if dropped else self.dropout(z))

    def set_progress(self, p: float) -> None:
        self.progress = float(p)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def source_and_target_features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The features the domain losses align, for ``source_x`` and ``target_x`` in one forward pass:
        ``features`` after the backbone's dropout (the layer skada-bench aligns on its digits net), so
        ``classify(z, dropped=True)`` gives the training logits of the same rows."""
        n = len(batch["source_x"])
        z = self.dropout(self.features(torch.cat([batch["source_x"], batch["target_x"]])))
        return z[:n], z[n:]

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover - interface
        raise NotImplementedError


def labelled_rows(batch: dict[str, Tensor], labels: str) -> tuple[Tensor, Tensor]:
    """The labelled rows of a domain batch: ``labels`` = source, target (the revealed target labels)
    or both."""
    has_target = "target_labelled_x" in batch
    if labels == "target" or (labels == "both" and has_target):
        if not has_target:
            raise ValueError(
                "labels='target' needs revealed target labels: set data.target_labels_fraction "
                "(e.g. --set data.target_labels_fraction=0.01)."
            )
        if labels == "target":
            return batch["target_labelled_x"], batch["target_labelled_y"]
        return (
            torch.cat([batch["source_x"], batch["target_labelled_x"]]),
            torch.cat([batch["source_y"], batch["target_labelled_y"]]),
        )
    if labels in ("source", "both"):
        return batch["source_x"], batch["source_y"]
    raise ValueError(f"unknown labels {labels!r}; use source, target or both.")


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


@ALGORITHMS.register("source_only")
class DeepSourceOnly(DeepTransfer):
    """Deep baseline: cross-entropy on labelled source rows only, ``L = CE(f(x_s), y_s)``."""

    def meta_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = self(batch["source_x"])
        loss = F.cross_entropy(logits, batch["source_y"])
        return loss, {"loss": loss.item(), "source_acc": accuracy(logits, batch["source_y"])}
