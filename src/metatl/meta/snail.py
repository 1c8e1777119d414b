"""SNAIL: a Simple Neural Attentive meta-Learner (Mishra, Rohaninejad, Chen and Abbeel, ICLR 2018).

The episode is a sequence of (embedding, label) pairs: the support set in a shuffled order, then one
query whose label is zeroed. With ``e_t = encode(x_t)``::

    z_t = [e_t, onehot(y_t)]  for the n support steps,     z_{n+1} = [e_q, 0]

and the logits for the query are the network's output at the last step, ``n + 1``. Every query of
an episode gets its own sequence (support + that query), so queries never see each other. Since
every block is causal, the support steps' activations are the same in all of an episode's
sequences: they are computed once, and each query adds only its own last step
(``SNAILNet.forward_queries``, tested equal to the separate sequences), so an episode with Q queries
costs n + Q steps rather than Q (n + 1).

The network interleaves two causal blocks, each concatenating its output to its input (channels)::

    causal conv, kernel 2, dilation d:  conv_d(x)_t = W_0 x_{t-d} + W_1 x_t + b      (x_s = 0, s < 1)
    DenseBlock(d, F):   x -> [x, tanh(conv_d^f(x)) * sigmoid(conv_d^g(x))]            (F filters)
    TCBlock(T, F):      DenseBlocks with d = 1, 2, 4, ..., 2^(ceil(log2 T) - 1)
    AttentionBlock(K, V): q = W_q x, k = W_k x, v = W_v x,
                        A = softmax_j(q_i . k_j / sqrt(K) + m_ij),  m_ij = -inf if j > i else 0,
                        x -> [x, A v]

and the Omniglot network of the paper (appendix B) is::

    Attention(64, 32), TC(T, 128), Attention(256, 128), TC(T, 128), Attention(512, 256), Linear -> N

A TC block built for length ``T = seq_len`` sees exactly ``2^ceil(log2 T)`` steps back, so a longer
sequence is refused (build with a larger ``seq_len``): for N ways and K shots, ``T = N K + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episode import Episode
from ..registry import ALGORITHMS
from ._sequence import check_ways, encode, feature_dim, infer_ways, one_hot
from ._types import Metrics
from .base import MetaLearner, Predictor, check_support


class CausalConv1d(nn.Module):
    """``y_t = W_0 x_{t-d} + W_1 x_t + b`` on ``(B, T, C)`` sequences (left zero padding)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=2, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x.transpose(1, 2), (self.dilation, 0))
        return self.conv(x).transpose(1, 2)

    def last_step(self, prefix: Tensor, x: Tensor) -> Tensor:
        """``y`` at step ``n`` for each of the inputs ``x`` ``(B, Q, C)`` placed after ``prefix``
        ``(B, n, C)``: ``W_0 prefix_{n-d} + W_1 x + b``."""
        n, w = prefix.shape[1], self.conv.weight
        out = F.linear(x, w[:, :, 1], self.conv.bias)
        return out + F.linear(prefix[:, n - self.dilation], w[:, :, 0])[:, None] if self.dilation <= n else out


class DenseBlock(nn.Module):
    def __init__(self, in_channels: int, dilation: int, filters: int):
        super().__init__()
        self.f = CausalConv1d(in_channels, filters, dilation)
        self.g = CausalConv1d(in_channels, filters, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, torch.tanh(self.f(x)) * torch.sigmoid(self.g(x))], -1)

    def extend(self, prefix: Tensor, x: Tensor):
        """``(block(prefix), block's output at step n for each query x)``; see ``SNAILNet.forward_queries``."""
        last = torch.tanh(self.f.last_step(prefix, x)) * torch.sigmoid(self.g.last_step(prefix, x))
        return self(prefix), torch.cat([x, last], -1)


class TCBlock(nn.Module):
    def __init__(self, in_channels: int, seq_len: int, filters: int):
        super().__init__()
        blocks = []
        for i in range(max(1, math.ceil(math.log2(seq_len)))):
            blocks.append(DenseBlock(in_channels + i * filters, 2**i, filters))
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = in_channels + len(blocks) * filters

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)

    def extend(self, prefix: Tensor, x: Tensor):
        for block in self.blocks:
            prefix, x = block.extend(prefix, x)
        return prefix, x


class AttentionBlock(nn.Module):
    def __init__(self, in_channels: int, key_size: int, value_size: int):
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def forward(self, x: Tensor) -> Tensor:
        return self.extend(x, x[:, :0])[0]

    def extend(self, prefix: Tensor, x: Tensor):
        """``(block(prefix), block's output at step n for each query x)``: a query attends to the
        prefix and to itself."""
        t = prefix.shape[1]
        k, v = self.key(prefix), self.value(prefix)
        logits = self.query(prefix) @ k.transpose(1, 2) * self.scale
        future = torch.ones(t, t, dtype=torch.bool, device=prefix.device).triu(1)
        attn = logits.masked_fill(future, float("-inf")).softmax(-1)
        out = torch.cat([prefix, attn @ v], -1)
        if x.shape[1] == 0:
            return out, x.new_zeros(*x.shape[:2], self.out_channels)
        q, kx, vx = self.query(x), self.key(x), self.value(x)
        a = torch.cat([q @ k.transpose(1, 2), (q * kx).sum(-1, keepdim=True)], -1).mul(self.scale).softmax(-1)
        return out, torch.cat([x, a[..., :t] @ v + a[..., t:] * vx], -1)


class SNAILNet(nn.Module):
    """Attention, then (TC, Attention) pairs, then a linear layer: ``(B, T, in) -> (B, T, N)``."""

    def __init__(
        self,
        input_size: int,
        n_classes: int,
        seq_len: int,
        filters: int = 128,
        attention: Sequence[Sequence[int]] = ((64, 32), (256, 128), (512, 256)),
    ):
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (support + query), got {seq_len}.")
        self.seq_len = seq_len
        layers, width = [], input_size
        for i, (key_size, value_size) in enumerate(attention):
            if i > 0:
                layers.append(TCBlock(width, seq_len, filters))
                width = layers[-1].out_channels
            layers.append(AttentionBlock(width, key_size, value_size))
            width = layers[-1].out_channels
        self.blocks = nn.Sequential(*layers)
        self.out = nn.Linear(width, n_classes)

    def check_length(self, t: int) -> None:
        if t > self.seq_len:
            raise ValueError(
                f"a sequence of length {t} is longer than the seq_len={self.seq_len} "
                f"this SNAIL was built for (its temporal convolutions see only that far back); "
                f"build it with algorithm.seq_len >= ways * shots + 1 = {t}."
            )

    def forward(self, z: Tensor) -> Tensor:
        """Logits at every step of the sequences ``z`` ``(B, T, in)``."""
        self.check_length(z.shape[1])
        return self.out(self.blocks(z))

    def forward_queries(self, prefix: Tensor, queries: Tensor) -> Tensor:
        """Logits ``(B, Q, N)`` at the last step of each sequence ``[prefix, queries[:, j]]``, with
        ``prefix`` ``(B, n, in)`` computed once: equal to ``forward`` on the Q sequences."""
        self.check_length(prefix.shape[1] + 1)
        for block in self.blocks:
            prefix, queries = block.extend(prefix, queries)
        return self.out(queries)


@ALGORITHMS.register("snail")
class SNAIL(MetaLearner):
    """SNAIL for N-way K-shot classification.

    Parameters
    ----------
    model : the encoder backbone (``model.embed(x)``; the paper's Omniglot embedding is conv4_pool).
    ways : the one-hot label size N (default: the backbone head's ``out_features``).
    seq_len : the longest sequence, ``N K + 1`` (support + one query); sets the TC block depth.
    filters : filters of every dense block (paper: 128).
    attention : ``[key_size, value_size]`` of each attention block (paper: 64/32, 256/128, 512/256).
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        ways: int | None = None,
        seq_len: int = 26,
        filters: int = 128,
        attention: Sequence[Sequence[int]] = ((64, 32), (256, 128), (512, 256)),
    ):
        super().__init__(model, task_type)
        if task_type != "classification":
            raise ValueError("SNAIL classifies here; use it with classification episodes.")
        ways = infer_ways(model, ways)
        self.ways = ways
        self.net = SNAILNet(feature_dim(model) + ways, ways, seq_len, filters, attention)

    def query_logits(self, s_feat: Tensor, s_y: Tensor, q_feat: Tensor) -> Tensor:
        """Support features ``(B, n, D)`` and labels ``(B, n)``, query features ``(B, Q, D)`` ->
        logits ``(B, Q, N)``: one sequence ``[support..., (query, 0)]`` per query."""
        b, q = q_feat.shape[:2]
        support = torch.cat([s_feat, one_hot(s_y, self.ways, "support_y")], -1)
        query = torch.cat([q_feat, q_feat.new_zeros(b, q, self.ways)], -1)
        return self.net.forward_queries(support, query)

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        sx = torch.stack([ep.support_x for ep in batch])
        sy = torch.stack([ep.support_y for ep in batch])
        qx = torch.stack([ep.query_x for ep in batch])
        qy = torch.stack([ep.query_y for ep in batch])
        one_hot(qy, self.ways, "query_y")
        check_ways(sy[0], self.ways, "SNAIL")
        b, n, q = len(batch), sy.shape[1], qy.shape[1]
        order = torch.stack([torch.randperm(n) for _ in range(b)]).to(sy.device)
        sx, sy = sx[torch.arange(b, device=sy.device)[:, None], order], sy.gather(1, order)
        feats = encode(self.model, torch.cat([sx, qx], 1).flatten(0, 1)).view(b, n + q, -1)
        logits = self.query_logits(feats[:, :n], sy, feats[:, n:])
        loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
        return loss, {"loss": loss.item(), "query_acc": (logits.argmax(-1) == qy).float().mean().item()}

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Embed the support set once (in a fixed shuffled order); each query is one forward pass of
        ``[support, (query, 0)]``. ``steps`` must be None: there are no gradient steps."""
        if steps is not None:
            raise ValueError(
                "SNAIL adapts by attending to the support sequence, not by gradient steps; "
                "leave eval.inner_steps unset."
            )
        support_y = check_support(support_x, support_y, self.task_type)
        self.net.check_length(len(support_y) + 1)
        check_ways(support_y, self.ways, "SNAIL")
        order = torch.randperm(len(support_y), generator=torch.Generator().manual_seed(0)).to(support_y.device)
        s_feat, s_y = encode(self.model, support_x[order])[None], support_y[order][None]
        one_hot(s_y, self.ways, "support_y")
        return Predictor(lambda x: self.query_logits(s_feat, s_y, encode(self.model, x)[None])[0], self.task_type)
