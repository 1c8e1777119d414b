"""Backbones and heads (plain ``nn.Module``s), and the fast kernels the conv nets use."""

from .backbones import ConvNet, Pixels, conv4_pool, conv4_stride, mlp, pixels
from .digits import DigitsCNN, digits_cnn
from .fast import BatchStatsNorm2d, MaxPool2d, conv_batch_stats_norm, functional_call, to_channels_last
from .per_step import PerStepBatchNorm
from .relation import RelationEmbedding, RelationModule, conv4_relation

__all__ = [
    "BatchStatsNorm2d",
    "ConvNet",
    "DigitsCNN",
    "digits_cnn",
    "MaxPool2d",
    "PerStepBatchNorm",
    "RelationEmbedding",
    "RelationModule",
    "conv4_pool",
    "conv4_relation",
    "conv4_stride",
    "conv_batch_stats_norm",
    "functional_call",
    "mlp",
    "Pixels",
    "pixels",
    "to_channels_last",
]
