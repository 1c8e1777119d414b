"""The process's execution settings, set once at start: intra-op threads, TF32, the allocator and
the random seed. Nothing else in metatl sets a thread count; the executors that run tasks in
threads (:mod:`metatl.engine.executors`) ask :func:`set_threads` for their share.

``threads="auto"`` uses the cores that are actually free: it reads the CPU counters of
``/proc/stat`` over a short interval, subtracts this process's own use, and runs as many intra-op
threads as there are idle cores (at least one). More threads than free cores makes every parallel
operation wait at its barrier for a thread that the scheduler has parked, which costs far more
than the lost parallelism. :class:`Runtime.rebalance` repeats the count from the counters since
its last call, so a long run follows the load of the machine as it changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import random
import time

import torch

REBALANCE_SECONDS = 10.0  # how often Runtime.rebalance re-counts the free cores


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_counters() -> tuple[float, float] | None:
    """``(busy, total)`` CPU seconds of the whole machine since boot, from ``/proc/stat``, and
    ``None`` where that file does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [float(v) for v in fields[:8]]
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)  # idle + iowait
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def _own_cpu() -> float:
    """CPU seconds this process has used (all its threads)."""
    return time.process_time()


class LoadSample:
    """A point to measure the machine's load from: the counters at one moment."""

    def __init__(self):
        self.machine: tuple[float, float] | None = _cpu_counters()
        self.own: float = _own_cpu()


def free_cores(since: LoadSample, cores: int | None = None) -> int:
    """How many of ``cores`` (default: :func:`available_cores`) other processes left idle between
    ``since`` and now, as a whole number of at least 1. Without ``/proc/stat``: ``cores``."""
    cores = cores or available_cores()
    now = LoadSample()
    if since.machine is None or now.machine is None:
        return cores
    busy = now.machine[0] - since.machine[0]
    total = now.machine[1] - since.machine[1]
    if total <= 0:
        return cores
    machine_cores = os.cpu_count() or cores
    wall = total / machine_cores  # seconds elapsed, as the counters saw them
    others = max(0.0, busy - (now.own - since.own)) / wall  # cores busy with other processes
    return max(1, min(cores, int(cores - others + 0.5)))


def set_threads(count: int) -> None:
    """Run torch's intra-op work in ``count`` threads (in the calling thread)."""
    torch.set_num_threads(max(1, int(count)))


def allow_tf32(allowed: bool) -> None:
    """Whether CUDA convolutions and matrix products may compute float32 tensors in TF32 (a 10-bit
    mantissa), for the whole process. Off for ``train.precision: float32`` (PyTorch's default
    allows it for cuDNN convolutions), on for ``tf32``: second-order MAML's float32 meta-gradient
    moves by up to a quarter of its largest entry with TF32 (docs/performance.md). No effect on CPUs."""
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves large blocks (such as activation tensors) with fresh ``mmap`` pages and
    unmaps them when freed, so every training step pays a page fault for each page it touches
    again. With mmap and trimming off, a step reuses the pages of the step before it; the process
    keeps the memory it has used until it exits, as a caching allocator does. Each thread keeps its
    own arena, so that the task threads do not queue for one lock at every tensor they allocate
    and free. A thread's arena grows in heaps of at most 64 MiB, which glibc unmaps as they empty
    unless the free space it keeps at the top of a heap (``M_TOP_PAD``) is at least a heap: the pad
    is set to two heaps. Returns whether it applied (only on Linux with glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # from glibc's malloc.h
    two_heaps = 128 << 20  # glibc's largest heap of a thread's arena is 64 MiB
    return all([mallopt(m_mmap_max, 0), mallopt(m_trim_threshold, 2**31 - 1), mallopt(m_top_pad, two_heaps)])


def seed_everything(seed: int) -> None:
    """Seed torch's and Python's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)


class Runtime:
    """The execution settings of one training process.

    ``threads``: intra-op threads, a count or ``"auto"`` (the free cores, shared among ``world``
    processes, re-counted by :meth:`rebalance`); ``None`` keeps torch's choice (or 1 per process
    when ``world > 1``). ``precision``: ``"tf32"`` allows TF32 on CUDA, anything else forbids it.
    ``keep_freed_memory``: tune glibc's malloc for CPU runs (:func:`keep_freed_memory`).
    """

    def __init__(
        self,
        threads: int | str | None = "auto",
        device: str = "cpu",
        precision: str = "float32",
        keep_freed_memory: bool = True,
        seed: int | None = None,
        world: int = 1,
        sample_seconds: float = 0.1,
    ):
        self.auto = threads == "auto"
        self.world = max(1, world)
        self.cores = max(1, available_cores() // self.world)
        device = torch.device(device)
        if self.auto:
            start = LoadSample()
            time.sleep(sample_seconds)
            self.threads = self._share(free_cores(start))
        elif threads is None:
            self.threads = torch.get_num_threads() if self.world == 1 else 1
        else:
            self.threads = int(threads)
        set_threads(self.threads)
        if device.type == "cuda":
            allow_tf32(precision == "tf32")
        self.keeps_freed_memory = bool(keep_freed_memory and device.type == "cpu" and _keep_freed_memory())
        if seed is not None:
            seed_everything(seed)
        self._since, self._last = LoadSample(), time.monotonic()

    def _share(self, free: int) -> int:
        return max(1, min(self.cores, free // self.world if self.world > 1 else free))

    def rebalance(self, every: float = REBALANCE_SECONDS) -> int:
        """With ``threads="auto"``, at most once per ``every`` seconds: re-count the free cores
        over the time since the last count and set the thread count to them. Returns the count."""
        if not self.auto or time.monotonic() - self._last < every:
            return self.threads
        threads = self._share(free_cores(self._since))
        if threads != self.threads:
            self.threads = threads
            set_threads(threads)
        self._since, self._last = LoadSample(), time.monotonic()
        return self.threads


_keep_freed_memory = keep_freed_memory  # Runtime's own reference, which tests may replace
