"""Checkpoints: written atomically (temporary file, fsync, rename), loaded with a clear error."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .pt file in a run folder.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable metatl checkpoint ({err}); use another checkpoint "
                         f"of the run (last.pt, best.pt) or train again.") from err
    if not isinstance(ckpt, dict) or "learner" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a metatl checkpoint (no learner state or config).")
    return ckpt


def learner_weights(ckpt: dict, weights: str = "averaged") -> dict:
    """The learner's state dict in a loaded checkpoint: the moving average of the weights when the
    run kept one (``train.ema_decay``) and ``weights`` is ``"averaged"``, else the trained weights."""
    if weights == "averaged" and ckpt.get("averaged") is not None:
        return ckpt["averaged"]
    return ckpt["learner"]


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
