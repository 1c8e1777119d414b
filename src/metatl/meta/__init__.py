"""Meta-learning algorithms, one file each (optimization-, metric- and RNN-based)."""
from .adapt import adapt
from .base import GradientMetaLearner, MetaLearner, Predictor
from .maml import MAML
from .pretrain import Pretrain
from .reptile import Reptile
from .rules import SGD, Adam

__all__ = ["MAML", "Adam", "GradientMetaLearner", "MetaLearner", "Predictor", "Pretrain", "Reptile", "SGD", "adapt"]
