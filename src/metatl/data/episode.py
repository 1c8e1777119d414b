"""Tasks as typed data: the :class:`Episode` and the N-way K-shot :class:`EpisodeSampler`.

An episode is one task: a small labelled *support* set to adapt on and a *query* set to
evaluate the adapted learner on. A meta-batch is a ``list[Episode]``; :func:`stack_episodes`
turns one into a single :class:`Episode` with a leading task dimension (for ``torch.func.vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class Episode:
    """One task.

    Shapes, for N ways, K shots and Q queries per class (classification), or K support and
    Q query points (regression):

    - ``support_x``: ``(N*K, *x_shape)``; ``support_y``: ``(N*K,)`` int64 labels in ``0..N-1``
      (classification) or ``(K, out_dim)`` float (regression)
    - ``query_x``: ``(N*Q, *x_shape)``; ``query_y``: like ``support_y``

    With :func:`stack_episodes` every field gains a leading task dimension ``T``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        return self.support_x, self.support_y

    @property
    def query(self) -> tuple[Tensor, Tensor]:
        return self.query_x, self.query_y

    def to(self, device: torch.device | str) -> Episode:
        return Episode(*(getattr(self, f.name).to(device) for f in fields(self)))


def stack_episodes(episodes: Sequence[Episode]) -> Episode:
    """Stack equally shaped episodes into one with a leading task dimension."""
    return Episode(*(torch.stack([getattr(e, f.name) for e in episodes]) for f in fields(Episode)))


class ClassPool:
    """Examples grouped by class: ``len(pool)`` classes, ``pool.counts[c]`` examples in class ``c``,
    and ``pool.get(c, idx)`` returning the examples ``idx`` (a 1-d int64 tensor) of class ``c``.

    Subclasses may compute examples on the fly (Omniglot's rotated classes do).
    """

    counts: list[int]

    def __len__(self) -> int:
        return len(self.counts)

    def get(self, c: int, idx: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def get_many(self, requests: Sequence[tuple[int, Tensor]]) -> Tensor:
        """``torch.cat([self.get(c, idx) for c, idx in requests])``; pools override it to gather
        all at once (a meta-batch's episodes are one call)."""
        return torch.cat([self.get(c, idx) for c, idx in requests if len(idx)])


class TensorClassPool(ClassPool):
    """A :class:`ClassPool` over tensors ``x`` of shape ``(n, *x_shape)`` and integer labels ``y``."""

    def __init__(self, x: Tensor, y: Tensor):
        y = torch.as_tensor(y)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels; they must match.")
        self.x = x
        self.classes = torch.unique(y).tolist()
        self._members = [torch.nonzero(y == c).flatten() for c in self.classes]
        self.counts = [len(m) for m in self._members]

    @classmethod
    def from_dataset(cls, dataset) -> TensorClassPool:
        """Build from any ``Dataset`` whose items are ``(x, y)`` with tensor ``x`` and int ``y``."""
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        return cls(torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys))

    def get(self, c: int, idx: Tensor) -> Tensor:
        return self.x[self._members[c][idx]]

    def get_many(self, requests: Sequence[tuple[int, Tensor]]) -> Tensor:
        return self.x[torch.cat([self._members[c][idx] for c, idx in requests])]


class EpisodeSampler:
    """Samples N-way K-shot episodes with Q queries per class from a :class:`ClassPool`.

    Classes are drawn without replacement, labels are remapped to ``0..N-1`` in draw order,
    and support and query examples of a class are disjoint. All randomness comes from the
    ``torch.Generator`` passed to :meth:`sample`, so the same seed gives the same episodes.

    ``labels="class"`` keeps each example's class index in the pool (``0..len(pool)-1``) instead,
    and ``out_features`` is then ``len(pool)``: batches for training one classifier over all the
    classes (the pretraining of Chen et al.'s Baseline), drawn ``ways`` classes at a time.
    """

    task_type = "classification"
    LABELS = ("episode", "class")

    def __init__(
        self,
        pool: ClassPool,
        ways: int,
        shots: int,
        queries: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        labels: str = "episode",
    ):
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(
                f"ways and shots must be >= 1 and queries >= 0 (got ways={ways}, shots={shots}, queries={queries})."
            )
        if ways > len(pool):
            raise ValueError(
                f"{ways}-way episodes need {ways} classes but the data has only "
                f"{len(pool)}; lower `ways` or use a split with more classes."
            )
        smallest = min(pool.counts)
        if shots + queries > smallest:
            raise ValueError(
                f"shots + queries = {shots}+{queries} = {shots + queries} exceeds the "
                f"smallest class ({smallest} examples); lower `shots` or `queries`."
            )
        if labels not in self.LABELS:
            raise ValueError(
                f"labels={labels!r}: use 'episode' (0..N-1 in draw order) or 'class' (the class's "
                f"index among all {len(pool)} classes)."
            )
        self.pool, self.ways, self.shots, self.queries = pool, ways, shots, queries
        self.transform = transform
        self.labels = labels
        self.out_features = ways if labels == "episode" else len(pool)

    def sample(self, generator: torch.Generator) -> Episode:
        return self.sample_batch(1, generator)[0]

    def sample_batch(self, size: int, generator: torch.Generator) -> list[Episode]:
        """``size`` episodes, the same as ``size`` calls of :meth:`sample`. The random draws come
        first, episode by episode (the classes, then each class's examples); then all the
        examples are gathered in one :meth:`ClassPool.get_many` call, each episode's support
        examples before its queries, so that its support and query sets are slices of one tensor."""
        n, k, q = self.ways, self.shots, self.queries
        requests = []
        for _ in range(size):
            classes = torch.randperm(len(self.pool), generator=generator)[:n].tolist()
            picks = [torch.randperm(self.pool.counts[c], generator=generator)[: k + q] for c in classes]
            requests += [(c, idx[:k]) for c, idx in zip(classes, picks)]
            requests += [(c, idx[k:]) for c, idx in zip(classes, picks)]
        x = self.pool.get_many(requests)
        episodes = []
        for e in range(size):
            if self.labels == "episode":
                labels = torch.arange(n)
            else:
                labels = torch.tensor([c for c, _ in requests[2 * n * e : 2 * n * e + n]])
            start = e * n * (k + q)
            support_x, query_x = x[start : start + n * k], x[start + n * k : start + n * (k + q)]
            if self.transform is not None:
                support_x, query_x = self.transform(support_x), self.transform(query_x)
            episodes.append(Episode(support_x, labels.repeat_interleave(k), query_x, labels.repeat_interleave(q)))
        return episodes


class EpisodeSource(Protocol):
    """What the evaluator needs of an episode source (:class:`EpisodeSampler`,
    :class:`~metatl.data.sinusoid.SinusoidTasks`): episodes drawn from a generator."""

    def sample(self, generator: torch.Generator) -> Episode: ...


def fixed_episodes(sampler: EpisodeSource, n: int, seed: int) -> Iterator[Episode]:
    """The same ``n`` episodes for every method and run, drawn lazily from ``sampler`` with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield sampler.sample(g)
