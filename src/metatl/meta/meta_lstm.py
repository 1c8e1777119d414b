"""Meta-learner LSTM: "Optimization as a Model for Few-Shot Learning" (Ravi and Larochelle, ICLR 2017).

The base learner's parameters, flattened, are the cell state of an LSTM: ``c_t = theta_t``, and the
LSTM's update *is* gradient descent with learned, per-coordinate input and forget gates::

    c_t = f_t * c_{t-1} + i_t * (-grad_t)                           grad_t = dL_t/dtheta at theta_{t-1}
    i_t = sigmoid(W_I [z_t, theta_{t-1}, i_{t-1}] + b_I)            a learned learning rate
    f_t = sigmoid(W_F [z_t, theta_{t-1}, f_{t-1}] + b_F)            a learned shrinkage / weight decay
    c_0 = theta_0                                                    the learned initialisation

where ``z_t`` is computed from ``x_t = [rho(grad_t), rho(L_t)]`` (4 numbers per coordinate, ``rho`` the
log-magnitude / sign preprocessing of Andrychowicz et al. 2016 with ``p = 10``, see
:mod:`metatl.meta.learned_optimizer`): ``z_t = x_t`` when ``hidden = 0``, or the output of a first,
standard coordinate-wise LSTM layer ``z_t = h_t = LSTM(x_t, (h_{t-1}, c'_{t-1}))`` of ``hidden`` units
(the paper's two-layer design). All coordinates share ``W_I, b_I, W_F, b_F`` and the first layer
(coordinate-wise parameter sharing). ``i_0 = f_0 = 0``; ``b_F`` starts in [4, 6] (``f`` near 1) and
``b_I`` in [-5, -4] (a small learning rate), as in the paper.

Training: for each episode, ``inner_steps`` updates on the support set, then the query loss of
``theta_T`` is minimised by the trainer with respect to ``theta_0`` and the gates' parameters, by
backpropagation through the unrolled updates. As in the paper, the gradient and loss inputs are
constants (``d grad_t / d theta = 0``, no second derivatives). Evaluation adapts with the same rule.

The update is an update rule (``init`` / ``update``, with ``uses_loss = True``), so training and
evaluation both run the one inner loop :func:`metatl.meta.adapt`. The paper reports miniImageNet
(43.44% 1-shot, 60.60% 5-shot, 5-way), not Omniglot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import ALGORITHMS
from ._types import Params
from .base import GradientMetaLearner
from .learned_optimizer import UnrolledLossError, check_finite, flatten, preprocess, unflatten

RuleState = tuple[int, Tensor, Tensor, Tensor, Tensor]  # step, previous input and forget gates, LSTM (h, c)


class MetaLSTMRule(nn.Module):
    """The meta-learner LSTM's update ``theta_t = f_t * theta_{t-1} - i_t * grad_t`` as a rule.

    State: ``(t, i_{t-1}, f_{t-1}, h_{t-1}, c'_{t-1})`` per coordinate.
    """

    uses_loss = True

    def __init__(self, hidden: int = 20, p: float = 10.0):
        super().__init__()
        self.hidden, self.p = hidden, p
        self.lstm = nn.LSTMCell(4, hidden) if hidden else None
        width = (hidden or 4) + 2
        self.W_I = nn.Parameter(torch.empty(width).uniform_(-0.01, 0.01))
        self.W_F = nn.Parameter(torch.empty(width).uniform_(-0.01, 0.01))
        self.b_I = nn.Parameter(torch.empty(1).uniform_(-5.0, -4.0))
        self.b_F = nn.Parameter(torch.empty(1).uniform_(4.0, 6.0))

    def init(self, params: Params) -> RuleState:
        like = next(iter(params.values()))
        n = sum(p.numel() for p in params.values())
        h = like.new_zeros(n, self.hidden)
        return 0, like.new_zeros(n), like.new_zeros(n), h, h.clone()

    def update(self, grads: Params, state: RuleState, params: Params, loss: Tensor) -> tuple[Params, RuleState]:
        t, i_prev, f_prev, h, c = state
        if not torch.isfinite(loss):
            raise UnrolledLossError(
                f"the meta-LSTM's inner loss became {loss.item()} at inner step {t}; "
                f"lower the initial input gate (b_I) or train.lr, set train.grad_clip "
                f"(e.g. 1.0), or take fewer inner_steps."
            )
        check_finite(grads, f"meta-LSTM inner step {t}")
        g = flatten(grads).detach()
        theta = flatten(params)
        x = torch.cat([preprocess(g, self.p), preprocess(loss.detach().reshape(1), self.p).expand(len(g), 2)], -1)
        if self.lstm is not None:
            h, c = self.lstm(x, (h, c))
            x = h
        i = torch.sigmoid(torch.cat([x, theta[:, None], i_prev[:, None]], -1) @ self.W_I + self.b_I)
        f = torch.sigmoid(torch.cat([x, theta[:, None], f_prev[:, None]], -1) @ self.W_F + self.b_F)
        step = (f - 1) * theta - i * g  # theta + step = f * theta - i * grad
        return unflatten(step, grads), (t + 1, i, f, h, c)


@ALGORITHMS.register("meta_lstm")
class MetaLSTM(GradientMetaLearner):
    """Meta-learner LSTM (Ravi and Larochelle 2017).

    Parameters
    ----------
    model : the base learner (the paper: conv4_pool with a linear head).
    inner_steps : updates on the support set in meta-training; ``inner_steps_test`` at test time.
    inner_batch, inner_batch_test : minibatch per update (default: the whole support set).
    hidden : units of the first, standard LSTM layer (paper: 20); 0 feeds ``x_t`` to the gates directly.
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        inner_steps: int = 5,
        inner_steps_test: int | None = None,
        inner_batch: int | None = None,
        inner_batch_test: int | None = None,
        hidden: int = 20,
    ):
        super().__init__(
            model, task_type, MetaLSTMRule(hidden), inner_steps, inner_steps_test, inner_batch, inner_batch_test
        )

    vmappable = False  # the rule checks each inner loss for NaN (data-dependent control flow)
