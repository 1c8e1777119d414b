"""Inner-loop update rules as ``init`` / ``update`` pairs of pure functions (the optax pattern).

``state = rule.init(params)``; ``updates, state = rule.update(grads, state, params)``; the new
parameters are ``params[k] + updates[k]``. Rules never touch a module: parameters are dicts of
tensors. MAML, Meta-SGD and a learned LSTM optimizer differ only in the rule they pass to
:func:`metatl.meta.adapt.adapt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ._types import Params


class Rule(Protocol):
    """What :func:`metatl.meta.adapt.adapt` needs of an update rule: ``init`` gives the rule's
    state for some parameters, ``update`` the additive updates and the next state. A rule with
    ``uses_loss = True`` (the meta-learner LSTM's) also takes the inner loss, ``update(..., loss=)``."""

    def init(self, params: Params) -> Any: ...

    def update(self, grads: Params, state: Any, params: Params) -> tuple[Params, Any]: ...


class SGD:
    """``theta <- theta - lr * g``; no state."""

    def __init__(self, lr: float):
        self.lr = lr

    def init(self, params: Params) -> tuple[()]:
        return ()

    def update(self, grads: Params, state: tuple[()], params: Params) -> tuple[Params, tuple[()]]:
        return {k: -self.lr * g for k, g in grads.items()}, state


class Adam:
    """Adam (Kingma and Ba 2015) with bias correction, as ``torch.optim.Adam`` with no weight decay:

    ``m <- b1 m + (1-b1) g``; ``v <- b2 v + (1-b2) g^2``;
    ``theta <- theta - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``.
    The Reptile paper uses ``betas=(0, 0.999)`` in its inner loop.
    """

    def __init__(self, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, tuple(betas), eps

    def init(self, params: Params) -> tuple[int, Params, Params]:
        """``(t, m, v)``: the step count and the first and second moments, at zero."""
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        return 0, zeros, dict(zeros)

    def update(
        self, grads: Params, state: tuple[int, Params, Params], params: Params
    ) -> tuple[Params, tuple[int, Params, Params]]:
        t, m, v = state
        t += 1
        b1, b2 = self.betas
        m = {k: b1 * m[k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * v[k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1**t, 1 - b2**t
        updates = {k: -self.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k in grads}
        return updates, (t, m, v)


class MetaSGDRule(nn.Module):
    """Meta-SGD's rule (Li et al. 2017): ``theta <- theta - alpha * g``, elementwise, where ``alpha``
    holds one learning rate per entry of each adapted parameter (the same shapes). The rates are
    parameters of this module, so the outer loop meta-learns them with ``theta`` (the executors'
    meta-gradient covers every parameter of the learner). No state.

    ``lr``: every rate starts at this value (learn2learn's ``MetaSGD(lr=...)``); ``None`` draws each
    uniformly from ``lr_range`` (the paper's initialisation, ``[0.005, 0.1]``).
    """

    def __init__(self, params: Params, lr: float | None = None, lr_range: Sequence[float] = (0.005, 0.1)):
        super().__init__()
        bounds = [float(v) for v in lr_range]
        if lr is None and not (len(bounds) == 2 and 0 <= bounds[0] <= bounds[1]):
            raise ValueError(
                f"Meta-SGD's inner_lr_range must be [low, high] with 0 <= low <= high (the paper: "
                f"[0.005, 0.1]), got {list(lr_range)}; or set inner_lr to start every rate at one value."
            )
        low, high = bounds if len(bounds) == 2 else (0.0, 0.0)
        self.index = {name: i for i, name in enumerate(params)}
        self.alpha = nn.ParameterList(
            nn.Parameter(
                torch.full_like(p.detach(), lr) if lr is not None else torch.empty_like(p.detach()).uniform_(low, high)
            )
            for p in params.values()
        )

    def rate(self, name: str) -> torch.Tensor:
        """``alpha`` of the parameter ``name``."""
        return self.alpha[self.index[name]]

    def init(self, params: Params) -> tuple[()]:
        return ()

    def update(self, grads: Params, state: tuple[()], params: Params) -> tuple[Params, tuple[()]]:
        return {k: -self.rate(k) * g for k, g in grads.items()}, state


RULES = {"sgd": SGD, "adam": Adam}


def make_rule(name: str, **kwargs: Any) -> Rule:
    """The rule ``name`` (``sgd``, ``adam``) built with ``kwargs``."""
    if name not in RULES:
        raise ValueError(f"unknown inner optimizer {name!r}; choose one of {', '.join(RULES)}.")
    return RULES[name](**kwargs)
