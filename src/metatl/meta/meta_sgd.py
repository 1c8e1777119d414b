"""Meta-SGD (Li, Zhou, Chen and Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", arXiv:1707.09835).

MAML whose inner learning rate is learned too, one rate per entry of theta. Inner loop, per task i
(one step in the paper; ``inner_steps`` repeats it with the same alpha)::

    theta'_i = theta - alpha * grad_theta L_i^support(theta)        (elementwise product)

Outer objective, minimised over theta *and* alpha by the trainer's optimizer (Adam in the paper)::

    L(theta, alpha) = 1/|B| * sum_{i in B} L_i^query(theta'_i)

alpha is the rule :class:`~metatl.meta.rules.MetaSGDRule` (its parameters, so every executor's
meta-gradient covers it); everything else is MAML's (:class:`~metatl.meta.maml.MAML`), including
``first_order`` (alpha still gets its gradient ``-grad L^support * grad L^query(theta'_i)``) and
``nil``.

Initialisation: the paper draws every entry of alpha uniformly from [0.005, 0.1] (the default,
``inner_lr_range``); ``inner_lr`` starts every entry at one value instead, as learn2learn's
``MetaSGD(lr=...)`` does (its default, 1.0, is a setting for its examples, not the paper's).
alpha is not constrained: entries may become negative, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..registry import ALGORITHMS
from .maml import MAML
from .rules import MetaSGDRule


@ALGORITHMS.register("meta_sgd")
class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): MAML with a learned inner learning rate per parameter entry.

    Parameters
    ----------
    model : the base learner, a plain ``nn.Module``.
    task_type : ``"classification"`` (cross-entropy) or ``"regression"`` (MSE).
    inner_lr : start every learned rate at this value; ``None`` (default): draw each from
        ``inner_lr_range``.
    inner_lr_range : ``[low, high]`` of the uniform initialisation (the paper: [0.005, 0.1]).
    inner_steps : inner steps during meta-training (the paper: 1).
    inner_steps_test : inner steps when adapting at test time (default ``inner_steps``).
    first_order : treat the inner gradient as a constant.
    nil, head : as :class:`~metatl.meta.maml.MAML`.
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        inner_lr: float | None = None,
        inner_lr_range: Sequence[float] = (0.005, 0.1),
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        nil: bool = False,
        head: str | None = None,
    ):
        super().__init__(model, task_type, 0.0, inner_steps, inner_steps_test, first_order, nil, head)
        self.rule = MetaSGDRule(self.params(), inner_lr, inner_lr_range)
        self.inner_lr, self.inner_lr_range = inner_lr, tuple(inner_lr_range)
