"""The meta-batch as one ``torch.func.vmap`` over tasks, eager or compiled."""

from __future__ import annotations

from functools import partial

import torch

from ...data.episode import stack_episodes
from ...meta.base import task_metric
from ._common import meta_parameters, refuse_autocast, with_gradient


def batch_loss(learner, theta, support_x, support_y, query_x, query_y):
    """The mean query loss of a stacked meta-batch, and the query outputs (tasks x queries x outputs)."""
    losses, outs = torch.func.vmap(partial(learner.task_loss, batched=True), in_dims=(None, 0, 0, 0, 0))(
        theta, support_x, support_y, query_x, query_y
    )
    return losses.mean(), outs


class Vmap:
    """Every task's inner loop and query loss in one vmap (equally shaped episodes): fewer, larger
    operations, fastest on GPUs and for small networks. ``compile``: the whole meta-gradient
    (inner gradients, adapted parameters, query losses and their gradient) as one function compiled
    by ``torch.compile``, which fuses the elementwise work of the double backward; the first step
    (and any new episode shape) compiles, which needs a C++ compiler on CPUs."""

    def __init__(self, compile: bool = False):
        self.compile = compile
        self.name = "compile" if compile else "vmap"
        self._compiled = {}  # id(learner) -> compiled meta-gradient

    def __call__(self, learner, batch):
        refuse_autocast(self.name, batch[0].query_x.device.type)
        ep = stack_episodes(batch)
        tensors = (ep.support_x, ep.support_y, ep.query_x, ep.query_y)
        theta = learner.params()
        if self.compile and torch.is_grad_enabled():
            fn = self._compiled.get(id(learner))
            if fn is None:
                gradient = torch.func.grad_and_value(partial(batch_loss, learner), has_aux=True)
                fn = self._compiled[id(learner)] = torch.compile(gradient, dynamic=False)
            grads, (loss, outs) = fn({k: p.detach() for k, p in theta.items()}, *tensors)
            wrt = meta_parameters(learner)
            loss = with_gradient(loss, wrt, {k: grads.get(k, torch.zeros_like(p)) for k, p in wrt.items()})
        else:
            loss, outs = batch_loss(learner, theta, *tensors)
        scores = [task_metric(learner.task_type, o, y) for o, y in zip(outs.detach(), ep.query_y)]
        return loss, learner.metrics(loss, scores)
