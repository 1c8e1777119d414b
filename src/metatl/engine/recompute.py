"""Gradient checkpointing of the inner loop (``train.inner_checkpoint``).

Second-order MAML keeps every inner step's graph (the forward pass and the backward pass that gave
the inner gradient) until the meta-gradient is taken, so its memory grows with the inner steps k.
With checkpointing no step keeps its graph or its inputs: when the meta-gradient flows back
through step j, the step's input parameters are recomputed from the loop's first inputs by steps
0..j-1 (without a graph), its graph is rebuilt from them, differentiated once and freed. Memory
holds one step's graph and the starting parameters, whatever k; the price is about ``k^2 / 2``
extra inner steps per task (the measured memory and time: docs/performance.md).

The recomputation is written out (:class:`Recompute`) rather than left to
``torch.utils.checkpoint``: its non-reentrant form gives the same values, but a step that calls
``torch.autograd.grad`` inside the checkpointed region keeps its recomputed activations until the
backward pass, and memory still grew with the steps (``benchmarks/maml_speed.py memory``);
keeping each step's input parameters, as plain checkpointing does, costs ``k`` copies of them,
more than one step's graph for Omniglot's conv4. The gradient also reaches tensors a step uses without taking them as
inputs (a learned rule's parameters, the parameters an inner loop leaves fixed): the learner's
meta-parameters are passed along. ``tests/test_inner_checkpoint.py`` compares meta-gradients with
and without it in float64.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import ConfigError


class Recompute(torch.autograd.Function):
    """One inner step ``fn`` (tensors to tensors) computed without a graph. Its inputs are not
    kept: the backward pass recomputes them from the loop's first inputs (``root``) by the earlier
    steps (``chain``, without a graph), rebuilds this step's graph from them, and returns the
    vector-Jacobian product for the inputs and for ``extras`` (tensors ``fn`` uses through its
    closure)."""

    @staticmethod
    def forward(ctx, fn, chain: list, n_inputs: int, *tensors):
        ctx.fn, ctx.chain, ctx.n = fn, chain, n_inputs
        ctx.extras = tensors[n_inputs:]
        if not chain:  # the first step: its inputs are the root
            ctx.save_for_backward(*tensors[:n_inputs])
        with torch.no_grad():
            return tuple(t.detach() for t in fn(*(t.detach() for t in tensors[:n_inputs])))

    @staticmethod
    @once_differentiable
    def backward(ctx, *cotangents):
        root = ctx.chain[0].saved_tensors if ctx.chain else ctx.saved_tensors
        values = [t.detach() for t in root]
        with torch.no_grad():
            for earlier in ctx.chain:
                values = earlier.fn(*values)
        differentiable = ctx.needs_input_grad[3 : 3 + ctx.n]
        inputs = [v.detach().requires_grad_(d) for v, d in zip(values, differentiable)]
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)
        used = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad and c is not None]
        wrt = [t for t in (*inputs, *ctx.extras) if t.requires_grad]
        grads = iter(
            torch.autograd.grad([o for o, _ in used], wrt, [c for _, c in used], allow_unused=True)
            if used and wrt
            else [None] * len(wrt)
        )
        return (None, None, None, *(next(grads) if t.requires_grad else None for t in (*inputs, *ctx.extras)))


_CONSTANT = object()  # marks a tensor's place among a step's outputs


def checkpointed(step, theta, state, xb, yb, *, extras=tuple):
    """``step(theta, state, xb, yb)`` (an inner step of :func:`metatl.meta.adapt.adapt`) through
    :class:`Recompute`: neither its graph nor its inputs are kept. Each output tensor carries the
    recipe that recomputes it (``_metatl_recompute``: the chain of steps since the loop's first
    inputs), which the next step extends. ``extras()`` gives the tensors outside ``theta`` and
    ``state`` that the meta-gradient must reach."""
    leaves, spec = tree_flatten((theta, state))
    at = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
    tensors = [leaves[i] for i in at]
    template = [_CONSTANT if isinstance(t, Tensor) else t for t in leaves]  # no input tensor kept alive
    result = {}

    def tensor_step(*values):
        full = list(template)
        for i, t in zip(at, values):
            full[i] = t
        out_leaves, result["spec"] = tree_flatten(step(*tree_unflatten(full, spec), xb, yb))
        result["constants"] = [_CONSTANT if isinstance(t, Tensor) else t for t in out_leaves]
        return [t for t in out_leaves if isinstance(t, Tensor)]

    marks = [getattr(t, "_metatl_recompute", None) for t in tensors]
    chained = marks[0] is not None and all(
        m is not None and m[0] is marks[0][0] and m[1] == j for j, m in enumerate(marks)
    )
    chain = list(marks[0][0]) if chained else []
    outputs = Recompute.apply(tensor_step, chain, len(tensors), *tensors, *extras())
    node = outputs[0].grad_fn if outputs and outputs[0].grad_fn is not None else None
    if node is not None:  # the next step recomputes these outputs by this chain
        recipe = (*chain, node)
        for j, t in enumerate(outputs):
            t._metatl_recompute = (recipe, j)
    it = iter(outputs)
    out = [next(it) if t is _CONSTANT else t for t in result["constants"]]
    return tree_unflatten(out, result["spec"])


def recompute_unsafe(model: nn.Module) -> str:
    """Why recomputing ``model``'s forward pass would not give the same function ("" when it does)."""
    if any(True for _ in model.buffers()):
        return "it has buffers (BatchNorm running statistics), which a recomputation would update twice"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "it has dropout, whose recomputation would draw other masks"
    return ""


def set_inner_checkpoint(learner, enabled: bool) -> None:
    """Turn checkpointing of ``learner``'s inner steps on or off (gradient-based learners; others
    have no inner loop, and are left as they are)."""
    if not hasattr(learner, "inner_step_runner"):
        return
    if not enabled:
        learner.inner_step_runner = None
        return
    why = recompute_unsafe(learner.model)
    if why:
        raise ConfigError(
            f"train.inner_checkpoint: the model cannot be recomputed exactly, because {why}; use "
            f"model.bn_mode: batch (the MAML default) and no dropout, or train.inner_checkpoint: false."
        )

    def extras():
        return tuple(p for p in learner.parameters() if p.requires_grad)

    learner.inner_step_runner = partial(checkpointed, extras=extras)
