"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio and Vinyals, ICLR 2020, "Rapid Learning or
Feature Reuse? Towards Understanding the Effectiveness of MAML").

MAML whose inner loop adapts the head only. With theta = (theta_body, theta_head), per task i::

    theta'_i = (theta_body, theta_head - alpha * grad_{theta_head} L_i^support(theta))

and the outer objective is MAML's, ``1/|B| sum_i L_i^query(theta'_i)``, minimised over all of
theta: the body is updated by the outer loop only (in second order its meta-gradient also flows
through the head's inner step, whose gradient depends on the body's features). The inner loop is
the one :func:`~metatl.meta.adapt.adapt` with a parameter filter (:meth:`ANIL.adapts`), so every
executor runs it; it is cheap because its gradients stop at the head.

The paper trains with MAML's hyper-parameters (second order, MAML's step sizes and steps); its NIL
test ("no inner loop", :mod:`metatl.meta.nil`) is the ``nil`` option.
"""

from __future__ import annotations

from torch import nn

from ..registry import ALGORITHMS
from .maml import MAML
from .nil import find_head, in_module


@ALGORITHMS.register("anil")
class ANIL(MAML):
    """ANIL: MAML with an inner loop on the head only.

    Parameters
    ----------
    head : the name of the head module (default: ``head``, the conv nets' linear classifier,
        else the last layer with parameters); its parameters are the ones adapted.
    model, task_type, inner_lr, inner_steps, inner_steps_test, first_order, nil : as
        :class:`~metatl.meta.maml.MAML`.
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
        super().__init__(model, task_type, inner_lr, inner_steps, inner_steps_test, first_order, nil, head)
        self.head = find_head(model, head)
        if all(in_module(k, self.head) for k in self.params()):
            raise ValueError(
                f"ANIL's head {self.head!r} holds every parameter of the model, so it would be MAML; "
                f"name the last layer (algorithm.head) or use algorithm.name=maml."
            )

    def adapts(self, name: str) -> bool:
        """Only the head's parameters are adapted."""
        return in_module(name, self.head)
