"""Executors: how a meta-batch's task losses and meta-gradient are computed.

A gradient-based meta-learner (:class:`~metatl.meta.base.GradientMetaLearner`) states what one
task computes; an executor runs a meta-batch of tasks and returns ``(loss, metrics)``, where
``loss.backward()`` gives the meta-gradient of the learner's outer objective. Every executor
computes the same function as the plain loop (``tests/test_executors.py``, in float64), so the
choice, ``train.executor``, is about speed only:

- ``loop``: the tasks one after another, each query loss differentiated as soon as it is computed;
- ``inner_vmap``: the inner loops as one ``torch.func.vmap`` over tasks, the query losses task by
  task (large query sets on CPUs);
- ``vmap``: the whole meta-batch as one vmap (GPUs, small networks);
- ``compile``: ``vmap`` compiled by ``torch.compile`` (long runs; the first step compiles);
- ``threads`` / ``threads_inner_vmap``: ``loop`` / ``inner_vmap`` with the tasks shared among
  CPU threads (:mod:`~metatl.engine.executors.threads`);
- ``auto`` (default): the fastest valid one for the learner, model and device (:func:`choose`).

The vmap executors need equally shaped episodes, no BatchNorm running statistics and, for second
order, normalisation layers that are exact when differentiated twice under vmap
(:class:`~metatl.nn.BatchStatsNorm2d`); they refuse bfloat16 autocast.
"""

from __future__ import annotations

from torch import nn

from ...meta.base import GradientMetaLearner
from ._common import ExecutorError, KnownGradient, meta_parameters, vmap_unfit, with_gradient
from .loop import Loop, TaskByTask
from .threads import Threads, threads_unsafe
from .vmap import Vmap

EXECUTORS = {
    "loop": lambda: TaskByTask(),
    "inner_vmap": lambda: TaskByTask(inner_vmap=True),
    "vmap": lambda: Vmap(),
    "compile": lambda: Vmap(compile=True),
    "threads": lambda: Threads(),
    "threads_inner_vmap": lambda: Threads(inner_vmap=True),
}
VMAP_EXECUTORS = ("inner_vmap", "vmap", "compile", "threads_inner_vmap")


class Direct:
    """A meta-learner that computes its own meta-loss (metric-based, RNN-based, transfer)."""

    name = "direct"

    def __call__(self, learner, batch):
        return learner.meta_loss(batch)


def is_gradient_learner(learner) -> bool:
    """Whether ``learner``'s meta-loss is the gradient meta-learner's plain loop, which executors
    may run otherwise (a learner that overrides ``meta_loss``, as ``pretrain``, runs its own)."""
    return isinstance(learner, GradientMetaLearner) and type(learner).meta_loss is GradientMetaLearner.meta_loss


def small_queries(batch) -> bool:
    """Whether a meta-batch's episodes are equally shaped with query sets no larger than their
    support sets (MAML's training protocol: one query per class)."""
    first = batch[0]
    same = all(ep.support_x.shape == first.support_x.shape and ep.query_x.shape == first.query_x.shape for ep in batch)
    return same and len(first.query_x) <= len(first.support_x)


def choose(learner, device: str = "cpu", precision: str = "float32", small: bool = False) -> str:
    """The executor ``auto`` picks: on GPUs the meta-batch as one vmap; on CPUs vmap for networks
    without convolutions and for conv nets with small query sets (``small``; per-operation
    overhead dominates there), task threads with the inner loops batched for conv nets with large
    query sets, and task threads where vmap does not apply (Reptile, the meta-learner LSTM,
    BatchNorm running statistics, bfloat16)."""
    vmap_ok = not vmap_unfit(learner) and precision != "bfloat16"
    if str(device).startswith("cuda"):
        return "vmap" if vmap_ok else "loop"
    if vmap_ok and (small or not any(isinstance(m, nn.Conv2d) for m in learner.model.modules())):
        return "vmap"
    if threads_unsafe(learner.model):
        return "inner_vmap" if vmap_ok else "loop"
    return "threads_inner_vmap" if vmap_ok else "threads"


class Auto:
    """``auto`` where the choice depends on the episodes' shape: decided at the first meta-batch of
    each shape (:func:`choose` with :func:`small_queries`)."""

    name = "auto"

    def __init__(self, device: str, precision: str):
        self.device, self.precision = device, precision
        self.chosen = {}  # episode shapes -> executor

    def __call__(self, learner, batch):
        key = (tuple(batch[0].support_x.shape), tuple(batch[0].query_x.shape), len(batch))
        if key not in self.chosen:
            self.chosen[key] = EXECUTORS[choose(learner, self.device, self.precision, small_queries(batch))]()
        return self.chosen[key](learner, batch)


def make_executor(name: str, learner, device: str = "cpu", precision: str = "float32"):
    """The executor ``name`` (``train.executor``) for ``learner``, checked: an ExecutorError says
    why it cannot run this learner and what to set instead."""
    if not is_gradient_learner(learner):
        if name not in ("auto", "loop"):
            raise ExecutorError(
                f"train.executor={name} runs gradient-based meta-learners (maml, reptile, "
                f"meta_lstm); {type(learner).__name__} computes its meta-loss itself. "
                f"Use train.executor=auto."
            )
        return Direct()
    if name == "auto":
        name = choose(learner, device, precision)
        if choose(learner, device, precision, small=True) != name:
            return Auto(device, precision)
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown train.executor {name!r}; choose auto or one of {', '.join(EXECUTORS)}.")
    if getattr(learner, "outer_loss", None) is not None and name not in ("loop", "threads"):
        raise ExecutorError(
            f"train.executor={name}: {type(learner).__name__} has its own outer rule, which runs "
            f"with train.executor loop, threads or auto."
        )
    if name in VMAP_EXECUTORS:
        why = vmap_unfit(learner)
        if why:
            raise ExecutorError(f"train.executor={name}: {why}. Or use train.executor=threads (or loop, or auto).")
        if precision == "bfloat16":
            raise ExecutorError(
                f"train.executor={name} (vmap) cannot run with train.precision=bfloat16 (its double "
                f"backward mixes dtypes under autocast); set train.executor=threads or "
                f"train.precision=float32."
            )
    if name == "compile":
        model = {id(p) for p in learner.params().values()}
        learned = [k for k, p in meta_parameters(learner).items() if id(p) not in model]
        if learned:
            raise ExecutorError(
                f"train.executor=compile differentiates the model's parameters only, and "
                f"{type(learner).__name__} also meta-learns {', '.join(learned[:3])}"
                f"{', ...' if len(learned) > 3 else ''}; use train.executor=vmap (the same "
                f"function, not compiled) or auto."
            )
    if name in ("threads", "threads_inner_vmap") and threads_unsafe(learner.model):
        raise ExecutorError(
            f"train.executor={name}: the model cannot run in several threads at once, because "
            f"{threads_unsafe(learner.model)}; use train.executor={name.replace('threads', 'loop').replace('loop_', '')} or auto."
        )
    executor = EXECUTORS[name]()
    if getattr(learner, "outer_loss", None) is not None and name == "loop":
        return Loop()
    return executor


__all__ = [
    "EXECUTORS",
    "Direct",
    "ExecutorError",
    "KnownGradient",
    "Loop",
    "TaskByTask",
    "Threads",
    "Vmap",
    "choose",
    "make_executor",
    "with_gradient",
]
