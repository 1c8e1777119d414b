"""Trainer, evaluator, checkpoints and plots shared by every method."""
from .evaluator import evaluate, mean_ci95
from .trainer import NonFiniteLossError, Trainer, load_trainer

__all__ = ["NonFiniteLossError", "Trainer", "evaluate", "load_trainer", "mean_ci95"]
