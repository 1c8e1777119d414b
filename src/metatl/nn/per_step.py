"""Per-inner-step copies of a model's BatchNorm weights, biases and running statistics (MAML++'s
BNWB and BNRS, Antoniou et al. 2019, sec. 4).

The model stays a plain module: :class:`PerStepBatchNorm` holds, for every BatchNorm layer, one
row per inner step of its weight and bias (parameters, learned by the outer loop) and/or of its
running mean and variance (buffers), and :meth:`PerStepBatchNorm.at` gives the tensors of step
``j`` under the model's own names, to be passed into a functional call of the model in place of
its own. Steps past the last row use the last row.
"""

from __future__ import annotations

from torch import Tensor, nn

AFFINE = ("weight", "bias")
STATS = ("running_mean", "running_var")


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers with their dotted names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _key(name: str) -> str:  # parameter and buffer names cannot hold dots
    return name.replace(".", "-")


class PerStepBatchNorm(nn.Module):
    """``steps`` copies of the BatchNorm weights and biases (``weights``) and of the running
    statistics (``stats``) of ``model``, each starting from the model's current values.

    ``at(j)`` maps the model's tensor names (``features.1.weight``...) to row ``min(j, steps - 1)``
    of the copies; ``at(j, stats)`` takes the statistics from ``stats`` (a :meth:`clone_stats`
    result: adapting at test time must not change the meta-learned statistics). In training mode
    BatchNorm updates the running statistics it is given in place, so step ``j``'s row collects the
    statistics of step ``j``'s batches."""

    def __init__(self, model: nn.Module, steps: int, weights: bool = True, stats: bool = False):
        super().__init__()
        if steps < 1:
            raise ValueError(f"per-step BatchNorm needs at least one inner step, got {steps}.")
        layers = batch_norms(model)
        self.steps = steps
        self.affine = nn.ParameterDict()
        self.affine_names: list[str] = []  # the model's names of the tensors replaced
        self.stats_names: list[str] = []
        if weights:
            affine = [(name, m) for name, m in layers if m.affine]
            if not affine:
                raise ValueError(
                    "bn_per_step_weights: the model has no BatchNorm layer with a weight and bias "
                    "(model.bn_mode none?); use a model with BatchNorm (the conv nets' bn_mode batch "
                    "or running) or bn_per_step_weights=false."
                )
            for name, m in affine:
                for attr in AFFINE:
                    p = getattr(m, attr).detach()
                    self.affine[_key(f"{name}.{attr}")] = nn.Parameter(p.unsqueeze(0).repeat(steps, 1).clone())
                    self.affine_names.append(f"{name}.{attr}")
        if stats:
            tracked = [(name, m) for name, m in layers if m.track_running_stats]
            if not tracked:
                raise ValueError(
                    "bn_per_step_stats: the model keeps no BatchNorm running statistics; set "
                    "model.bn_mode: running (with bn_mode batch every step normalises with its own "
                    "batch's statistics, as the MAML++ reference code does), or bn_per_step_stats=false."
                )
            for name, m in tracked:
                for attr in STATS:
                    b = getattr(m, attr).detach()
                    self.register_buffer(f"stats_{_key(f'{name}.{attr}')}", b.unsqueeze(0).repeat(steps, 1).clone())
                    self.stats_names.append(f"{name}.{attr}")

    def clone_stats(self) -> dict[str, Tensor]:
        """A copy of the per-step running statistics, for :meth:`at`."""
        return {n: getattr(self, f"stats_{_key(n)}").clone() for n in self.stats_names}

    def at(self, step: int, stats: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The tensors of inner step ``step`` under the model's names."""
        j = min(step, self.steps - 1)
        out = {n: self.affine[_key(n)][j] for n in self.affine_names}
        for n in self.stats_names:
            out[n] = (getattr(self, f"stats_{_key(n)}") if stats is None else stats[n])[j]
        return out
