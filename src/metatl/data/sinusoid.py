"""Sinusoid regression tasks exactly as in the MAML paper (Finn et al. 2017, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; the learner sees ``K`` support points and is scored by MSE on the query.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .episode import Episode

if TYPE_CHECKING:  # matplotlib is imported by the engine's plots, where the figure is made
    from matplotlib.axes import Axes


class SinusoidTasks:
    """Episode source for sinusoid regression.

    Each episode: ``support_x``/``support_y`` of shape ``(shots, 1)`` and ``query_x``/``query_y``
    of shape ``(queries, 1)``, all float32. :meth:`sample_task` also returns ``(A, phi)`` for plots.
    """

    task_type = "regression"
    out_features = 1

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ):
        if shots < 1 or queries < 1:
            raise ValueError(f"sinusoid tasks need shots >= 1 and queries >= 1 (got {shots}, {queries}).")
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _uniform(self, lo_hi, size, g):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(size, generator=g)

    def sample_task(self, generator: torch.Generator) -> tuple[Episode, tuple[float, float]]:
        a = self._uniform(self.amplitude, (), generator)
        phi = self._uniform(self.phase, (), generator)
        x = self._uniform(self.x_range, (self.shots + self.queries, 1), generator)
        y = a * torch.sin(x - phi)
        k = self.shots
        return Episode(x[:k], y[:k], x[k:], y[k:]), (float(a), float(phi))

    def sample(self, generator: torch.Generator) -> Episode:
        return self.sample_task(generator)[0]

    def sample_batch(self, size: int, generator: torch.Generator) -> list[Episode]:
        return [self.sample(generator) for _ in range(size)]

    def draw_task(
        self, ax: Axes, learner: nn.Module, generator: torch.Generator, steps: tuple[int, ...] = (1, 10)
    ) -> None:
        """The MAML paper's figure for one task drawn from ``generator``, on the matplotlib axes
        ``ax``: the true curve, the K support points, and ``learner``'s prediction before
        adaptation and after each number of inner steps in ``steps``. A data source with this
        method gets a plot of ``eval.plot_tasks`` test tasks in the run folder
        (:func:`metatl.engine.plots.task_plots`)."""
        grid = torch.linspace(*self.x_range, 200).unsqueeze(1)
        ep, (a, phi) = self.sample_task(generator)
        ax.plot(grid, a * torch.sin(grid - phi), "k-", label="ground truth")
        ax.plot(ep.support_x, ep.support_y, "^", color="tab:purple", label=f"{len(ep.support_x)} points")
        for s, style in zip((0, *steps), (":", "--", "-")):
            prediction = learner.adapt(ep.support_x, ep.support_y, steps=s)(grid)
            ax.plot(grid, prediction, style, label="pre-update" if s == 0 else f"{s} grad step{'s' if s > 1 else ''}")
        ax.set(xlabel="x", ylim=(-6, 6))
