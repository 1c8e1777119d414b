"""Backbones and heads (plain ``nn.Module``s)."""
from .backbones import ConvNet, conv4_pool, conv4_stride, mlp

__all__ = ["ConvNet", "conv4_pool", "conv4_stride", "mlp"]
