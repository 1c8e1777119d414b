"""RNN-based meta-learners: MANN (and its LSTM baseline), SNAIL, the meta-learner LSTM.

Reference tests check each method's equation on numbers computed by hand or by an independent
computation; smoke tests show each learns tiny synthetic episodes well above chance in seconds.
"""

import math
from pathlib import Path

import pytest
import torch

from metatl.data.episode import EpisodeSampler, TensorClassPool
from metatl.engine.evaluator import evaluate
from metatl.meta.adapt import adapt
from metatl.meta.learned_optimizer import UnrolledLossError
from metatl.meta.mann import (
    MANN,
    MANNCore,
    cosine_read_weights,
    least_used,
    lru_write_weights,
    mann_online_accuracy,
    update_usage,
)
from metatl.meta.meta_lstm import MetaLSTM, MetaLSTMRule
from metatl.meta.rules import SGD
from metatl.meta.snail import SNAIL, SNAILNet
from metatl.nn.backbones import mlp

ROOT = Path(__file__).resolve().parents[1]


def clusters(n_classes=200, per_class=12, dim=8, noise=0.3, seed=0):
    """Classes are random unit-variance prototypes with Gaussian noise: a tiny few-shot problem."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_classes, dim, generator=g)
    x = protos.repeat_interleave(per_class, 0) + noise * torch.randn(n_classes * per_class, dim, generator=g)
    return TensorClassPool(x, torch.arange(n_classes).repeat_interleave(per_class))


def sampler(ways=3, shots=1, queries=3, seed=0):
    return EpisodeSampler(clusters(seed=seed), ways, shots, queries)


class Raw(torch.nn.Module):
    """The identity encoder: the sequence models see the 8-d inputs themselves."""

    embedding_dim = 8

    def embed(self, x):
        return x


def encoder(dim=8, width=16):
    return mlp(in_features=dim, out_features=width, hidden=(16,))


def train(learner, tasks, iterations, lr=3e-3, meta_batch=8, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        loss, _ = learner.meta_loss(tasks.sample_batch(meta_batch, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return learner


# -- MANN: least-recently-used access, by hand -----------------------------------------------------
def test_lru_write_weights_by_hand_on_two_slots():
    usage = torch.tensor([[0.7, 0.2]])
    lu = least_used(usage, 1)
    assert lu.tolist() == [[0.0, 1.0]]  # slot 1 is the least used
    prev_read = torch.tensor([[[0.9, 0.1]]])  # one head
    alpha = torch.tensor([[0.0]])  # sigmoid(0) = 1/2
    w_w = lru_write_weights(alpha, prev_read, lu)
    assert torch.allclose(w_w, torch.tensor([[[0.45, 0.55]]]))  # 0.5*[.9,.1] + 0.5*[0,1]
    w_r = torch.tensor([[[0.3, 0.7]]])
    new_usage = update_usage(usage, w_r, w_w, gamma=0.5)
    assert torch.allclose(new_usage, torch.tensor([[0.35 + 0.3 + 0.45, 0.1 + 0.7 + 0.55]]))
    assert least_used(new_usage, 1).tolist() == [[1.0, 0.0]]
    assert least_used(torch.zeros(1, 2), 1).tolist() == [[1.0, 0.0]]  # ties: lower slot first


def test_cosine_read_weights_by_hand():
    memory = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    key = torch.tensor([[[2.0, 0.0]]])
    cos = torch.tensor([1.0, 1 / math.sqrt(2)])
    assert torch.allclose(cosine_read_weights(key, memory)[0, 0], cos.softmax(0))


def test_mann_step_writes_then_reads_as_the_equations_say():
    torch.manual_seed(0)
    core = MANNCore(input_size=3, n_classes=2, hidden=5, memory=True, slots=2, slot_size=2, heads=1, gamma=0.9)
    s = core.initial_state(1, torch.zeros(1))
    s["M"] = torch.tensor([[[0.5, -1.0], [0.2, 0.3]]])
    s["w_r"] = torch.tensor([[[0.6, 0.4]]])
    s["w_u"] = torch.tensor([[1.0, 0.1]])
    s["w_lu"] = least_used(s["w_u"], 1)  # slot 1
    x, y_prev = torch.randn(1, 3), torch.tensor([[0.0, 1.0]])
    logits, new = core.step(x, y_prev, s)
    # by hand, from the controller's output
    h, _ = core.controller(torch.cat([x, y_prev, s["r"]], -1), (s["h"], s["c"]))
    k = torch.tanh(core.key(h))[0]
    a = torch.sigmoid(core.alpha(h))[0, 0]
    w_w = a * torch.tensor([0.6, 0.4]) + (1 - a) * torch.tensor([0.0, 1.0])
    M = torch.stack([torch.tensor([0.5, -1.0]) + w_w[0] * k, torch.zeros(2) + w_w[1] * k])  # slot 1 zeroed first
    cos = torch.stack([torch.dot(k, M[i]) / (k.norm() * M[i].norm()) for i in range(2)])
    w_r = cos.softmax(0)
    r = w_r @ M
    assert torch.allclose(new["M"][0], M, atol=1e-6)
    assert torch.allclose(new["w_r"][0, 0], w_r, atol=1e-6)
    assert torch.allclose(new["w_u"][0], 0.9 * torch.tensor([1.0, 0.1]) + w_r + w_w, atol=1e-6)
    assert torch.allclose(logits[0], core.out(torch.cat([h, r[None]], -1))[0], atol=1e-6)


@pytest.mark.parametrize(
    "erase_slots,kept",
    [(None, [0.0, 1.0, 0.0]), (1, [1.0, 1.0, 0.0])],
    ids=["erase-one-per-head", "erase-the-least-used"],
)
def test_mann_step_with_add_vectors_and_a_least_used_slot_per_head(erase_slots, kept):
    torch.manual_seed(0)
    core = MANNCore(
        input_size=3,
        n_classes=2,
        hidden=5,
        memory=True,
        slots=3,
        slot_size=2,
        heads=2,
        gamma=0.9,
        add_vector=True,
        lru_per_head=True,
        erase_slots=erase_slots,
    )
    s = core.initial_state(1, torch.zeros(1))
    assert s["w_lu"].tolist() == [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]  # no usage yet: slots 0 and 1
    M0 = torch.tensor([[0.5, -1.0], [0.2, 0.3], [-0.4, 0.8]])
    s["M"] = M0[None].clone()
    s["w_r"] = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]])
    s["w_u"] = torch.tensor([[0.1, 1.0, 0.05]])
    s["w_lu"] = core.least_used(s["w_u"])  # head 0 -> slot 2 (least used), head 1 -> slot 0
    assert s["w_lu"].tolist() == [[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]
    x, y_prev = torch.randn(1, 3), torch.tensor([[1.0, 0.0]])
    logits, new = core.step(x, y_prev, s)
    h, _ = core.controller(torch.cat([x, y_prev, s["r"]], -1), (s["h"], s["c"]))
    k = torch.tanh(core.key(h))[0].view(2, 2)
    a = torch.tanh(core.add(h))[0].view(2, 2)
    g = torch.sigmoid(core.alpha(h))[0]
    w_w = torch.stack(
        [
            g[0] * torch.tensor([0.6, 0.3, 0.1]) + (1 - g[0]) * torch.tensor([0.0, 0.0, 1.0]),
            g[1] * torch.tensor([0.2, 0.2, 0.6]) + (1 - g[1]) * torch.tensor([1.0, 0.0, 0.0]),
        ]
    )
    kept = torch.tensor(kept)  # slots 2 and 0 (or only 2, the least used) zeroed before the write
    M = torch.stack([kept[i] * M0[i] + w_w[0, i] * a[0] + w_w[1, i] * a[1] for i in range(3)])
    w_r = torch.stack(
        [torch.stack([torch.dot(k[j], M[i]) / (k[j].norm() * M[i].norm()) for i in range(3)]) for j in range(2)]
    ).softmax(-1)
    assert torch.allclose(new["M"][0], M, atol=1e-6)
    assert torch.allclose(new["w_r"][0], w_r, atol=1e-6)
    w_u = 0.9 * torch.tensor([0.1, 1.0, 0.05]) + w_r.sum(0) + w_w.sum(0)
    assert torch.allclose(new["w_u"][0], w_u, atol=1e-6)
    assert torch.equal(new["w_lu"][0], torch.nn.functional.one_hot(torch.argsort(w_u)[:2], 3).float())
    assert torch.allclose(logits[0], core.out(torch.cat([h[0], (w_r @ M).flatten()])), atol=1e-6)


def test_mann_erase_slots_out_of_range_names_the_fix():
    with pytest.raises(ValueError, match="erase_slots=5 must lie in 0..slots=4"):
        MANNCore(input_size=3, n_classes=2, slots=4, slot_size=2, heads=2, erase_slots=5)


def test_mann_queries_do_not_see_each_other():
    torch.manual_seed(0)
    learner = MANN(encoder(), ways=3, hidden=16, slots=8, slot_size=4, heads=2).eval()
    ep = sampler().sample(torch.Generator().manual_seed(1))
    predictor = learner.adapt(ep.support_x, ep.support_y)
    together = predictor(ep.query_x)
    alone = torch.cat([predictor(q[None]) for q in ep.query_x])
    assert torch.allclose(together, alone, atol=1e-5)


def test_wrong_label_count_names_the_fix():
    learner = MANN(encoder(), ways=2, hidden=8, slots=4, slot_size=4, heads=1)
    ep = sampler(ways=3).sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="2-way one-hot.*ways"):
        learner.meta_loss([ep])
    with pytest.raises(ValueError, match="3 classes but this SNAIL was built for 2-way episodes.*algorithm.ways=3"):
        SNAIL(encoder(), ways=2, seq_len=8, filters=4, attention=[[4, 4]]).adapt(ep.support_x, ep.support_y)
    # fewer classes than the one-hot size: the labels fit, but the model could answer a missing class
    small = sampler(ways=2).sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="2 classes but this MANN was built for 3-way"):
        MANN(encoder(), ways=3, hidden=8, slots=4, slot_size=4, heads=1).meta_loss([small])
    with pytest.raises(ValueError, match="2 classes but this SNAIL was built for 3-way"):
        SNAIL(encoder(), ways=3, seq_len=8, filters=4, attention=[[4, 4]]).meta_loss([small])


def test_mann_online_accuracy_on_a_tiny_model():
    torch.manual_seed(0)
    tasks = EpisodeSampler(clusters(per_class=12), 3, 5, 5)  # 3 classes x 10 instances = 30 steps
    learner = MANN(encoder(), ways=3, hidden=16, slots=8, slot_size=8, heads=1, objective="online")
    acc = mann_online_accuracy(learner, tasks, episodes=4)
    assert set(acc) == {1, 2, 5, 10} and all(0.0 <= v["mean"] <= 1.0 for v in acc.values())
    with pytest.raises(ValueError, match="instance"):
        mann_online_accuracy(learner, tasks, episodes=1, instances=(11,))


class _Memoriser(torch.nn.Module):
    """Right at step t exactly when y_t appeared earlier in the sequence: a perfect one-shot
    learner, whose k-th-instance accuracy is 0 for k = 1 and 1 for every k >= 2."""

    def online_logits(self, x, y):
        ways = int(y.max()) + 1
        out = torch.zeros(*y.shape, ways)
        for t in range(y.shape[1]):
            seen = bool((y[0, :t] == y[0, t]).any())
            out[0, t, y[0, t] if seen else (y[0, t] + 1) % ways] = 1.0
        return out


def test_mann_online_accuracy_counts_instances_per_class():
    tasks = EpisodeSampler(clusters(per_class=12), 3, 5, 5)  # every class appears 10 times
    acc = mann_online_accuracy(_Memoriser(), tasks, episodes=5)
    assert acc[1]["mean"] == 0.0 and acc[2]["mean"] == acc[5]["mean"] == acc[10]["mean"] == 1.0
    assert all(v["ci95"] == 0.0 for v in acc.values())


@pytest.mark.slow  # binding labels through the sequence takes ~300 iterations (~7 s on an idle core)
@pytest.mark.parametrize(
    "memory,lr,beta,writes",
    [(True, 2e-2, 10.0, False), (True, 2e-2, 10.0, True), (False, 1e-2, 1.0, False)],
    ids=["mann", "mann-add-lru", "lstm"],
)
def test_mann_learns_tiny_episodes(memory, lr, beta, writes):
    tasks = sampler(ways=3, shots=1, queries=3)
    learner = MANN(
        encoder(),
        ways=3,
        memory=memory,
        hidden=32,
        slots=8,
        slot_size=16,
        heads=1,
        beta=beta,
        add_vector=writes,
        lru_per_head=writes,
    )
    train(learner, tasks, 300, lr=lr)
    acc = evaluate(learner, sampler(seed=7), 50, progress=False)["mean"]  # unseen classes
    assert acc > 0.5, acc  # chance is 1/3


def test_mann_online_objective_trains_on_every_step():
    tasks = EpisodeSampler(clusters(per_class=12), 3, 3, 3)
    learner = MANN(encoder(), ways=3, hidden=8, slots=4, slot_size=4, heads=1, objective="online")
    loss, metrics = learner.meta_loss(tasks.sample_batch(2, torch.Generator().manual_seed(0)))
    loss.backward()
    assert "seq_acc" in metrics and learner.core.alpha.weight.grad.abs().sum() > 0


# -- SNAIL ----------------------------------------------------------------------------------------
def test_snail_is_causal():
    torch.manual_seed(0)
    net = SNAILNet(input_size=6, n_classes=3, seq_len=9, filters=4, attention=[[4, 3], [5, 4], [6, 2]]).eval()
    z = torch.randn(2, 9, 6)
    out = net(z)
    for t in range(8):
        z2 = z.clone()
        z2[:, t + 1 :] += torch.randn_like(z2[:, t + 1 :])  # change everything after t
        out2 = net(z2)
        assert torch.allclose(out[:, : t + 1], out2[:, : t + 1], atol=1e-6), t
        assert not torch.allclose(out[:, t + 1 :], out2[:, t + 1 :])


@pytest.mark.parametrize("n", [1, 3, 8])
def test_snail_shared_support_prefix_equals_one_sequence_per_query(n):
    torch.manual_seed(0)
    net = SNAILNet(input_size=6, n_classes=3, seq_len=9, filters=4, attention=[[4, 3], [5, 4], [6, 2]]).double()
    prefix = torch.randn(2, n, 6, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    fast = net.forward_queries(prefix, queries)
    seqs = torch.cat([prefix.repeat_interleave(5, 0), queries.flatten(0, 1)[:, None]], 1)  # (2 * 5, n + 1, 6)
    slow = net(seqs)[:, -1].view(2, 5, 3)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(slow)
    inputs = [prefix, queries, *net.parameters()]
    for a, b in zip(torch.autograd.grad((fast * w).sum(), inputs), torch.autograd.grad((slow * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_snail_receptive_field_and_length_check():
    net = SNAILNet(input_size=2, n_classes=2, seq_len=5, filters=2, attention=[[2, 2], [2, 2]])
    assert [b.conv.dilation[0] for blk in net.blocks[1].blocks for b in (blk.f,)] == [1, 2, 4]
    with pytest.raises(ValueError, match="seq_len=5.*algorithm.seq_len >= ways \\* shots \\+ 1 = 6"):
        net(torch.zeros(1, 6, 2))
    learner = SNAIL(encoder(), ways=3, seq_len=3, filters=4, attention=[[4, 4]])
    ep = sampler(ways=3, shots=1).sample(torch.Generator().manual_seed(0))  # needs 3*1 + 1 = 4
    with pytest.raises(ValueError, match="seq_len=3"):
        learner.adapt(ep.support_x, ep.support_y)


def test_snail_learns_tiny_episodes():
    tasks = sampler(ways=3, shots=1, queries=3)
    learner = SNAIL(Raw(), ways=3, seq_len=4, filters=8, attention=[[8, 8], [8, 8]])
    train(learner, tasks, 60, lr=1e-2)
    acc = evaluate(learner, sampler(seed=7), 50, progress=False)["mean"]
    assert acc > 0.6, acc


# -- meta-learner LSTM ------------------------------------------------------------------------------
def test_meta_lstm_with_forget_one_and_input_lr_is_sgd():
    torch.manual_seed(0)
    lr = 0.05
    rule = MetaLSTMRule(hidden=0)
    with torch.no_grad():
        rule.W_I.zero_(), rule.W_F.zero_()
        rule.b_F.fill_(40.0)  # sigmoid(40) == 1 in float32
        rule.b_I.fill_(math.log(lr / (1 - lr)))  # sigmoid(b_I) == lr
    net = mlp(in_features=4, out_features=3, hidden=(8,))
    params = {k: p.detach() for k, p in net.named_parameters()}
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    fwd = lambda p, z: torch.func.functional_call(net, p, (z,))  # noqa: E731
    loss_fn = torch.nn.functional.cross_entropy
    ours = adapt(fwd, params, x, y, loss_fn, rule, steps=3)
    sgd = adapt(fwd, params, x, y, loss_fn, SGD(lr), steps=3)
    for k in params:
        assert torch.allclose(ours[k], sgd[k], atol=1e-6), k


def test_meta_lstm_gate_equation_on_one_coordinate():
    torch.manual_seed(0)
    rule = MetaLSTMRule(hidden=0)
    theta, g, loss = torch.tensor([0.3]), torch.tensor([2.0]), torch.tensor(0.5)
    updates, state = rule.update({"w": g}, rule.init({"w": theta}), {"w": theta}, loss=loss)
    x = torch.tensor([math.log(2.0) / 10, 1.0, math.log(0.5) / 10, 1.0])
    i = torch.sigmoid(torch.cat([x, theta, torch.zeros(1)]) @ rule.W_I + rule.b_I)
    f = torch.sigmoid(torch.cat([x, theta, torch.zeros(1)]) @ rule.W_F + rule.b_F)
    assert torch.allclose(theta + updates["w"], f * theta - i * g, atol=1e-6)
    assert torch.allclose(state[1], i) and torch.allclose(state[2], f)


def test_meta_lstm_meta_gradient_reaches_gates_and_init():
    learner = MetaLSTM(encoder_head(), inner_steps=2)
    loss, _ = learner.meta_loss(sampler().sample_batch(2, torch.Generator().manual_seed(0)))
    loss.backward()
    for name in ("rule.W_I", "rule.b_I", "rule.W_F", "rule.b_F", "rule.lstm.weight_ih"):
        assert dict(learner.named_parameters())[name].grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in learner.model.parameters())


def encoder_head(dim=8, ways=3):
    return mlp(in_features=dim, out_features=ways, hidden=(16,))


def test_meta_lstm_non_finite_inner_loss_is_reported():
    learner = MetaLSTM(encoder_head(), inner_steps=2)
    ep = sampler().sample(torch.Generator().manual_seed(0))
    ep.support_x[0, 0] = float("inf")
    with pytest.raises(UnrolledLossError, match="inner step 0.*grad_clip"):
        learner.meta_loss([ep])


def test_meta_lstm_learns_tiny_episodes():
    tasks = sampler(ways=3, shots=1, queries=3)
    learner = MetaLSTM(encoder_head(), inner_steps=3)
    train(learner, tasks, 30, lr=1e-2)
    acc = evaluate(learner, sampler(seed=7), 50, progress=False)["mean"]
    assert acc > 0.6, acc


# -- configs and the real data ----------------------------------------------------------------------
CONFIGS = sorted(
    p.name for p in (ROOT / "configs").glob("*.yaml") if p.name.split("_omniglot")[0] in ("mann", "snail", "meta_lstm")
)


def test_every_rnn_config_exists():
    want = {f"{m}_omniglot_{s}.yaml" for m in ("mann", "snail", "meta_lstm") for s in ("5w1s", "5w5s")}
    assert want <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_rnn_configs_validate(name):
    from metatl.config import load_config

    cfg = load_config(ROOT / "configs" / name)
    assert cfg.algorithm["name"] in ("mann", "snail", "meta_lstm")


@pytest.mark.parametrize("shots", [1, 5])
def test_mann_episode_configs_train_as_the_online_config(shots):
    """The 5-way configs are the online run with other test episodes (docs/results.md scores it)."""
    from metatl.config import load_config

    online = load_config(ROOT / "configs" / "mann_omniglot_online.yaml")
    cfg = load_config(ROOT / "configs" / f"mann_omniglot_5w{shots}s.yaml")
    assert cfg.algorithm == online.algorithm and cfg.model == online.model and cfg.train == online.train
    train_episodes = lambda d: (
        d.name,
        d.split,
        d.train_ways or d.ways,
        d.train_shots or d.shots,  # noqa: E731
        d.train_queries or d.queries,
    )
    assert train_episodes(cfg.data) == train_episodes(online.data)
    assert (cfg.data.ways, cfg.data.shots, cfg.data.queries) == (5, shots, 15)


@pytest.mark.data
@pytest.mark.parametrize("name", CONFIGS)
def test_rnn_configs_take_a_step_on_omniglot(name):
    from metatl.config import load_config
    from metatl.data.files import resolve_data_dir
    from metatl.engine.build import build_learner, build_sampler

    if not (resolve_data_dir() / "omniglot" / "images_background.zip").exists():
        pytest.skip("Omniglot is not in the data folder")
    cfg = load_config(ROOT / "configs" / name)
    if cfg.model["name"] != "pixels":  # a narrow conv net keeps the test fast
        cfg = load_config(ROOT / "configs" / name, ["model.filters=8"])
    tasks = build_sampler(cfg.data, "train")
    learner = build_learner(cfg, tasks)
    g = torch.Generator().manual_seed(0)
    loss, metrics = learner.meta_loss(tasks.sample_batch(2, g))
    loss.backward()
    assert math.isfinite(loss.item())
    ep = build_sampler(cfg.data, "test").sample(g)
    assert learner.adapt(ep.support_x, ep.support_y)(ep.query_x).shape == (len(ep.query_y), cfg.data.ways)
