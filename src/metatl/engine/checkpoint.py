"""Checkpoint reading and writing, at its old import path: it lives in :mod:`metatl.checkpoint`."""

from ..checkpoint import (
    FORMAT,
    learner_weights,
    load,
    plain,
    read,
    rng_state,
    save_atomic,
    set_rng_state,
    upgrade,
)

__all__ = [
    "FORMAT",
    "learner_weights",
    "load",
    "plain",
    "read",
    "rng_state",
    "save_atomic",
    "set_rng_state",
    "upgrade",
]
