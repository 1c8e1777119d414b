"""Deep transfer objectives: reference tests against independent computations, behaviour of the
fine-tuning filters, smoke runs on a tiny shifted image pair, and `metatl train` end to end."""

import gzip
import itertools
import json
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
import yaml

from metatl.cli import main
from metatl.config import from_dict
from metatl.data.adaptation import DomainPairSampler, LabelledSet
from metatl.data.digits import labelled_subset
from metatl.engine import checkpoint as ckpt_io
from metatl.engine.build import build_learner
from metatl.engine.trainer import make_optimizer, to_device
from metatl.transfer.feature.dann import dann_lambda, grad_reverse
from metatl.transfer.feature.deep_coral import coral_loss
from metatl.transfer.feature.mmd import default_bandwidths, mk_mmd
from metatl.transfer.parameter.finetune import param_groups
from metatl.transfer.parameter.l2sp import l2sp_penalty
from metatl.transfer.relation.rkd import rkd_angle_loss, rkd_distance_loss

torch.set_default_dtype(torch.float32)


def huber(a, b):  # delta = 1
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


# -- reference tests ------------------------------------------------------------------------------
def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    y = grad_reverse(x, 0.7)
    torch.testing.assert_close(y, x)
    y.backward(g)
    torch.testing.assert_close(x.grad, -0.7 * g)
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)


def test_deep_coral_matches_the_numpy_formula():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(20, 5)), rng.normal(size=(15, 5)) * 2 + 1
    d = 5
    expected = np.sum((np.cov(s, rowvar=False) - np.cov(t, rowvar=False)) ** 2) / (4 * d * d)
    got = coral_loss(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def _k(a, b, bandwidths):
    return np.mean([math.exp(-np.sum((a - b) ** 2) / s) for s in bandwidths])


def test_mk_mmd_unbiased_and_linear_match_double_sums():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(7, 3)), rng.normal(size=(6, 3)) + 0.5
    bw = [0.5, 1.0, 4.0]
    ns, nt = len(s), len(t)
    kss = sum(_k(s[i], s[j], bw) for i in range(ns) for j in range(ns) if i != j) / (ns * (ns - 1))
    ktt = sum(_k(t[i], t[j], bw) for i in range(nt) for j in range(nt) if i != j) / (nt * (nt - 1))
    kst = sum(_k(s[i], t[j], bw) for i in range(ns) for j in range(nt)) / (ns * nt)
    got = mk_mmd(torch.tensor(s), torch.tensor(t), torch.tensor(bw), "unbiased")
    assert got.item() == pytest.approx(kss + ktt - 2 * kst, rel=1e-9)
    n = 6  # linear-time: quad-tuples over the first even min(ns, nt) rows
    lin = (
        sum(
            _k(s[2 * i], s[2 * i + 1], bw)
            + _k(t[2 * i], t[2 * i + 1], bw)
            - _k(s[2 * i], t[2 * i + 1], bw)
            - _k(s[2 * i + 1], t[2 * i], bw)
            for i in range(n // 2)
        )
        * 2
        / n
    )
    got = mk_mmd(torch.tensor(s), torch.tensor(t), torch.tensor(bw), "linear")
    assert got.item() == pytest.approx(lin, rel=1e-9)
    # default bandwidths: multipliers x mean pairwise squared distance of the pooled rows
    h = np.vstack([s, t])
    mean_sq = np.mean([np.sum((h[i] - h[j]) ** 2) for i in range(13) for j in range(13) if i != j])
    torch.testing.assert_close(
        default_bandwidths(torch.tensor(s), torch.tensor(t), (0.5, 2.0)),
        torch.tensor([0.5 * mean_sq, 2 * mean_sq], dtype=torch.float64),
    )
    # same distribution -> ~0; shifted -> clearly positive
    a, b = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)), torch.randn(200, 2)
    assert abs(mk_mmd(a, b).item()) < 0.02 < mk_mmd(a, b + 2).item()


def test_rkd_losses_match_explicit_loops():
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    n = 5
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def dist(x):
        d = {(i, j): np.linalg.norm(x[i] - x[j]) for i, j in pairs}
        mu = np.mean(list(d.values()))
        return {k: v / mu for k, v in d.items()}

    dt, ds = dist(t), dist(s)
    expected_d = np.mean([huber(dt[p], ds[p]) for p in pairs])
    assert rkd_distance_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(expected_d, rel=1e-9)

    def angle(x, i, j, k):  # cosine of the angle at x_j
        e1, e2 = x[i] - x[j], x[k] - x[j]
        return e1 @ e2 / (np.linalg.norm(e1) * np.linalg.norm(e2))

    triplets = [c for c in itertools.product(range(n), repeat=3) if len(set(c)) == 3]
    expected_a = np.mean([huber(angle(t, *c), angle(s, *c)) for c in triplets])
    assert rkd_angle_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(expected_a, rel=1e-9)
    # the losses vanish for a scaled and rotated copy (relations are preserved)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    moved = torch.tensor(3 * t @ q)
    assert rkd_distance_loss(moved, torch.tensor(t)).item() < 1e-12
    assert rkd_angle_loss(moved, torch.tensor(t)).item() < 1e-12


def test_l2sp_penalty_matches_the_formula():
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]]), "head": torch.tensor([3.0, -1.0])}
    w0 = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.5]])}
    expected = 0.1 / 2 * ((1 + 1) + 1) + 0.01 / 2 * (9 + 1)
    assert l2sp_penalty(w, w0, ["head"], 0.1, 0.01).item() == pytest.approx(expected)


# -- plumbing ------------------------------------------------------------------------------------
def test_to_device_recurses_into_structures():
    P = namedtuple("P", "a b")
    batch = {"x": torch.ones(2), "pair": P(torch.zeros(1), [torch.ones(1), 3]), "name": "s"}
    out = to_device(batch, "cpu")
    assert isinstance(out["pair"], P) and out["pair"].b[1] == 3 and out["name"] == "s"
    torch.testing.assert_close(out["x"], batch["x"])


def test_labelled_subset_is_stratified_and_seeded():
    y = torch.arange(10).repeat_interleave(50)
    idx = labelled_subset(y, 0.02, seed=0)
    assert len(idx) == 10 and set(y[idx].tolist()) == set(range(10))
    torch.testing.assert_close(idx, labelled_subset(y, 0.02, seed=0))
    assert len(labelled_subset(y, 0.0, 0)) == 0


# -- a tiny shifted image pair ---------------------------------------------------------------------
def blob_images(n, shift, seed, size=8, classes=3):
    """Class c: a bright bump at one of ``classes`` positions on a ``size`` x ``size`` image; the target
    domain moves every bump by ``shift`` pixels and dims it (a covariate shift)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    centres = torch.tensor([[2.0, 2.0], [2.0, 5.0], [5.0, 3.5]])[y] + shift + 0.6 * torch.randn(n, 2, generator=g)
    r = torch.arange(size, dtype=torch.float32)
    img = torch.exp(
        -((r[None, :, None] - centres[:, 0, None, None]) ** 2 + (r[None, None, :] - centres[:, 1, None, None]) ** 2) / 2
    )
    scale = 1.0 if shift == 0 else 0.7
    return (scale * img + 0.05 * torch.randn(n, size, size, generator=g)).unsqueeze(1), y


def domain_pair(fraction=0.0):
    xs, ys = blob_images(300, 0.0, 0)
    xt, yt = blob_images(300, 1.0, 1)
    labelled = labelled_subset(yt, fraction, 0) if fraction else None
    test = LabelledSet(*blob_images(300, 1.0, 2))
    return DomainPairSampler(xs, ys, xt, yt, labelled), test


def train_objective(algorithm, sampler, steps=60, batch=32, lr=3e-3):
    torch.manual_seed(0)
    cfg = from_dict(
        {
            "algorithm": algorithm,
            "model": {"name": "digits_cnn", "hidden": 32},
            "data": {"name": "mnist_usps", "image_size": 8},
            "train": {"lr": lr},
        }
    )
    learner = build_learner(cfg, sampler)
    groups = getattr(learner, "param_groups", None)
    opt = make_optimizer(cfg, groups() if groups else learner.parameters())
    g = torch.Generator().manual_seed(0)
    for it in range(steps):
        if hasattr(learner, "set_progress"):
            learner.set_progress(it / steps)
        loss, metrics = learner.meta_loss(sampler.sample_batch(batch, g))
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return learner


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory):
    sampler, test = domain_pair()
    learner = train_objective({"name": "source_only"}, sampler)
    path = tmp_path_factory.mktemp("src") / "source_only.pt"
    ckpt_io.save_atomic({"learner": learner.state_dict(), "config": {}}, path)
    return path, test.evaluate(learner)["mean"]


UNSUPERVISED = [{"name": "dann"}, {"name": "deep_coral"}, {"name": "dan"}, {"name": "dan", "estimator": "linear"}]


@pytest.mark.parametrize("algorithm", UNSUPERVISED, ids=lambda a: "-".join(map(str, a.values())))
def test_unsupervised_methods_learn_the_shifted_target(algorithm, source_checkpoint):
    sampler, test = domain_pair()
    res = test.evaluate(train_objective(algorithm, sampler))
    assert res["metric"] == "accuracy" and res["episodes"] == 300
    assert res["mean"] > 0.6, f"{algorithm}: target accuracy {res['mean']:.2f} (chance 0.33)"


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "finetune"},
        {"name": "l2sp"},
        {"name": "linear_probe"},
        {"name": "finetune", "strategy": "head"},
        {"name": "rkd", "on": "target", "labels": "target"},
    ],
    ids=lambda a: "-".join(map(str, a.values())),
)
def test_methods_from_a_source_model_with_few_target_labels(algorithm, source_checkpoint):
    path, source_acc = source_checkpoint
    sampler, test = domain_pair(fraction=0.05)
    learner = train_objective({**algorithm, "init_checkpoint": str(path)}, sampler, steps=30)
    acc = test.evaluate(learner)["mean"]
    assert acc > 0.6 and acc >= source_acc - 0.1, f"{algorithm}: {source_acc:.2f} -> {acc:.2f}"


def test_freeze_filter_leaves_frozen_parameters_unchanged_and_groups_scale_the_lr(source_checkpoint):
    path, _ = source_checkpoint
    sampler, _ = domain_pair(fraction=0.05)
    algo = {
        "name": "finetune",
        "init_checkpoint": str(path),
        "strategy": "filter",
        "freeze": ["features.0.*"],
        "lr_scales": {"features.*": 0.1},
    }
    cfg = from_dict(
        {
            "algorithm": algo,
            "model": {"name": "digits_cnn", "hidden": 32},
            "data": {"name": "mnist_usps", "image_size": 8},
        }
    )
    learner = build_learner(cfg, sampler)
    before = {k: v.clone() for k, v in learner.model.named_parameters()}
    groups = learner.param_groups()
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    in_groups = {id(p) for g in groups for p in g["params"]}
    names = dict(learner.model.named_parameters())
    assert id(names["features.0.weight"]) not in in_groups and id(names["head.weight"]) in in_groups
    opt = make_optimizer(cfg, groups)
    loss, _ = learner.meta_loss(sampler.sample_batch(16, torch.Generator().manual_seed(0)))
    loss.backward()
    opt.step()
    for name, p in learner.model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (not name.startswith("features.0.")), name
    assert param_groups([("a", torch.zeros(1, requires_grad=True))], {"b*": 2.0})[0]["lr_scale"] == 1.0
    with pytest.raises(ValueError, match="strategy: filter"):
        build_learner(
            from_dict(
                {
                    "algorithm": {"name": "finetune", "freeze": ["x"]},
                    "model": {"name": "digits_cnn"},
                    "data": {"name": "mnist_usps"},
                }
            ),
            sampler,
        )


def test_target_labels_are_needed_where_asked_for():
    sampler, _ = domain_pair()
    learner = train_objective({"name": "finetune"}, sampler, steps=0)
    with pytest.raises(ValueError, match="target_labels_fraction"):
        learner.meta_loss(sampler.sample_batch(4, torch.Generator()))
    assert "target_labelled_x" not in sampler.sample_batch(4, torch.Generator())


# -- end to end through `metatl train` on tiny fake MNIST / USPS files ------------------------------
def _idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_digits(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "usps").mkdir()
    for prefix, n in (("train", 60), ("t10k", 30)):
        _idx(tmp_path / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _idx(tmp_path / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    with h5py.File(tmp_path / "usps" / "usps.h5", "w") as f:
        for split, n in (("train", 50), ("test", 20)):
            f.create_dataset(f"{split}/data", data=rng.random((n, 256)).astype(np.float32))
            f.create_dataset(f"{split}/target", data=(np.arange(n) % 10).astype(np.int32))
    return tmp_path


def test_metatl_train_runs_dann_and_finetune_on_digits_files(fake_digits, tmp_path, capsys):
    raw = {
        "name": "t",
        "algorithm": {"name": "dann"},
        "model": {"name": "digits_cnn", "hidden": 16},
        "data": {"name": "mnist_usps", "direction": "usps->mnist", "image_size": 12},
        "train": {"iterations": 3, "meta_batch": 8, "val_every": 2, "ckpt_every": 2, "log_every": 1},
    }
    cfg = tmp_path / "dann.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", "--data-dir", str(fake_digits)]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in (
        "algorithm",
        "dataset",
        "ways",
        "shots",
        "queries",
        "episodes",
        "metric",
        "inner_steps_test",
        "bn_mode",
        "train_seconds",
        "iterations",
        "seed",
        "metatl_version",
        "torch_version",
    ):
        assert key in res
    assert res["algorithm"] == "dann" and res["episodes"] == 30 and res["setting"] == "usps->mnist"
    assert res["metric"]["name"] == "accuracy" and 0 <= res["metric"]["mean"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in records) and any("lambda" in r for r in records)
    assert "usps->mnist" in capsys.readouterr().out
    # fine-tuning the trained network on 20% of the target labels, then `metatl eval`
    raw["algorithm"] = {"name": "finetune", "init_checkpoint": str(out / "last.pt")}
    raw["model"] = {"name": "digits_cnn", "hidden": 16}
    raw["data"]["target_labels_fraction"] = 0.2
    cfg.write_text(yaml.safe_dump(raw))
    ft = tmp_path / "ft"
    assert main(["train", str(cfg), "--out", str(ft), "--no-progress", "--data-dir", str(fake_digits)]) == 0
    assert json.loads((ft / "results.json").read_text())["target_labels_fraction"] == 0.2
    assert (
        main(
            [
                "eval",
                str(ft / "last.pt"),
                "--out",
                str(tmp_path / "ev"),
                "--no-progress",
                "--data-dir",
                str(fake_digits),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ev" / "eval_last_30ep.json").read_text())["episodes"] == 30
