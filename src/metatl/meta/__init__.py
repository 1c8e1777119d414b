"""Meta-learning algorithms, one file each (optimization-, metric- and RNN-based)."""
from .adapt import adapt
from .base import GradientMetaLearner, MetaLearner, Predictor
from .maml import MAML
from .matching import MatchingNet
from .pretrain import Pretrain
from .protonet import ProtoNet
from .relation import RelationNet
from .reptile import Reptile
from .rules import SGD, Adam

__all__ = ["MAML", "Adam", "GradientMetaLearner", "MatchingNet", "MetaLearner", "Predictor", "Pretrain", "ProtoNet",
           "RelationNet", "Reptile", "SGD", "adapt"]
