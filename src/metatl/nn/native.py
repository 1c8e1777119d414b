"""The C kernels of ``kernels.c``, compiled on first use with the system's C compiler and called
through ``ctypes``: no build step at install, and without a compiler (or with
``METATL_NATIVE=0``) :func:`library` answers ``None`` and the callers keep PyTorch's layers.

The shared library is cached under ``$METATL_CACHE_DIR`` (default ``~/.cache/metatl``), named by a
hash of the source, the compiler, its flags and the machine, and written atomically, so that
processes compiling at once and machines sharing a home directory never load a half-written or
foreign file. ``ctypes`` releases the GIL during each call, so task threads run the kernels in
parallel; :func:`split` spreads one call over PyTorch's intra-op threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler has no -march=native
_FUNCTIONS = ("block", "conv_at", "wgrad_at", "moments")

_lock = threading.Lock()
_loaded: list = []  # [library or None], once tried
_pool: list = []  # [ThreadPoolExecutor, its size, the process it belongs to]


def enabled() -> bool:
    """Whether the native kernels may be used (``METATL_NATIVE=0`` turns them off)."""
    return os.environ.get("METATL_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    if os.environ.get("METATL_CACHE_DIR"):
        return Path(os.environ["METATL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metatl"


def _machine() -> str:
    """What a ``-march=native`` build depends on: the processor's name and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cc: str, target: Path) -> bool:
    for flags in _FLAGS:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return True
            log.debug("native kernels: %s failed: %s", " ".join(cmd), done.stderr.strip())
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("native kernels: %s failed: %s", " ".join(cmd), e)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return False


def _load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not SOURCE.exists():
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, repr(_FLAGS), platform.machine(), _machine()]).encode()
    ).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"metatl-{os.getuid()}"):
        target = directory / f"kernels-{key}.so"
        try:
            if not target.exists() and not _compile(cc, target):
                return None  # the compiler failed: it would fail in the other directory too
            lib = ctypes.CDLL(str(target))
        except OSError as e:  # an unwritable cache directory, or a library that does not load
            log.debug("native kernels: %s: %s", target, e)
            continue
        for dtype in ("float", "double"):
            for name in _FUNCTIONS:
                getattr(lib, f"{name}_{dtype}").restype = ctypes.c_int
            getattr(lib, f"channels_{dtype}").restype = ctypes.c_int64
        return lib
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` where they are turned off or cannot be built."""
    if not enabled():
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]


def function(name: str, dtype: torch.dtype):
    """The kernel ``name`` for ``dtype`` (float32 or float64); it raises where the C function
    refuses its arguments (returns non-zero)."""
    kernel = getattr(library(), f"{name}_{'float' if dtype == torch.float32 else 'double'}")

    def call(*args):
        if kernel(*args) != 0:
            raise ValueError(f"native kernel {name} refused its arguments (channels, windows): a bug in its caller")

    return call


def channels(dtype: torch.dtype, windows: int) -> int:
    """The multiple of channels the block kernels need for ``dtype`` and ``windows``."""
    return getattr(library(), f"channels_{'float' if dtype == torch.float32 else 'double'}")(ctypes.c_int64(windows))


def split(n: int, call) -> list:
    """``call(n0, n1)`` over ``[0, n)`` in as many pieces as PyTorch has intra-op threads (one
    piece, in this thread, inside a task thread or for small ``n``); the results in order."""
    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        return [call(0, n)]
    bounds = [n * i // threads for i in range(threads + 1)]
    with _lock:
        # a new pool where it is too small, and in a forked child (whose copy has no threads)
        if not _pool or _pool[1] < threads or _pool[2] != os.getpid():
            _pool[:] = [ThreadPoolExecutor(threads, thread_name_prefix="metatl-native"), threads, os.getpid()]
        pool = _pool[0]
    return list(pool.map(lambda i: call(bounds[i], bounds[i + 1]), range(threads)))


def pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())
