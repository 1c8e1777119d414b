"""A meta-batch's tasks in parallel CPU threads.

The tasks of a meta-batch are independent until their gradients are averaged. On a CPU, ``N``
threads that each run a share of the tasks with ``1/N`` of the intra-op threads use the cores
better than one task at a time spread over all of them: the per-operation overhead (Python,
dispatch, autograd) runs in parallel too, and the small per-task operations need no
synchronisation between cores.

Each thread runs its own replica of the learner (its module objects copied, its parameters and
buffers shared), because running a module with given parameters swaps them into the module while
it runs. Threads apply only where they give the same function: on CPU tensors, with gradients
enabled, outside ``torch.func`` transforms, and for models that neither update buffers in place
(BatchNorm running statistics) nor draw random numbers (dropout). Results differ from one
thread's only by floating-point rounding.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...meta.base import task_metric
from ...nn.fast import _transforms_active, autocast_enabled
from ..runtime import set_threads
from ._common import ExecutorError, meta_parameters
from .loop import mean_task_loss, task_gradients


def threads_unsafe(model: nn.Module) -> str:
    """Why ``model`` cannot run in several threads at once ("" when it can)."""
    if any(True for _ in model.buffers()):
        return "it has buffers (BatchNorm running statistics), which each thread would update in place"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "it has dropout, whose random draws would depend on the order the threads run in"
    return ""


def thread_count(learner, tasks: int, example: torch.Tensor) -> int:
    """How many threads to run ``tasks`` tasks in: ``torch.get_num_threads()``, at most one per
    task, and 1 where threads do not apply (a GPU tensor, gradients disabled, inside ``torch.func``
    transforms, a model that is not thread-safe)."""
    if tasks < 2 or example.device.type != "cpu" or not torch.is_grad_enabled() or _transforms_active():
        return 1
    if threads_unsafe(learner.model):
        return 1
    return max(1, min(torch.get_num_threads(), tasks))


def replicate(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module objects that shares its parameters and buffers."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    try:
        return copy.deepcopy(module, memo)
    except Exception as error:  # e.g. a module holding a lock or an open file
        raise ExecutorError(
            f"task threads: cannot copy the {type(module).__name__} for a second thread "
            f"({type(error).__name__}: {error}); set train.executor=loop to run the tasks "
            f"one after another."
        ) from error


def map_shards(learner, fn: Callable, items: Sequence, threads: int) -> list:
    """``[fn(replica_w, items[w::threads]) for w in range(threads)]``, each call in its own thread
    (the caller's thread runs the first, with ``learner`` itself) with
    ``torch.get_num_threads() // threads`` intra-op threads (at least one) and its own replica of
    ``learner``. CPU autocast is carried into the threads. The first exception raised in any thread
    is re-raised here."""
    items = list(items)
    threads = max(1, min(threads, len(items)))
    if threads == 1:
        return [fn(learner, items)]
    total = torch.get_num_threads()
    intra = max(1, total // threads)
    replicas = [learner] + [replicate(learner) for _ in range(threads - 1)]
    autocast = (autocast_enabled("cpu"), _cpu_autocast_dtype())
    results: list = [None] * threads
    errors: list = [None] * threads

    def run(w: int) -> None:
        try:
            set_threads(intra)
            with torch.enable_grad(), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                results[w] = fn(replicas[w], items[w::threads])
        except BaseException as error:  # re-raised in the caller's thread
            errors[w] = error

    workers = [threading.Thread(target=run, args=(w,), name=f"metatl-task-{w}", daemon=True) for w in range(1, threads)]
    try:
        for worker in workers:
            worker.start()
        run(0)
        for worker in workers:
            worker.join()
    finally:
        set_threads(total)
    for error in errors:
        if error is not None:
            raise error
    return results


def _cpu_autocast_dtype() -> torch.dtype:
    get = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4
    return get("cpu") if get is not None else torch.get_autocast_cpu_dtype()


class Threads:
    """The meta-batch's tasks shared among CPU threads (:func:`map_shards`): each thread computes
    its tasks' losses and their meta-gradient (:func:`~metatl.engine.executors.loop.task_gradients`,
    with the inner loops as one vmap over its tasks when ``inner_vmap``), and the returned loss
    carries the sum. For a learner with an ``outer_loss`` (Reptile) the threads compute the
    adapted parameters, and the outer loss is taken from them in the tasks' order."""

    def __init__(self, inner_vmap: bool = False):
        self.inner_vmap = inner_vmap
        self.name = "threads_inner_vmap" if inner_vmap else "threads"

    def __call__(self, learner, batch):
        threads = thread_count(learner, len(batch), batch[0].support_x)
        generators = learner.task_generators(len(batch))
        items = list(zip(batch, generators))
        if learner.outer_loss is not None:
            return self._outer(learner, batch, items, threads)
        theta, wrt = learner.params(), meta_parameters(learner)

        def shard(replica, part):  # a replica shares the tensors: theta and wrt hold for it too
            tasks, gens = [ep for ep, _ in part], [g for _, g in part]
            return task_gradients(replica, theta, wrt, tasks, gens, 1 / len(batch), self.inner_vmap)

        parts = map_shards(learner, shard, items, threads)
        return mean_task_loss(parts, learner, wrt, len(batch))

    @staticmethod
    def _outer(learner, batch, items, threads):
        theta = learner.params()

        def shard(replica, part):
            adapted, scores = [], []
            for ep, generator in part:
                a = {k: v.detach() for k, v in replica.adapted(theta, *ep.support, generator=generator).items()}
                adapted.append(a)
                if len(ep.query_x):
                    with torch.no_grad():
                        scores.append(task_metric(replica.task_type, replica.functional(a, ep.query_x), ep.query_y))
            return adapted, scores

        parts = map_shards(learner, shard, items, threads)
        n = len(parts)
        adapted = [parts[i % n][0][i // n] for i in range(len(batch))]
        scores = [s for _, sc in parts for s in sc]
        loss = learner.outer_loss(theta, adapted)
        return loss, learner.metrics(loss, scores)
