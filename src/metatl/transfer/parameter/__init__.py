"""Parameter-based transfer: fit the target model close to the source parameters."""
from metatl.transfer.parameter.regularized_linear import TransferLogisticRegression, TransferRidge

__all__ = ["TransferLogisticRegression", "TransferRidge"]
