"""Divergence: a run whose loss or weights explode stops before it can write them to a checkpoint.

A NaN or infinite loss or meta-gradient is caught by the trainer at once. A run can also explode
while every number stays finite (an outer learning rate of 1e6 trains to losses of 1e5 to 1e9 at
chance accuracy; 1e38 gives weights near float32's largest value). :class:`DivergenceGuard` watches
both sides each step:

- the loss: the median of the last ``window`` losses above ``factor`` times the median of the
  first ``window`` (at least ``factor`` in absolute terms, for losses that start near zero); a
  median, so that one spike does not stop a run;
- the weights: any non-finite weight, or their global norm above ``factor`` times its value at
  the start of training.

``factor`` is ``train.divergence_factor`` (default 1000; null turns the loss and norm tests off,
the non-finite tests stay). The trainer checks the weights again before every checkpoint it
writes, so ``last.pt`` and ``best.pt`` only ever hold weights that passed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import torch


class DivergenceError(FloatingPointError):
    """Training diverged: a non-finite loss, gradient or weight, or an exploding loss or weight norm."""


def weight_norm(params: Iterable[torch.Tensor]) -> float:
    """The global L2 norm of ``params`` (inf or nan when one of them is not finite)."""
    norms = [torch.linalg.vector_norm(p.detach().float()) for p in params]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class DivergenceGuard:
    """Tells when training has diverged; its state goes into checkpoints so a resumed run keeps
    the same reference values."""

    def __init__(self, factor: float | None = 1000.0, window: int = 10):
        self.factor, self.window = factor, window
        self.first: list = []  # the first `window` losses
        self.recent: deque = deque(maxlen=window)
        self.start_norm: float | None = None

    def state(self) -> dict:
        return {"first": list(self.first), "recent": list(self.recent), "start_norm": self.start_norm}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.first = list(state["first"])
            self.recent = deque(state["recent"], maxlen=self.window)
            self.start_norm = state["start_norm"]

    def loss(self, value: float) -> str | None:
        """Record a step's loss; a description of the problem when the loss has exploded."""
        if len(self.first) < self.window:
            self.first.append(value)
        self.recent.append(value)
        if not self.factor or len(self.first) < self.window or len(self.recent) < self.window:
            return None
        start, now = _median(self.first), _median(self.recent)
        if now > self.factor * max(abs(start), 1.0):
            return (
                f"the loss exploded: median {now:.4g} over the last {self.window} steps against {start:.4g} "
                f"over the first {self.window} (more than train.divergence_factor={self.factor:g} times)"
            )
        return None

    def weights(self, params: Iterable[torch.Tensor]) -> str | None:
        """A description of the problem when the weights are not finite or their norm has exploded
        (the first call sets the reference norm)."""
        norm = weight_norm(params)
        if not math.isfinite(norm):
            return f"the weights became NaN or infinite (global norm {norm})"
        if self.start_norm is None:
            self.start_norm = norm
            return None
        if self.factor and norm > self.factor * max(self.start_norm, 1.0):
            return (
                f"the weights exploded: global norm {norm:.4g} against {self.start_norm:.4g} at the start "
                f"(above train.divergence_factor={self.factor:g} times)"
            )
        return None
