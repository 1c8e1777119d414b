"""Meta-learning algorithms, one file each (optimization-, metric- and RNN-based)."""

from .adapt import adapt
from .anil import ANIL
from .base import GradientMetaLearner, MetaLearner, Predictor
from .baseline import Baseline, BaselinePP
from .imaml import IMAML
from .learned_optimizer import LearnedOptimizer
from .maml import MAML
from .maml_pp import MAMLPlusPlus
from .mann import MANN
from .matching import MatchingNet
from .meta_lstm import MetaLSTM
from .meta_sgd import MetaSGD
from .pretrain import Pretrain
from .protonet import ProtoNet
from .relation import RelationNet
from .reptile import Reptile
from .rules import SGD, Adam, MetaSGDRule, Rule
from .snail import SNAIL

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "MAMLPlusPlus",
    "Adam",
    "Baseline",
    "BaselinePP",
    "GradientMetaLearner",
    "MatchingNet",
    "MetaLearner",
    "MetaSGD",
    "MetaSGDRule",
    "Predictor",
    "Pretrain",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "Rule",
    "SGD",
    "adapt",
]
__all__ += ["LearnedOptimizer", "MANN", "MetaLSTM", "SNAIL"]  # RNN-based
