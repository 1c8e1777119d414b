"""Backbones and heads (plain ``nn.Module``s)."""
from .backbones import ConvNet, conv4_pool, conv4_stride, mlp
from .relation import RelationEmbedding, RelationModule, conv4_relation

__all__ = ["ConvNet", "RelationEmbedding", "RelationModule", "conv4_pool", "conv4_relation", "conv4_stride", "mlp"]
