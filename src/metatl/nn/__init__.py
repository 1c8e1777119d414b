"""Backbones and heads (plain ``nn.Module``s)."""
from .backbones import (BatchStatsNorm2d, ConvNet, MaxPool2d, Pixels, conv4_pool, conv4_stride, conv_batch_stats_norm,
                        mlp, pixels, to_channels_last)
from .digits import DigitsCNN, digits_cnn
from .relation import RelationEmbedding, RelationModule, conv4_relation

__all__ = ["BatchStatsNorm2d", "ConvNet", "DigitsCNN", "digits_cnn", "MaxPool2d", "RelationEmbedding",
           "RelationModule", "conv4_pool", "conv4_relation", "conv4_stride", "conv_batch_stats_norm", "mlp", "Pixels", "pixels",
           "to_channels_last"]
