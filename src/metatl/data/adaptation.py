"""Domain-adaptation data sources for the one trainer: labelled source + unlabelled target batches,
and a labelled evaluation set scored by accuracy.

Training (:class:`DomainPairSampler`): ``sample_batch(size, generator)`` returns a dict of tensors

- ``source_x (size, c, s, s)``, ``source_y (size,)`` int64: labelled source rows;
- ``target_x (size, c, s, s)``: unlabelled target rows (no labels in the batch);
- only when some target labels are revealed (``target_labelled``): ``target_labelled_x (size, c, s, s)``
  and ``target_labelled_y (size,)``, drawn from the revealed rows only.

Rows are drawn uniformly with replacement from the ``generator`` (the trainer's, so resuming is exact).

Evaluation (:class:`LabelledSet`): ``evaluate(learner, ...)`` classifies every row once with
``learner(x)`` in eval mode and returns the evaluator's dict: ``metric="accuracy"``, ``mean``,
``std`` and ``ci95 = 1.96 std / sqrt(n)`` of the per-image 0/1 scores, ``episodes = n`` (images,
each scored once), plus ``record``: extra ``results.json`` fields (the adaptation setting).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import mean_ci95


def _input_spec(x: Tensor) -> dict:
    return {"in_channels": int(x.shape[1]), "image_size": int(x.shape[-1])}


class DomainPairSampler:
    """Batches of labelled source rows and unlabelled target rows (see the module docstring).

    ``target_labelled`` is an int64 index of the target rows whose labels may be used (fine-tuning on
    a few target labels); ``target_y`` is read only at those rows.
    """

    task_type = "classification"

    def __init__(
        self,
        source_x: Tensor,
        source_y: Tensor,
        target_x: Tensor,
        target_y: Tensor | None = None,
        target_labelled: Tensor | None = None,
        out_features: int | None = None,
    ):
        if source_x.shape[1:] != target_x.shape[1:]:
            raise ValueError(
                f"source images {tuple(source_x.shape[1:])} and target images "
                f"{tuple(target_x.shape[1:])} differ; resize both to one size first."
            )
        self.source_x, self.source_y, self.target_x = source_x, source_y.long(), target_x
        self.labelled_x = self.labelled_y = None
        if target_labelled is not None and len(target_labelled):
            if target_y is None:
                raise ValueError("target_labelled needs target_y, the labels of the target rows.")
            self.labelled_x, self.labelled_y = target_x[target_labelled], target_y[target_labelled].long()
        self.out_features = out_features or int(source_y.max()) + 1
        self.input_spec = _input_spec(source_x)

    def to(self, device) -> DomainPairSampler:
        for name in ("source_x", "source_y", "target_x", "labelled_x", "labelled_y"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def _rows(self, x: Tensor, size: int, generator: torch.Generator) -> Tensor:
        return torch.randint(len(x), (size,), generator=generator).to(x.device)

    def sample_batch(self, size: int, generator: torch.Generator) -> dict[str, Tensor]:
        s, t = self._rows(self.source_x, size, generator), self._rows(self.target_x, size, generator)
        batch = {"source_x": self.source_x[s], "source_y": self.source_y[s], "target_x": self.target_x[t]}
        if self.labelled_x is not None:
            i = self._rows(self.labelled_x, size, generator)
            batch.update(target_labelled_x=self.labelled_x[i], target_labelled_y=self.labelled_y[i])
        return batch


class LabelledSet:
    """Labelled images scored by accuracy (the target test set, or held-out source rows)."""

    task_type = "classification"

    def __init__(
        self, x: Tensor, y: Tensor, record: dict | None = None, batch_size: int = 2048, out_features: int | None = None
    ):
        self.x, self.y, self.record, self.batch_size = x, y.long(), dict(record or {}), batch_size
        self.out_features = out_features or int(y.max()) + 1
        self.input_spec = _input_spec(x)

    def to(self, device) -> LabelledSet:
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    @torch.no_grad()
    def evaluate(self, learner, episodes=None, seed=None, progress=False, device="cpu", desc="eval") -> dict:
        """Accuracy of ``learner(x)`` over every row (``episodes`` and ``seed`` are unused: the whole
        set is scored, deterministically)."""
        was_training = learner.training
        learner.eval()
        try:
            correct = torch.cat(
                [
                    (
                        learner(self.x[i : i + self.batch_size].to(device)).argmax(-1)
                        == self.y[i : i + self.batch_size].to(device)
                    )
                    .float()
                    .cpu()
                    for i in range(0, len(self.x), self.batch_size)
                ]
            )
        finally:
            learner.train(was_training)
        return {
            "metric": "accuracy",
            **mean_ci95(correct.numpy()),
            "episodes": len(correct),
            "n": len(correct),
            "record": self.record,
        }
