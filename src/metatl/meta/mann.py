"""Memory-augmented neural network, MANN (Santoro, Bartunov, Botvinick, Wierstra and Lillicrap,
"One-shot Learning with Memory-Augmented Neural Networks", ICML 2016), and its LSTM baseline.

The episode is a sequence. Step ``t`` sees the input and the *previous* step's label, and predicts
the current label: input ``(x_t, onehot(y_{t-1}))`` (``y_0`` = the zero vector), output ``p(y_t)``.
Each episode's label ids are shuffled (a random permutation of ``0..N-1``) during training, so a
label carries no meaning across episodes and must be bound to its images through memory.

With ``e_t = encode(x_t)`` (the backbone's features), ``H`` read heads and a memory ``M`` of ``N``
slots of width ``W``, one step is::

    h_t, c_t = LSTM([e_t, onehot(y_{t-1}), r_{t-1}], (h_{t-1}, c_{t-1}))     controller
    k_t^h = tanh(W_k^h h_t + b_k^h),  a_t^h = W_a^h h_t + b_a^h           key and gate of head h
    w^w_t = sigmoid(a_t) w^r_{t-1} + (1 - sigmoid(a_t)) w^lu_{t-1}         LRU write weights
    M_t(i) = (1 - w^lu_{t-1}(i)) M_{t-1}(i) + sum_h w^w_t^h(i) k_t^h        zero least used, write
    K(k, M(i)) = k . M(i) / (||k|| ||M(i)||),  w^r_t^h(i) = softmax_i beta K(k_t^h, M_t(i))  read
    r_t^h = sum_i w^r_t^h(i) M_t(i)
    w^u_t = gamma w^u_{t-1} + sum_h w^r_t^h + sum_h w^w_t^h                usage, decay gamma
    w^lu_t(i) = 1 if w^u_t(i) is among the H smallest of w^u_t, else 0    (ties: lower slot first)
    logits_t = W_o [h_t, r_t] + b_o

with ``M_0 = 1e-6``, ``r_0 = 0``, ``w^r_0 = 0``, ``w^u_0 = 0``. ``beta = 1`` is the paper's read; a
larger fixed ``beta`` sharpens it (as the key strength of Neural Turing Machines does). ``memory=False`` is the paper's LSTM
baseline: no memory, ``h_t, c_t = LSTM([e_t, onehot(y_{t-1})])`` and ``logits_t = W_o h_t + b_o``.

Three options change the writes; by default they follow the equations above, the paper's read
literally. configs/mann_omniglot_online.yaml turns all three on: with them MANN passes the paper's
accuracies, without them it stops improving after a class's 5th instance (docs/results.md).

- ``add_vector=True``: head ``h`` writes an add vector ``a_t^h = tanh(W_a^h h_t + b_a^h)`` of its
  own instead of its read key (``M_t(i) = ... + sum_h w^w_t^h(i) a_t^h``), as Neural Turing Machines
  do. With the key written, the read at step t always finds the slot just filled with ``k_t``
  (cosine 1), so part of every read returns the key itself.
- ``lru_per_head=True``: head ``h`` writes to the ``h``-th least used slot only
  (``w^w_t^h = sigmoid(a_t^h) w^r_{t-1}^h + (1 - sigmoid(a_t^h)) onehot(lu_h)``); read literally the
  paper's ``w^lu`` has ``H`` ones shared by all heads, so every head adds its key to all ``H``
  freshly zeroed slots, which then hold the same sum.
- ``erase_slots``: how many least used slots are zeroed before each write: ``H`` by default (the
  ones written to), or ``1``, the paper's words ("the least used memory location ... is set to
  zero"). Zeroing ``H`` slots a step wipes a 128-slot memory's oldest unread writes after about 32
  steps.

Two ways to feed an :class:`~metatl.data.Episode` (``objective``):

- ``"episode"`` (the one evaluator's protocol): the support set in a shuffled order, then each query
  ``q`` as one more step ``(x_q, onehot(y_n))`` after the support (``y_n`` = the last support label),
  every query from the same post-support state, so no query sees another query or its own label.
  Loss: cross-entropy on the queries.
- ``"online"`` (the paper's protocol): support and query together, shuffled, as one labelled
  sequence; loss: cross-entropy at every step. :func:`mann_online_accuracy` reports the paper's
  accuracy at the 1st, 2nd, 5th and 10th instance of each class.

Differences from the paper: the encoder is any backbone (``model.embed``); the paper's raw 20x20
pixels are the ``pixels`` backbone with ``size: 20`` (configs/mann_omniglot_online.yaml, which also
sharpens reads with beta 10 and turns on the write options above; the config says why). In the
online protocol every class appears equally often (``shots + queries`` times) in random order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.episode import Episode
from ..registry import ALGORITHMS
from ..stats import mean_ci95
from ._sequence import check_ways, encode, feature_dim, infer_ways, one_hot
from ._types import Metrics
from .base import MetaLearner, Predictor, check_support

State = dict[str, Tensor]


def cosine_read_weights(keys: Tensor, memory: Tensor, beta: float = 1.0, eps: float = 1e-8) -> Tensor:
    """``w^r(i) = softmax_i(beta k . M(i) / (||k|| ||M(i)||))``; keys ``(B, H, W)``, memory ``(B, N, W)`` -> ``(B, H, N)``."""
    dots = keys @ memory.transpose(1, 2)
    norms = keys.norm(dim=-1, keepdim=True) * memory.norm(dim=-1).unsqueeze(1)
    return (beta * dots / norms.clamp_min(eps)).softmax(-1)


def least_used(usage: Tensor, n: int) -> Tensor:
    """``w^lu``: 1 at the ``n`` least used slots of ``usage`` ``(B, N)`` (ties: lower index), else 0."""
    idx = torch.argsort(usage, dim=-1, stable=True)[..., :n]
    return torch.zeros_like(usage).scatter_(-1, idx, 1.0)


def least_used_per_head(usage: Tensor, n: int) -> Tensor:
    """One slot per head: ``(B, N)`` usage -> ``(B, n, N)``, head ``h`` one-hot at the ``h``-th least
    used slot (ties: lower index)."""
    idx = torch.argsort(usage, dim=-1, stable=True)[..., :n]
    return F.one_hot(idx, usage.shape[-1]).to(usage.dtype)


def lru_write_weights(alpha: Tensor, prev_read: Tensor, prev_least_used: Tensor) -> Tensor:
    """``w^w = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``; alpha ``(B, H)``,
    prev_read ``(B, H, N)``, prev_least_used ``(B, N)`` (shared by the heads) or ``(B, H, N)`` (one
    per head) -> ``(B, H, N)``."""
    g = torch.sigmoid(alpha).unsqueeze(-1)
    lu = prev_least_used if prev_least_used.dim() == 3 else prev_least_used.unsqueeze(1)
    return g * prev_read + (1 - g) * lu


def update_usage(usage: Tensor, read: Tensor, write: Tensor, gamma: float) -> Tensor:
    """``w^u_t = gamma w^u_{t-1} + sum_h w^r_t + sum_h w^w_t``."""
    return gamma * usage + read.sum(1) + write.sum(1)


class MANNCore(nn.Module):
    """The recurrent part: controller LSTM, optional LRU memory, output layer (equations above)."""

    def __init__(
        self,
        input_size: int,
        n_classes: int,
        hidden: int = 200,
        memory: bool = True,
        slots: int = 128,
        slot_size: int = 40,
        heads: int = 4,
        gamma: float = 0.95,
        beta: float = 1.0,
        add_vector: bool = False,
        lru_per_head: bool = False,
        erase_slots: int | None = None,
    ):
        super().__init__()
        if memory and heads > slots:
            raise ValueError(f"heads={heads} exceeds memory slots={slots}; use heads <= slots.")
        self.erase_slots = heads if erase_slots is None else erase_slots
        if memory and not 0 <= self.erase_slots <= slots:
            raise ValueError(
                f"erase_slots={erase_slots} must lie in 0..slots={slots}; leave it unset to "
                f"zero the {heads} least used slots (one per head)."
            )
        self.n_classes, self.hidden, self.memory = n_classes, hidden, memory
        self.slots, self.slot_size, self.heads, self.gamma, self.beta = slots, slot_size, heads, gamma, beta
        self.lru_per_head = lru_per_head
        reads = heads * slot_size if memory else 0
        self.controller = nn.LSTMCell(input_size + n_classes + reads, hidden)
        if memory:
            self.key = nn.Linear(hidden, heads * slot_size)
            self.alpha = nn.Linear(hidden, heads)
            self.add = nn.Linear(hidden, heads * slot_size) if add_vector else None
        self.out = nn.Linear(hidden + reads, n_classes)

    def least_used(self, usage: Tensor) -> Tensor:
        """``w^lu`` from usage: ``(B, N)`` shared by the heads, or ``(B, H, N)`` with ``lru_per_head``."""
        return (least_used_per_head if self.lru_per_head else least_used)(usage, self.heads)

    def initial_state(self, batch: int, like: Tensor) -> State:
        z = lambda *s: like.new_zeros(s)  # noqa: E731
        state = {"h": z(batch, self.hidden), "c": z(batch, self.hidden)}
        if self.memory:
            n, w, heads = self.slots, self.slot_size, self.heads
            usage = z(batch, n)
            state.update(
                r=z(batch, heads * w),
                M=like.new_full((batch, n, w), 1e-6),
                w_r=z(batch, heads, n),
                w_u=usage,
                w_lu=self.least_used(usage),
            )
        return state

    def step(self, x: Tensor, y_prev: Tensor, s: State):
        """One step: ``x`` ``(B, input_size)``, ``y_prev`` ``(B, n_classes)`` -> logits ``(B, n_classes)``, state."""
        if not self.memory:
            h, c = self.controller(torch.cat([x, y_prev], -1), (s["h"], s["c"]))
            return self.out(h), {"h": h, "c": c}
        h, c = self.controller(torch.cat([x, y_prev, s["r"]], -1), (s["h"], s["c"]))
        keys = torch.tanh(self.key(h)).view(-1, self.heads, self.slot_size)
        content = keys if self.add is None else torch.tanh(self.add(h)).view_as(keys)
        w_w = lru_write_weights(self.alpha(h), s["w_r"], s["w_lu"])
        zeroed = least_used(s["w_u"], self.erase_slots)  # w^u_{t-1}'s least used slots
        memory = s["M"] * (1 - zeroed).unsqueeze(-1) + w_w.transpose(1, 2) @ content
        w_r = cosine_read_weights(keys, memory, self.beta)
        r = (w_r @ memory).flatten(1)
        w_u = update_usage(s["w_u"], w_r, w_w, self.gamma)
        state = {"h": h, "c": c, "r": r, "M": memory, "w_r": w_r, "w_u": w_u, "w_lu": self.least_used(w_u)}
        return self.out(torch.cat([h, r], -1)), state

    def forward(self, x_seq: Tensor, y_prev_seq: Tensor, state: State | None = None):
        """Run a sequence: ``x_seq`` ``(B, T, input_size)``, ``y_prev_seq`` ``(B, T, n_classes)`` ->
        logits ``(B, T, n_classes)`` and the final state."""
        state = self.initial_state(x_seq.shape[0], x_seq) if state is None else state
        logits = []
        for t in range(x_seq.shape[1]):
            out, state = self.step(x_seq[:, t], y_prev_seq[:, t], state)
            logits.append(out)
        return torch.stack(logits, 1), state


def _shift_labels(y1h: Tensor) -> Tensor:
    """``(B, T, C)`` one-hots -> the previous step's one-hots, zeros at ``t = 0``."""
    return torch.cat([torch.zeros_like(y1h[:, :1]), y1h[:, :-1]], 1)


@ALGORITHMS.register("mann")
class MANN(MetaLearner):
    """Memory-augmented neural network (``memory=True``) or its LSTM baseline (``memory=False``).

    Parameters
    ----------
    model : the encoder backbone (``model.embed(x)`` is used; a conv4 head is left unused).
    ways : the one-hot label size N (default: the backbone head's ``out_features``, = ``data.ways``).
    memory : use the external memory (MANN) or not (LSTM baseline).
    hidden : controller LSTM units (paper: 200).
    slots, slot_size, heads : memory size N x W and read/write heads (paper: 128 x 40, 4 heads).
    gamma : usage decay.
    beta : read sharpness, ``softmax(beta * cosine)`` (paper: 1).
    add_vector : write a separate add vector per head instead of the read key (module docstring).
    lru_per_head : each head writes to a least used slot of its own (module docstring).
    erase_slots : least used slots zeroed before each write (default: ``heads``; module docstring).
    objective : ``"episode"`` (loss on queries after the support) or ``"online"`` (loss at every
        step of the shuffled support + query sequence, the paper's training).
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str = "classification",
        ways: int | None = None,
        memory: bool = True,
        hidden: int = 200,
        slots: int = 128,
        slot_size: int = 40,
        heads: int = 4,
        gamma: float = 0.95,
        beta: float = 1.0,
        objective: str = "episode",
        add_vector: bool = False,
        lru_per_head: bool = False,
        erase_slots: int | None = None,
    ):
        super().__init__(model, task_type)
        if task_type != "classification":
            raise ValueError("MANN classifies; use it with classification episodes (e.g. data.name: omniglot).")
        if objective not in ("episode", "online"):
            raise ValueError(f"unknown objective {objective!r}; use 'episode' or 'online'.")
        ways = infer_ways(model, ways)
        self.ways, self.objective = ways, objective
        self.core = MANNCore(
            feature_dim(model),
            ways,
            hidden,
            memory,
            slots,
            slot_size,
            heads,
            gamma,
            beta,
            add_vector,
            lru_per_head,
            erase_slots,
        )

    # -- the two protocols -------------------------------------------------------------------
    def online_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits ``(B, T, N)`` for labelled sequences ``x`` ``(B, T, *x_shape)``, ``y`` ``(B, T)``:
        step t sees ``(x_t, y_{t-1})``."""
        b, t = y.shape
        feats = encode(self.model, x.flatten(0, 1)).view(b, t, -1)
        return self.core(feats, _shift_labels(one_hot(y, self.ways, "y")))[0]

    def support_state(self, s_feat: Tensor, s_y: Tensor) -> tuple[State, Tensor]:
        """Run the support sequences ``(B, n, D)``, ``(B, n)``; returns the state and ``onehot(y_n)``."""
        y1h = one_hot(s_y, self.ways, "support_y")
        _, state = self.core(s_feat, _shift_labels(y1h))
        return state, y1h[:, -1]

    def query_logits(self, state: State, last_y: Tensor, q_feat: Tensor) -> Tensor:
        """One step per query from the post-support state: ``q_feat`` ``(B, Q, D)`` -> ``(B, Q, N)``."""
        b, q = q_feat.shape[:2]
        rep = {k: v.repeat_interleave(q, 0) for k, v in state.items()}
        out, _ = self.core.step(q_feat.flatten(0, 1), last_y.repeat_interleave(q, 0), rep)
        return out.view(b, q, -1)

    # -- trainer and evaluator interface ----------------------------------------------------------
    def meta_loss(self, batch: list[Episode]) -> tuple[Tensor, Metrics]:
        sx = torch.stack([ep.support_x for ep in batch])
        sy = torch.stack([ep.support_y for ep in batch])
        qx = torch.stack([ep.query_x for ep in batch])
        qy = torch.stack([ep.query_y for ep in batch])
        one_hot(sy, self.ways, "support_y"), one_hot(qy, self.ways, "query_y")  # validate labels
        check_ways(sy[0], self.ways, "MANN")
        b = len(batch)
        perm = torch.stack([torch.randperm(self.ways) for _ in range(b)]).to(sy.device)  # shuffle label ids
        sy, qy = perm.gather(1, sy), perm.gather(1, qy)
        if self.objective == "online":
            x, y = torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)
            order = torch.stack([torch.randperm(y.shape[1]) for _ in range(b)]).to(y.device)
            x = x[torch.arange(b, device=y.device)[:, None], order]
            y = y.gather(1, order)
            logits = self.online_logits(x, y)
            target = y
        else:
            order = torch.stack([torch.randperm(sy.shape[1]) for _ in range(b)]).to(sy.device)
            sx, sy = sx[torch.arange(b, device=sy.device)[:, None], order], sy.gather(1, order)
            n, q = sx.shape[1], qx.shape[1]
            feats = encode(self.model, torch.cat([sx, qx], 1).flatten(0, 1)).view(b, n + q, -1)
            state, last = self.support_state(feats[:, :n], sy)
            logits = self.query_logits(state, last, feats[:, n:])
            target = qy
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        acc = (logits.argmax(-1) == target).float().mean().item()
        name = "seq_acc" if self.objective == "online" else "query_acc"
        return loss, {"loss": loss.item(), name: acc}

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Predictor:
        """Read the support set (in a fixed shuffled order); the predictor classifies each query as
        one step after it. ``steps`` must be None: there are no gradient steps."""
        if steps is not None:
            raise ValueError(
                "MANN adapts by reading the support sequence, not by gradient steps; leave eval.inner_steps unset."
            )
        support_y = check_support(support_x, support_y, self.task_type)
        check_ways(support_y, self.ways, "MANN")
        order = torch.randperm(len(support_y), generator=torch.Generator().manual_seed(0)).to(support_y.device)
        feats = encode(self.model, support_x[order])[None]
        state, last = self.support_state(feats, support_y[order][None])
        return Predictor(lambda x: self.query_logits(state, last, encode(self.model, x)[None])[0], self.task_type)


@torch.no_grad()
def mann_online_accuracy(
    learner, sampler, episodes: int = 100, seed: int = 1234, instances: Sequence[int] = (1, 2, 5, 10)
) -> dict[int, dict[str, float]]:
    """The paper's online protocol: accuracy of the prediction at the k-th presentation of a class.

    Each episode's support and query examples (e.g. 5 ways x 10 examples = 50) are shuffled into one
    sequence, fed as ``(x_t, y_{t-1})``; the prediction at step t is scored when ``x_t`` is the k-th
    instance of its class, for ``k`` in ``instances``. ``learner`` needs ``online_logits`` (MANN).
    Returns ``{k: {"mean", "ci95", "std"}}`` over the episodes' accuracies at instance k (the same
    summary as the evaluator's); a ``k`` larger than the examples per class raises an error.
    """
    from ..data.episode import fixed_episodes

    was_training = learner.training
    learner.eval()
    scores: dict[int, list] = {k: [] for k in instances}
    g = torch.Generator().manual_seed(seed + 1)
    try:
        for ep in fixed_episodes(sampler, episodes, seed):
            x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
            order = torch.randperm(len(y), generator=g)
            x, y = x[order], y[order]
            right = (learner.online_logits(x[None], y[None])[0].argmax(-1) == y).tolist()
            seen: dict[int, int] = {}
            hits: dict[int, list] = {k: [] for k in instances}
            for t, label in enumerate(y.tolist()):
                seen[label] = seen.get(label, 0) + 1
                if seen[label] in hits:
                    hits[seen[label]].append(right[t])
            for k, h in hits.items():
                if h:
                    scores[k].append(sum(h) / len(h))
    finally:
        learner.train(was_training)
    empty = [k for k in instances if not scores[k]]
    if empty:
        raise ValueError(
            f"no class reached instance(s) {empty}: episodes have fewer examples per class; "
            f"use shots + queries >= {max(empty)}."
        )
    return {k: mean_ci95(v) for k, v in scores.items()}
