"""Backbones and heads (plain ``nn.Module``s)."""
from .backbones import ConvNet, conv4_pool, conv4_stride, mlp
from .digits import DigitsCNN, digits_cnn
from .relation import RelationEmbedding, RelationModule, conv4_relation

__all__ = ["ConvNet", "DigitsCNN", "digits_cnn", "RelationEmbedding", "RelationModule", "conv4_pool", "conv4_relation", "conv4_stride", "mlp"]
