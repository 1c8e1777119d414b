"""Label-free selection for deep transfer: each scorer against a direct computation, and a network
that fits its source scores above a random one without reading a target label."""

import math

import numpy as np
import pytest
import torch

from metatl.transfer.deep_selection import dev_score, entropy_score, iwv_score, label_free_scores, select, snd_score
from metatl.transfer.selection import dev_risk


def _softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def test_entropy_and_snd_match_loops():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 4)) * 3
    p = [_softmax(r) for r in logits]
    assert entropy_score(logits) == pytest.approx(np.mean([np.sum(q * np.log(q)) for q in p]))
    unit = [q / np.linalg.norm(q) for q in p]
    ents = []
    for j in range(7):
        sims = np.array([unit[j] @ unit[m] / 0.05 for m in range(7) if m != j])
        w = _softmax(sims)
        ents.append(-np.sum(w * np.log(w)))
    assert snd_score(logits) == pytest.approx(np.mean(ents))
    confident = np.eye(4)[rng.integers(0, 4, 50)] * 20
    assert entropy_score(confident) > entropy_score(rng.normal(size=(50, 4)) * 0.1)


def test_iwv_and_dev_match_their_formulas():
    rng = np.random.default_rng(1)
    logits, y, w = rng.normal(size=(30, 3)), rng.integers(0, 3, 30), rng.random(30) + 0.1
    assert iwv_score(logits, y, w) == pytest.approx(np.sum(w * (logits.argmax(1) == y)) / w.sum())
    loss = np.array([-math.log(_softmax(r)[k]) for r, k in zip(logits, y)])
    assert dev_score(logits, y, w) == pytest.approx(-dev_risk(loss, w))


class _Net(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(weight)
            self.lin.bias.zero_()

    def features(self, x):
        return x

    def classify(self, z):
        return self.lin(z)


def test_label_free_scores_prefer_the_network_that_fits_the_source():
    g = torch.Generator().manual_seed(0)
    ys = torch.randint(0, 2, (200,), generator=g)
    xs = torch.randn(200, 2, generator=g) * 0.5 + torch.stack([ys * 2.0 - 1, torch.zeros(200)], 1)
    xt = (
        torch.randn(200, 2, generator=g) * 0.5
        + torch.tensor([0.3, 0.0])
        + torch.stack([torch.randint(0, 2, (200,), generator=g) * 2.0 - 1, torch.zeros(200)], 1)
    )
    good, bad = _Net(torch.tensor([[-4.0, 0.0], [4.0, 0.0]])), _Net(torch.tensor([[4.0, 0.0], [-4.0, 0.0]]))
    cands = [{"name": n, "scores": label_free_scores(net, xs, ys, xt)} for n, net in (("bad", bad), ("good", good))]
    assert select(cands, "iwv")["name"] == "good" and select(cands, "dev")["name"] == "good"
    with pytest.raises(ValueError, match="unknown scorer"):
        label_free_scores(good, xs, ys, xt, scorers=("accuracy",))
