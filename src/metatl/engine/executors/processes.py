"""A meta-batch split over the processes of a ``torch.distributed`` group (``torchrun``, ``train.processes``).

Every process draws the same meta-batch from the same seeded generator and keeps its share, the
``rank``-th of ``world`` equal consecutive blocks; its own executor computes the loss of that share
and its gradient, and one all-reduce averages the gradients (and another the loss and metrics) over
the processes, so that every process takes the same optimizer step and the parameters stay
identical. With equal shares the mean of the shares' mean losses is the meta-batch's mean loss: the
run trains the parameters of a one-process run, up to the order of a float sum. This is the
reduction that ``DistributedDataParallel`` performs (gradients averaged after backward, parameters
equal by construction), done once per step on the gradient that the inner executor computed,
because a meta-learner's loss is not one ``forward`` of a module: it serves the gradient-based
meta-learners and the learners trained as a whole (ProtoNet and the metric learners, deep transfer)
alike.

A batch of tensors (a deep transfer method's source and target rows) is split by rows, and each
process's share is a batch of its own, as under ``DistributedDataParallel``: a loss that is a mean
over rows (cross-entropy) has the one-process gradient; one of the batch as a whole (CORAL's
covariances, MMD) is computed on each share and averaged.

BatchNorm: training normalises each episode with its own batch statistics, which do not depend on
the split. The running statistics (BatchNorm in eval mode uses them) are moving averages, updated at
every forward as ``r <- (1 - m) r + m x``. Each process updates them from its own episodes; then the
processes' updates are composed in rank order (:func:`merge_running_statistics`): ``r`` after
process 0's updates, then process 1's, and so on, which is the one-process run's sequence over the
meta-batch, because the shares are consecutive blocks of it. The running statistics are therefore
those of a one-process run up to rounding, and equal in every process. SyncBatchNorm, which pools
one batch's statistics over processes, does not apply: an episode is normalised by itself, not
together with the episodes other processes hold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...config import ConfigError
from .. import distributed as ddp
from ._common import with_gradient


class Split:
    """``inner`` run on this process's share of each meta-batch, its gradient averaged over the group.

    Construction gives every process rank 0's parameters and buffers and its own random stream
    (``seed + 1000 * rank``, for dropout and the like)."""

    name = "processes"

    def __init__(self, inner, learner, seed: int = 0):
        self.inner, self.name = inner, f"processes({inner.name})"
        self.rank, self.world = ddp.rank(), ddp.world_size()
        ddp.broadcast_module(learner)
        torch.manual_seed(seed + 1000 * self.rank)

    def __call__(self, learner, batch):
        norms = running_norms(learner)
        before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms]
        loss, metrics = self.inner(learner, share(batch, self.rank, self.world))
        named = [(k, p) for k, p in learner.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        used = [g is not None for g in grads]
        # the loss, the metrics and which parameters got a gradient, in one float64 all-reduce
        numbers = ddp.average_values(
            {"_loss": float(loss.detach()), **metrics, **{f"_used{i}": float(u) for i, u in enumerate(used)}},
            loss.device,
        )
        keep = [i for i in range(len(named)) if numbers.pop(f"_used{i}") > 0]  # used by some process
        flat = [grads[i] if used[i] else torch.zeros_like(named[i][1]) for i in keep]
        for dtype in {g.dtype for g in flat}:
            ddp.average_in_place([g for g in flat if g.dtype == dtype])
        merge_running_statistics(norms, before)
        merged = {id(b) for m in norms for b in (m.running_mean, m.running_var)}
        other = [b for b in learner.buffers() if b.is_floating_point() and id(b) not in merged]
        for dtype in {b.dtype for b in other}:
            ddp.average_in_place([b for b in other if b.dtype == dtype])
        value = torch.tensor(numbers.pop("_loss"), dtype=loss.dtype, device=loss.device)
        names = [named[i][0] for i in keep]
        return with_gradient(value, {k: named[i][1] for k, i in zip(names, keep)}, dict(zip(names, flat))), numbers


def running_norms(module: nn.Module) -> list:
    """The BatchNorm layers of ``module`` that keep exponential moving averages of their statistics."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.momentum is not None
    ]


def merge_running_statistics(norms: list, before: list) -> None:
    """Compose the processes' updates of each layer's running statistics in rank order.

    A process that made ``j`` updates ``r <- (1 - m) r + m x_i`` from ``r0`` holds
    ``r = (1 - m)^j r0 + d``; applying process 0's ``(j, d)``, then process 1's, ... to ``r0`` gives
    the moving average of all the processes' updates in that order. One all-gather for all layers."""
    if ddp.world_size() == 1 or not norms:
        return
    parts = []
    for m, (mean0, var0, n0) in zip(norms, before):
        j = int(m.num_batches_tracked) - n0
        decay = (1 - m.momentum) ** j
        steps = torch.tensor([float(j)], dtype=m.running_mean.dtype, device=m.running_mean.device)
        parts += [steps, m.running_mean - decay * mean0, m.running_var - decay * var0]
    mine = torch.cat(parts)
    everyone = [torch.empty_like(mine) for _ in range(ddp.world_size())]
    dist.all_gather(everyone, mine)
    offset = 0
    for m, (mean0, var0, n0) in zip(norms, before):
        size = m.running_mean.numel()
        mean, var, total = mean0, var0, 0
        for theirs in everyone:
            j = int(theirs[offset].item())
            decay = (1 - m.momentum) ** j
            mean = decay * mean + theirs[offset + 1 : offset + 1 + size]
            var = decay * var + theirs[offset + 1 + size : offset + 1 + 2 * size]
            total += j
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(n0 + total)
        offset += 1 + 2 * size


def share(batch, rank: int, world: int):
    """Process ``rank``'s share of ``batch``: the ``rank``-th of ``world`` equal consecutive blocks of
    a list of episodes, or of the rows of each tensor of a dict, tuple or tensor batch (a deep
    transfer method's source and target rows)."""
    if isinstance(batch, dict):
        return {k: share(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return tuple(share(b, rank, world) for b in batch)
    if not isinstance(batch, (list, torch.Tensor)):
        raise ConfigError(
            f"{world} processes split a meta-batch of episodes or a batch of tensors, but this data source "
            f"gives {type(batch).__name__} batches; train it in one process (train.processes=1, no torchrun)."
        )
    if len(batch) % world:
        raise ConfigError(
            f"train.meta_batch={len(batch)} cannot be split evenly over {world} processes; make the "
            f"meta-batch a multiple of the number of processes."
        )
    size = len(batch) // world
    return batch[rank * size : (rank + 1) * size]


def over_processes(executor, learner, seed: int = 0):
    """``executor`` split over the processes of the group (:class:`Split`); itself in one process."""
    return Split(executor, learner, seed) if ddp.world_size() > 1 else executor
