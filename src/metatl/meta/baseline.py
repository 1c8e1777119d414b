"""Baseline and Baseline++ (Chen, Liu, Kira, Wang and Huang, "A Closer Look at Few-shot
Classification", ICLR 2019): transfer learning as a few-shot learner.

**Pretraining.** One classifier over all ``C`` base classes (``data.train_labels: class``), trained by
the one trainer with the joint loss of :func:`metatl.meta.pretrain.joint_loss` over every image of
the batch, with the backbone ``f`` and the head's weights ``W (C, d)``::

    Baseline:    logits(x) = W f(x) + b
    Baseline++:  logits(x)_c = s * cos(f(x), w_c) = s * f(x) . w_c / (||f(x)|| ||w_c||)

**Adaptation** to an N-way episode: a new head of the same kind (``N`` outputs) is trained on the
support set, the backbone frozen (``adapt_layers: head``; the features are computed once)::

    min_head  CE(head(f(x_i)), y_i)   by SGD (lr 0.01, momentum 0.9, dampening 0.9, weight decay
                                      0.001), minibatches of 4, 100 epochs over the support set

the reference code's protocol (``methods/baselinefinetune.py`` of wyharveychen/CloserLookFewShot).
The new head starts as ``nn.Linear``'s default (uniform in +-1/sqrt(d)), drawn from a generator
seeded with ``seed``, which also shuffles the minibatches: the same support set gives the same
predictor. Two variants give the other transfer baselines of the comparison on the same backbone:

* ``adapt_layers: all``: the backbone is fine-tuned with the new head (same optimizer; a copy of the
  backbone per episode; BatchNorm layers keep their mode, running statistics are not updated);
* ``l2sp_alpha``: with ``all``, the backbone's penalty ``alpha/2 ||w - w^0||^2`` of L2-SP (Li et al.
  2018, :func:`metatl.transfer.parameter.l2sp.l2sp_penalty`) replaces its weight decay.

With the head only, Baseline is a linear probe of the pretrained features.

Where this differs from the reference code: its Baseline++ head is PyTorch's weight normalization
of a bias-free linear layer, ``g_c v_c . f(x) / (||v_c|| ||f(x)||)``, with a class-wise learnable norm
``g_c`` multiplying the cosine; here the head is the cosine of the paper's equation, ``g_c = 1``. The
scale ``s`` follows the code: 2 for heads of up to 200 classes, 10 above (Omniglot's pretraining);
``scale`` fixes it. The base classifier's bias of Baseline++ is not used (kept at zero).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episode import Episode
from ..registry import ALGORITHMS
from ._types import Metrics
from .base import MetaLearner, Predictor, check_support
from .metric import cosine_similarity, n_ways
from .pretrain import joint_loss

HEADS = ("linear", "cosine")
ADAPT_LAYERS = ("head", "all")


def cosine_scale(n_classes: int, scale: float | None = None) -> float:
    """``s`` of a cosine head: ``scale`` when given, else the reference code's 2 for up to 200
    classes and 10 above."""
    if scale is not None:
        return float(scale)
    return 2.0 if n_classes <= 200 else 10.0


def head_logits(kind: str, head: dict[str, Tensor], z: Tensor, scale: float = 1.0) -> Tensor:
    """Logits of features ``z (n, d)`` under a head ``{"weight": (N, d)[, "bias": (N,)]}``: ``z W^T + b``
    (``linear``) or ``scale * cos(z_i, w_c)`` (``cosine``)."""
    if kind == "linear":
        return F.linear(z, head["weight"], head.get("bias"))
    if kind == "cosine":
        return scale * cosine_similarity(z, head["weight"])
    raise ValueError(f"unknown head {kind!r}; use one of {', '.join(HEADS)}.")


def new_head(kind: str, dim: int, n_classes: int, generator: torch.Generator) -> dict[str, Tensor]:
    """A fresh head with ``nn.Linear``'s default initialisation, uniform in ``+-1/sqrt(dim)``
    (the cosine head has no bias)."""
    bound = 1.0 / math.sqrt(dim)
    head = {"weight": (torch.rand(n_classes, dim, generator=generator) * 2 - 1) * bound}
    if kind == "linear":
        head["bias"] = (torch.rand(n_classes, generator=generator) * 2 - 1) * bound
    return head


def fit_minibatch_sgd(
    params: list[Tensor],
    loss: Callable[[Tensor], Tensor],
    n: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    generator: torch.Generator,
    no_decay: Sequence[Tensor] = (),
) -> None:
    """Minimise ``loss(idx)`` (a minibatch's loss, ``idx`` rows of ``0..n-1``) over the leaf tensors
    ``params`` in place: ``epochs`` passes in minibatches of ``batch_size``, shuffled by ``generator``,
    with ``torch.optim.SGD``'s update (``no_decay``: further tensors trained without weight decay)::

        g = grad + wd p;   b = g at the first step, then b = momentum b + (1 - dampening) g;   p -= lr b

    Written out rather than calling ``torch.optim.SGD``: its per-step overhead was most of the time
    of an episode's hundreds of tiny steps (the test checks the two agree)."""
    tensors = list(params) + list(no_decay)
    decay = [weight_decay] * len(params) + [0.0] * len(no_decay)
    bufs: list[Tensor | None] = [None] * len(tensors)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            grads = torch.autograd.grad(loss(order[start : start + batch_size]), tensors)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(tensors, grads)):
                    if decay[i]:
                        g = g + decay[i] * p
                    bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(momentum).add_(g, alpha=1 - dampening)
                    p.sub_(bufs[i], alpha=lr)


@ALGORITHMS.register("baseline")
class Baseline(MetaLearner):
    """Chen et al.'s Baseline: a classifier over all base classes, then a new linear head per episode.

    Parameters
    ----------
    model : a backbone with ``embed`` and ``head`` (``conv4_pool``, ``conv4_stride``), built with one
        output per base class (``data.train_labels: class``).
    adapt_layers : ``head`` (frozen backbone) or ``all`` (fine-tune every layer with the new head).
    epochs, batch_size, lr, momentum, dampening, weight_decay : the support-set training protocol.
    l2sp_alpha : with ``adapt_layers: all``, the L2-SP pull of the backbone towards its pretrained
        weights (replaces its weight decay).
    seed : seeds the new head's initialisation and the minibatch order of every adaptation.
    """

    head_kind = "linear"

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        adapt_layers: str = "head",
        epochs: int = 100,
        batch_size: int = 4,
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.9,
        weight_decay: float = 0.001,
        l2sp_alpha: float | None = None,
        seed: int = 0,
        scale: float | None = None,
    ):
        if task_type != "classification":
            raise ValueError(f"{type(self).__name__} classifies; it has no {task_type} form.")
        if not (hasattr(model, "embed") and isinstance(getattr(model, "head", None), nn.Linear)):
            raise ValueError(
                f"{type(self).__name__} needs a backbone with embed() and a linear head (model.name: "
                f"conv4_pool or conv4_stride); got {type(model).__name__}."
            )
        if adapt_layers not in ADAPT_LAYERS:
            raise ValueError(f"adapt_layers must be one of {', '.join(ADAPT_LAYERS)}, got {adapt_layers!r}.")
        if l2sp_alpha is not None and adapt_layers != "all":
            raise ValueError("l2sp_alpha pulls a fine-tuned backbone towards its start: set adapt_layers: all.")
        super().__init__(model, task_type)
        self.adapt_layers, self.epochs, self.batch_size = adapt_layers, epochs, batch_size
        self.lr, self.momentum, self.dampening, self.weight_decay = lr, momentum, dampening, weight_decay
        self.l2sp_alpha, self.seed, self.scale = l2sp_alpha, seed, scale
        if self.head_kind == "cosine" and model.head.bias is not None:  # a cosine classifier has no bias
            nn.init.zeros_(model.head.bias)
            model.head.bias.requires_grad_(False)

    # -- pretraining over the base classes --------------------------------------------------------
    def base_logits(self, x: Tensor) -> Tensor:
        """The pretraining classifier's logits over all base classes, ``W f(x) + b``."""
        return self.model(x)

    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        loss = joint_loss(self.base_logits, batch, self.loss_fn)
        return loss, {"loss": loss.item()}

    # -- adaptation: a new head on the support set ------------------------------------------------
    def logits(self, head: dict[str, Tensor], z: Tensor) -> Tensor:
        return head_logits(self.head_kind, head, z, cosine_scale(len(head["weight"]), self.scale))

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """A new N-way head trained on the support set (see the module docstring); ``steps`` is
        accepted and ignored (the protocol counts epochs)."""
        support_y = check_support(support_x, support_y, self.task_type)
        n = n_ways(support_y)
        g = torch.Generator().manual_seed(self.seed)
        head = {
            k: v.to(support_x.device).requires_grad_()
            for k, v in new_head(self.head_kind, self.model.embedding_dim, n, g).items()
        }
        opts = dict(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            dampening=self.dampening,
            generator=g,
        )
        if self.adapt_layers == "head":
            with torch.no_grad():
                z = self.model.embed(support_x)
            with torch.enable_grad():
                fit_minibatch_sgd(
                    list(head.values()),
                    lambda idx: self.loss_fn(self.logits(head, z[idx]), support_y[idx]),
                    len(z),
                    weight_decay=self.weight_decay,
                    **opts,
                )
            backbone = self.model
        else:
            backbone = self._fine_tuned(support_x, support_y, head, opts)
        head = {k: v.detach() for k, v in head.items()}
        return Predictor(lambda x: self.logits(head, backbone.embed(x)), self.task_type)

    def _fine_tuned(self, x: Tensor, y: Tensor, head: dict[str, Tensor], opts: dict) -> nn.Module:
        """A copy of the backbone fine-tuned with ``head`` (updated in place) on ``(x, y)``."""
        net = copy.deepcopy(self.model)
        weights = [p for name, p in net.named_parameters() if not name.startswith("head.")]
        for p in net.parameters():
            p.requires_grad_(False)
        for p in weights:
            p.requires_grad_(True)
        start = {str(i): p.detach().clone() for i, p in enumerate(weights)}

        def loss(idx):
            ce = self.loss_fn(self.logits(head, net.embed(x[idx])), y[idx])
            if self.l2sp_alpha is None:
                return ce
            from ..transfer.parameter.l2sp import l2sp_penalty

            current = {str(i): p for i, p in enumerate(weights)}
            return ce + l2sp_penalty(current, start, (), self.l2sp_alpha, 0.0)

        with torch.enable_grad():
            if self.l2sp_alpha is None:
                fit_minibatch_sgd(list(head.values()) + weights, loss, len(x), weight_decay=self.weight_decay, **opts)
            else:
                fit_minibatch_sgd(
                    list(head.values()), loss, len(x), weight_decay=self.weight_decay, no_decay=weights, **opts
                )
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def test_parameters(self, ways: int) -> int:
        """Parameters of the adapted predictor of an N-way episode: the backbone without the base
        classifier, and the new head."""
        backbone = sum(p.numel() for name, p in self.model.named_parameters() if not name.startswith("head."))
        d = self.model.embedding_dim
        return backbone + ways * d + (ways if self.head_kind == "linear" else 0)


@ALGORITHMS.register("baseline_pp")
class BaselinePP(Baseline):
    """Chen et al.'s Baseline++: cosine-similarity classifiers with a scale, over the base classes and per episode."""

    head_kind = "cosine"

    def base_logits(self, x: Tensor) -> Tensor:
        """``s * cos(f(x), w_c)`` over all base classes, ``w_c`` the rows of the head's weight."""
        weight = self.model.head.weight
        return head_logits("cosine", {"weight": weight}, self.model.embed(x), cosine_scale(len(weight), self.scale))
