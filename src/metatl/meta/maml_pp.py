"""MAML++: "How to train your MAML" (Antoniou, Edwards and Storkey, ICLR 2019).

MAML (:mod:`metatl.meta.maml`) with five changes, each a switch; all off, this is MAML exactly.
Per task i, ``S = inner_steps`` steps on the support set, step ``j = 0 .. S-1``::

    theta_{j+1} = theta_j - alpha_{l,j} * grad_{theta_l} L_i^support(f(.; theta_j, bn_j))     for each layer l

- ``lslr`` (per-layer per-step learning rates): ``alpha_{l,j}``, one learned rate per parameter
  tensor and step, meta-learned with ``theta`` (starting at ``inner_lr``); off: ``alpha = inner_lr``.
- ``bn_per_step_weights`` (BNWB): step ``j`` runs the model with its own BatchNorm weights and
  biases ``bn_j``, learned by the outer loop only (the inner loop adapts the other parameters, as
  the reference code's ``enable_inner_loop_optimizable_bn_params: false``); off: one set, adapted
  in the inner loop as in MAML.
- ``bn_per_step_stats`` (BNRS): step ``j`` also keeps its own BatchNorm running statistics
  (``model.bn_mode: running``), used by the model in ``eval()`` mode at that step.
- ``multi_step_loss`` (MSL): the outer objective of a task is ``sum_j v_j(e) L_i^query(theta_{j+1},
  bn_j)`` for epochs ``e < multi_step_loss_epochs``, and ``L_i^query(theta_S, bn_{S-1})`` after,
  with the reference code's importance vector ``v(e)`` (:func:`multi_step_loss_weights`): uniform
  at ``e = 0``, the non-final weights decreasing by ``1 / (S N)`` per epoch to ``0.03 / S``.
- ``derivative_order_annealing`` (DA): first order for epochs ``e < first_order_epochs``, second
  order after.

The meta-batch's objective is the mean of the task objectives. The sixth change, cosine annealing
of the meta learning rate, is the trainer's ``train.lr_schedule: cosine`` (to ``train.lr_final``).

An epoch: the trainer tells the learner its progress ``p`` in [0, 1] (``set_progress``; the
iteration fraction, or the time budget spent when ``train.time_budget_min`` ends the run first),
and the run counts ``epochs`` epochs, ``e = floor(p * epochs)``. The reference code's runs are 100
epochs of 500 iterations, so ``multi_step_loss_epochs: 10`` anneals over the first tenth of a run
whatever its length.

Steps past ``inner_steps`` (``inner_steps_test`` larger) reuse the last step's rates, BatchNorm
weights and statistics (the reference code cannot take more test steps than training steps).
The reference code always normalises with the batch's statistics and collects per-step running
statistics it does not use; with ``model.bn_mode: batch`` (our configs) BNRS has nothing to
collect, so ``bn_per_step_stats`` needs ``bn_mode: running``, where the statistics are used at test.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ConfigError, at_least
from ..nn.per_step import PerStepBatchNorm
from ..registry import ALGORITHMS
from ._types import Params
from .base import GradientMetaLearner, Predictor, check_support
from .rules import SGD


def multi_step_loss_weights(epoch: int, steps: int, msl_epochs: int) -> list[float]:
    """The reference code's per-step importance vector at ``epoch`` (``get_per_step_loss_importance_vector``):
    ``v_j = max(1/S - e / (S N), 0.03 / S)`` for ``j < S-1`` and
    ``v_{S-1} = min(1/S + e (S-1) / (S N), 1 - (S-1) 0.03 / S)``, with ``S = steps``, ``N = msl_epochs``."""
    decay = 1.0 / steps / max(msl_epochs, 1)
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    return [*weights, min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)]


class PerStepRates(nn.Module):
    """LSLR as an update rule: ``theta_l <- theta_l - alpha_{l,j} g_l`` at step ``j``, with one
    learned rate per parameter tensor ``l`` and step (``min(j, steps - 1)``). State: the step."""

    def __init__(self, names, steps: int, lr: float):
        super().__init__()
        self.steps = steps
        self.rates = nn.ParameterDict(
            {n.replace(".", "-"): nn.Parameter(torch.full((steps,), float(lr))) for n in names}
        )

    def init(self, params: Params) -> int:
        return 0

    def update(self, grads: Params, step: int, params: Params) -> tuple[Params, int]:
        j = min(step, self.steps - 1)
        return {k: -self.rates[k.replace(".", "-")][j] * g for k, g in grads.items()}, step + 1


@ALGORITHMS.register("maml_pp")
class MAMLPlusPlus(GradientMetaLearner):
    """MAML++ (Antoniou et al. 2019); every switch off is MAML.

    Parameters
    ----------
    model : the base learner, a plain ``nn.Module`` (the paper: conv4 with max-pooling).
    task_type : ``"classification"`` or ``"regression"``.
    inner_lr : alpha, the inner step size (LSLR: the rates' start). Reference code: 0.1.
    inner_steps : S, inner steps in meta-training (reference code: 5); ``inner_steps_test`` at test.
    first_order : drop the second-order term throughout.
    lslr : per-layer per-step learned inner learning rates.
    multi_step_loss : the weighted query loss of every step during the first
        ``multi_step_loss_epochs`` epochs (reference code: 10 of 100).
    bn_per_step_weights : per-step BatchNorm weights and biases (BNWB).
    bn_per_step_stats : per-step BatchNorm running statistics (BNRS; needs ``model.bn_mode: running``).
    derivative_order_annealing : first order for the first ``first_order_epochs`` epochs (the paper: its
        first 50; the reference code's Omniglot configs leave it off).
    epochs : how many epochs a run counts, for the two schedules (reference code: 100).
    """

    config_ranges = {"epochs": at_least(1)}

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        lslr: bool = False,
        multi_step_loss: bool = False,
        multi_step_loss_epochs: int = 10,
        bn_per_step_weights: bool = False,
        bn_per_step_stats: bool = False,
        derivative_order_annealing: bool = False,
        first_order_epochs: int = 50,
        epochs: int = 100,
    ):
        per_step_switches = [
            k
            for k, on in (
                ("lslr", lslr),
                ("multi_step_loss", multi_step_loss),
                ("bn_per_step_weights", bn_per_step_weights),
                ("bn_per_step_stats", bn_per_step_stats),
            )
            if on
        ]
        if per_step_switches and inner_steps < 1:
            raise ValueError(f"{', '.join(per_step_switches)} need(s) inner_steps >= 1, got {inner_steps}.")
        if derivative_order_annealing and first_order:
            raise ValueError(
                "derivative_order_annealing switches from first to second order; it needs "
                "first_order=false (or set derivative_order_annealing=false for first order throughout)."
            )
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}.")
        per_step = None
        if bn_per_step_weights or bn_per_step_stats:
            per_step = PerStepBatchNorm(model, inner_steps, bn_per_step_weights, bn_per_step_stats)
        outer_only = set(per_step.affine_names) if per_step is not None else set()
        inner = [k for k, _ in model.named_parameters() if k not in outer_only]
        rule = PerStepRates(inner, inner_steps, inner_lr) if lslr else SGD(inner_lr)
        super().__init__(model, task_type, rule, inner_steps, inner_steps_test)
        self.per_step = per_step
        for name in outer_only:  # replaced at every step by the per-step copies: unused
            model.get_parameter(name).requires_grad_(False)
        self._outer_only = frozenset(outer_only)
        self.inner_lr, self.first_order, self.lslr = inner_lr, first_order, lslr
        self.multi_step_loss, self.multi_step_loss_epochs = multi_step_loss, multi_step_loss_epochs
        self.derivative_order_annealing, self.first_order_epochs = derivative_order_annealing, first_order_epochs
        self.epochs = epochs
        self.second_order = not first_order  # where training ends (the executors check this one)
        self.progress = 0.0

    @classmethod
    def check_config(cls, cfg) -> None:
        a = cfg.algorithm
        if a.get("bn_per_step_stats") and cfg.model.get("bn_mode", "batch") != "running":
            raise ConfigError(
                "algorithm.bn_per_step_stats needs BatchNorm running statistics: set model.bn_mode: "
                "running (with bn_mode batch each step normalises with its own batch's statistics, "
                "as the MAML++ reference code does), or algorithm.bn_per_step_stats: false."
            )

    # -- the schedules ---------------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Called by the trainer before each step with the training progress in [0, 1]."""
        self.progress = float(progress)

    @property
    def epoch(self) -> int:
        """``floor(progress * epochs)``."""
        return math.floor(self.progress * self.epochs + 1e-9)

    def multi_step_active(self) -> bool:
        return self.multi_step_loss and self.epoch < self.multi_step_loss_epochs

    def second_order_now(self) -> bool:
        return self.second_order and not (self.derivative_order_annealing and self.epoch < self.first_order_epochs)

    def loss_weights(self) -> list[float]:
        """The weights of the per-step query losses now (the last step's alone after the MSL epochs)."""
        if not self.multi_step_active():
            return [0.0] * (self.inner_steps - 1) + [1.0]
        return multi_step_loss_weights(self.epoch, self.inner_steps, self.multi_step_loss_epochs)

    # -- what one task computes ----------------------------------------------------------------
    def _inner_options(self, stats=None, trajectory: bool = False) -> dict:
        options = {"trajectory": trajectory}
        if self.per_step is not None:
            options["step_params"] = lambda j: self.per_step.at(j, stats)
        return options

    def adapts(self, name: str) -> bool:
        """Every parameter but the model's BatchNorm weights and biases when per-step copies
        replace them (those are learned by the outer loop only, as in the reference code)."""
        return name not in self._outer_only

    def adapted(
        self,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        *,
        batched: bool = False,
        generator: torch.Generator | None = None,
    ) -> Params:
        """``theta_S``; while the multi-step loss is on, the trajectory ``theta_1 .. theta_S`` instead,
        each tensor stacked along a new first dimension (one row per step), which
        :meth:`query_loss` reads. Either way a dict of tensors, as every executor expects."""
        msl = self.multi_step_active()
        out = self.adapt_params(
            params,
            support_x,
            support_y,
            self.inner_steps,
            create_graph=self.second_order_now(),
            batched=batched,
            generator=generator,
            **self._inner_options(trajectory=msl),
        )
        return {k: torch.stack([p[k] for p in out]) for k in out[0]} if msl else out

    def _step_loss(self, params: Params, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if self.per_step is not None:
            params = {**params, **self.per_step.at(step)}
        out = self.functional(params, x)
        return self.loss_fn(out, y), out

    def query_loss(self, params: Params, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        """``L^query`` of :meth:`adapted`'s result: ``sum_j v_j L^query(theta_{j+1}, bn_j)`` of a
        trajectory, or ``L^query(theta_S, bn_{S-1})``; and the last step's query outputs."""
        if not self.multi_step_active():
            return self._step_loss(params, query_x, query_y, max(self.inner_steps, 1) - 1)
        total = 0.0
        for j, w in enumerate(self.loss_weights()):
            loss, out = self._step_loss({k: v[j] for k, v in params.items()}, query_x, query_y, j)
            total = total + w * loss
        return total, out

    # -- adaptation outside meta-training ------------------------------------------------------
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Adapt a copy of the meta-learned parameters to a support set (no meta-gradient); the
        predictor runs with the BatchNorm weights and statistics of the last step taken."""
        support_y = check_support(support_x, support_y, self.task_type)
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        stats = self.per_step.clone_stats() if self.per_step is not None else None
        params = {k: p.detach() for k, p in self.params().items()}
        steps = self.inner_steps_test if steps is None else steps
        adapted = self.adapt_params(params, support_x, support_y, steps, buffers=buffers, **self._inner_options(stats))
        adapted = {k: p.detach() for k, p in adapted.items()}
        last = {}
        if self.per_step is not None:
            last = {k: v.detach() for k, v in self.per_step.at(max(steps, 1) - 1, stats).items()}
        return Predictor(lambda x: self.functional({**buffers, **adapted, **last}, x), self.task_type)
