"""Metric-based meta-learners: reference tests against independent computations, short smoke
runs that show learning, and a conformance test over every registered algorithm."""

import math

import pytest
import torch
import torch.nn.functional as F

from metatl.config import from_dict
from metatl.data import EpisodeSampler, TensorClassPool
from metatl.engine import evaluate
from metatl.engine.build import build_learner
from metatl.engine.trainer import lr_at
from metatl.meta import MatchingNet, MetaLearner, Predictor, ProtoNet, RelationNet
from metatl.meta.matching import attention_log_probs
from metatl.meta.metric import full_precision, pairwise_distances, prototypes
from metatl.nn import conv4_pool, conv4_relation
from metatl.registry import ALGORITHMS


def blob_sampler(n_classes=24, per_class=10, size=28, ways=5, shots=1, queries=5, seed=0):
    """Gaussian-blob "images": class k is a blob of its own centre and width; each example jitters
    the centre and adds pixel noise. New seeds give new classes."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(n_classes, 2, generator=g) * (size - 8) + 4
    widths = torch.rand(n_classes, generator=g) * 3 + 1.5
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c = centers.repeat_interleave(per_class, 0) + torch.randn(n_classes * per_class, 2, generator=g)
    w = widths.repeat_interleave(per_class)[:, None, None]
    img = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / (2 * w**2))
    x = (img + 0.2 * torch.randn(img.shape, generator=g))[:, None]
    y = torch.arange(n_classes).repeat_interleave(per_class)
    sampler = EpisodeSampler(TensorClassPool(x, y), ways=ways, shots=shots, queries=queries)
    sampler.input_spec = {"in_channels": 1, "image_size": size}
    return sampler


def episode(ways=3, shots=2, queries=2, size=28, seed=0):
    return blob_sampler(
        n_classes=ways, per_class=shots + queries, size=size, ways=ways, shots=shots, queries=queries, seed=seed
    ).sample(torch.Generator().manual_seed(seed))


# -- pure helpers -----------------------------------------------------------------------------
def test_prototypes_are_class_means_by_loop():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(9, 4, generator=g)
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0])  # unequal shots
    ref = torch.stack([torch.stack([emb[i] for i in range(9) if labels[i] == k]).mean(0) for k in range(3)])
    torch.testing.assert_close(prototypes(emb, labels, 3), ref)
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no support examples"):
        prototypes(emb, labels, 4)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_pairwise_distances_by_loop(metric):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    ref = torch.empty(5, 4, dtype=torch.float64)
    for i in range(5):
        for j in range(4):
            d = a[i] - b[j]
            ref[i, j] = {
                "sqeuclidean": float(d @ d),
                "euclidean": math.sqrt(float(d @ d)),
                "cosine": 1 - float(a[i] @ b[j]) / (a[i].norm() * b[j].norm()),
            }[metric]
    torch.testing.assert_close(pairwise_distances(a, b, metric), ref)
    assert pairwise_distances(a, a, "sqeuclidean").diagonal().abs().max() < 1e-10  # clamped, exact zero-ish
    with pytest.raises(ValueError, match="unknown metric"):
        pairwise_distances(a, b, "manhattan")


# -- reference tests of the three learners ----------------------------------------------------
def _eval_model(model):
    return model.eval()


def test_protonet_logits_and_loss_match_the_equation():
    torch.manual_seed(0)
    model = _eval_model(conv4_pool(out_features=0, bn_mode="none", filters=8))
    learner = ProtoNet(model)
    ep = episode(ways=3, shots=2, queries=2)
    f = lambda x: model(x[None])[0]  # noqa: E731  one image at a time
    c = [sum(f(ep.support_x[i]) for i in range(len(ep.support_y)) if ep.support_y[i] == k) / 2 for k in range(3)]
    ref = torch.stack([torch.stack([-((f(q) - ck) ** 2).sum() for ck in c]) for q in ep.query_x])
    loss, metrics = learner.meta_loss([ep])
    ref_loss = -torch.stack([ref[j].log_softmax(0)[ep.query_y[j]] for j in range(len(ref))]).mean()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        learner.adapt(ep.support_x, ep.support_y)(ep.query_x), ref.detach(), rtol=1e-4, atol=1e-4
    )
    cos = ProtoNet(model, distance="cosine").adapt(ep.support_x, ep.support_y)(ep.query_x)
    ref_cos = torch.stack([torch.stack([F.cosine_similarity(f(q), ck, dim=0) - 1 for ck in c]) for q in ep.query_x])
    torch.testing.assert_close(cos, ref_cos.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_matching_attention_over_one_hot_labels_by_loop(scale):
    torch.manual_seed(0)
    model = _eval_model(conv4_pool(out_features=0, bn_mode="none", filters=8))
    learner = MatchingNet(model, scale=scale)
    ep = episode(ways=3, shots=2, queries=2)
    g = [model(x[None])[0] for x in ep.support_x]
    probs = []
    for q in ep.query_x:
        f = model(q[None])[0]
        sims = scale * torch.stack([F.cosine_similarity(f, gi, dim=0) for gi in g])
        a = sims.exp() / sims.exp().sum()
        probs.append(torch.stack([sum(a[i] for i in range(len(g)) if ep.support_y[i] == k) for k in range(3)]))
    probs = torch.stack(probs)
    loss, _ = learner.meta_loss([ep])
    torch.testing.assert_close(loss, -probs[torch.arange(len(probs)), ep.query_y].log().mean(), rtol=1e-4, atol=1e-5)
    predictor = learner.adapt(ep.support_x, ep.support_y)
    torch.testing.assert_close(predictor.predict_proba(ep.query_x), probs.detach(), rtol=1e-4, atol=1e-5)


def test_matching_learned_scale_is_a_positive_parameter_that_trains():
    torch.manual_seed(0)
    model = _eval_model(conv4_pool(out_features=0, bn_mode="none", filters=8))
    fixed, learned = MatchingNet(model, scale=5.0), MatchingNet(model, scale=5.0, learn_scale=True)
    assert "log_scale" not in fixed.state_dict()  # the paper's fixed form keeps old checkpoints loadable
    ep = episode(ways=3, shots=2, queries=2)
    torch.testing.assert_close(learned.meta_loss([ep])[0], fixed.meta_loss([ep])[0])
    learned.meta_loss([ep])[0].backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs() > 0
    with pytest.raises(ValueError, match="scale must be positive"):
        MatchingNet(model, scale=0.0)


def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """The LSTM equations written out (gate order i, f, g, o as in torch)."""
    z = w_ih @ x + b_ih + w_hh @ h + b_hh
    i, f, g, o = z.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_matching_full_context_embeddings_by_hand_unrolled_lstms():
    torch.manual_seed(0)
    model = _eval_model(conv4_pool(out_features=0, bn_mode="none", filters=6))
    learner = MatchingNet(model, fce=True, fce_steps=3)
    ctx = learner.context
    ep = episode(ways=3, shots=2, queries=2)
    gp = [model(x[None])[0] for x in ep.support_x]
    d, n = len(gp[0]), len(gp)
    lstm = ctx.support_lstm
    fw = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
    bw = [lstm.weight_ih_l0_reverse, lstm.weight_hh_l0_reverse, lstm.bias_ih_l0_reverse, lstm.bias_hh_l0_reverse]
    h, c, hf = torch.zeros(d), torch.zeros(d), []
    for i in range(n):
        h, c = _lstm_cell(gp[i], h, c, *fw)
        hf.append(h)
    h, c, hb = torch.zeros(d), torch.zeros(d), [None] * n
    for i in reversed(range(n)):
        h, c = _lstm_cell(gp[i], h, c, *bw)
        hb[i] = h
    g = torch.stack([hf[i] + hb[i] + gp[i] for i in range(n)])
    cell = ctx.query_lstm
    probs = []
    for q in ep.query_x:
        fp = model(q[None])[0]
        h, c = torch.zeros(d), torch.zeros(d)
        for _ in range(3):
            a = torch.softmax(torch.stack([h @ gi for gi in g]), 0)
            r = sum(a[i] * g[i] for i in range(n))
            h_hat, c = _lstm_cell(fp, h + r, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            h = h_hat + fp
        att = torch.softmax(torch.stack([F.cosine_similarity(h, gi, dim=0) for gi in g]), 0)
        probs.append(torch.stack([sum(att[i] for i in range(n) if ep.support_y[i] == k) for k in range(3)]))
    probs = torch.stack(probs).detach()
    torch.testing.assert_close(
        learner.adapt(ep.support_x, ep.support_y).predict_proba(ep.query_x), probs, rtol=1e-4, atol=1e-5
    )


def test_relation_scores_and_mse_match_the_equation():
    torch.manual_seed(0)
    model = conv4_relation(bn_mode="running", filters=8)
    learner = RelationNet(model, hidden=8, filters=8).eval()  # running statistics: per-pair calls are exact
    ep = episode(ways=3, shots=2, queries=2)
    assert model(ep.support_x).shape == (6, 8, 5, 5) and model.map_shape == (8, 5, 5)
    class_maps = [sum(model(ep.support_x[i][None])[0] for i in range(6) if ep.support_y[i] == k) for k in range(3)]
    r = torch.stack(
        [
            torch.stack([learner.relation(torch.cat([class_maps[k], model(q[None])[0]])[None])[0] for k in range(3)])
            for q in ep.query_x
        ]
    )
    target = torch.zeros(len(ep.query_y), 3)
    target[torch.arange(len(ep.query_y)), ep.query_y] = 1
    loss, _ = learner.meta_loss([ep])
    torch.testing.assert_close(loss, ((r - target) ** 2).mean(), rtol=1e-4, atol=1e-6)
    predictor = learner.adapt(ep.support_x, ep.support_y)
    torch.testing.assert_close(predictor(ep.query_x).exp(), r.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        predictor.predict_proba(ep.query_x), (r / r.sum(1, keepdim=True)).detach(), rtol=1e-4, atol=1e-6
    )


def test_relation_needs_feature_maps():
    with pytest.raises(ValueError, match="conv4_relation"):
        RelationNet(conv4_pool(out_features=0))


def test_step_lr_schedule_halves_every_n_iterations():
    cfg = from_dict({"train": {"lr": 1e-3, "lr_schedule": "step", "lr_step_every": 2000, "lr_gamma": 0.5}})
    assert [lr_at(cfg, i) for i in (0, 1999, 2000, 4000, 6001)] == [1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4]
    from metatl.config import ConfigError

    with pytest.raises(ConfigError, match="lr_step_every"):
        lr_at(from_dict({"train": {"lr_schedule": "step"}}), 0)


def test_distances_stay_float32_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(0)
    a = 30 + torch.randn(7, 64, generator=g)  # large norms, small differences
    b = a[:3] + 0.05 * torch.randn(3, 64, generator=g)
    exact = pairwise_distances(a.double(), b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_distances(a, b)
        naive = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.t()  # autocast: bf16 matmul
        protos = prototypes(a, torch.tensor([0, 1, 2, 0, 1, 2, 0]), 3)
    assert d.dtype == torch.float32 and protos.dtype == torch.float32
    torch.testing.assert_close(d.double(), exact, rtol=1e-3, atol=1e-2)
    assert (naive.double() - exact).abs().max() > 10  # what the helper guards against


def test_protonet_bfloat16_loss_is_close_to_float32_and_learns():
    torch.manual_seed(0)
    train, test = blob_sampler(n_classes=24, seed=0), blob_sampler(n_classes=12, seed=1)
    cfg = from_dict({"algorithm": {"name": "protonet"}, "model": {"name": "conv4_pool", "filters": 16, "fast": True}})
    learner = build_learner(cfg, train)
    batch = train.sample_batch(2, torch.Generator().manual_seed(0))
    loss32, _ = learner.meta_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = learner.meta_loss(batch)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = learner.meta_loss(train.sample_batch(2, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    acc = evaluate(learner, test, episodes=30, progress=False)["mean"]
    assert acc > 0.65, f"protonet in bfloat16: {acc:.2f} on 5-way blobs (chance 0.2)"


def test_matching_log_probs_stay_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    cfg = from_dict({"algorithm": {"name": "matching"}, "model": {"name": "conv4_pool", "filters": 8}})
    learner = build_learner(cfg, blob_sampler(n_classes=12, seed=0))
    ep = episode(ways=3, shots=2, queries=2)
    g = learner.support_embeddings(ep.support_x)
    exact = learner.log_probs(g, ep.support_y, 3, ep.query_x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = learner.log_probs(g, ep.support_y, 3, ep.query_x)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0, atol=0.05)
    # a probability of 0.999 is 1.0 in bfloat16 (log 0); the helper keeps log(0.999)
    logits = torch.tensor([[0.0, -6.2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = attention_log_probs(logits, torch.tensor([0, 1]), 2)
    assert lp.dtype == torch.float32 and -3e-3 < lp[0, 0].item() < -1e-3


def test_full_precision_finds_the_device_in_keyword_arguments(monkeypatch):
    devices = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, *args, **kwargs):
        devices.append(device_type)
        return real_autocast("cpu", *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    f = full_precision(lambda *, x: x)
    assert f(x=torch.ones(2, dtype=torch.bfloat16, device="meta")).dtype == torch.float32
    assert devices == ["meta"]  # the tensor's device, not a default


# -- learning happens -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algo,backbone", [("protonet", "conv4_pool"), ("matching", "conv4_pool"), ("relation", "conv4_relation")]
)
def test_metric_learner_learns_blobs(algo, backbone):
    torch.manual_seed(0)
    train = blob_sampler(n_classes=24, seed=0)
    test = blob_sampler(n_classes=12, seed=1)  # new classes
    cfg = from_dict({"algorithm": {"name": algo}, "model": {"name": backbone, "filters": 16}})
    learner = build_learner(cfg, train)
    before = evaluate(learner, test, episodes=30, progress=False)["mean"]
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss, _ = learner.meta_loss(train.sample_batch(2, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = evaluate(learner, test, episodes=30, progress=False)["mean"]
    assert acc > 0.65 and acc > before + 0.2, f"{algo}: {before:.2f} -> {acc:.2f} on 5-way blobs (chance 0.2)"


# -- conformance over the registry ------------------------------------------------------------
BACKBONE_FOR = {"relation": "conv4_relation"}  # the rest take the conv4 nets


EPISODIC = [
    name
    for name in ALGORITHMS
    if isinstance(ALGORITHMS.get(name), type) and issubclass(ALGORITHMS.get(name), MetaLearner)
]


def test_the_registry_has_the_episodic_meta_learners():
    assert {"maml", "reptile", "protonet", "matching", "relation", "mann", "snail"} <= set(EPISODIC)


@pytest.mark.parametrize("name", EPISODIC)  # the transfer methods have their own conformance tests
def test_every_algorithm_gives_a_finite_loss_and_a_predictor(name):
    torch.manual_seed(0)
    sampler = blob_sampler(n_classes=6, per_class=4, ways=3, shots=1, queries=2)
    cfg = from_dict(
        {"algorithm": {"name": name}, "model": {"name": BACKBONE_FOR.get(name, "conv4_pool"), "filters": 8}}
    )
    learner = build_learner(cfg, sampler)
    batch = sampler.sample_batch(2, torch.Generator().manual_seed(0))
    loss, metrics = learner.meta_loss(batch)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    loss.backward()
    ep = batch[0]
    predictor = learner.adapt(ep.support_x, ep.support_y)
    assert isinstance(predictor, Predictor)
    out = predictor(ep.query_x)
    assert out.shape == (len(ep.query_x), 3) and torch.isfinite(out).all()
    proba = predictor.predict_proba(ep.query_x)
    torch.testing.assert_close(proba.sum(1), torch.ones(len(ep.query_x)))
