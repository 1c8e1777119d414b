"""Splitting a meta-batch across processes (``train.processes``) with ``torch.distributed``.

Every process draws the *same* meta-batch from the same seeded generator and keeps its share,
``batch[rank::world]``; each computes the meta-loss of its tasks and its gradient, the gradients
are averaged with one all-reduce, and every process takes the same optimizer step, so the
parameters stay identical. The result is the single-process run's (up to the order of a float
sum), at a fraction of the time when one process cannot use the cores well (small convolutions,
per-task Python loops). Process 0 alone logs, validates, checkpoints and tests.

The backend is ``gloo`` on CPU (each process then uses ``train.num_threads`` threads; ``auto``: its
share of the free cores, see :mod:`metatl.engine.runtime`)
and ``nccl`` on CUDA (process ``r`` on ``cuda:r``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(r: int, world: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=r, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, processes: int, device: str, *args) -> None:
    """Run ``fn(*args)`` in ``processes`` new processes joined in one process group."""
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < processes:
        raise ValueError(
            f"train.processes={processes} on CUDA needs {processes} GPUs, found "
            f"{torch.cuda.device_count()}; lower train.processes."
        )
    torch.multiprocessing.spawn(_worker, args=(processes, _free_port(), backend, fn, args), nprocs=processes, join=True)


def _average_in_place(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the processes, with one all-reduce for all of them."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over the processes."""
    _average_in_place([p.grad for p in params if p.grad is not None])


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the processes."""
    _average_in_place([b for b in module.buffers() if b.is_floating_point()])


def average_values(values: dict[str, float], device) -> dict[str, float]:
    """The mean over the processes of each number in ``values`` (same keys in every process)."""
    if world_size() == 1 or not values:
        return values
    keys: list[str] = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / world_size()).tolist()))


def max_value(value: float, device) -> float:
    """The largest ``value`` over the processes (so that they all agree, e.g. on the time spent)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
