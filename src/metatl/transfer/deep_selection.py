r"""Label-free model selection for deep transfer: score a trained network without target labels.

A user choosing DANN's, Deep CORAL's or DAN's regularization weight has labelled source rows the
network did not train on (``source_x, source_y``: the held-out source split) and unlabelled target
rows (``target_x``); no target label. Each scorer maps these to a number, greater is better, and the
grid point with the greatest score is chosen (:func:`select`). What they compute, for the network's
features :math:`z` and class probabilities :math:`p`:

* ``iwv`` -- importance-weighted validation (Sugiyama, Krauledat and Mueller, JMLR 2007):
  :math:`\sum_i w_i [\hat y_i = y_i] / \sum_i w_i` over the source rows, with the density ratio
  :math:`w(z) = \frac{n_s}{n_t} \frac{P(t \mid z)}{P(s \mid z)}` from a logistic-regression domain
  classifier on the features (:func:`metatl.transfer.selection.domain_classifier_weights`).
* ``dev`` -- deep embedded validation (You, Wang, Long and Jordan, ICML 2019): the same weights, the
  source cross-entropy :math:`\ell_i`, :math:`L_i = w_i \ell_i`,
  :math:`\eta = -\widehat{\mathrm{Cov}}(L, w)/\widehat{\mathrm{Var}}(w)`,
  :math:`R = \bar L + \eta \bar w - \eta`; the score is :math:`-R`
  (:func:`metatl.transfer.selection.dev_risk`).
* ``entropy`` -- minus the mean prediction entropy on the target,
  :math:`\frac1{n_t}\sum_j \sum_k p_{jk} \log p_{jk}` (Morerio, Cavazza and Murino, ICLR 2018).
* ``snd`` -- soft neighbourhood density (Saito, Kim, Teterwak, Sclaroff, Darrell and Saenko, ICCV
  2021): L2-normalise the target probabilities, :math:`S_{jl} = \langle \bar p_j, \bar p_l \rangle`
  for :math:`l \ne j`, :math:`P_j = \mathrm{softmax}_l(S_{jl} / \tau)` with :math:`\tau = 0.05`;
  the score is the mean entropy of :math:`P_j` (dense neighbourhoods score high).

Reverse validation (:class:`~metatl.transfer.selection.ReverseValidationScorer`) would retrain the
network once per grid point; it is left to the classical estimators, where a refit is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor, nn

from .selection import dev_risk, domain_classifier_weights

SCORERS = ("iwv", "dev", "entropy", "snd")


@torch.no_grad()
def features_and_logits(learner: nn.Module, x: Tensor, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, d), logits (n, k))`` of a deep transfer learner (``features`` / ``classify``)
    in eval mode, as float64 numpy arrays."""
    was_training = learner.training
    learner.eval()
    try:
        device = next(learner.parameters()).device
        zs, ls = [], []
        for i in range(0, len(x), batch_size):
            z = learner.features(x[i : i + batch_size].to(device))
            zs.append(z.double().cpu())
            ls.append(learner.classify(z).double().cpu())
    finally:
        learner.train(was_training)
    return torch.cat(zs).numpy(), torch.cat(ls).numpy()


def _domain_weights(zs: np.ndarray, zt: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return domain_classifier_weights(zs, zt, make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return F.log_softmax(torch.as_tensor(logits), dim=1).numpy()


def iwv_score(source_logits: ArrayLike, source_y: ArrayLike, weights: ArrayLike) -> float:
    """Importance-weighted source accuracy."""
    correct = (np.asarray(source_logits).argmax(1) == np.asarray(source_y)).astype(float)
    return float(np.sum(weights * correct) / np.sum(weights))


def dev_score(source_logits: ArrayLike, source_y: ArrayLike, weights: ArrayLike) -> float:
    """``-R_DEV`` with the cross-entropy of the source rows."""
    logp = _log_softmax(source_logits)
    loss = -logp[np.arange(len(source_y)), np.asarray(source_y)]
    return float(-dev_risk(loss, np.asarray(weights)))


def entropy_score(target_logits: ArrayLike) -> float:
    """Minus the mean prediction entropy on the target rows."""
    logp = _log_softmax(target_logits)
    return float(np.mean(np.sum(np.exp(logp) * logp, axis=1)))


def snd_score(target_logits: ArrayLike, temperature: float = 0.05) -> float:
    """Soft neighbourhood density of the target predictions (Saito et al. 2021)."""
    p = np.exp(_log_softmax(target_logits))
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    sim = torch.as_tensor(p @ p.T / temperature)
    sim.fill_diagonal_(-float("inf"))
    logq = F.log_softmax(sim, dim=1)
    q = logq.exp()
    return float(-(q * logq.nan_to_num(neginf=0.0)).sum(1).mean())


def label_free_scores(
    learner: nn.Module, source_x: Tensor, source_y: Tensor, target_x: Tensor, scorers: Sequence[str] = SCORERS
) -> dict[str, float]:
    """Every scorer in ``scorers`` for ``learner`` on held-out labelled source rows and unlabelled
    target rows (see the module docstring); no target label is read."""
    unknown = set(scorers) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown scorer(s) {sorted(unknown)}; use some of {', '.join(SCORERS)}.")
    zs, ls = features_and_logits(learner, source_x)
    zt, lt = features_and_logits(learner, target_x)
    ys = np.asarray(source_y)
    out = {}
    if {"iwv", "dev"} & set(scorers):
        w = _domain_weights(zs, zt)
        if "iwv" in scorers:
            out["iwv"] = iwv_score(ls, ys, w)
        if "dev" in scorers:
            out["dev"] = dev_score(ls, ys, w)
    if "entropy" in scorers:
        out["entropy"] = entropy_score(lt)
    if "snd" in scorers:
        out["snd"] = snd_score(lt)
    return out


def select(candidates: Sequence[dict], scorer: str) -> dict:
    """The candidate (a dict with ``scores``) whose ``scores[scorer]`` is greatest; the first on ties."""
    if not candidates:
        raise ValueError("select needs at least one candidate.")
    return max(candidates, key=lambda c: c["scores"][scorer])
