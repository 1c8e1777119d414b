"""Relation Network (Sung, Yang, Zhang, Xiang, Torr and Hospedales, CVPR 2018).

With embedding ``f_phi`` returning feature maps and relation module ``g_phi``
(:mod:`metatl.nn.relation`), for an episode with N classes::

    F_k    = sum_{(x_i, y_i) in S, y_i = k} f_phi(x_i)            (class map: sum over the shots)
    r_{j,k} = g_phi( concat_channels(F_k, f_phi(x_j)) )   in (0, 1)  (relation score)
    L = 1/|B| sum_{episodes} 1/(|Q| N) sum_{j in Q} sum_k (r_{j,k} - 1[y_j = k])^2    (MSE)

The predictor's output is ``log r_{j,k}``: the argmax is the class of highest relation, and
``predict_proba`` gives the scores normalised over the classes, ``r_{j,k} / sum_k' r_{j,k'}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episode import Episode
from ..nn.relation import RelationModule
from ..registry import ALGORITHMS
from ._types import Metrics
from .base import MetaLearner, Predictor, check_support, task_metric
from .metric import n_ways


@ALGORITHMS.register("relation")
class RelationNet(MetaLearner):
    """Relation Network.

    Parameters
    ----------
    model : the embedding ``f_phi``; it must return feature maps and state their shape as
        ``model.map_shape = (c, s, s)`` (the ``conv4_relation`` backbone).
    task_type : ``"classification"`` only.
    hidden : width of the relation module's hidden FC layer (8 in the paper).
    filters : channels of the relation module's conv blocks (64 in the paper).
    """

    uses_head = False

    def __init__(self, model: nn.Module, task_type: str = "classification", hidden: int = 8, filters: int = 64):
        if task_type != "classification":
            raise ValueError("relation classifies; it has no regression form (use maml or reptile).")
        if not hasattr(model, "map_shape"):
            raise ValueError(
                f"relation needs a backbone that returns feature maps with a `map_shape` "
                f"attribute; {type(model).__name__} has none. Use model: {{name: conv4_relation}}."
            )
        super().__init__(model, task_type)
        self.relation = RelationModule(tuple(model.map_shape), filters, hidden, getattr(model, "bn_mode", "batch"))

    def class_maps(self, support_x: Tensor, support_y: Tensor, n: int) -> Tensor:
        """``F_k``: the support maps summed per class, ``(n, c, s, s)``."""
        maps = self.model(support_x)
        onehot = F.one_hot(support_y, n).to(maps.dtype)  # (n_support, N)
        return torch.einsum("ik,ichw->kchw", onehot, maps)

    def scores(self, class_maps: Tensor, x: Tensor) -> Tensor:
        """``r_{j,k}``, shape ``(len(x), N)``."""
        q = self.model(x)
        m, n = len(q), len(class_maps)
        pairs = torch.cat(
            [class_maps[None].expand(m, -1, -1, -1, -1), q[:, None].expand(-1, n, -1, -1, -1)], dim=2
        )  # (m, N, 2c, s, s)
        return self.relation(pairs.flatten(0, 1)).view(m, n)

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        losses, scores = [], []
        for ep in batch:
            n = n_ways(ep.support_y)
            r = self.scores(self.class_maps(ep.support_x, ep.support_y, n), ep.query_x)
            losses.append(F.mse_loss(r, F.one_hot(ep.query_y, n).to(r.dtype)))
            scores.append(task_metric(self.task_type, r.detach(), ep.query_y))
        loss = torch.stack(losses).mean()
        return loss, {"loss": loss.item(), "query_acc": sum(scores) / len(scores)}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Store the class maps ``F_k``; ``steps`` is ignored (no inner loop)."""
        support_y = check_support(support_x, support_y, self.task_type)
        n = n_ways(support_y)
        with torch.no_grad():
            maps = self.class_maps(support_x, support_y, n)
        return Predictor(lambda x: self.scores(maps, x).clamp_min(1e-12).log(), self.task_type)
