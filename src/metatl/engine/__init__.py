"""Trainer, evaluator, checkpoints and plots shared by every method."""

from .divergence import DivergenceError
from .evaluator import evaluate, mean_ci95
from .trainer import NonFiniteLossError, Trainer

__all__ = ["DivergenceError", "NonFiniteLossError", "Trainer", "evaluate", "mean_ci95"]
