"""Classical (scikit-learn compatible) transfer learning.

Data convention: ``X, y, sample_domain`` with source domains positive, target domains negative and
target labels masked (-1, NaN for regression); see :mod:`metatl.data.domains`.

Every estimator here is registered in :data:`metatl.registry.ESTIMATORS`. The deep objectives
(``source_only``, ``dann``, ``deep_coral``, ``dan``, ``linear_probe``, ``finetune``, ``l2sp``,
``rkd``) are registered in :data:`metatl.registry.ALGORITHMS` and run by the one trainer.
Transferability scores of a pretrained model on a target task (LEEP, LogME, H-score, NCE):
:mod:`metatl.transfer.transferability`.
"""

from metatl.transfer import relation  # noqa: F401  (registers rkd)
from metatl.transfer._base import SourceOnly
from metatl.transfer._deep import DeepSourceOnly, DeepTransfer
from metatl.transfer._validation import TargetLabelLeakWarning
from metatl.transfer.feature import CORAL
from metatl.transfer.instance import KLIEP, KMM, TrAdaBoost, kliep_weights, kmm_weights
from metatl.transfer.parameter import TransferLogisticRegression, TransferRidge
from metatl.transfer.selection import DEVScorer, ImportanceWeightedScorer, ReverseValidationScorer
from metatl.transfer.transferability import h_score, leep, logme, nce, score_checkpoint, score_model

__all__ = [
    "CORAL",
    "DEVScorer",
    "DeepSourceOnly",
    "DeepTransfer",
    "ImportanceWeightedScorer",
    "KLIEP",
    "KMM",
    "ReverseValidationScorer",
    "SourceOnly",
    "TargetLabelLeakWarning",
    "TrAdaBoost",
    "TransferLogisticRegression",
    "TransferRidge",
    "h_score",
    "kliep_weights",
    "kmm_weights",
    "leep",
    "logme",
    "nce",
    "score_checkpoint",
    "score_model",
]
