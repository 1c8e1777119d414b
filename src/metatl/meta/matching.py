"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, NeurIPS 2016).

With support set ``S = {(x_i, y_i)}`` (one-hot labels ``y_i``), query ``x``, embeddings ``g`` of
the support and ``f`` of the query::

    a(x, x_i) = softmax_i( cos(f(x), g(x_i)) )                 (attention over the support)
    P(y | x, S) = sum_i a(x, x_i) y_i                           (attention-weighted labels)
    L = 1/|B| sum_{episodes} 1/|Q| sum_{(x, y) in Q} -log P(y | x, S)

Without full context embeddings (``fce: false``, the paper's Omniglot setting) ``f = g = f'``, the
backbone. With ``fce: true`` (the paper's appendix), the support is embedded in context by a
bidirectional LSTM and each query by an attention LSTM with ``K = fce_steps`` read steps::

    g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)                     (biLSTM over g'(x_1..x_n))
    r_{k-1}   = sum_i softmax_i(h_{k-1} . g(x_i, S)) g(x_i, S)  (read-out)
    h^_k, c_k = LSTM(f'(x), h_{k-1} + r_{k-1}, c_{k-1})         (h_0 = c_0 = 0)
    h_k       = h^_k + f'(x);    f(x, S) = h_K

The paper's attention takes the softmax of cosines, which lie in [-1, 1], so it can never be sharp
(at best ``e / (e + (n - 1) / e)`` on the right support example). ``scale`` multiplies the cosines
before the softmax (an inverse temperature, ``a = softmax_i(s * cos(f(x), g(x_i)))``), and
``learn_scale=True`` learns ``s`` with the embedding (metric scaling, Oreshkin et al. 2018);
``scale=1, learn_scale=False`` is the paper's formula.

(The paper writes the LSTM's previous state as the concatenation ``[h_{k-1}, r_{k-1}]``, whose
size does not match ``h_k``; like the common reimplementations we feed the sum.) The predictor's
output is ``log P(y | x, S)``, so ``predict_proba`` returns ``P`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episode import Episode
from ..registry import ALGORITHMS
from ._types import Metrics
from .base import MetaLearner, Predictor, check_support, task_metric
from .metric import cosine_similarity, embed, full_precision, n_ways


class FullContextEmbedding(nn.Module):
    """The FCE functions ``g(., S)`` (bidirectional LSTM) and ``f(., S)`` (attention LSTM)."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, bidirectional=True)
        self.query_lstm = nn.LSTMCell(dim, dim)

    def support(self, g: Tensor) -> Tensor:
        """``g(x_i, S)`` for support embeddings ``g`` ``(n, d)`` taken as one sequence."""
        out, _ = self.support_lstm(g[:, None, :])  # (n, 1, 2d)
        forward, backward = out[:, 0].chunk(2, dim=-1)
        return forward + backward + g

    def query(self, f: Tensor, g: Tensor) -> Tensor:
        """``f(x, S) = h_K`` for query embeddings ``f`` ``(m, d)`` and context support ``g`` ``(n, d)``."""
        h = torch.zeros_like(f)
        c = torch.zeros_like(f)
        for _ in range(self.steps):
            r = (h @ g.t()).softmax(dim=1) @ g
            h_hat, c = self.query_lstm(f, (h + r, c))
            h = h_hat + f
        return h


@full_precision
def attention_log_probs(logits: Tensor, support_y: Tensor, n: int) -> Tensor:
    """``log sum_i a(x, x_i) onehot(y_i)`` with ``a = softmax(logits)`` over the support, shape
    ``(m, n)`` for ``logits`` ``(m, n_support)``; float32 even under bfloat16 autocast."""
    attention = logits.softmax(dim=1)
    probs = attention @ F.one_hot(support_y, n).to(attention.dtype)
    return probs.clamp_min(1e-12).log()


@ALGORITHMS.register("matching")
class MatchingNet(MetaLearner):
    """Matching Networks.

    Parameters
    ----------
    model : the embedding ``f' = g'``; built without a head (``out_features=0``).
    task_type : ``"classification"`` only.
    fce : full context embeddings (needs ``model.embedding_dim``, as the conv4 backbones have).
    fce_steps : K, the attention LSTM's read steps (not given in the paper).
    scale : s, the factor on the cosines before the softmax (1 is the paper's formula).
    learn_scale : learn ``s`` (starting from ``scale``) with the rest of the network.
    """

    uses_head = False

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        fce: bool = False,
        fce_steps: int = 5,
        scale: float = 1.0,
        learn_scale: bool = False,
    ):
        if task_type != "classification":
            raise ValueError("matching classifies; it has no regression form (use maml or reptile).")
        if not scale > 0:
            raise ValueError(f"scale must be positive (it multiplies the cosines), got {scale}.")
        super().__init__(model, task_type)
        self.fce, self.fce_steps = fce, fce_steps
        # stored as a log so that a learned scale stays positive
        log_scale = torch.tensor(float(scale)).log()
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        if fce:
            if not hasattr(model, "embedding_dim"):
                raise ValueError(
                    f"fce needs the embedding width: backbone {type(model).__name__} has no "
                    f"`embedding_dim`; use conv4_pool / conv4_stride or set fce: false."
                )
            self.context = FullContextEmbedding(int(model.embedding_dim), fce_steps)

    def support_embeddings(self, support_x: Tensor) -> Tensor:
        g = embed(self.model, support_x)
        return self.context.support(g) if self.fce else g

    def log_probs(self, g: Tensor, support_y: Tensor, n: int, x: Tensor) -> Tensor:
        """``log P(y | x, S)``, shape ``(len(x), n)``, for context support embeddings ``g``."""
        f = embed(self.model, x)
        if self.fce:
            f = self.context.query(f, g)
        return attention_log_probs(self.log_scale.exp() * cosine_similarity(f, g), support_y, n)

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        losses, scores = [], []
        for ep in batch:
            n = n_ways(ep.support_y)
            out = self.log_probs(self.support_embeddings(ep.support_x), ep.support_y, n, ep.query_x)
            losses.append(F.nll_loss(out, ep.query_y))
            scores.append(task_metric(self.task_type, out.detach(), ep.query_y))
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item(), "query_acc": sum(scores) / len(scores)}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Store the (context) support embeddings; ``steps`` is ignored (no inner loop)."""
        support_y = check_support(support_x, support_y, self.task_type)
        n = n_ways(support_y)
        with torch.no_grad():
            g = self.support_embeddings(support_x)
        return Predictor(lambda x: self.log_probs(g, support_y, n, x), self.task_type)
