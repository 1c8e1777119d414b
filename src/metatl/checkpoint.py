"""Checkpoints: written atomically (temporary file, fsync, rename), read without running code.

A checkpoint holds plain containers only (dicts, lists, tuples, strings, numbers and tensors), so
it is read with ``torch.load(weights_only=True)``: a crafted file cannot run code when it is
loaded by ``metatl eval``, ``metatl adapt``, ``metatl.load`` or ``--resume``. Checkpoints of
metatl 0.1.0 kept the numpy random state as numpy arrays and torch's version as a
``TorchVersion``; those few types are allowed too (they rebuild data, never call code), and
:func:`upgrade` rewrites such a file in today's plain form. A file that names any other Python
object is refused with the names it asks for.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 2  # 1: metatl 0.1.0 (numpy arrays in the random state); 2: plain containers only


def _legacy_globals() -> list:
    """The non-plain types that checkpoints of format 1 hold: data, no callables that run code."""
    from torch.torch_version import TorchVersion

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), TorchVersion]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: str | os.PathLike) -> Any:
    """The object in a file written by :func:`save_atomic`, read with ``weights_only=True`` (no
    code runs). A file that asks for other Python objects raises a ValueError naming them."""
    path = Path(path)
    if not path.exists():
        if path.name == "best.pt" and (path.parent / "last.pt").exists():
            raise FileNotFoundError(
                f"{path} does not exist: the run never validated (train.val_every: 0, or "
                f"data.train_subset: trainval, which leaves no validation classes), so it kept "
                f"no best checkpoint; use {path.parent / 'last.pt'}."
            )
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .pt file in a run folder.")
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not even a readable pickle: fall through to the generic message
            names = []
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in _legacy_globals()}
        names = [n for n in names if n not in allowed]
        if names:
            raise ValueError(
                f"{path} was refused: it asks to import {', '.join(names)}, which a metatl checkpoint never "
                f"holds, and loading it could run code. It is not a metatl checkpoint, or it was altered; "
                f"use another checkpoint of the run (last.pt, best.pt) or train again."
            ) from None
        raise ValueError(
            f"{path} is not a readable metatl checkpoint ({str(err).splitlines()[0]}); use another "
            f"checkpoint of the run (last.pt, best.pt) or train again."
        ) from None
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(
            f"{path} is not a readable metatl checkpoint ({err}); use another checkpoint "
            f"of the run (last.pt, best.pt) or train again."
        ) from err


def load(path: str | os.PathLike) -> dict:
    """A metatl checkpoint (see :func:`read`): a dict with at least ``learner`` and ``config``."""
    ckpt = read(path)
    if not isinstance(ckpt, dict) or "learner" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a metatl checkpoint (no learner state or config).")
    return ckpt


def plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars as tensors and numbers, and ``str`` subclasses (such
    as ``torch.__version__``) as ``str``: what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str):
        return str(value)
    return value


def upgrade(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Rewrite the checkpoint ``path`` (into ``out``, default in place) in today's format.

    A file of an older metatl is read safely (:func:`read` allows the few data types it held) and
    rewritten in plain containers; a file that asks for anything else is refused, never unpickled."""
    path, out = Path(path), Path(out or path)
    state = read(path)
    if not isinstance(state, dict) or "learner" not in state or "config" not in state:
        raise ValueError(f"{path} is not a metatl checkpoint (no learner state or config); nothing was written.")
    state = plain(state)
    state["format"] = FORMAT
    save_atomic(state, out)
    read(out)  # what was written loads safely
    return out


def learner_weights(ckpt: dict, weights: str = "averaged") -> dict:
    """The learner's state dict in a loaded checkpoint: the moving average of the weights when the
    run kept one (``train.ema_decay``) and ``weights`` is ``"averaged"``, else the trained weights."""
    if weights == "averaged" and ckpt.get("averaged") is not None:
        return ckpt["averaged"]
    return ckpt["learner"]


def rng_state() -> dict:
    """Every random state, as plain containers (numpy's key as an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
