"""Transferability scores against their formulas on cases computed by hand, LogME's evidence against
a direct Gaussian computation and a numerical maximisation, and the invariances the papers state."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from metatl.transfer import transferability as tr
from metatl.transfer.transferability import h_score, leep, logme, logme_evidence, nce, score_model

LOG2 = math.log(2)
DATA = Path(os.environ.get("METATL_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")


# --------------------------------------------------------------------------- LEEP and NCE by hand


def test_leep_symmetric_case_by_hand():
    # P(y, z) = [[.375, .125], [.125, .375]], P(z) = [.5, .5], P(y | z) = [[.75, .25], [.25, .75]];
    # each row: .75 * .75 + .25 * .25 = .625
    theta = np.array([[0.75, 0.25], [0.25, 0.75]])
    assert leep(theta, [0, 1]) == pytest.approx(math.log(0.625), abs=1e-12)


def test_leep_asymmetric_case_by_hand():
    # theta = [[.6, .4], [.2, .8], [.5, .5]], y = [0, 1, 1]:
    # P(y=0, z) = [.2, 4/30], P(y=1, z) = [.7/3, 1.3/3]; P(z) = [.4333.., .5666..]
    # P(0 | z) = [6/13, 4/17], P(1 | z) = [7/13, 13/17]
    theta = np.array([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    eep = [0.6 * 6 / 13 + 0.4 * 4 / 17, 0.2 * 7 / 13 + 0.8 * 13 / 17, 0.5 * 7 / 13 + 0.5 * 13 / 17]
    assert leep(theta, [0, 1, 1]) == pytest.approx(np.mean(np.log(eep)), abs=1e-12)


def test_nce_by_hand():
    # z = [0, 0, 1], y = [0, 1, 1]: H(Y | Z) = P(z=0) H(1/2, 1/2) + P(z=1) * 0 = 2/3 log 2
    assert nce([0, 0, 1], [0, 1, 1]) == pytest.approx(-2 / 3 * LOG2, abs=1e-12)
    # z = [0, 0, 0, 1, 1, 1], y = [0, 0, 1, 1, 1, 1]: P(z=0) H(2/3, 1/3) = 1/2 (log 3 - 2/3 log 2)
    expected = -0.5 * (math.log(3) - 2 / 3 * LOG2)
    assert nce([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(expected, abs=1e-12)


def test_nce_extremes():
    # 0 when y is a function of z; -H(Y) when they are independent
    assert nce([0, 1, 2, 2], [5, 7, 9, 9]) == pytest.approx(0.0, abs=1e-12)
    assert nce([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-LOG2, abs=1e-12)


def test_leep_with_one_hot_probabilities_is_nce():
    # the LEEP paper (sec. 4): LEEP >= NCE + 1/n sum_i log theta_{i, z_i}, with equality for one-hot theta
    rng = np.random.default_rng(0)
    z, y = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    assert leep(np.eye(4)[z], y) == pytest.approx(nce(z, y), abs=1e-12)
    logits = rng.normal(size=(50, 4)) * 2
    theta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    z = theta.argmax(1)
    assert leep(theta, y) >= nce(z, y) + np.mean(np.log(theta[np.arange(50), z])) - 1e-12


def test_leep_and_nce_ignore_how_labels_are_named():
    rng = np.random.default_rng(1)
    theta = rng.dirichlet(np.ones(5), size=40)
    y = rng.integers(0, 3, 40)
    perm_z, names = rng.permutation(5), np.array([10, -3, 7])
    assert leep(theta[:, perm_z], names[y]) == pytest.approx(leep(theta, y), abs=1e-12)
    z = theta.argmax(1)
    assert nce(perm_z[z], names[y]) == pytest.approx(nce(z, y), abs=1e-12)


def test_leep_unused_source_label_contributes_nothing():
    theta = np.array([[0.75, 0.25, 0.0], [0.25, 0.75, 0.0]])
    assert leep(theta, [0, 1]) == pytest.approx(math.log(0.625), abs=1e-12)


# --------------------------------------------------------------------------- H-score by hand


def test_h_score_by_hand():
    # f = [0, 2, 4, 6], y = [0, 0, 1, 1]: cov f = 5, class means -2 / +2 (centred), cov E[f|y] = 4
    assert h_score([[0.0], [2.0], [4.0], [6.0]], [0, 0, 1, 1]) == pytest.approx(0.8, abs=1e-12)
    # a second feature of +-1 independent of the class: cov f = [[5, -1], [-1, 1]], its inverse
    # [[1, 1], [1, 5]] / 4, cov E[f|y] = [[4, 0], [0, 0]]: H = 4 / 4 = 1
    f = [[0.0, 1.0], [2.0, -1.0], [4.0, 1.0], [6.0, -1.0]]
    assert h_score(f, [0, 0, 1, 1]) == pytest.approx(1.0, abs=1e-12)


def test_h_score_invariant_to_affine_maps_and_bounded():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    f = rng.normal(size=(200, 6)) + np.eye(4, 6)[y] * 1.5
    a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    h = h_score(f, y)
    assert h_score(f @ a + rng.normal(size=6), y) == pytest.approx(h, rel=1e-8)
    assert 0 < h <= min(6, 4 - 1)


# --------------------------------------------------------------------------- LogME


def direct_log_evidence(f, y, alpha, beta):
    n = len(f)
    return multivariate_normal(np.zeros(n), np.eye(n) / beta + f @ f.T / alpha).logpdf(y)


@pytest.mark.parametrize("n, d", [(30, 5), (12, 20)])  # more rows than features, and fewer
def test_logme_evidence_is_the_gaussian_marginal_at_its_maximum(n, d):
    rng = np.random.default_rng(3)
    f = rng.normal(size=(n, d))
    y = (f[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
    evidence, alpha, beta = logme_evidence(f, y)
    assert evidence == pytest.approx(direct_log_evidence(f, y, alpha, beta), abs=1e-8)
    # a maximum: every nearby (alpha, beta) gives less ...
    for da, db in [(1.1, 1), (0.9, 1), (1, 1.1), (1, 0.9), (1.05, 1.05), (0.95, 0.95)]:
        assert direct_log_evidence(f, y, alpha * da, beta * db) < evidence
    # ... and a general-purpose optimiser over log alpha, log beta finds no higher value
    best = minimize(lambda p: -direct_log_evidence(f, y, *np.exp(p)), x0=[0.0, 0.0], method="Nelder-Mead")
    assert evidence == pytest.approx(-best.fun, abs=1e-5)


def test_logme_is_the_mean_per_row_evidence_over_classes():
    rng = np.random.default_rng(4)
    f, y = rng.normal(size=(25, 4)), rng.integers(0, 3, 25)
    per_class = [logme_evidence(f, (y == k).astype(float))[0] / 25 for k in range(3)]
    assert logme(f, y) == pytest.approx(np.mean(per_class), abs=1e-12)


def test_logme_invariant_to_rotation_scale_and_label_names():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    f = rng.normal(size=(60, 8)) + np.eye(3, 8)[y]
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    score = logme(f, y)
    assert logme(f @ q, y) == pytest.approx(score, abs=1e-8)
    assert logme(7.0 * f, y) == pytest.approx(score, abs=1e-8)
    assert logme(f, np.array([4, 9, 2])[y]) == pytest.approx(score, abs=1e-12)


def test_informative_features_score_higher():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 300)
    noise = rng.normal(size=(300, 8))
    good = noise + 2 * np.eye(3, 8)[y]
    assert logme(good, y) > logme(noise, y)
    assert h_score(good, y) > h_score(noise, y)


# --------------------------------------------------------------------------- errors and models


def test_bad_inputs_say_what_to_pass():
    with pytest.raises(ValueError, match="softmax"):
        leep(np.array([[2.0, -1.0], [0.5, 0.5]]), [0, 1])
    with pytest.raises(ValueError, match="one label per row"):
        logme(np.ones((4, 2)), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        h_score(np.array([[np.nan], [1.0]]), [0, 1])
    with pytest.raises(ValueError, match="non-integer"):
        nce([0, 1], [0.5, 1.0])
    with pytest.raises(ValueError, match="embed"):
        score_model(torch.nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown target domain"):
        tr.target_images("svhn", 5)


def test_score_model_on_a_backbone_with_and_without_head():
    from metatl.nn.backbones import conv4_stride

    torch.manual_seed(0)
    x, y = torch.rand(40, 1, 28, 28), torch.arange(40) % 4
    with_head = score_model(conv4_stride(out_features=5), x, y, batch_size=16)
    assert set(with_head) == {"leep", "nce", "logme", "h_score"}
    assert all(np.isfinite(v) for v in with_head.values())
    headless = score_model(conv4_stride(out_features=0), x, y)
    assert headless["leep"] is None and headless["nce"] is None and np.isfinite(headless["logme"])


def test_logme_of_useless_features_is_the_pure_noise_limit():
    # y = [1, 1, 1, 1] and features orthogonal to it: the evidence grows with alpha towards N(y | 0, 1/beta I)
    f = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    y = np.ones(4)
    evidence, alpha, beta = logme_evidence(f, y)
    assert alpha == math.inf and beta == pytest.approx(1.0)
    assert evidence == pytest.approx(-2 * math.log(2 * math.pi) - 2, abs=1e-12)
    assert direct_log_evidence(f, y, 1e9, beta) == pytest.approx(evidence, abs=1e-6)
    assert direct_log_evidence(f, y, 10.0, beta) < evidence


@pytest.mark.data
@pytest.mark.skipif(
    not (DATA / "mnist").is_dir() or not (DATA / "usps").is_dir(), reason="real digits data not found (METATL_DATA_DIR)"
)
def test_command_line_scores_a_checkpoint(tmp_path, capsys):
    import json

    from metatl.config import load_config
    from metatl.engine.trainer import Trainer

    pytest.importorskip("h5py")
    cfg_text = """
algorithm: {name: source_only}
model: {name: conv4_stride, filters: 8}
data: {name: mnist_usps, direction: "usps->mnist", max_source: 64, max_target: 64}
train: {iterations: 1, meta_batch: 8, val_every: 0, ckpt_every: 1, log_every: 1, num_threads: 1}
"""
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg_text)
    Trainer(load_config(path), tmp_path / "run", progress=False).fit()
    out = tr.main([str(tmp_path / "run" / "last.pt"), "--target", "usps", "--per-class", "3"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 30 and line["leep"] == pytest.approx(out[str(tmp_path / "run" / "last.pt")]["leep"])
