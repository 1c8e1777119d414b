"""The one inner loop of the code base.

``adapt`` maps parameters to adapted parameters (``dict[str, Tensor] -> dict[str, Tensor]``):

    theta_0 = theta;   theta_{j+1} = theta_j + rule.update(grad_theta L(f(x; theta_j), y))

for ``j < steps``. With ``create_graph=True`` the result stays differentiable with respect to
``theta`` through the gradients (second-order MAML); with ``create_graph=False`` the gradients are
constants, so ``d theta_steps / d theta`` is the identity (first-order MAML), and with detached
inputs nothing is tracked at all (evaluation, Reptile). Training and evaluation call this same
function. A rule with ``uses_loss = True`` also receives the (detached) loss: ``rule.update(grads,
state, params, loss=...)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

Params = Dict[str, Tensor]


def adapt(forward: Callable[[Params, Tensor], Tensor], params: Params, x: Tensor, y: Tensor,
          loss_fn: Callable[[Tensor, Tensor], Tensor], rule, steps: int, *,
          create_graph: bool = False, trainable: Optional[Callable[[str], bool]] = None,
          batch_size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Params:
    """Run ``steps`` updates of ``rule`` on the loss of ``forward(params, x)`` against ``y``.

    ``trainable(name)`` picks the parameters to adapt (the others stay fixed, e.g. ANIL adapts the
    head only); ``batch_size`` draws a minibatch per step by cycling through shuffled passes over
    ``(x, y)`` (the Reptile inner loop), else every step uses all of ``(x, y)``.
    """
    names = [k for k in params if trainable is None or trainable(k)]
    params = dict(params)
    outer = any(params[k].requires_grad for k in names)  # is an outer loop differentiating us?
    for k in names:  # a tensor outside any graph still needs a gradient inside the loop
        if not params[k].requires_grad:
            params[k] = params[k].detach().requires_grad_(True)
    state = rule.init({k: params[k] for k in names})
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        xb, yb = x, y
        if batch_size is not None and batch_size < len(x):
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(x), generator=generator)])
            idx, order = order[:batch_size], order[batch_size:]
            xb, yb = x[idx], y[idx]
        with torch.enable_grad():
            loss = loss_fn(forward(params, xb), yb)
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
        extra = {"loss": loss.detach()} if getattr(rule, "uses_loss", False) else {}  # e.g. meta-LSTM
        updates, state = rule.update(dict(zip(names, grads)), state, {k: params[k] for k in names}, **extra)
        for k in names:
            new = params[k] + updates[k]
            params[k] = new if outer else new.detach().requires_grad_(True)
    return params
