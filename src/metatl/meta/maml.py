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
from typing import Optional, Union

import torch
from torch import nn

from ..data.episode import stack_episodes
from ..nn.backbones import BatchStatsNorm2d, autocast_enabled
from ..registry import ALGORITHMS
from .base import GradientMetaLearner, task_metric
from .rules import SGD
from .threads import check_task_threads, map_shards, resolve_threads

BATCH_TASKS = (False, True, "inner")


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
    batch_tasks : ``False`` (a Python loop over the tasks), ``True`` (the meta-batch as one
        ``torch.func.vmap`` over tasks: faster for small episodes and on GPUs) or ``"inner"``
        (the inner loops as one vmap over tasks, then the query losses task by task: faster on
        CPUs for large query sets, where each task's query batch is big enough for the plain
        convolutions, and the small support sets would leave the loop bound by per-operation
        overhead). A conv net's ``channels_last`` option runs what is outside vmap in the
        channels-last layout, which oneDNN's CPU convolutions are faster on: the query losses with
        ``"inner"``, everything with ``False``; under vmap (the inner loops with ``"inner"``, all
        of ``True``, and ``compile``) it has no effect.
        The same meta-gradient either way. Batching needs equally shaped episodes and
        no BatchNorm running statistics (``bn_mode`` ``batch`` or ``none``); for second order,
        normalisation layers must be :class:`~metatl.nn.BatchStatsNorm2d` (PyTorch's fused
        batch_norm and layer_norm differentiate wrongly twice under vmap).
    compile : with ``batch_tasks``, compute the whole meta-gradient (inner gradients, adapted
        parameters, query loss and its gradient) as one ``torch.func`` function compiled by
        ``torch.compile``, which fuses the elementwise work of the double backward. The first
        meta-iteration compiles (one to two minutes on 2 CPU cores, seconds once PyTorch's compile
        cache holds the graph) and so does any new episode shape; CPU compilation needs a C++
        compiler. The trainer still calls ``loss.backward()``: the returned loss carries the
        computed gradient (:func:`with_gradient`).
    task_threads : with ``batch_tasks`` ``False`` or ``"inner"``, on CPU tensors: run the
        meta-batch's tasks in this many threads, each with its share of the tasks and of the
        intra-op threads (:mod:`metatl.meta.threads`); each thread computes its tasks' losses and
        their meta-gradient, and the returned loss carries the sum (:func:`with_gradient`).
        ``"auto"`` (default): ``torch.get_num_threads()`` threads where that is safe (no
        buffers, no dropout), else 1. 1 runs the tasks one after another. The same meta-gradient
        up to floating-point rounding; faster on multi-core CPUs (0.39 instead of 0.46 s for the
        15-query Omniglot step on 2 cores). With ``batch_tasks=True`` the meta-batch is one vmap,
        and this setting must stay ``"auto"`` or 1.
    """

    def __init__(self, model: nn.Module, task_type: str = "classification", inner_lr: float = 0.01,
                 inner_steps: int = 1, inner_steps_test: Optional[int] = None, first_order: bool = False,
                 batch_tasks: Union[bool, str] = False, compile: bool = False,
                 task_threads: Union[int, str] = "auto"):
        super().__init__(model, task_type, SGD(inner_lr), inner_steps, inner_steps_test)
        if not any(batch_tasks is choice or batch_tasks == choice == "inner" for choice in BATCH_TASKS):
            raise ValueError(f"batch_tasks must be false, true or 'inner', got {batch_tasks!r}.")
        if compile and batch_tasks is not True:
            raise ValueError("compile=True compiles the meta-batch's vmap over tasks; set "
                             "algorithm.batch_tasks=true as well (or compile=false).")
        if batch_tasks and any(True for _ in model.buffers()):
            raise ValueError(f"batch_tasks={batch_tasks!r} cannot update BatchNorm running statistics inside vmap; "
                             "use model.bn_mode 'batch' (the MAML default) or 'none', or batch_tasks=false.")
        unexact = [name for name, m in model.named_modules()
                   if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and not isinstance(m, BatchStatsNorm2d)]
        if batch_tasks and not first_order and unexact:
            raise ValueError(f"batch_tasks={batch_tasks!r} with second-order MAML: PyTorch's fused batch_norm and layer_norm "
                             f"give wrong second-order gradients under vmap (pytorch/functorch#534), and the model "
                             f"has {', '.join(unexact[:3])}. Use metatl.nn.BatchStatsNorm2d for BatchNorm with batch "
                             f"statistics (the conv nets' bn_mode 'batch'), first_order=True, or batch_tasks=false.")
        if check_task_threads(task_threads, model) not in ("auto", 1) and batch_tasks is True:
            raise ValueError(f"task_threads={task_threads} runs tasks in threads, but batch_tasks=true runs the "
                             "meta-batch as one vmap; set task_threads to 'auto' or 1, or batch_tasks to "
                             "false or 'inner'.")
        self.inner_lr, self.first_order, self.batch_tasks = inner_lr, first_order, batch_tasks
        self.task_threads = task_threads
        self.compile = compile
        self._compiled = None  # built on first use: torch.compile(self.meta_gradient)

    def adapted(self, theta, support_x, support_y, batched: bool = False):
        """``theta'_i``: the inner loop on one task's support set."""
        return self.adapt_params(theta, support_x, support_y, self.inner_steps,
                                 create_graph=not self.first_order, batched=batched)

    def task_loss(self, theta, support_x, support_y, query_x, query_y, batched: bool = False):
        """``L_i^query(theta'_i)`` for one task, and the query outputs."""
        out = self.functional(self.adapted(theta, support_x, support_y, batched), query_x)
        return self.loss_fn(out, query_y), out

    def batch_adapted(self, theta, support_x, support_y):
        """Every task's ``theta'_i`` from one vmap over the stacked support sets, as one dict of
        stacked parameters (tasks first; ``batch_tasks="inner"``)."""
        return torch.func.vmap(partial(self.adapted, theta, batched=True))(support_x, support_y)

    def batch_loss(self, theta, support_x, support_y, query_x, query_y):
        """The meta-objective of a stacked meta-batch (one vmap over tasks): the mean query loss,
        and the query outputs (tasks x queries x outputs)."""
        losses, outs = torch.func.vmap(partial(self.task_loss, batched=True), in_dims=(None, 0, 0, 0, 0))(
            theta, support_x, support_y, query_x, query_y)
        return losses.mean(), outs

    def meta_gradient(self, theta, support_x, support_y, query_x, query_y):
        """``(grad_theta L(theta), (L(theta), query outputs))`` as one pure function of tensors,
        the function that ``compile=True`` compiles."""
        return torch.func.grad_and_value(self.batch_loss, has_aux=True)(
            theta, support_x, support_y, query_x, query_y)

    def meta_loss(self, batch):
        theta = self.params()
        if self.batch_tasks is True:
            ep = self._stacked(batch)
            tensors = (ep.support_x, ep.support_y, ep.query_x, ep.query_y)
            if self.compile:
                if self._compiled is None:
                    self._compiled = torch.compile(self.meta_gradient, dynamic=False)
                grads, (loss, outs) = self._compiled({k: p.detach() for k, p in theta.items()}, *tensors)
                loss = with_gradient(loss, theta, grads)
            else:
                loss, outs = self.batch_loss(theta, *tensors)
            scores = [task_metric(self.task_type, o, y) for o, y in zip(outs.detach(), ep.query_y)]
        else:
            loss, scores = self._meta_loss_by_task(theta, batch)
        name = "query_acc" if self.task_type == "classification" else "query_mse"
        return loss, {"loss": loss.item(), name: sum(scores) / len(scores)}

    def task_gradients(self, theta, wrt, tasks, scale: float):
        """For ``batch_tasks`` ``False`` or ``"inner"``: the summed query loss of ``tasks`` (a list
        of episodes), each task's query metric, and ``scale`` times the meta-gradient of the summed
        loss with respect to each tensor of ``wrt`` (``None`` where unused): the parameters of
        ``theta`` that require grad, and any others the inner loop uses (a learned update rule's).
        With gradients disabled, no gradients (``None``).

        Each task's query loss is differentiated as soon as it is computed, with respect to its
        adapted parameters, while its activations are still in the CPU's caches (and then freed);
        one backward pass through the inner loops then carries these gradients to ``theta``."""
        names = [k for k, p in theta.items() if p.requires_grad]
        if self.batch_tasks == "inner":  # only the support sets are stacked
            self._refuse_autocast(tasks[0].support_x.device.type)
            stacked = self.batch_adapted(theta, torch.stack([ep.support_x for ep in tasks]),
                                         torch.stack([ep.support_y for ep in tasks]))
            tracked = [k for k in names if stacked[k].requires_grad]
            adapted = [{k: v.detach()[i] for k, v in stacked.items()} for i in range(len(tasks))]
        else:
            adapted = [self.adapted(theta, *ep.support) for ep in tasks]
            tracked = [k for k in names if adapted[0][k].requires_grad]
        differentiate = torch.is_grad_enabled()  # under no_grad: the losses and metrics only
        total, scores, query_grads = 0.0, [], []
        for params, ep in zip(adapted, tasks):
            leaves = {k: v.detach().requires_grad_(differentiate and k in tracked) for k, v in params.items()}
            out = self.functional(leaves, ep.query_x)
            loss = self.loss_fn(out, ep.query_y)
            if differentiate:
                grads = torch.autograd.grad(loss * scale, [leaves[k] for k in tracked], allow_unused=True)
                query_grads.append([torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(tracked, grads)])
            total = total + loss.detach()
            scores.append(task_metric(self.task_type, out.detach(), ep.query_y))
        if not differentiate:
            return total, scores, None
        if self.batch_tasks == "inner":  # one output per parameter, the tasks stacked
            outputs = [stacked[k] for k in tracked]
            cotangents = [torch.stack(g) for g in zip(*query_grads)]
        else:
            outputs = [params[k] for params in adapted for k in tracked]
            cotangents = [g for grads in query_grads for g in grads]
        grads = torch.autograd.grad(outputs, list(wrt.values()), cotangents, allow_unused=True)
        return total, scores, grads

    def _meta_loss_by_task(self, theta, batch):
        """The meta-batch's mean query loss, carrying its meta-gradient (:func:`with_gradient`), and
        the tasks' metrics; the tasks shared among ``task_threads`` threads
        (:func:`~metatl.meta.threads.map_shards`)."""
        wrt = {k: p for k, p in theta.items() if p.requires_grad}
        seen = {id(p) for p in wrt.values()}
        wrt.update((k, p) for k, p in self.named_parameters() if p.requires_grad and id(p) not in seen)
        threads = resolve_threads(self.task_threads, self.model, len(batch), batch[0].support_x)
        task_gradients = partial(self.task_gradients, theta, wrt, scale=1 / len(batch))
        parts = map_shards(self.model, task_gradients, batch, threads)
        value = sum(total for total, _, _ in parts) / len(batch)
        scores = [s for _, sc, _ in parts for s in sc]
        if parts[0][2] is None:  # gradients disabled
            return value, scores
        grads = {k: sum(g[j] if g[j] is not None else torch.zeros_like(p) for _, _, g in parts)
                 for j, (k, p) in enumerate(wrt.items())}
        return with_gradient(value, wrt, grads), scores

    def _stacked(self, batch):
        """The meta-batch stacked for vmap."""
        self._refuse_autocast(batch[0].query_x.device.type)
        return stack_episodes(batch)

    def _refuse_autocast(self, device_type: str) -> None:
        if autocast_enabled(device_type):
            raise ValueError(f"batch_tasks={self.batch_tasks!r} (vmap) cannot run under bfloat16 autocast (its "
                             "double backward mixes dtypes); set train.precision=float32 or "
                             "algorithm.batch_tasks=false.")


class KnownGradient(torch.autograd.Function):
    """A scalar of some parameters whose gradient was computed already:
    ``with_gradient(value, params, grads)`` returns ``value``, and its backward gives each
    parameter ``grad_output * grads[name]``. It lets a meta-learner that computes its own
    meta-gradient (``MAML(compile=True)``) keep the trainer's ``loss.backward()`` interface, with
    gradient clipping and the distributed average."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(grad_output * g for g in ctx.grads))


def with_gradient(value, params, grads):
    """``value`` (a scalar tensor) with ``d value / d params[k] = grads[k]`` for autograd."""
    names = list(params)
    return KnownGradient.apply(value, tuple(grads[k] for k in names), *(params[k] for k in names))
