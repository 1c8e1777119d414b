"""A meta-batch's tasks in parallel CPU threads (``task_threads`` of MAML and Reptile).

The tasks of a meta-batch are independent until their gradients are averaged. On a CPU, ``N``
threads that each run a share of the tasks with one intra-op thread use the cores better than one
task at a time spread over ``N`` intra-op threads: the per-operation overhead (Python, dispatch,
autograd) runs in parallel too, and the small per-task operations need no synchronisation between
cores. Second-order MAML's 15-query Omniglot step on 2 cores: 0.39 instead of 0.46 s
(``benchmarks/task_threads.py``).

Each thread runs the model through its own replica, because ``torch.func.functional_call`` swaps a
module's parameters while it runs, so two threads cannot share one module. A replica shares the
parameters' and buffers' storage (it copies only the module objects) and is made for each call, so
it always matches the model. :meth:`MetaLearner.functional` runs the calling thread's replica.

Threads are used only where they give the same function: on CPU tensors, with gradients enabled,
outside ``torch.func`` transforms, and for models that neither update buffers in place (BatchNorm
running statistics) nor draw random numbers (dropout), whose results would then depend on the
order in which the threads run. Results differ from one thread's only by floating-point rounding.
"""
from __future__ import annotations

import copy
import threading
from contextvars import ContextVar
from typing import Callable, List, Sequence, TypeVar, Union

import torch
from torch import nn

from ..nn.backbones import _compiling, _transforms_active, autocast_enabled

T = TypeVar("T")
R = TypeVar("R")

# the calling thread's replicas: id(model) -> replica (a thread starts with an empty context)
_REPLICAS: ContextVar[dict] = ContextVar("metatl_task_thread_replicas", default={})


def check_task_threads(setting: Union[int, str], model: nn.Module) -> Union[int, str]:
    """Validate a ``task_threads`` setting for ``model``: ``"auto"`` or a positive integer, and
    more than 1 only for a model that can run in several threads at once."""
    if not (setting == "auto" or (isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1)):
        raise ValueError(f"task_threads must be 'auto' or a positive integer, got {setting!r}.")
    if setting not in ("auto", 1) and threads_unsafe(model):
        raise ValueError(f"task_threads={setting}: the model cannot run in several threads at once, "
                         f"because {threads_unsafe(model)}; set task_threads to 'auto' or 1.")
    return setting


def threads_unsafe(model: nn.Module) -> str:
    """Why ``model`` cannot run in several threads at once ("" when it can)."""
    if any(True for _ in model.buffers()):
        return "it has buffers (BatchNorm running statistics), which each thread would update in place"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "it has dropout, whose random draws would depend on the order the threads run in"
    return ""


def resolve_threads(setting: Union[int, str], model: nn.Module, tasks: int, example: torch.Tensor) -> int:
    """How many threads to run ``tasks`` tasks in: 1 where threads do not apply (a GPU tensor,
    gradients disabled, inside ``torch.func`` transforms, a model that is not thread-safe),
    otherwise ``setting`` (``"auto"``: ``torch.get_num_threads()``), at most one per task."""
    if tasks < 2 or example.device.type != "cpu" or not torch.is_grad_enabled() or _transforms_active():
        return 1
    if threads_unsafe(model):
        return 1
    wanted = torch.get_num_threads() if setting == "auto" else setting
    return max(1, min(wanted, tasks))


def thread_model(model: nn.Module) -> nn.Module:
    """The calling thread's replica of ``model`` inside :func:`map_shards`, else ``model``. Under
    ``torch.compile`` (which cannot trace a ``ContextVar`` and would run the whole compiled function
    eagerly) ``model``: compiled functions run in the caller's thread."""
    if _compiling():
        return model
    return _REPLICAS.get().get(id(model), model)


def replicate(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module objects that shares its parameters and buffers."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:  # e.g. a module holding a lock or an open file
        raise RuntimeError(f"task_threads: cannot copy the {type(model).__name__} for a second thread "
                           f"({type(error).__name__}: {error}); set algorithm.task_threads=1 (task_threads=1 "
                           f"in Python) to run the tasks one after another.") from error


def map_shards(model: nn.Module, fn: Callable[[Sequence[T]], R], items: Sequence[T], threads: int) -> List[R]:
    """``[fn(items[w::threads]) for w in range(threads)]``, each call in its own thread (the
    caller's thread runs the first) with ``torch.get_num_threads() // threads`` intra-op threads
    (at least one) and its own replica of ``model`` (see :func:`thread_model`). CPU autocast is
    carried into the threads. The first exception raised in any thread is re-raised here."""
    items = list(items)
    threads = max(1, min(threads, len(items)))
    if threads == 1:
        return [fn(items)]
    total = torch.get_num_threads()
    intra = max(1, total // threads)
    replicas = [model] + [replicate(model) for _ in range(threads - 1)]
    autocast = (autocast_enabled("cpu"), _cpu_autocast_dtype())
    results: list = [None] * threads
    errors: list = [None] * threads

    def run(w: int) -> None:
        token = _REPLICAS.set({**_REPLICAS.get(), id(model): replicas[w]})
        try:
            torch.set_num_threads(intra)
            with torch.enable_grad(), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                results[w] = fn(items[w::threads])
        except BaseException as error:  # re-raised in the caller's thread
            errors[w] = error
        finally:
            _REPLICAS.reset(token)

    workers = [threading.Thread(target=run, args=(w,), name=f"metatl-task-{w}", daemon=True)
               for w in range(1, threads)]
    try:
        for worker in workers:
            worker.start()
        run(0)
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(total)
    for error in errors:
        if error is not None:
            raise error
    return results


def _cpu_autocast_dtype() -> torch.dtype:
    get = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4
    return get("cpu") if get is not None else torch.get_autocast_cpu_dtype()
