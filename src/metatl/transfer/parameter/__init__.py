"""Parameter-based transfer: fit the target model close to the source parameters."""

from metatl.transfer.parameter.finetune import Finetune, freeze_by_filter, param_groups
from metatl.transfer.parameter.l2sp import L2SP, l2sp_penalty
from metatl.transfer.parameter.regularized_linear import TransferLogisticRegression, TransferRidge

__all__ = [
    "Finetune",
    "L2SP",
    "TransferLogisticRegression",
    "TransferRidge",
    "freeze_by_filter",
    "l2sp_penalty",
    "param_groups",
]
