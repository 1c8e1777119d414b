"""L2-SP: fine-tuning regularised towards the starting point (Li, Grandvalet & Davoine, ICML 2018).

With ``w_s`` the parameters shared with the pretrained network (starting values ``w_s^0``, frozen
copies taken after ``init_checkpoint`` is loaded) and ``w_new`` the parameters of a new head
(``reset_head=True``; otherwise there are none)::

    Omega(w) = alpha/2 ||w_s - w_s^0||_2^2 + beta/2 ||w_new||_2^2
    L = CE(f(x; w), y) + Omega(w)

Frozen parameters are constant, so they are left out of the penalty. Defaults ``alpha=0.1``,
``beta=0.01`` as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...registry import ALGORITHMS
from .finetune import Finetune


def l2sp_penalty(
    params: dict[str, Tensor], start: dict[str, Tensor], new: Sequence[str], alpha: float, beta: float
) -> Tensor:
    """``alpha/2 sum_{k in start} ||params[k] - start[k]||^2 + beta/2 sum_{k in new} ||params[k]||^2``."""
    shared = sum(((params[k] - w0) ** 2).sum() for k, w0 in start.items())
    fresh = sum((params[k] ** 2).sum() for k in new)
    return alpha / 2 * torch.as_tensor(shared) + beta / 2 * torch.as_tensor(fresh)


@ALGORITHMS.register("l2sp")
class L2SP(Finetune):
    """Fine-tuning with the L2-SP penalty alpha/2 ||w_s - w_s^0||^2 + beta/2 ||w_new||^2 (Li et al. 2018)."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        init_checkpoint: str | None = None,
        alpha: float = 0.1,
        beta: float = 0.01,
        strategy: str = "all",
        freeze: Sequence[str] = (),
        lr_scales: dict[str, float] | None = None,
        labels: str = "target",
        reset_head: bool = False,
    ):
        super().__init__(model, task_type, init_checkpoint, strategy, freeze, lr_scales, labels, reset_head)
        self.alpha, self.beta = alpha, beta
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.new = [n for n in trainable if reset_head and n.startswith("head.")]
        self.start = nn.Module()  # w_s^0 as buffers, so checkpoints carry them
        self._start_names = {}
        for n, p in model.named_parameters():
            if n in trainable and n not in self.new:
                key = n.replace(".", "__")
                self.start.register_buffer(key, p.detach().clone())
                self._start_names[n] = key

    def regularizer(self) -> Tensor:
        params = dict(self.model.named_parameters())
        start = {n: getattr(self.start, key) for n, key in self._start_names.items()}
        return l2sp_penalty(params, start, self.new, self.alpha, self.beta)
