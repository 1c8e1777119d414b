"""Instance-based transfer: reweight or reuse source samples (KMM, KLIEP, TrAdaBoost)."""

from metatl.transfer.instance.kliep import KLIEP, kliep_weights
from metatl.transfer.instance.kmm import KMM, kmm_weights
from metatl.transfer.instance.tradaboost import TrAdaBoost

__all__ = ["KMM", "KLIEP", "TrAdaBoost", "kmm_weights", "kliep_weights"]
