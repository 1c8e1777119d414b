"""Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task i of the meta-batch, ``theta'_i`` is the result of ``k = inner_steps`` steps of SGD
or Adam on the task's support set (minibatches of ``inner_batch`` examples), started from theta.
The meta-update is::

    theta <- theta + epsilon * (mean_i theta'_i - theta)

It is computed here as a loss for the one trainer (:meth:`Reptile.outer_loss`): ``L(theta) = 1/2
||theta - stopgrad(mean_i theta'_i)||^2`` has gradient ``theta - mean_i theta'_i``, so one step of
plain SGD with learning rate epsilon on it is exactly the Reptile update (the paper anneals epsilon linearly to 0:
``train.lr_schedule: linear``). ``train.meta_batch: 1`` gives the serial version (Algorithm 1), a
larger meta-batch the batched version (Algorithm 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..registry import ALGORITHMS
from .base import GradientMetaLearner, Params
from .rules import make_rule


@ALGORITHMS.register("reptile")
class Reptile(GradientMetaLearner):
    """Reptile.

    Parameters
    ----------
    inner_optimizer : ``"adam"`` (the paper's choice, with ``inner_betas=(0, 0.999)``) or ``"sgd"``.
    inner_lr : the inner optimizer's step size.
    inner_steps, inner_batch : inner iterations and minibatch size during meta-training (each task
        draws its minibatches from its own generator, seeded before the tasks start).
    inner_steps_test, inner_batch_test : the same when adapting at test time.
    """

    vmappable = False  # minibatches drawn with randperm

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        inner_steps_test: int | None = 50,
        inner_optimizer: str = "adam",
        inner_betas: Sequence[float] = (0.0, 0.999),
        inner_batch: int | None = 10,
        inner_batch_test: int | None = None,
    ):
        kwargs = {"betas": tuple(inner_betas)} if inner_optimizer == "adam" else {}
        rule = make_rule(inner_optimizer, lr=inner_lr, **kwargs)
        super().__init__(model, task_type, rule, inner_steps, inner_steps_test, inner_batch, inner_batch_test)
        self.inner_lr, self.inner_optimizer = inner_lr, inner_optimizer

    def adapted(
        self,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        *,
        batched: bool = False,
        generator: torch.Generator | None = None,
    ) -> Params:
        """``theta'_i``, started from ``stopgrad(theta)``: no graph is kept."""
        start = {k: p.detach() for k, p in params.items()}
        return super().adapted(start, support_x, support_y, batched=batched, generator=generator)

    def outer_loss(self, theta: Params, adapted: list[Params]) -> torch.Tensor:
        """``1/2 ||theta - stopgrad(mean_i theta'_i)||^2``; the adapted parameters are summed in
        the tasks' order."""
        mean = {k: sum(a[k].detach() for a in adapted) / len(adapted) for k in theta}
        return 0.5 * sum(((theta[k] - mean[k]) ** 2).sum() for k in theta)
