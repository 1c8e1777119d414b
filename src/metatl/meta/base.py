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

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.stateless import functional_call
from .adapt import adapt
from .threads import thread_model

Params = Dict[str, Tensor]


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


class MetaLearner(nn.Module):
    """Base class: holds ``model`` and the task type, and runs the model functionally."""

    uses_head = True  # False: the backbone returns embeddings (engine.build sets out_features=0)
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
        buffers it lacks come from the model (:func:`metatl.nn.stateless.functional_call`). Inside
        :func:`metatl.meta.threads.map_shards` it runs the calling thread's replica of the model."""
        return functional_call(thread_model(self.model), params, (x,))

    def meta_loss(self, batch):  # pragma: no cover - interface
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> Predictor:
        raise NotImplementedError  # pragma: no cover - interface

    def adapt_images(self, support, labels=None, steps: Optional[int] = None, invert: Optional[bool] = None,
                     transductive: bool = False):
        """:meth:`adapt` on image files, converted as the checkpoint expects (channels, size, and
        inverted for Omniglot models): ``support`` is a folder with one sub-folder per class, or a
        list of files with ``labels`` (class names or integer ids). Returns an
        :class:`~metatl.engine.predict.ImagePredictor` (``predict_images(paths)``,
        ``predict_proba_images(paths)``); ``metatl adapt`` runs the same code
        (:func:`metatl.engine.predict.adapt_images`)."""
        from ..engine.predict import adapt_images

        return adapt_images(self, support, labels, steps=steps, invert=invert, transductive=transductive)


class GradientMetaLearner(MetaLearner):
    """A meta-learner whose base learner adapts by gradient steps (MAML, Reptile, Meta-SGD...).

    ``rule`` is the inner update rule (:mod:`metatl.meta.rules`); ``inner_steps_test`` (default:
    ``inner_steps``) and ``inner_batch_test`` apply when adapting outside meta-training.
    """

    def __init__(self, model: nn.Module, task_type: str, rule, inner_steps: int,
                 inner_steps_test: Optional[int] = None, inner_batch: Optional[int] = None,
                 inner_batch_test: Optional[int] = None):
        super().__init__(model, task_type)
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}.")
        self.rule = rule
        self.inner_steps = inner_steps
        self.inner_steps_test = inner_steps if inner_steps_test is None else inner_steps_test
        self.inner_batch, self.inner_batch_test = inner_batch, inner_batch_test

    def adapt_params(self, params: Params, x: Tensor, y: Tensor, steps: int, *,
                     create_graph: bool = False, batch_size: Optional[int] = None,
                     buffers: Optional[Params] = None, batched: bool = False,
                     generator: Optional[torch.Generator] = None) -> Params:
        """:func:`metatl.meta.adapt.adapt` with this learner's model, loss and rule. ``buffers``
        defaults to the model's own (BatchNorm running statistics are updated in training);
        ``generator`` draws the minibatches (default: the global generator)."""
        if buffers is None:
            buffers = dict(self.model.named_buffers())
        return adapt(self.functional, params, x, y, self.loss_fn, self.rule, steps, create_graph=create_graph,
                     batch_size=batch_size, buffers=buffers, batched=batched, generator=generator)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: Optional[int] = None) -> Predictor:
        """Adapt a copy of the meta-learned parameters to a support set (no meta-gradient)."""
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        params = {k: p.detach() for k, p in self.params().items()}
        steps = self.inner_steps_test if steps is None else steps
        adapted = self.adapt_params(params, support_x, support_y, steps,
                                    batch_size=self.inner_batch_test, buffers=buffers)
        adapted = {k: p.detach() for k, p in adapted.items()}
        return Predictor(lambda x: self.functional({**buffers, **adapted}, x), self.task_type)
