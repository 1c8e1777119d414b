"""Transferability scores: how well a pretrained source model suits a labelled target task, computed
from one forward pass over the target data, before any fine-tuning.

Each score is a pure function of NumPy arrays; higher means "predicted to transfer better".

| score | takes | reference |
|---|---|---|
| :func:`leep` | the source model's predicted source-label probabilities ``theta (n, C_s)`` and target labels | Nguyen, Hassner, Seeger, Archambeau, ICML 2020 |
| :func:`nce` | source labels ``z (n,)`` (e.g. ``theta.argmax(1)``) and target labels | Tran, Nguyen, Hassner, ICCV 2019 |
| :func:`logme` | features ``f (n, D)`` and target labels | You, Liu, Wang, Long, ICML 2021 |
| :func:`h_score` | features ``f (n, D)`` and target labels | Bao, Li, Huang, Zheng et al., ICIP 2019 |

Target labels are integers ``(n,)``; any values (they are only compared for equality). LEEP and NCE
need a classifier head on the source model (the source labels); LogME and H-score need features only,
so a metric-based learner without head (ProtoNet) is scored by those two only.

:func:`score_model` and :func:`score_checkpoint` compute all four for a backbone with ``embed``
(features) and ``head`` (source-label logits); ``python -m metatl.transfer CKPT --target mnist``
does it for checkpoints on a digits data set (MNIST, USPS, scikit-learn digits).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # torch is imported where it is used
    from torch import Tensor, nn

__all__ = ["h_score", "leep", "logme", "logme_evidence", "nce", "score_checkpoint", "score_model"]


def _labels(target_labels, n: int, name: str = "target_labels") -> tuple[np.ndarray, int]:
    """``target_labels`` as codes ``0..C-1`` (in sorted order of the values) and ``C``."""
    y = np.asarray(target_labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(
            f"{name} must be one label per row, shape ({n},); got shape {y.shape}. Pass integer class labels, "
            f"not one-hot rows."
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} holds non-integer values; pass integer class labels.")
    values, codes = np.unique(y, return_inverse=True)
    return codes.reshape(-1), len(values)


def _two_d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"{name} must be a (n, d) array with n >= 2 rows; got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinite values; check the model's outputs on this data.")
    return a


def leep(source_probs: ArrayLike, target_labels: ArrayLike) -> float:
    """Log Expected Empirical Prediction (Nguyen et al., "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020, eq. 1-2).

    With ``theta = source_probs`` (n, C_s), rows the source model's distributions over its own labels
    ``z`` on the target inputs, and target labels ``y``:

        P(y, z) = 1/n sum_{i: y_i = y} theta_iz,    P(y | z) = P(y, z) / sum_y' P(y', z),
        LEEP = 1/n sum_i log sum_z P(y_i | z) theta_iz.

    A source label no row gives any probability (``P(z) = 0``) contributes nothing. LEEP <= 0; it is
    the average log-likelihood of the "expected empirical predictor" that maps source to target labels.
    """
    theta = _two_d(source_probs, "source_probs")
    if np.any(theta < 0) or not np.allclose(theta.sum(1), 1.0, atol=1e-4):
        raise ValueError(
            "source_probs must be probabilities (non-negative rows summing to 1); apply softmax to the "
            "source model's logits first."
        )
    y, n_classes = _labels(target_labels, len(theta))
    n = len(theta)
    joint = np.zeros((n_classes, theta.shape[1]))
    np.add.at(joint, y, theta / n)  # P(y, z)
    pz = joint.sum(0, keepdims=True)
    conditional = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P(y | z)
    eep = np.einsum("iz,iz->i", theta, conditional[y])  # sum_z P(y_i | z) theta_iz
    return float(np.mean(np.log(eep)))


def nce(source_labels: ArrayLike, target_labels: ArrayLike) -> float:
    """Negative Conditional Entropy (Tran, Nguyen, Hassner, "Transferability and Hardness of
    Supervised Classification Tasks", ICCV 2019): ``NCE = -H(Y | Z)`` from the empirical joint
    distribution of the source labels ``z`` (e.g. the source model's predicted labels on the target
    inputs) and the target labels ``y``:

        P(y, z) = #{i: y_i = y, z_i = z} / n,   NCE = sum_{y,z} P(y, z) log (P(y, z) / P(z)).

    ``NCE <= 0``, with 0 exactly when ``y`` is a function of ``z``, and ``-H(Y)`` when the two are
    independent.
    """
    z, _ = _labels(source_labels, len(np.asarray(source_labels).reshape(-1)), "source_labels")
    y, n_classes = _labels(target_labels, len(z))
    joint = np.zeros((n_classes, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0 / len(z))
    pz = np.broadcast_to(joint.sum(0, keepdims=True), joint.shape)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / pz[nz])))


def h_score(features: ArrayLike, target_labels: ArrayLike, rcond: float = 1e-10) -> float:
    """H-score (Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
    Learning", ICIP 2019, eq. 2):

        H(f) = tr( cov(f(X))^+  cov(E[f(X) | Y]) ),

    the covariances estimated over the ``n`` rows (divided by ``n``), ``E[f | Y]`` the mean feature of
    each row's class, ``^+`` the pseudo-inverse (singular values below ``rcond`` times the largest
    dropped: features of a small target set are often rank-deficient). It is Fisher's discriminant
    ratio of the features, unchanged by any invertible affine map of them, between 0 and
    ``min(D, C - 1)``.
    """
    f = _two_d(features, "features")
    y, n_classes = _labels(target_labels, len(f))
    f = f - f.mean(0)
    cov_f = f.T @ f / len(f)
    means = np.zeros((n_classes, f.shape[1]))
    np.add.at(means, y, f)
    means /= np.bincount(y, minlength=n_classes)[:, None]
    g = means[y]  # E[f | y_i] for every row
    cov_g = g.T @ g / len(f)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=rcond, hermitian=True) @ cov_g))


def _evidence_terms(s2: np.ndarray, x2: np.ndarray, rest: float, n: int, d: int, alpha: float, beta: float):
    """``(log evidence, gamma, ||m||^2, ||y - F m||^2)`` at ``alpha, beta`` from the squared singular
    values ``s2`` of ``F``, the squared coordinates ``x2`` of ``y`` on its left singular vectors and
    ``rest = ||y||^2 - sum x2`` (the part of ``y`` outside the column space of ``F``)."""
    t = alpha / beta
    gamma = float(np.sum(s2 / (s2 + t)))
    m2 = float(np.sum(s2 * x2 / (s2 + t) ** 2))
    res2 = float(np.sum(x2 * (t / (s2 + t)) ** 2) + rest)
    # log |A| with A = alpha I_D + beta F^T F: the k non-zero directions plus D - k directions of alpha
    logdet = float(np.sum(np.log(alpha + beta * s2)) + (d - len(s2)) * math.log(alpha))
    evidence = (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - logdet / 2
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * math.log(2 * math.pi)
    )
    return evidence, gamma, m2, res2


def _svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    return u, s**2


def logme_evidence(
    features: ArrayLike,
    target: ArrayLike,
    tol: float = 1e-10,
    max_iter: int = 1000,
    _svd_of_features: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, float, float]:
    """The maximum log evidence of Bayesian linear regression of one target vector ``target (n,)``
    on ``features F (n, D)`` (You et al., "LogME: Practical Assessment of Pre-trained Models for
    Transfer Learning", ICML 2021, eq. 2 and Algorithm 1):

        y = F w + e,  w ~ N(0, alpha^-1 I_D),  e ~ N(0, beta^-1 I_n),
        log p(y | F, alpha, beta) = log N(y | 0, beta^-1 I_n + alpha^-1 F F^T)
          = D/2 log alpha + n/2 log beta - 1/2 log|A| - beta/2 ||y - F m||^2 - alpha/2 ||m||^2 - n/2 log 2 pi,
        A = alpha I + beta F^T F,  m = beta A^-1 F^T y,

    maximised over ``alpha, beta`` by MacKay's fixed point (the paper's Algorithm 1, computed on the
    SVD of ``F`` as in the authors' ``thuml/LogME``): ``gamma = sum_j beta s_j^2 / (alpha + beta s_j^2)``,
    ``alpha <- gamma / ||m||^2``, ``beta <- (n - gamma) / ||y - F m||^2``, until ``alpha / beta``
    changes by less than ``tol`` (relative). Unlike the reference code, no 1e-5 is added to the
    denominators and ``log|A|`` counts the ``D - rank(F)`` directions where ``A`` is ``alpha``, so the
    value is the exact evidence at the returned optimum.

    Where the features explain nothing of ``y``, the evidence increases towards ``alpha = inf``
    (``w = 0``); the limit, ``log N(y | 0, beta^-1 I)`` with ``beta = n / ||y||^2``, is returned with
    ``alpha = inf`` (the reference code stops at a large finite alpha instead).

    Returns ``(log evidence (total, not divided by n), alpha, beta)``.
    """
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if _svd_of_features is None:
        f = _two_d(features, "features")
        u, s2 = _svd(f)
    else:
        f, (u, s2) = features, _svd_of_features
    n, d = f.shape
    if len(y) != n:
        raise ValueError(f"target has {len(y)} values for {n} feature rows.")
    x = u.T @ y
    x2 = x**2
    rest = max(float(y @ y - x2.sum()), 0.0)
    yy = float(y @ y)
    if yy == 0 or not np.any(s2 > 0):
        raise ValueError(
            "LogME is undefined for a target of zeros or features of zeros; check that every class has rows "
            "and that the model's features are not all zero."
        )
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        _, gamma, m2, res2 = _evidence_terms(s2, x2, rest, n, d, alpha, beta)
        if alpha / beta > 1e12 * s2.max() or m2 <= 0:
            # the features explain nothing of y: the evidence grows as alpha -> infinity (w = 0), towards
            # that of pure noise, N(y | 0, beta^-1 I) with beta = n / ||y||^2
            beta = n / yy
            return n / 2 * math.log(beta) - beta / 2 * yy - n / 2 * math.log(2 * math.pi), math.inf, beta
        new_alpha, new_beta = gamma / m2, (n - gamma) / res2
        converged = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    evidence = _evidence_terms(s2, x2, rest, n, d, alpha, beta)[0]
    if not math.isfinite(evidence):
        raise ValueError(
            "LogME's fixed point did not converge (the features fit the target exactly?); use more target rows "
            "than feature dimensions."
        )
    return evidence, alpha, beta


def logme(features: ArrayLike, target_labels: ArrayLike) -> float:
    """LogME (You et al., ICML 2021): the maximum log evidence (:func:`logme_evidence`) of each
    class's one-hot indicator ``y_k = [y == k]`` regressed on the features, divided by ``n`` and
    averaged over the ``C`` classes:

        LogME = 1/C sum_k max_{alpha, beta} log p(y_k | F, alpha, beta) / n.

    The features are used as they are (no centring, no bias), as in the paper. It does not change when
    the features are rotated (``F Q``, ``Q`` orthogonal) or scaled (``c F``: ``alpha`` absorbs ``c``)."""
    f = _two_d(features, "features")
    y, n_classes = _labels(target_labels, len(f))
    decomposition = _svd(f)
    evidences = [
        logme_evidence(f, (y == k).astype(np.float64), _svd_of_features=decomposition)[0] for k in range(n_classes)
    ]
    return float(np.mean(evidences) / len(f))


# --------------------------------------------------------------------------- models and checkpoints


def model_outputs(model: nn.Module, x: Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
    """``(features (n, D), source probabilities (n, C_s) or None)`` of a backbone with ``embed``
    (features) and ``head`` (logits over its source labels; ``None`` when the head is an identity, as
    for metric-based learners) on images ``x``, in eval mode, in batches of ``batch_size``."""
    import torch

    if not hasattr(model, "embed"):
        raise ValueError(
            f"{type(model).__name__} has no embed(); transferability scores need a backbone with embed() "
            f"(features) and head (source logits), e.g. digits_cnn, conv4_stride, conv4_pool."
        )
    head = getattr(model, "head", None)
    has_head = head is not None and not isinstance(head, torch.nn.Identity)
    was_training = model.training
    model.eval()
    feats, probs = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                z = model.embed(x[i : i + batch_size])
                feats.append(z.double().cpu())
                if has_head:
                    probs.append(torch.softmax(head(z).double(), -1).cpu())
    finally:
        model.train(was_training)
    features = torch.cat(feats).numpy()
    return features, (torch.cat(probs).numpy() if has_head else None)


def score_model(model: nn.Module, x: Tensor, y: ArrayLike, batch_size: int = 500) -> dict[str, float | None]:
    """The four scores of ``model`` (see :func:`model_outputs`) on target images ``x`` with labels
    ``y``: ``{"leep", "nce", "logme", "h_score"}``; ``leep`` and ``nce`` are ``None`` without a head."""
    features, probs = model_outputs(model, x, batch_size)
    labels = np.asarray(y.cpu() if hasattr(y, "cpu") else y)
    return {
        "leep": leep(probs, labels) if probs is not None else None,
        "nce": nce(probs.argmax(1), labels) if probs is not None else None,
        "logme": logme(features, labels),
        "h_score": h_score(features, labels),
    }


def score_checkpoint(
    checkpoint: str | os.PathLike, x: Tensor, y: ArrayLike, batch_size: int = 500
) -> dict[str, float | None]:
    """:func:`score_model` for the model stored in a metatl checkpoint (``last.pt``, ``best.pt``);
    ``x`` must be in the format the model was trained on (channels, size, value range)."""
    from ..build import load_learner

    return score_model(load_learner(checkpoint).model, x, y, batch_size)


def target_images(
    domain: str, per_class: int | None, split: str = "train", seed: int = 0, standardize: bool = False
) -> tuple[Tensor, Tensor]:
    """``(x (n, 1, 28, 28) float32 tensor, y (n,))``: ``per_class`` random rows of each class of a
    digits domain (``mnist``, ``usps``, ``sklearn_digits``; all rows when ``None``), values in [0, 1]
    with ink high (as metatl's Omniglot), or standardized by the domain's training mean and std."""
    import torch

    from ..data.digits import LOADERS, _domain, domain_statistics

    if domain not in LOADERS:
        raise ValueError(f"unknown target domain {domain!r}; use one of {', '.join(LOADERS)}.")
    x, y = _domain(domain, split, 28, None)
    if per_class is not None:
        g = torch.Generator().manual_seed(seed)
        rows = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
        if min(len(r) for r in rows) < per_class:
            raise ValueError(f"{domain} {split} has fewer than {per_class} rows in some class; ask for fewer.")
        pick = torch.sort(torch.cat([r[torch.randperm(len(r), generator=g)[:per_class]] for r in rows])).values
        x, y = x[pick], y[pick]
    if standardize:
        mean, std = domain_statistics(_domain(domain, "train", 28, None)[0])
        x = (x - mean) / std
    return x, y


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    """``python -m metatl.transfer CKPT [CKPT ...] --target mnist --per-class 50``:
    the four scores of each checkpoint on a digits target set, printed as JSON lines."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m metatl.transfer", description=main.__doc__)
    p.add_argument("checkpoints", nargs="+", help="metatl checkpoints (last.pt, best.pt)")
    p.add_argument("--target", default="mnist", help="mnist, usps or sklearn_digits")
    p.add_argument("--split", default="train", help="train (default) or test")
    p.add_argument("--per-class", type=int, default=None, help="labelled rows per class (default: all)")
    p.add_argument("--seed", type=int, default=0, help="which rows --per-class draws")
    p.add_argument(
        "--standardize", action="store_true", help="standardize by the domain's mean and std (data.standardize)"
    )
    args = p.parse_args(argv)
    x, y = target_images(args.target, args.per_class, args.split, args.seed, args.standardize)
    out = {}
    for ckpt in args.checkpoints:
        out[ckpt] = score_checkpoint(ckpt, x, y)
        print(json.dumps({"checkpoint": ckpt, "target": args.target, "n": len(y), **out[ckpt]}))
    return out
