"""What every meta-learner shares: the functional view of its model, the task loss, and the
:class:`Predictor` that :meth:`MetaLearner.adapt` returns.

A meta-learner is an ``nn.Module`` that holds the base model (``self.model``, a plain module) and
any meta-learned state. It implements

- ``meta_loss(batch: list[Episode]) -> (loss, metrics)``: the trainer calls ``loss.backward()``
  and steps the outer optimizer; ``metrics`` is a dict of floats;
- ``adapt(support_x, support_y) -> Predictor``: used by the evaluator, ``metatl adapt`` and users.

Two class attributes tell the engine how to treat it: ``uses_head`` (``False``: the backbone is
built without a classification head and returns embeddings, as for the metric-based learners) and
``couples_queries`` (``True``: a query's prediction depends on the other queries of its batch in a
way other than BatchNorm, so a non-transductive test must classify one query per forward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episode import Episode
from ..nn.fast import functional_call
from ._types import Metrics, Params
from .adapt import adapt
from .rules import Rule

if TYPE_CHECKING:  # images.py imports this module
    from .images import Files, ImagePredictor, Labels


def task_loss(task_type: str) -> Callable[[Tensor, Tensor], Tensor]:
    if task_type == "classification":
        return F.cross_entropy
    if task_type == "regression":
        return F.mse_loss
    raise ValueError(f"unknown task type {task_type!r}; use 'classification' or 'regression'.")


def task_metric(task_type: str, output: Tensor, y: Tensor) -> float:
    """Accuracy for classification, MSE for regression (the number the evaluator reports)."""
    if task_type == "classification":
        return (output.argmax(-1) == y).float().mean().item()
    return F.mse_loss(output, y).item()


METRIC_NAME = {"classification": "accuracy", "regression": "mse"}


def check_support(support_x: Tensor, support_y: Tensor, task_type: str = "classification") -> Tensor:
    """``support_y`` as ``adapt`` needs it (int64 class labels for classification), or a clear error
    for a support set it cannot read: not tensors, not one label per example, float class labels."""
    for name, t in (("support_x", support_x), ("support_y", support_y)):
        if not isinstance(t, Tensor):
            raise ValueError(
                f"{name} must be a tensor, got {type(t).__name__}; use torch.as_tensor(...) "
                f"(image files: learner.adapt_images)."
            )
    n_y = len(support_y) if support_y.dim() else 0
    if support_x.dim() == 0 or len(support_x) != n_y:
        raise ValueError(
            f"support_x has {len(support_x) if support_x.dim() else 0} example(s) but support_y has "
            f"{n_y} label(s) (shape {tuple(support_y.shape)}); give one label per example, in order."
        )
    if task_type != "classification":
        if not support_y.dtype.is_floating_point:
            raise ValueError(
                f"support_y of a {task_type} task must hold float targets, got dtype "
                f"{support_y.dtype}; use support_y.float()."
            )
        return support_y
    if support_y.dtype.is_floating_point or support_y.dtype.is_complex or support_y.dtype == torch.bool:
        raise ValueError(
            f"support_y must hold integer class labels 0..N-1, got dtype {support_y.dtype}; use "
            f"support_y.long() if they are whole numbers (class names: learner.adapt_images "
            f"takes them as labels)."
        )
    if support_y.dim() != 1:
        raise ValueError(
            f"support_y must hold one class label per example, shape (n,), got shape {tuple(support_y.shape)}."
        )
    return support_y.long()


class Predictor:
    """A learner adapted to one task. ``predictor(x)`` gives logits (or regression outputs),
    ``predict(x)`` class indices, ``predict_proba(x)`` class probabilities."""

    def __init__(self, forward: Callable[[Tensor], Tensor], task_type: str = "classification"):
        self._forward = forward
        self.task_type = task_type

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self._forward(x)

    def predict(self, x: Tensor) -> Tensor:
        out = self(x)
        return out.argmax(-1) if self.task_type == "classification" else out

    def predict_proba(self, x: Tensor) -> Tensor:
        if self.task_type != "classification":
            raise TypeError("predict_proba is only defined for classification tasks.")
        return self(x).softmax(-1)


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers without running statistics (``bn_mode: batch``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in model.modules())


def queries_interact(learner: nn.Module) -> bool:
    """Whether a query's prediction can depend on the other queries of its batch: BatchNorm with
    batch statistics, or a learner that says so with ``couples_queries = True``. Only then does a
    non-transductive prediction need one forward pass per query."""
    return uses_batch_statistics(learner) or bool(getattr(learner, "couples_queries", False))


class MetaLearner(nn.Module):
    """Base class: holds ``model`` and the task type, and runs the model functionally."""

    uses_head = True  # False: the backbone returns embeddings (metatl.build sets out_features=0)
    couples_queries = False  # True: queries of one batch affect each other's predictions

    def __init__(self, model: nn.Module, task_type: str = "classification"):
        super().__init__()
        self.model = model
        self.task_type = task_type
        self.loss_fn = task_loss(task_type)

    def params(self) -> Params:
        """The model's parameters as a dict (the outer loop differentiates through these)."""
        return dict(self.model.named_parameters())

    def functional(self, params: Params, x: Tensor) -> Tensor:
        """``f(x; params)``. ``params`` may also carry buffers (BatchNorm running statistics);
        buffers it lacks come from the model (:func:`metatl.nn.fast.functional_call`)."""
        return functional_call(self.model, params, (x,))

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:  # pragma: no cover - interface
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        raise NotImplementedError  # pragma: no cover - interface

    def adapt_images(
        self,
        support: Files,
        labels: Labels | None = None,
        steps: int | None = None,
        invert: bool | None = None,
        transductive: bool = False,
    ) -> ImagePredictor:
        """:meth:`adapt` on image files, converted as the checkpoint expects (channels, size, and
        inverted for Omniglot models): ``support`` is a folder with one sub-folder per class, or a
        list of files with ``labels`` (class names or integer ids). Returns an
        :class:`~metatl.meta.images.ImagePredictor` (``predict_images(paths)``,
        ``predict_proba_images(paths)``); ``metatl adapt`` runs the same code
        (:func:`metatl.meta.images.adapt_images`)."""
        from .images import adapt_images

        return adapt_images(self, support, labels, steps=steps, invert=invert, transductive=transductive)


class GradientMetaLearner(MetaLearner):
    """A meta-learner whose base learner adapts by gradient steps (MAML, Reptile, the meta-learner
    LSTM...). It states what is computed for one task; how a meta-batch of tasks is executed (a
    loop, vmap, threads, compiled) is the business of :mod:`metatl.engine.executors`, which are
    tested against :meth:`meta_loss`, the plain loop written here.

    - :meth:`adapted`: ``theta'_i``, the inner loop (the one :func:`~metatl.meta.adapt.adapt`
      with this learner's ``rule``) on a task's support set;
    - :meth:`query_loss`: ``L_i^query`` of some parameters, and the query outputs;
    - :meth:`task_loss`: ``L_i^query(theta'_i)``;
    - :meth:`adapts`: which parameters the inner loop adapts (all by default; ANIL: the head's);
    - ``second_order``: whether the meta-gradient flows through the inner gradients;
    - :meth:`outer_loss`: the outer objective from every task's ``theta'_i``. By default ``None``:
      the outer objective is the mean task loss ``1/|B| sum_i L_i^query(theta'_i)``; a learner
      whose outer step is something else (Reptile) defines it.

    ``inner_steps_test`` (default: ``inner_steps``) and ``inner_batch_test`` apply when adapting
    outside meta-training; ``inner_batch`` draws a minibatch of the support set per inner step.
    """

    second_order = False
    inner_step_runner = None  # the engine's adapt(run_step=...) hook (train.inner_checkpoint)
    vmappable = True  # False: the inner loop cannot run under torch.func.vmap (data-dependent control flow)

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        rule: Rule,
        inner_steps: int,
        inner_steps_test: int | None = None,
        inner_batch: int | None = None,
        inner_batch_test: int | None = None,
    ):
        super().__init__(model, task_type)
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}.")
        self.rule = rule
        self.inner_steps = inner_steps
        self.inner_steps_test = inner_steps if inner_steps_test is None else inner_steps_test
        self.inner_batch, self.inner_batch_test = inner_batch, inner_batch_test

    # -- what one task computes ----------------------------------------------------------------
    def adapts(self, name: str) -> bool:
        """Whether the inner loop adapts the parameter ``name`` (a key of :meth:`params`). Every
        parameter by default; a learner that adapts a part of the model only (ANIL: the head)
        says so here, and :meth:`adapted` and :meth:`adapt` (so every executor) leave the others
        at ``theta``, where they get their meta-gradient through the outer loop only."""
        return True

    def adapted(
        self,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        *,
        batched: bool = False,
        generator: torch.Generator | None = None,
    ) -> Params:
        """``theta'_i``: ``inner_steps`` updates of the rule on the support set, differentiable
        with respect to ``params`` through the inner gradients when ``second_order``."""
        return self.adapt_params(
            params,
            support_x,
            support_y,
            self.inner_steps,
            create_graph=self.second_order,
            batch_size=self.inner_batch,
            batched=batched,
            generator=generator,
        )

    def query_loss(self, params: Params, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        """``L^query(params)`` and the query outputs."""
        out = self.functional(params, query_x)
        return self.loss_fn(out, query_y), out

    def task_loss(
        self,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        *,
        batched: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``L_i^query(theta'_i)`` and the query outputs."""
        return self.query_loss(
            self.adapted(params, support_x, support_y, batched=batched, generator=generator), query_x, query_y
        )

    outer_loss: Callable[[Params, list[Params]], Tensor] | None = None

    def task_generators(self, tasks: int) -> list[torch.Generator | None]:
        """One generator per task for its inner minibatches, seeded from the global generator
        before any task runs, so that the result does not depend on the order the tasks run in;
        ``None`` for each task when the inner loop takes whole support sets."""
        if self.inner_batch is None:
            return [None] * tasks
        return [torch.Generator().manual_seed(s) for s in torch.randint(0, 2**62, (tasks,)).tolist()]

    def metrics(self, loss: Tensor, scores: list[float]) -> dict:
        """The metrics of a meta-batch: the loss and the mean query accuracy (or MSE)."""
        name = "query_acc" if self.task_type == "classification" else "query_mse"
        metrics = {"loss": float(loss.detach())}
        if scores:
            metrics[name] = sum(scores) / len(scores)
        return metrics

    # -- the meta-batch, as the equation says ----------------------------------------------------
    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        """The outer objective of a meta-batch computed task by task, and its metrics:
        ``1/|B| sum_i L_i^query(theta'_i)``, or :meth:`outer_loss` where the learner defines one."""
        theta = self.params()
        generators = self.task_generators(len(batch))
        if self.outer_loss is not None:
            adapted = [self.adapted(theta, *ep.support, generator=g) for ep, g in zip(batch, generators)]
            with torch.no_grad():
                scores = [
                    task_metric(self.task_type, self.functional(a, ep.query_x), ep.query_y)
                    for a, ep in zip(adapted, batch)
                    if len(ep.query_x)
                ]
            loss = self.outer_loss(theta, adapted)
            return loss, self.metrics(loss, scores)
        losses, scores = [], []
        for ep, g in zip(batch, generators):
            loss, out = self.task_loss(theta, *ep.support, *ep.query, generator=g)
            losses.append(loss)
            scores.append(task_metric(self.task_type, out.detach(), ep.query_y))
        loss = torch.stack(losses).mean()
        return loss, self.metrics(loss, scores)

    # -- adaptation ------------------------------------------------------------------------------
    def adapt_params(
        self,
        params: Params,
        x: Tensor,
        y: Tensor,
        steps: int,
        *,
        create_graph: bool = False,
        batch_size: int | None = None,
        buffers: Params | None = None,
        batched: bool = False,
        generator: torch.Generator | None = None,
        **options,
    ) -> Params:
        """:func:`metatl.meta.adapt.adapt` with this learner's model, loss and rule. ``buffers``
        defaults to the model's own (BatchNorm running statistics are updated in training);
        ``generator`` draws the minibatches (default: the global generator); ``options`` go to
        :func:`~metatl.meta.adapt.adapt` (``step_params``, ``trajectory``)."""
        if buffers is None:
            buffers = dict(self.model.named_buffers())
        return adapt(
            self.functional,
            params,
            x,
            y,
            self.loss_fn,
            self.rule,
            steps,
            create_graph=create_graph,
            trainable=self.adapts,
            batch_size=batch_size,
            buffers=buffers,
            batched=batched,
            generator=generator,
            run_step=self.inner_step_runner,
            **options,
        )

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Adapt a copy of the meta-learned parameters to a support set (no meta-gradient)."""
        support_y = check_support(support_x, support_y, self.task_type)
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        params = {k: p.detach() for k, p in self.params().items()}
        steps = self.inner_steps_test if steps is None else steps
        adapted = self.adapt_params(
            params, support_x, support_y, steps, batch_size=self.inner_batch_test, buffers=buffers
        )
        adapted = {k: p.detach() for k, p in adapted.items()}
        return Predictor(lambda x: self.functional({**buffers, **adapted}, x), self.task_type)
