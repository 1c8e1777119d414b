"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel and Levine, ICML 2017).

Inner loop, per task i, ``k = inner_steps`` times on the support set::

    theta'_i = theta - alpha * grad_theta L_i^support(theta)

Outer objective on the query sets, minimised by the trainer's optimizer (Adam in the paper)::

    L(theta) = 1/|B| * sum_{i in B} L_i^query(theta'_i)

(the mean over the meta-batch, as in the reference code; the paper's sum differs by the constant
|B|). Second order by default: the meta-gradient flows through ``grad_theta L_i^support``.
``first_order=True`` treats that gradient as a constant, so
``grad_theta L(theta) = mean_i grad L_i^query(theta'_i)`` (first-order MAML).

The inner loop is :meth:`GradientMetaLearner.adapted` with the SGD rule, the outer objective its
default mean task loss (:meth:`GradientMetaLearner.meta_loss`). How a meta-batch runs (a loop,
vmap over tasks, CPU threads, compiled) is chosen by ``train.executor``
(:mod:`metatl.engine.executors`).

``nil=True`` replaces test-time adaptation by NIL (:mod:`metatl.meta.nil`): the body's features
and the cosine similarity of each query to the support examples, no inner loop (``metatl eval
CKPT --set algorithm.nil=true``); meta-training is unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import ALGORITHMS
from .base import GradientMetaLearner, Predictor, check_support
from .nil import find_head, nil_forward
from .rules import SGD


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
    nil : at test time, classify by NIL (cosine similarity of the body's features) instead of
        adapting; classification only.
    head : the name of the head module (default: ``head``, else the last layer with parameters):
        NIL's features are its input.
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        nil: bool = False,
        head: str | None = None,
    ):
        super().__init__(model, task_type, SGD(inner_lr), inner_steps, inner_steps_test)
        self.inner_lr, self.first_order = inner_lr, first_order
        self.second_order = not first_order
        if nil and task_type != "classification":
            raise ValueError(
                f"nil=true classifies by the similarity of features to the support examples; a "
                f"{task_type} task needs nil=false."
            )
        self.nil = nil
        self.head = find_head(model, head) if nil or head is not None else None

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """The adapted predictor (:meth:`GradientMetaLearner.adapt`), or with ``nil`` the NIL
        classifier of the support set."""
        if not self.nil:
            return super().adapt(support_x, support_y, steps)
        support_y = check_support(support_x, support_y, self.task_type)
        return Predictor(nil_forward(self.model, self.head, support_x, support_y), self.task_type)
