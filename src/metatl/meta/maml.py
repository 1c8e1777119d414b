"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, ICML 2017).

Inner loop, per task i, ``k = inner_steps`` times on the support set::

    theta'_i = theta - alpha * grad_theta L_i^support(theta)

Outer objective on the query sets, minimised by the trainer's optimizer (Adam in the paper)::

    L(theta) = 1/|B| * sum_{i in B} L_i^query(theta'_i)

(the mean over the meta-batch, as in the reference code; the paper's sum differs by the constant
|B|). Second order by default: the meta-gradient flows through ``grad_theta L_i^support``.
``first_order=True`` treats that gradient as a constant, so
``grad_theta L(theta) = mean_i grad L_i^query(theta'_i)`` (first-order MAML).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn

from ..data.episode import stack_episodes
from ..registry import ALGORITHMS
from .base import GradientMetaLearner, task_metric
from .rules import SGD


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 has no per-device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch 2.3
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


@ALGORITHMS.register("maml")
class MAML(GradientMetaLearner):
    """MAML and first-order MAML.

    Parameters
    ----------
    model : the base learner, a plain ``nn.Module``.
    task_type : ``"classification"`` (cross-entropy) or ``"regression"`` (MSE).
    inner_lr : alpha, the inner-loop step size.
    inner_steps : k, inner steps during meta-training.
    inner_steps_test : inner steps when adapting at test time (default ``inner_steps``).
    first_order : drop the second-order term (first-order MAML).
    batch_tasks : run the meta-batch as one ``torch.func.vmap`` over tasks instead of a Python
        loop (same result; faster for small episodes and on GPUs). Needs equally shaped episodes
        and no BatchNorm running statistics (``bn_mode`` ``batch`` or ``none``).
    """

    def __init__(self, model: nn.Module, task_type: str = "classification", inner_lr: float = 0.01,
                 inner_steps: int = 1, inner_steps_test: Optional[int] = None, first_order: bool = False,
                 batch_tasks: bool = False):
        super().__init__(model, task_type, SGD(inner_lr), inner_steps, inner_steps_test)
        if batch_tasks and any(True for _ in model.buffers()):
            raise ValueError("batch_tasks=True cannot update BatchNorm running statistics inside vmap; "
                             "use model.bn_mode 'batch' (the MAML default) or 'none', or batch_tasks=false.")
        if batch_tasks and getattr(model, "channels_last", False):
            raise ValueError("batch_tasks=True (vmap) cannot run the channels-last layout; set "
                             "model.channels_last=false or algorithm.batch_tasks=false.")
        self.inner_lr, self.first_order, self.batch_tasks = inner_lr, first_order, batch_tasks

    def task_loss(self, theta, support_x, support_y, query_x, query_y, batched: bool = False):
        """``L_i^query(theta'_i)`` for one task, and the query outputs."""
        adapted = self.adapt_params(theta, support_x, support_y, self.inner_steps,
                                    create_graph=not self.first_order, batched=batched)
        out = self.functional(adapted, query_x)
        return self.loss_fn(out, query_y), out

    def meta_loss(self, batch):
        theta = self.params()
        if self.batch_tasks:
            ep = stack_episodes(batch)
            if autocast_enabled(ep.query_x.device.type):
                raise ValueError("batch_tasks=True (vmap) cannot run under bfloat16 autocast (its double "
                                 "backward mixes dtypes); set train.precision=float32 or "
                                 "algorithm.batch_tasks=false.")
            losses, outs = torch.func.vmap(partial(self.task_loss, batched=True), in_dims=(None, 0, 0, 0, 0))(
                theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y)
            scores = [task_metric(self.task_type, o, y) for o, y in zip(outs.detach(), ep.query_y)]
        else:
            losses, scores = [], []
            for ep in batch:
                loss, out = self.task_loss(theta, *ep.support, *ep.query)
                losses.append(loss)
                scores.append(task_metric(self.task_type, out.detach(), ep.query_y))
            losses = torch.stack(losses)
        loss = losses.mean()
        name = "query_acc" if self.task_type == "classification" else "query_mse"
        return loss, {"loss": loss.item(), name: sum(scores) / len(scores)}
