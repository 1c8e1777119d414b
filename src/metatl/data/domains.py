"""Domain-labelled data: the ``X, y, sample_domain`` convention and small shifted-data generators.

Every sample carries a domain: ``sample_domain`` is positive for source domains and negative for
target domains. Target labels are masked (``y = -1`` for classification, ``NaN`` for regression)
unless asked for with ``return_target_labels=True``, in which case the true target labels come
back separately so that they cannot leak into ``fit`` by accident.

Generators (all return ``X, y, sample_domain`` and, optionally, ``y_target_true``):

* :func:`make_shifted_moons` -- two moons; the target is the source rotated by ``angle``.
* :func:`make_shifted_blobs` -- Gaussian blobs with covariate shift (p(x) changes, p(y|x) fixed)
  or target shift (p(y) changes, p(x|y) fixed).
* :func:`make_covariate_shift_regression` -- the classic sinc-like regression where the source
  and target inputs come from different Gaussians (Shimodaira 2000; Sugiyama et al. 2007).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.datasets import make_moons
from sklearn.utils import check_random_state

SOURCE, TARGET = 1, -1
MASKED_LABEL = -1

# (X, y, sample_domain), and the target's true labels with return_target_labels=True
DomainArrays = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def to_domain(
    X_source: ArrayLike,
    y_source: ArrayLike,
    X_target: ArrayLike,
    y_target: ArrayLike | None = None,
    *,
    mask_target: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack source and target arrays into ``X, y, sample_domain``.

    Parameters
    ----------
    X_source : array (n_s, d); y_source : array (n_s,)
    X_target : array (n_t, d); y_target : array (n_t,) or None
        Target labels, kept only when ``mask_target=False`` (supervised transfer, e.g. TrAdaBoost).

    Returns
    -------
    X : (n_s + n_t, d); y : (n_s + n_t,) with target rows masked; sample_domain : (n_s + n_t,) of +1 / -1
    """
    X_source, X_target = np.asarray(X_source, dtype=float), np.asarray(X_target, dtype=float)
    if X_source.ndim != 2 or X_target.ndim != 2:
        raise ValueError("X_source and X_target must be 2-D (n_samples, n_features).")
    if X_source.shape[1] != X_target.shape[1]:
        raise ValueError(
            f"source has {X_source.shape[1]} features and target has {X_target.shape[1]}; "
            "bring them to the same feature space first (same columns in the same order, e.g. resize images)."
        )
    y_source = np.asarray(y_source)
    n_t = len(X_target)
    regression = y_source.dtype.kind == "f"
    if y_target is None or mask_target:
        y_t = np.full(n_t, np.nan if regression else MASKED_LABEL, dtype=float if regression else y_source.dtype)
    else:
        y_t = np.asarray(y_target, dtype=y_source.dtype)
    X = np.vstack([X_source, X_target])
    y = np.concatenate([y_source, y_t])
    sample_domain = np.concatenate([np.full(len(X_source), SOURCE), np.full(n_t, TARGET)])
    return X, y, sample_domain


def split_domains(
    X: ArrayLike, y: ArrayLike, sample_domain: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`to_domain`: ``X_source, y_source, X_target, y_target``."""
    X, y, sample_domain = np.asarray(X), np.asarray(y), np.asarray(sample_domain)
    s = sample_domain > 0
    return X[s], y[s], X[~s], y[~s]


def _finish(Xs, ys, Xt, yt, return_target_labels):
    X, y, sd = to_domain(Xs, ys, Xt)
    return (X, y, sd, yt) if return_target_labels else (X, y, sd)


def make_shifted_moons(
    n_source: int = 100,
    n_target: int = 100,
    *,
    angle: float = np.pi / 6,
    noise: float = 0.1,
    random_state: int | np.random.RandomState | None = None,
    return_target_labels: bool = False,
) -> DomainArrays:
    """Two moons; the target is the source distribution rotated by ``angle`` radians about the centre."""
    rng = check_random_state(random_state)
    Xs, ys = make_moons(n_source, noise=noise, random_state=rng)
    Xt, yt = make_moons(n_target, noise=noise, random_state=rng)
    centre = np.array([0.5, 0.25])
    c, s = np.cos(angle), np.sin(angle)
    Xt = (Xt - centre) @ np.array([[c, -s], [s, c]]).T + centre
    return _finish(Xs, ys, Xt, yt, return_target_labels)


def make_shifted_blobs(
    n_source: int = 100,
    n_target: int = 100,
    *,
    shift: str = "covariate",
    n_features: int = 2,
    noise: float = 1.0,
    random_state: int | np.random.RandomState | None = None,
    return_target_labels: bool = False,
) -> DomainArrays:
    """Binary Gaussian-mixture data with a covariate shift or a target shift.

    Each class is a mixture of two Gaussian blobs (4 blobs in all, with fixed centres). The labelling
    rule p(y|x) is the same in both domains.

    * ``shift='covariate'``: source and target draw from the *same blobs* with different mixture
      weights (the source favours the first blob of each class, the target the second), so p(x)
      changes while p(y|x) stays fixed: the setting of sample-selection bias where KMM and KLIEP apply.
    * ``shift='target'``: class proportions change (source 50/50, target 20/80) while p(x|y) stays fixed.
    """
    rng = check_random_state(random_state)
    centres = np.zeros((4, n_features))
    centres[:, :2] = [[-2.0, 1.5], [1.5, 2.5], [2.0, -1.5], [-1.5, -2.5]]  # class 0: blobs 0,1; class 1: 2,3
    blob_class = np.array([0, 0, 1, 1])
    if shift == "covariate":
        p_source, p_target = [0.4, 0.1, 0.4, 0.1], [0.1, 0.4, 0.1, 0.4]
    elif shift == "target":
        p_source, p_target = [0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.4, 0.4]
    else:
        raise ValueError(f"shift must be 'covariate' or 'target'; got {shift!r}.")

    def draw(n, p):
        blob = rng.choice(4, size=n, p=p)
        return centres[blob] + noise * rng.standard_normal((n, n_features)), blob_class[blob]

    Xs, ys = draw(n_source, p_source)
    Xt, yt = draw(n_target, p_target)
    return _finish(Xs, ys, Xt, yt, return_target_labels)


def make_covariate_shift_regression(
    n_source: int = 100,
    n_target: int = 100,
    *,
    noise: float = 0.1,
    random_state: int | np.random.RandomState | None = None,
    return_target_labels: bool = False,
) -> DomainArrays:
    """1-D regression ``y = sinc(x) + noise`` with ``x_s ~ N(1, 0.5^2)``, ``x_t ~ N(2, 0.3^2)``.

    The setting of Sugiyama, Krauledat and Mueller (2007), section 5: a linear model fitted on the
    source extrapolates badly to the target unless the source is reweighted.
    Masked target labels are ``NaN``.
    """
    rng = check_random_state(random_state)
    xs = rng.normal(1.0, 0.5, size=(n_source, 1))
    xt = rng.normal(2.0, 0.3, size=(n_target, 1))
    f = lambda x: np.sinc(x[:, 0])  # noqa: E731
    ys = f(xs) + noise * rng.standard_normal(n_source)
    yt = f(xt) + noise * rng.standard_normal(n_target)
    return _finish(xs, ys, xt, yt, return_target_labels)
