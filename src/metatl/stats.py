"""Evaluation statistics shared by data, meta, transfer and engine (no imports from them)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def mean_ci95(values: Iterable[float]) -> dict[str, float]:
    """The mean of ``values`` with the half-width of its normal 95% confidence interval,
    ``1.96 * std / sqrt(n)`` (``std`` with ``ddof=1``; 0 for a single value), and that ``std``."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("no episode scores to summarise; evaluate at least one episode.")
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "ci95": float(1.96 * std / math.sqrt(v.size)), "std": float(std)}


__all__ = ["mean_ci95"]
