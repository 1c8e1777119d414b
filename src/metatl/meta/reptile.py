"""Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task i of the meta-batch, ``theta'_i`` is the result of ``k = inner_steps`` steps of SGD
or Adam on the task's support set (minibatches of ``inner_batch`` examples), started from theta.
The meta-update is::

    theta <- theta + epsilon * (mean_i theta'_i - theta)

It is computed here as a loss for the one trainer: ``L(theta) = 1/2 ||theta - stopgrad(mean_i
theta'_i)||^2`` has gradient ``theta - mean_i theta'_i``, so one step of plain SGD with learning
rate epsilon on it is exactly the Reptile update (the paper anneals epsilon linearly to 0:
``train.lr_schedule: linear``). ``train.meta_batch: 1`` gives the serial version (Algorithm 1), a
larger meta-batch the batched version (Algorithm 2).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..registry import ALGORITHMS
from .base import GradientMetaLearner, task_metric
from .rules import make_rule
from .threads import check_task_threads, map_shards, resolve_threads


@ALGORITHMS.register("reptile")
class Reptile(GradientMetaLearner):
    """Reptile.

    Parameters
    ----------
    inner_optimizer : ``"adam"`` (the paper's choice, with ``inner_betas=(0, 0.999)``) or ``"sgd"``.
    inner_lr : the inner optimizer's step size.
    inner_steps, inner_batch : inner iterations and minibatch size during meta-training.
    inner_steps_test, inner_batch_test : the same when adapting at test time.
    task_threads : run the meta-batch's tasks in this many CPU threads, as for
        :class:`~metatl.meta.MAML` (``"auto"``: ``torch.get_num_threads()`` where the model is
        thread-safe). Each task draws its minibatches from its own generator, seeded from the
        global one before the tasks start, so the result does not depend on the threads.
    """

    def __init__(self, model: nn.Module, task_type: str = "classification", inner_lr: float = 1e-3,
                 inner_steps: int = 5, inner_steps_test: Optional[int] = 50,
                 inner_optimizer: str = "adam", inner_betas: Sequence[float] = (0.0, 0.999),
                 inner_batch: Optional[int] = 10, inner_batch_test: Optional[int] = None,
                 task_threads: Union[int, str] = "auto"):
        kwargs = {"betas": tuple(inner_betas)} if inner_optimizer == "adam" else {}
        rule = make_rule(inner_optimizer, lr=inner_lr, **kwargs)
        super().__init__(model, task_type, rule, inner_steps, inner_steps_test, inner_batch, inner_batch_test)
        check_task_threads(task_threads, model)
        self.inner_lr, self.inner_optimizer, self.task_threads = inner_lr, inner_optimizer, task_threads

    def meta_loss(self, batch):
        theta = self.params()
        start = {k: p.detach() for k, p in theta.items()}
        # each task's minibatch order, whichever thread runs it
        seeds = torch.randint(0, 2 ** 62, (len(batch),)).tolist()

        def shard(tasks):
            adapted_all, scores = [], []
            for ep, seed in tasks:
                adapted = self.adapt_params(start, ep.support_x, ep.support_y, self.inner_steps,
                                            batch_size=self.inner_batch,
                                            generator=torch.Generator().manual_seed(seed))
                adapted_all.append({k: adapted[k].detach() for k in start})
                if len(ep.query_x):
                    with torch.no_grad():
                        scores.append(task_metric(self.task_type, self.functional(adapted, ep.query_x), ep.query_y))
            return adapted_all, scores

        threads = resolve_threads(self.task_threads, self.model, len(batch), batch[0].support_x)
        parts = map_shards(self.model, shard, list(zip(batch, seeds)), threads)
        # summed in the tasks' order, so that the result does not depend on the number of threads
        adapted = [parts[i % threads][0][i // threads] for i in range(len(batch))]
        mean = {k: sum(a[k] for a in adapted) / len(batch) for k in start}
        scores = [s for _, sc in parts for s in sc]
        loss = 0.5 * sum(((theta[k] - mean[k]) ** 2).sum() for k in theta)
        name = "query_acc" if self.task_type == "classification" else "query_mse"
        metrics = {"loss": loss.detach().item()}
        if scores:
            metrics[name] = sum(scores) / len(scores)
        return loss, metrics
