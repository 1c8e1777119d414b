"""What the executors share: a loss that carries a gradient computed already, and the checks of
whether a meta-learner can run under ``torch.func.vmap``."""

from __future__ import annotations

import torch
from torch import nn

from ...config import ConfigError
from ...nn.fast import BatchStatsNorm2d, autocast_enabled


class ExecutorError(ConfigError):
    """An executor that cannot run this meta-learner, with the setting to use instead."""


class KnownGradient(torch.autograd.Function):
    """A scalar of some parameters whose gradient was computed already:
    ``with_gradient(value, params, grads)`` returns ``value``, and its backward gives each
    parameter ``grad_output * grads[name]``. Executors that compute the meta-gradient themselves
    (task threads, compiled) keep the trainer's ``loss.backward()`` interface this way, with
    gradient clipping and the distributed average."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(grad_output * g for g in ctx.grads))


def with_gradient(value, params, grads):
    """``value`` (a scalar tensor) with ``d value / d params[k] = grads[k]`` for autograd."""
    names = list(params)
    return KnownGradient.apply(value, tuple(grads[k] for k in names), *(params[k] for k in names))


def meta_parameters(learner) -> dict:
    """The tensors a meta-gradient is taken with respect to: the model's parameters that require
    grad (as in ``learner.params()``), then any other parameters of the learner (a learned rule's)."""
    wrt = {k: p for k, p in learner.params().items() if p.requires_grad}
    seen = {id(p) for p in wrt.values()}
    wrt.update((k, p) for k, p in learner.named_parameters() if p.requires_grad and id(p) not in seen)
    return wrt


def vmap_unfit(learner) -> str:
    """Why ``learner``'s inner loops cannot run under ``torch.func.vmap`` ("" when they can)."""
    model = learner.model
    if not getattr(learner, "vmappable", False) or getattr(learner, "outer_loss", None) is not None:
        return f"{type(learner).__name__}'s inner loop does not run under vmap"
    if getattr(learner, "inner_step_runner", None) is not None:
        return "gradient checkpointing of the inner loop (train.inner_checkpoint) does not run under vmap"
    if any(True for _ in model.buffers()):
        return "vmap cannot update BatchNorm running statistics; use model.bn_mode 'batch' (the MAML default) or 'none'"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "the model has dropout, whose random draws vmap over tasks does not batch"
    unexact = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and not isinstance(m, BatchStatsNorm2d)
    ]
    if learner.second_order and unexact:
        return (
            f"PyTorch's fused batch_norm and layer_norm give wrong second-order gradients under vmap "
            f"(pytorch/functorch#534), and the model has {', '.join(unexact[:3])}; use "
            f"metatl.nn.BatchStatsNorm2d (the conv nets' bn_mode 'batch') or first_order=true"
        )
    return ""


def refuse_autocast(name: str, device_type: str) -> None:
    if autocast_enabled(device_type):
        raise ExecutorError(
            f"train.executor={name} (vmap) cannot run under bfloat16 autocast (its double "
            "backward mixes dtypes); set train.precision=float32 or train.executor=threads."
        )
