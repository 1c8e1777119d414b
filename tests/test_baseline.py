"""Baseline and Baseline++ (Chen et al. 2019): heads against hand computations, the support-set
protocol against a hand-unrolled SGD loop, and a smoke run showing that pretraining helps."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatl.data import EpisodeSampler, TensorClassPool
from metatl.meta.baseline import Baseline, BaselinePP, cosine_scale, head_logits, new_head
from metatl.nn.backbones import conv4_pool


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of tiny steps per episode: on a busy machine a second intra-op thread makes each
    log-softmax wait at a barrier (tens of ms). The compare runner sets threads as the runtime does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Identity2d(nn.Module):
    """Features = the input points; a linear head over ``classes`` base classes."""

    def __init__(self, dim=2, classes=3):
        super().__init__()
        self.embedding_dim = dim
        self.scale = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, classes)

    def embed(self, x):
        return x * self.scale

    def forward(self, x):
        return self.head(self.embed(x))


def test_cosine_head_logits_by_formula():
    g = torch.Generator().manual_seed(0)
    z, w = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    out = head_logits("cosine", {"weight": w}, z, scale=2.0)
    for i in range(4):
        for c in range(5):
            dot = sum(float(z[i, k] * w[c, k]) for k in range(3))
            norms = math.sqrt(sum(float(v) ** 2 for v in z[i])) * math.sqrt(sum(float(v) ** 2 for v in w[c]))
            assert out[i, c].item() == pytest.approx(2.0 * dot / norms, rel=1e-5)
    assert cosine_scale(5) == 2.0 and cosine_scale(200) == 2.0 and cosine_scale(4112) == 10.0
    assert cosine_scale(4112, 3.0) == 3.0


def test_linear_head_separates_separable_points():
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    g = torch.Generator().manual_seed(1)
    support_x = centres.repeat_interleave(5, 0) + 0.5 * torch.randn(15, 2, generator=g)
    query_x = centres.repeat_interleave(10, 0) + 0.5 * torch.randn(30, 2, generator=g)
    support_y, query_y = torch.arange(3).repeat_interleave(5), torch.arange(3).repeat_interleave(10)
    for cls in (Baseline, BaselinePP):
        predictor = cls(Identity2d()).adapt(support_x, support_y)
        assert (predictor.predict(query_x) == query_y).all(), cls.__name__
        assert predictor(query_x).shape == (30, 3)


def hand_sgd(head, z, y, logits, epochs, lr, mom, damp, wd, g, batch=4):
    """torch.optim.SGD's update written out: g = grad + wd p; b = g (first step), else
    b = mom b + (1 - damp) g; p -= lr b."""
    bufs = {}
    for _ in range(epochs):
        order = torch.randperm(len(z), generator=g)
        for s in range(0, len(z), batch):
            idx = order[s : s + batch]
            leaves = {k: v.detach().requires_grad_() for k, v in head.items()}
            grads = torch.autograd.grad(F.cross_entropy(logits(leaves, z[idx]), y[idx]), list(leaves.values()))
            for (k, p), grad in zip(head.items(), grads):
                grad = grad + wd * p
                bufs[k] = grad.clone() if k not in bufs else mom * bufs[k] + (1 - damp) * grad
                head[k] = p - lr * bufs[k]
    return head


@pytest.mark.parametrize("cls, kind", [(Baseline, "linear"), (BaselinePP, "cosine")])
def test_support_training_matches_hand_unrolled_sgd(cls, kind):
    torch.manual_seed(0)
    learner = cls(Identity2d(dim=2), epochs=7, lr=0.05)
    x, y = torch.randn(10, 2), torch.arange(5).repeat_interleave(2)
    query = torch.randn(6, 2)
    g = torch.Generator().manual_seed(learner.seed)
    head = new_head(kind, 2, 5, g)
    scale = cosine_scale(5)
    head = hand_sgd(head, x, y, lambda h, z: head_logits(kind, h, z, scale), 7, 0.05, 0.9, 0.9, 0.001, g)
    expected = head_logits(kind, head, query, scale)
    assert torch.allclose(learner.adapt(x, y)(query), expected, atol=1e-6)


def test_pretraining_losses_are_cross_entropy_over_base_classes():
    torch.manual_seed(0)
    x, y = torch.randn(12, 2), torch.arange(3).repeat(4)
    pool_batch = EpisodeSampler(TensorClassPool(x, y), 3, 1, 1, labels="class").sample_batch(2, torch.Generator())
    rows_x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in pool_batch])
    rows_y = torch.cat([torch.cat([e.support_y, e.query_y]) for e in pool_batch])
    base = Baseline(Identity2d())
    assert base.meta_loss(pool_batch)[0].item() == pytest.approx(
        F.cross_entropy(base.model(rows_x), rows_y).item(), rel=1e-6
    )
    pp = BaselinePP(Identity2d())
    w = pp.model.head.weight
    cos = F.normalize(rows_x, dim=1) @ F.normalize(w, dim=1).T
    assert pp.meta_loss(pool_batch)[0].item() == pytest.approx(F.cross_entropy(2.0 * cos, rows_y).item(), rel=1e-5)
    assert not pp.model.head.bias.requires_grad and pp.model.head.bias.abs().sum() == 0


def test_fine_tuning_all_layers_and_l2sp():
    torch.manual_seed(0)
    x, y = torch.randn(10, 2), torch.arange(5).repeat_interleave(2)
    frozen = Baseline(Identity2d(), epochs=5)
    frozen.adapt(x, y)
    assert torch.equal(frozen.model.scale, torch.ones(2))  # the learner's own backbone never moves
    moved = Baseline(Identity2d(), adapt_layers="all", epochs=20, lr=0.5, weight_decay=0.0)
    pulled = Baseline(Identity2d(), adapt_layers="all", epochs=20, lr=0.5, weight_decay=0.0, l2sp_alpha=50.0)
    q = torch.randn(4, 2)
    head_only = Baseline(Identity2d(), epochs=20, lr=0.5, weight_decay=0.0).adapt(x, y)(q)
    assert not torch.allclose(moved.adapt(x, y)(q), head_only, atol=1e-3)
    # a strong pull keeps the backbone near its start: close to the head-only predictor
    gap_pulled = (pulled.adapt(x, y)(q) - head_only).abs().max()
    assert gap_pulled < (moved.adapt(x, y)(q) - head_only).abs().max()
    with pytest.raises(ValueError, match="set adapt_layers: all"):
        Baseline(Identity2d(), l2sp_alpha=0.1)
    with pytest.raises(ValueError, match="adapt_layers must be one of head, all"):
        Baseline(Identity2d(), adapt_layers="last")
    with pytest.raises(ValueError, match="embed\\(\\) and a linear head"):
        Baseline(nn.Linear(2, 3))


@pytest.mark.parametrize("cls", [Baseline, BaselinePP])
def test_smoke_pretraining_makes_features_that_transfer(cls):
    """Pretrain on 30 synthetic base classes (binary templates with dropped pixels), then 5-way
    1-shot episodes of 5 new classes: the loss falls and the new heads beat chance clearly, where the
    same protocol on the untrained backbone is at chance (its features are too weak for 100 epochs
    of lr 0.01)."""
    g = torch.Generator().manual_seed(0)

    def pool(n_classes, per_class):
        x = (torch.rand(n_classes, 1, 28, 28, generator=g) > 0.7).float().repeat_interleave(per_class, 0)
        x = (x - (torch.rand(x.shape, generator=g) < 0.2).float()).clamp(min=0)
        return TensorClassPool(x, torch.arange(n_classes).repeat_interleave(per_class))

    base = EpisodeSampler(pool(30, 10), 30, 4, 0, labels="class")
    episodes = EpisodeSampler(pool(5, 20), 5, 1, 10).sample_batch(20, torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    learner = cls(conv4_pool(out_features=30, filters=16, bn_mode="running"))
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = learner.meta_loss(base.sample_batch(1, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    learner.eval()
    accuracy = sum((learner.adapt(*e.support).predict(e.query_x) == e.query_y).float().mean() for e in episodes) / 20
    assert losses[-1] < 0.7 * losses[0]
    # chance 0.2, with a standard error of 0.013 over these 1000 queries (the untrained backbone:
    # 0.20-0.21); trained, 0.29-0.49 (Baseline++) and 0.51-0.66 (Baseline) over seeds and thread
    # counts, whose float rounding moves a 30-step run this much
    assert accuracy > 0.25, accuracy


def test_minibatch_sgd_is_torch_optim_sgd():
    from metatl.meta.baseline import fit_minibatch_sgd

    torch.manual_seed(0)
    x, y = torch.randn(9, 3), torch.randint(0, 2, (9,))
    w0 = torch.randn(2, 3)
    mine, ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = lambda w: lambda idx: F.cross_entropy(x[idx] @ w.T, y[idx])  # noqa: E731
    opts = dict(epochs=3, batch_size=4, lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.01)
    fit_minibatch_sgd([mine], loss(mine), 9, generator=torch.Generator().manual_seed(5), **opts)
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        order = torch.randperm(9, generator=g)
        for s in range(0, 9, 4):
            opt.zero_grad()
            loss(ref)(order[s : s + 4]).backward()
            opt.step()
    assert torch.allclose(mine, ref, atol=1e-6)
