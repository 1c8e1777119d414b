"""The one inner loop of the code base.

``adapt`` maps parameters to adapted parameters (``dict[str, Tensor] -> dict[str, Tensor]``):

    theta_0 = theta;   theta_{j+1} = theta_j + rule.update(grad_theta L(f(x; theta_j), y))

for ``j < steps``. Gradients come from ``torch.autograd.grad`` (least overhead for a per-task loop)
or, with ``batched=True``, from ``torch.func.grad``, so the same loop also runs batched over tasks
under ``torch.func.vmap``. With ``create_graph=True`` the result
stays differentiable with respect to ``theta`` through the gradients (second-order MAML); with
``create_graph=False`` the gradients are constants, so ``d theta_steps / d theta`` is the identity
(first-order MAML), and for parameters outside any graph nothing is tracked at all (evaluation,
Reptile). Training and evaluation call this same function. A rule with ``uses_loss = True`` also
receives the (detached) inner loss: ``rule.update(grads, state, params, loss=...)`` (the
meta-learner LSTM needs it). ``step_params(j)`` gives tensors that stand in for some of the model's
at step ``j`` (MAML++'s per-step BatchNorm weights and statistics), and ``trajectory=True`` returns
the parameters after every step, ``[theta_1, ..., theta_steps]`` (MAML++'s multi-step loss).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ._types import Params
from .rules import Rule


def adapt(
    forward: Callable[[Params, Tensor], Tensor],
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    rule: Rule,
    steps: int,
    *,
    create_graph: bool = False,
    trainable: Callable[[str], bool] | None = None,
    buffers: Params | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    batched: bool = False,
    step_params: Callable[[int], Params] | None = None,
    trajectory: bool = False,
    run_step: Callable | None = None,
) -> Params | list[Params]:
    """Run ``steps`` updates of ``rule`` on the loss of ``forward(params, x)`` against ``y``.

    ``forward`` receives the parameters merged with ``buffers`` (e.g. BatchNorm running statistics,
    which it may update in place). ``trainable(name)`` picks the parameters to adapt, the others stay
    fixed (e.g. ANIL adapts the head only). ``batch_size`` draws a minibatch per step by cycling
    through shuffled passes over ``(x, y)`` (the Reptile inner loop); otherwise every step uses all
    of ``(x, y)``. Set ``batched`` when calling inside ``torch.func.vmap``. ``step_params(j)``, when
    given, is merged over the parameters and buffers the forward pass of step ``j`` sees (tensors
    the inner loop does not adapt). ``run_step(step, theta, state, xb, yb)``, when given, runs each
    differentiable step of a second-order inner loop in place of ``step(theta, state, xb, yb)`` (the
    engine's gradient checkpointing, ``train.inner_checkpoint``: the same values, less memory).
    Returns the adapted parameters (``params`` with the trainable ones replaced), or with
    ``trajectory`` the list of them after each step.
    """
    names = [k for k in params if trainable is None or trainable(k)]
    fixed = {**(buffers or {}), **{k: v for k, v in params.items() if k not in names}}
    theta = {k: params[k] for k in names}

    # Is an outer loop differentiating us? Inside torch.func transforms (batched) the caller decides,
    # and requires_grad is not reliable there under torch.compile: keep the graph.
    outer = batched or any(v.requires_grad for v in theta.values())

    def inner_loss(theta, fixed, xb, yb):
        return loss_fn(forward({**fixed, **theta}, xb), yb)

    def grad_and_loss(theta, fixed, xb, yb):
        if batched:
            return torch.func.grad_and_value(inner_loss)(theta, fixed, xb, yb)
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in theta.items()}
        loss = inner_loss(leaves, fixed, xb, yb)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)
        return dict(zip(leaves, grads)), loss

    def one_step(theta, state, xb, yb, fixed):  # theta_j, rule state -> theta_{j+1}, rule state
        with torch.enable_grad():
            grads, loss = grad_and_loss(theta, fixed, xb, yb)
        if not create_graph:
            grads = {k: g.detach() for k, g in grads.items()}
        extra = {"loss": loss.detach()} if getattr(rule, "uses_loss", False) else {}
        updates, state = rule.update(grads, state, theta, **extra)
        return {k: theta[k] + updates[k] for k in names}, state

    state = rule.init(theta)
    order = torch.empty(0, dtype=torch.long)
    path = []
    for step in range(steps):
        xb, yb = x, y
        if batch_size is not None and batch_size < len(x):
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(x), generator=generator)])
            idx, order = order[:batch_size], order[batch_size:]
            xb, yb = x[idx], y[idx]
        fixed_j = fixed if step_params is None else {**fixed, **step_params(step)}
        if run_step is not None and create_graph and outer and not batched:
            theta, state = run_step(partial(one_step, fixed=fixed_j), theta, state, xb, yb)
        else:
            theta, state = one_step(theta, state, xb, yb, fixed_j)
        if not outer:  # evaluation or Reptile: keep no graph across steps
            theta = {k: v.detach() for k, v in theta.items()}
        if trajectory:
            path.append({**params, **theta})
    return path if trajectory else {**params, **theta}
