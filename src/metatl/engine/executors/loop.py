"""The per-task executors: the plain loop, and the loop that differentiates each task's query loss
as soon as it is computed (optionally with the inner loops as one vmap over tasks)."""

from __future__ import annotations

from functools import partial

import torch

from ...meta.base import task_metric
from ._common import meta_parameters, refuse_autocast, with_gradient


class Loop:
    """The meta-batch task by task, as the learner's own :meth:`meta_loss` states it: one autograd
    graph through every task, differentiated by the trainer's ``loss.backward()``. The reference
    the other executors are tested against."""

    name = "loop"

    def __call__(self, learner, batch):
        return learner.meta_loss(batch)


def task_gradients(learner, theta, wrt, tasks, generators, scale: float, inner_vmap: bool = False):
    """For a list of episodes: the summed query loss, each task's query metric, and ``scale`` times
    the meta-gradient of the summed loss with respect to each tensor of ``wrt`` (``None`` where
    unused; no gradients at all under ``torch.no_grad``).

    Each task's query loss is differentiated as soon as it is computed, with respect to its adapted
    parameters, while its activations are still in the CPU's caches (and then freed); one backward
    pass through the inner loops then carries these gradients to ``theta``. With ``inner_vmap`` the
    inner loops run as one vmap over the stacked support sets. Learner parameters outside the
    model that the query loss uses directly (MAML++'s per-step BatchNorm weights) get that part of
    their gradient from the query losses' backward."""
    names = [k for k, p in theta.items() if p.requires_grad]
    direct = [k for k in wrt if k not in theta]
    direct_grads: dict = {}
    if inner_vmap:
        refuse_autocast("inner_vmap", tasks[0].support_x.device.type)
        stacked = torch.func.vmap(partial(learner.adapted, theta, batched=True))(
            torch.stack([ep.support_x for ep in tasks]), torch.stack([ep.support_y for ep in tasks])
        )
        tracked = [k for k in names if stacked[k].requires_grad]
        adapted = [{k: v.detach()[i] for k, v in stacked.items()} for i in range(len(tasks))]
    else:
        adapted = [learner.adapted(theta, *ep.support, generator=g) for ep, g in zip(tasks, generators)]
        tracked = [k for k in names if adapted[0][k].requires_grad]
    differentiate = torch.is_grad_enabled()
    total, scores, query_grads = 0.0, [], []
    for params, ep in zip(adapted, tasks):
        leaves = {k: v.detach().requires_grad_(differentiate and k in tracked) for k, v in params.items()}
        loss, out = learner.query_loss(leaves, ep.query_x, ep.query_y)
        if differentiate:
            inputs = [leaves[k] for k in tracked] + [wrt[k] for k in direct]
            grads = torch.autograd.grad(loss * scale, inputs, allow_unused=True)
            query_grads.append([torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(tracked, grads)])
            for k, g in zip(direct, grads[len(tracked) :]):
                if g is not None:
                    direct_grads[k] = g + direct_grads[k] if k in direct_grads else g
        total = total + loss.detach()
        scores.append(task_metric(learner.task_type, out.detach(), ep.query_y))
    if not differentiate:
        return total, scores, None
    if inner_vmap:  # one output per parameter, the tasks stacked
        outputs = [stacked[k] for k in tracked]
        cotangents = [torch.stack(g) for g in zip(*query_grads)]
    else:
        outputs = [params[k] for params in adapted for k in tracked]
        cotangents = [g for grads in query_grads for g in grads]
    grads = [None] * len(wrt)
    if outputs:
        grads = list(torch.autograd.grad(outputs, list(wrt.values()), cotangents, allow_unused=True))
    for j, k in enumerate(wrt):
        if k in direct_grads:
            grads[j] = direct_grads[k] if grads[j] is None else grads[j] + direct_grads[k]
    return total, scores, grads


def mean_task_loss(parts, learner, wrt, tasks: int):
    """The mean query loss carrying its meta-gradient, from the ``task_gradients`` of shards."""
    value = sum(total for total, _, _ in parts) / tasks
    scores = [s for _, sc, _ in parts for s in sc]
    if parts[0][2] is None:  # gradients disabled
        return value, learner.metrics(value, scores)
    grads = {
        k: sum(g[j] if g[j] is not None else torch.zeros_like(p) for _, _, g in parts)
        for j, (k, p) in enumerate(wrt.items())
    }
    loss = with_gradient(value, wrt, grads)
    return loss, learner.metrics(loss, scores)


class TaskByTask:
    """The tasks one after another, each query loss differentiated at once (:func:`task_gradients`);
    ``inner_vmap``: the inner loops as one vmap over tasks, then the query losses task by task
    (faster on CPUs for large query sets)."""

    def __init__(self, inner_vmap: bool = False):
        self.inner_vmap = inner_vmap
        self.name = "inner_vmap" if inner_vmap else "loop"

    def __call__(self, learner, batch):
        theta, wrt = learner.params(), meta_parameters(learner)
        part = task_gradients(
            learner, theta, wrt, batch, learner.task_generators(len(batch)), 1 / len(batch), self.inner_vmap
        )
        return mean_task_loss([part], learner, wrt, len(batch))
