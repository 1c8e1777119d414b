"""Learned optimizer: "Learning to learn by gradient descent by gradient descent" (Andrychowicz,
Denil, Gomez, Hoffman, Pfau, Schaul, Shillingford and de Freitas, NeurIPS 2016).

An update rule (the :mod:`metatl.meta.rules` ``init`` / ``update`` interface, so MAML's inner loop
can use it). Every coordinate ``j`` of the optimizee's parameters is processed by the same two-layer
LSTM ``m`` (weights ``phi``, 20 hidden units; coordinate-wise, so the rule works for any number of
parameters and is invariant to their order)::

    [h^1_t, c^1_t]_j = LSTM_1(rho(g_{t,j}), [h^1_{t-1}, c^1_{t-1}]_j)
    [h^2_t, c^2_t]_j = LSTM_2(h^1_{t,j}, [h^2_{t-1}, c^2_{t-1}]_j)
    theta_{t+1,j} = theta_{t,j} + output_scale * (w . h^2_{t,j} + b)          (output_scale = 0.1)

with the gradient preprocessing of the paper's appendix A (``p = 10``)::

    rho(x) = (log(|x|) / p, sign(x))   if |x| >= e^(-p)
             (-1, e^p x)               otherwise

Meta-training (:func:`meta_train`) minimises the sum of the optimizee's losses along the trajectory,
``L(phi) = E_f [ sum_{t=1..T} f(theta_t) ]``, by truncated backpropagation through the unrolled
optimisation: ``T = unroll`` steps cut into truncations of ``truncation`` steps, with an Adam step on
``phi`` after each truncation. As in the paper the second derivatives are dropped:
``d g_t / d phi = 0`` (the gradients are inputs, detached). The meta-gradient norm is clipped at
``clip`` (the number of clipped truncations is reported); a non-finite unrolled loss stops training
with :class:`UnrolledLossError`.

Problems (:class:`QuadraticProblem`, :class:`MLPProblem`) are plain objects with ``init_params()``
and ``loss(params)``. :func:`meta_train` has its own unroll rather than :func:`metatl.meta.adapt`:
``adapt`` returns only the final parameters and starts a fresh rule state, while this objective needs
the loss at every step and the LSTM state carried across truncations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._types import Params
from .rules import Rule

LSTMState = tuple[tuple[Tensor, Tensor], ...]  # (h, c) of each LSTM layer, one row per coordinate


class UnrolledLossError(FloatingPointError):
    """The loss of an unrolled optimisation became NaN or infinite."""


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """``rho(x)`` above: ``(...,)`` -> ``(..., 2)``."""
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    second = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([first, second], -1)


def flatten(tensors: Params) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vector[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


def check_finite(grads: Params, who: str) -> None:
    bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise UnrolledLossError(
            f"{who}: the gradient of {', '.join(bad)} is NaN or infinite, so the inner "
            f"optimisation diverged; lower the inner learning rate / output scale, or "
            f"take fewer inner steps."
        )


class LearnedOptimizer(nn.Module):
    """The coordinate-wise LSTM optimizer as an update rule.

    Parameters
    ----------
    hidden : LSTM units per layer (paper: 20).
    layers : stacked LSTM layers (paper: 2).
    output_scale : the factor on the LSTM output (paper: 0.1).
    p : preprocessing constant (paper: 10); ``p=None`` feeds the raw gradient.
    detach_inputs : drop second derivatives through the gradient input (paper: True).
    """

    def __init__(
        self,
        hidden: int = 20,
        layers: int = 2,
        output_scale: float = 0.1,
        p: float | None = 10.0,
        detach_inputs: bool = True,
    ):
        super().__init__()
        self.hidden, self.output_scale, self.p, self.detach_inputs = hidden, output_scale, p, detach_inputs
        width = 2 if p is not None else 1
        self.cells = nn.ModuleList(nn.LSTMCell(width if i == 0 else hidden, hidden) for i in range(layers))
        self.out = nn.Linear(hidden, 1)

    def init(self, params: Params) -> LSTMState:
        like = next(iter(params.values()))
        n = sum(p.numel() for p in params.values())
        zeros = lambda: like.new_zeros(n, self.hidden)  # noqa: E731
        return tuple((zeros(), zeros()) for _ in self.cells)

    def update(self, grads: Params, state: LSTMState, params: Params) -> tuple[Params, LSTMState]:
        check_finite(grads, "LearnedOptimizer")
        g = flatten(grads)
        if self.detach_inputs:
            g = g.detach()
        x = preprocess(g, self.p) if self.p is not None else g[:, None]
        new_state = []
        for cell, (h, c) in zip(self.cells, state):
            h, c = cell(x, (h, c))
            new_state.append((h, c))
            x = h
        step = self.output_scale * self.out(x).squeeze(-1)
        return unflatten(step, grads), tuple(new_state)


# -- problems ----------------------------------------------------------------------------------
class QuadraticProblem:
    """``f(theta) = ||W theta - y||^2`` with ``W`` ``(dim, dim)``, ``y`` and ``theta_0`` drawn from N(0, 1)."""

    def __init__(self, dim: int = 10, generator: torch.Generator | None = None):
        g = generator
        self.W = torch.randn(dim, dim, generator=g)
        self.y = torch.randn(dim, generator=g)
        self.theta0 = torch.randn(dim, generator=g)

    def init_params(self) -> Params:
        return {"theta": self.theta0.clone()}

    def loss(self, params: Params) -> Tensor:
        return (self.W @ params["theta"] - self.y).pow(2).sum()


ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


class MLPProblem:
    """Cross-entropy of an MLP classifier on minibatches of ``(x, y)`` (the paper: MNIST, one hidden
    layer of 20 sigmoid units, batches of 128). ``hidden`` and ``activation`` give the
    generalisation variants (40 units, two layers, ReLU)."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        hidden: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch: int = 128,
        n_classes: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}.")
        self.x, self.y = x.reshape(len(x), -1).float(), y.long()
        self.act, self.batch = ACTIVATIONS[activation], batch
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        widths = [self.x.shape[1], *hidden, n_classes or int(self.y.max()) + 1]
        self.theta0 = {}
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            bound = 1.0 / math.sqrt(a)
            self.theta0[f"w{i}"] = (torch.rand(b, a, generator=self.generator) * 2 - 1) * bound
            self.theta0[f"b{i}"] = (torch.rand(b, generator=self.generator) * 2 - 1) * bound
        self.layers = len(widths) - 1

    def init_params(self) -> Params:
        return {k: v.clone() for k, v in self.theta0.items()}

    def forward(self, params: Params, x: Tensor) -> Tensor:
        for i in range(self.layers):
            x = F.linear(x, params[f"w{i}"], params[f"b{i}"])
            if i < self.layers - 1:
                x = self.act(x)
        return x

    def loss(self, params: Params) -> Tensor:
        idx = torch.randint(len(self.x), (min(self.batch, len(self.x)),), generator=self.generator)
        return F.cross_entropy(self.forward(params, self.x[idx]), self.y[idx])


# -- running and meta-training -----------------------------------------------------------------
class Problem(Protocol):
    """An optimisee: ``loss(params)`` of a parameter dict (:class:`QuadraticProblem`, :class:`MLPProblem`)."""

    def loss(self, params: Params) -> Tensor: ...


def unroll(
    rule: Rule, problem: Problem, params: Params, state: Any, steps: int, meta: bool = True
) -> tuple[Params, Any, Tensor]:
    """``steps`` updates of ``rule`` on ``problem`` from ``params``; returns ``(params, state, losses)``
    with ``losses[t] = f(theta_t)`` for ``t < steps``. ``meta=True`` keeps the graph from ``phi`` to
    the losses (gradients detached, as in the paper); ``meta=False`` detaches every step."""
    losses = []
    for _ in range(steps):
        params = {k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()}
        loss = problem.loss(params)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=meta)))
        updates, state = rule.update(grads, state, params)
        params = {k: p + updates[k] for k, p in params.items()}
        if not meta:
            params = {k: p.detach() for k, p in params.items()}
            state = _detach(state)
            loss = loss.detach()
        losses.append(loss)
    return params, state, torch.stack(losses)


def _detach(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    if isinstance(state, dict):
        return {k: _detach(v) for k, v in state.items()}
    return state


def meta_train(
    rule: nn.Module,
    sample_problem: Callable[[torch.Generator], object],
    iterations: int,
    unroll_steps: int = 100,
    truncation: int = 20,
    lr: float = 1e-3,
    clip: float = 1.0,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> dict:
    """Meta-train ``rule`` on ``iterations`` problems from ``sample_problem(generator)``.

    Each problem is optimised for ``unroll_steps`` steps from its ``init_params()``; after every
    ``truncation`` steps, Adam (``lr``) steps ``phi`` on the mean loss of those steps and the
    trajectory is cut (parameters and LSTM state detached). Returns the history:
    ``{"meta_loss": [...], "clipped": n, "truncations": n, "max_grad_norm": x}``.
    """
    if unroll_steps % truncation:
        raise ValueError(
            f"unroll_steps={unroll_steps} is not a multiple of truncation={truncation}; "
            f"pick values that divide (e.g. 100 and 20)."
        )
    opt = torch.optim.Adam(rule.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = {"meta_loss": [], "clipped": 0, "truncations": 0, "max_grad_norm": 0.0}
    for it in range(iterations):
        problem = sample_problem(g)
        params = problem.init_params()
        state = rule.init(params)
        total = 0.0
        for start in range(0, unroll_steps, truncation):
            params, state, losses = unroll(rule, problem, params, state, truncation, meta=True)
            loss = losses.mean()
            if not torch.isfinite(loss):
                raise UnrolledLossError(
                    f"the unrolled loss became {loss.item()} on problem {it}, steps {start}..{start + truncation}; "
                    f"lower the meta learning rate (lr={lr}) or the rule's output_scale, or shorten the "
                    f"truncation ({truncation})."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(rule.parameters(), clip))
            if not math.isfinite(norm):
                raise UnrolledLossError(
                    f"the meta-gradient became non-finite on problem {it}, steps "
                    f"{start}..{start + truncation}; lower lr={lr} or clip={clip}."
                )
            history["clipped"] += int(norm > clip)
            history["truncations"] += 1
            history["max_grad_norm"] = max(history["max_grad_norm"], norm)
            opt.step()
            params, state = {k: p.detach() for k, p in params.items()}, _detach(state)
            total += loss.item()
        history["meta_loss"].append(total / (unroll_steps // truncation))
        if callback is not None:
            callback(it, history["meta_loss"][-1])
    return history
