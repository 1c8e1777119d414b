"""Feature-based transfer: map source and target to a shared representation.

Closed-form CORAL (an estimator), and the deep objectives: DANN, Deep CORAL, DAN (multi-kernel
MMD) and a linear probe on pretrained features.
"""

from metatl.transfer.feature.coral import CORAL, coral_matrix
from metatl.transfer.feature.dann import DANN, GradientReversal, dann_lambda, grad_reverse
from metatl.transfer.feature.deep_coral import DeepCORAL, coral_loss
from metatl.transfer.feature.linear_probe import LinearProbe, extract_features
from metatl.transfer.feature.mmd import DAN, mk_mmd

__all__ = [
    "CORAL",
    "DAN",
    "DANN",
    "DeepCORAL",
    "GradientReversal",
    "LinearProbe",
    "coral_loss",
    "coral_matrix",
    "dann_lambda",
    "extract_features",
    "grad_reverse",
    "mk_mmd",
]
