"""Processes: the ``torch.distributed`` group of a run started by ``torchrun`` (or by ``train.processes``).

A run is launched by PyTorch's elastic launcher, ``torchrun`` (``torch.distributed.run``), on one
machine or many; the launcher sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each worker's environment, and :func:`process_group` joins the group from it
(``init_method="env://"``): ``gloo`` on CPUs, ``nccl`` on GPUs (the worker of local rank ``r`` on
``cuda:r``). ``train.processes: N`` is a shortcut for ``torchrun --standalone --nproc-per-node N``:
:func:`launch` starts the same workers through the same launcher
(``torch.distributed.launcher.api.elastic_launch``), and they take the same path.

Under an elastic restart (``torchrun --max-restarts``) the launcher starts every worker again after
one fails; :func:`restarts` counts them, and ``metatl train`` then continues the run from its last
checkpoint (:func:`metatl.engine.run.train`).

How a meta-batch is split over the processes is an executor's business
(:class:`metatl.engine.executors.processes.Split`); the collectives it uses are here, and each is
the identity in a run of one process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's rank in the group (0 outside one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the group (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_world_size() -> int:
    """How many processes of the group share this machine (the launcher's ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def launched() -> bool:
    """Whether a launcher (``torchrun``, :func:`launch`) started this process as a worker."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def restarts() -> int:
    """How many times the elastic launcher has restarted the workers (``TORCHELASTIC_RESTART_COUNT``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) if launched() else 0


def backend(device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device) -> torch.device:
    """``device``, or on CUDA in a launched worker the GPU of its local rank (``cuda:LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


@contextmanager
def process_group(device):
    """Join the launcher's process group for the ``with`` block (nothing outside a launched worker,
    or when the group is joined already)."""
    if not launched() or dist.is_initialized():
        yield
        return
    device = local_device(device)
    if device.type == "cuda":
        if torch.cuda.device_count() <= device.index:
            raise ValueError(
                f"the worker of local rank {device.index} needs a GPU cuda:{device.index}, but this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per node (--nproc-per-node)."
            )
        torch.cuda.set_device(device)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts():
        # The workers share the launcher's rendezvous store, where the keys of the attempt before a
        # restart are still found (pytorch/pytorch#135712): keep each attempt's keys apart.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(minutes=10)
        )
        dist.init_process_group(
            backend(device),
            store=dist.PrefixStore(f"metatl/attempt_{restarts()}", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    else:
        dist.init_process_group(backend(device), init_method="env://")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _in_group(fn: Callable, device: str, *args):
    with process_group(device):
        return fn(*args)


def launch(fn: Callable, processes: int, device: str, *args, max_restarts: int = 0):
    """Run ``fn(*args)`` in ``processes`` workers on this machine, joined in one process group, through
    PyTorch's elastic launcher (as ``torchrun --standalone --nproc-per-node processes`` would); returns
    the value of rank 0. A worker that fails stops the others (and, with ``max_restarts``, restarts them)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if backend(device) == "nccl" and torch.cuda.device_count() < processes:
        raise ValueError(
            f"train.processes={processes} on CUDA needs {processes} GPUs, found "
            f"{torch.cuda.device_count()}; lower train.processes."
        )
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        return elastic_launch(config, _in_group)(fn, str(device), *args)[0]
    except ChildFailedError as err:
        first = err.get_first_failure()[1]
        message = first.message.get("message") if isinstance(first.message, dict) else first.message
        raise WorkerError(
            f"process {first.local_rank} of {processes} stopped: {message or 'see its output above'}"
        ) from None


class WorkerError(RuntimeError):
    """A worker of :func:`launch` failed; the message carries its error."""


def barrier() -> None:
    """Wait until every process of the group gets here."""
    if world_size() > 1:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process ``src``'s parameters and buffers."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def average_in_place(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor (all of one dtype and device) by its mean over the processes, with one
    all-reduce for all of them."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the processes."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    for dtype in {b.dtype for b in buffers}:
        average_in_place([b for b in buffers if b.dtype == dtype])


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
