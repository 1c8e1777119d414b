"""Dropout whose random mask is drawn eight bits per value: the same layer as ``nn.Dropout``,
faster on CPUs.

Dropout keeps each value with probability ``1 - p`` and scales it by ``1 / (1 - p)``. PyTorch draws
its CPU mask with ``bernoulli_``, one value at a time in one thread whatever the thread count: on
the digits net's pooled maps a sizeable share of the training step (measured in docs/transfer.md).
:func:`dropout` instead fills int64 words from torch's global generator
(``random_``: 63 uniform bits each) and reads seven uniform bytes ``u`` from each: a value is kept
when ``u < 256 (1 - p)``, an event of probability exactly ``1 - p`` for every ``p`` that is a
multiple of 1/256 (0.25 and 0.5 in the digits net). Output and gradient are then
``x * (mask / (1 - p))``, computed as PyTorch's dropout computes them, so the layer is the same
random function of its input: independent Bernoulli masks, the same scale, seeded by
``torch.manual_seed`` (and restored with the trainer's random state). The masks themselves differ
from ``bernoulli_``'s for a given seed.

Other ``p``, other devices (CUDA has a fused kernel) and ``torch.func`` transforms (whose
randomness rules the plain layer follows) use ``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast import _transforms_active

_LEVELS = 256  # a byte per value


def keep_mask(like: Tensor, keep: float) -> Tensor:
    """A bool tensor shaped and laid out like ``like`` (contiguous, or channels-last contiguous),
    each entry True with probability ``keep`` (a multiple of 1/256), independently: seven bytes
    of each 63-bit word of ``random_``, in memory order."""
    n = like.numel()
    words = -(-n // 7)
    raw = torch.empty(words, dtype=torch.int64).random_()  # uniform on [0, 2**63): 7 uniform bytes
    mask = torch.empty((words, 7), dtype=torch.bool)
    torch.lt(raw.view(torch.uint8).view(words, 8)[:, :7], round(keep * _LEVELS), out=mask)
    return mask.view(-1)[:n].as_strided(like.shape, like.stride())


def _fits(p: float) -> bool:
    return 0.0 < p < 1.0 and float(p * _LEVELS).is_integer()


def _dense(x: Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """``torch.nn.functional.dropout(x, p, training)`` with the mask of :func:`keep_mask` on CPUs
    (see the module docstring); the same function otherwise."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not _fits(p) or not x.is_floating_point() or _transforms_active():
        return F.dropout(x, p, training)
    if not _dense(x):
        x = x.contiguous()
    # as PyTorch's dropout computes it: the mask as 0 / 1 values divided by 1 - p, times the input
    return x * keep_mask(x, 1.0 - p).to(x.dtype).div_(1.0 - p)


class Dropout(nn.Dropout):
    """``nn.Dropout(p)`` drawing its mask with :func:`keep_mask` on CPUs (same parameters, none;
    same state dict, empty)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
