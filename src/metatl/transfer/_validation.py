"""Input checks shared by every classical transfer estimator.

The convention (as in scikit-learn-compatible domain adaptation, e.g. skada): every sample carries a
domain. ``X`` is ``(n_samples, n_features)``, ``y`` is ``(n_samples,)``, ``sample_domain`` is
``(n_samples,)`` of integers, **positive for source domains and negative for target domains**.
Target labels are *masked*: ``y = -1`` for classification, ``NaN`` for regression.

When ``sample_domain`` is not given it is inferred from the mask: labelled rows are source (``1``),
masked rows are target (``-1``). That keeps every estimator usable in ``Pipeline``,
``cross_val_score`` and ``GridSearchCV`` without metadata routing; with routing enabled
(``sklearn.set_config(enable_metadata_routing=True)``) ``sample_domain`` is requested by default
and routed like any other metadata.

Every error names the fix.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    check_array,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

MASKED_LABEL = -1
SOURCE, TARGET = 1, -1


class TargetLabelLeakWarning(UserWarning):
    """Target labels were passed to a method that must not see them; they were masked and ignored."""


def is_masked(y: np.ndarray, classification: bool = True) -> np.ndarray:
    """Boolean mask of unlabelled rows: ``y == -1`` (classification) or ``NaN``.

    With ``classification=False`` only ``NaN`` is masked: ``-1.0`` is an ordinary regression target.
    """
    y = np.asarray(y)
    if y.dtype.kind == "f":
        return np.isnan(y) | (y == MASKED_LABEL) if classification else np.isnan(y)
    if not classification:
        return np.isnan(y.astype(float))
    if y.dtype.kind in "iub":
        return y == MASKED_LABEL
    return np.array([v is None or v == MASKED_LABEL for v in y.tolist()], dtype=bool)


def mask_labels(y: np.ndarray, mask: np.ndarray, classification: bool = True) -> np.ndarray:
    """Copy of ``y`` with ``mask`` rows set to the masked value: -1 (classification) or NaN (regression).

    String labels are copied to an ``object`` array first, so ``-1`` is stored as is (a ``'<U1'`` array
    would store it as ``'-'``).
    """
    y = np.asarray(y)
    dtype = (object if y.dtype.kind in "USO" else y.dtype) if classification else float
    y = np.array(y, copy=True, dtype=dtype)
    y[mask] = MASKED_LABEL if classification else np.nan
    return y


def check_X(X, *, name: str = "X", estimator=None, reset: bool = True) -> np.ndarray:
    """2-D float array with only finite values, through scikit-learn's own checks.

    Dense input only (sparse input gets scikit-learn's "use X.toarray()" error), real numbers only
    (complex data is refused), at least one row and one feature. With ``estimator``,
    :func:`sklearn.utils.validation.validate_data` also sets (``reset=True``, in ``fit``) or checks
    (``reset=False``, after ``fit``) ``n_features_in_`` and ``feature_names_in_``.
    """
    kw = {"dtype": np.float64, "ensure_all_finite": False}
    if estimator is None:
        X = check_array(X, input_name=name, **kw)
    else:
        try:
            X = validate_data(estimator, X, reset=reset, **kw)
        except ValueError as e:
            if reset or "features as input" not in str(e):
                raise
            raise ValueError(
                f"{e} Source and target must share the same feature space (same columns, same order)."
            ) from None
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ValueError(
            f"{name} contains NaN or infinite values in {bad} row(s); impute them "
            "(e.g. sklearn.impute.SimpleImputer) or drop those rows before calling fit/predict."
        )
    return X


def check_fitted_X(estimator, X) -> np.ndarray:
    """``X`` for ``predict`` / ``transform``: NotFittedError before ``fit``, then :func:`check_X` against
    the fitted ``n_features_in_``."""
    check_is_fitted(estimator)
    return check_X(X, estimator=estimator, reset=False)


def check_domains(
    X,
    y=None,
    sample_domain=None,
    *,
    target_labels: str = "forbid",
    classification: bool = True,
    requires_y: bool = False,
    estimator=None,
    who: str = "estimator",
):
    """Validate ``X, y, sample_domain`` and return them as arrays.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,) or None
        Labels; target rows masked (-1 / NaN) unless ``target_labels='require'``.
    sample_domain : array-like of shape (n_samples,) of int, or None
        Positive = source, negative = target. None: inferred from the label mask.
    target_labels : {'forbid', 'require'}
        'forbid': unsupervised adaptation; labelled target rows trigger a
        :class:`TargetLabelLeakWarning` and are masked. 'require': at least one labelled target row.
    classification : bool
        Whether ``y`` holds class labels (then the source needs two classes); otherwise the
        labelled values must be finite.
    requires_y : bool
        Refuse ``y=None`` (every estimator that learns from labels).
    estimator : estimator or None
        Passed to :func:`check_X`, which sets its ``n_features_in_`` (and ``feature_names_in_``).

    Returns
    -------
    X : ndarray (n, d); y : ndarray (n,) or None; sample_domain : ndarray (n,) of int
    """
    X = check_X(X, estimator=estimator)
    n = X.shape[0]
    if y is None and requires_y:
        raise ValueError(
            f"{who} requires y to be passed, but the target y is None; pass the source labels "
            "(target rows masked as -1, NaN for regression)."
        )
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)  # DataConversionWarning, as in scikit-learn
        if y.shape != (n,):
            raise ValueError(f"y has shape {y.shape}; expected ({n},), one label per row of X.")
    if n < 2:
        raise ValueError(f"{who} got n_samples={n}; it needs at least one source and one target row.")
    if sample_domain is None:
        if y is None:
            raise ValueError(
                f"{who} needs to know which rows are target: pass sample_domain (positive = source, "
                "negative = target) or y with target labels masked as -1 (NaN for regression)."
            )
        if target_labels == "require":
            raise ValueError(
                f"{who} uses labelled target rows, so their domain cannot be inferred from masked labels; "
                "pass sample_domain (positive = source, negative = target)."
            )
        sample_domain = np.where(is_masked(y, classification), TARGET, SOURCE)
    sample_domain = np.asarray(sample_domain)
    if sample_domain.shape != (n,):
        raise ValueError(f"sample_domain has shape {sample_domain.shape}; expected ({n},), one domain per row of X.")
    if sample_domain.dtype.kind not in "iu" and not np.all(sample_domain == np.round(sample_domain)):
        raise ValueError("sample_domain must hold integers: positive for source domains, negative for target.")
    sample_domain = sample_domain.astype(int)
    if np.any(sample_domain == 0):
        raise ValueError("sample_domain contains 0; use positive integers for source and negative for target.")
    source, target = sample_domain > 0, sample_domain < 0
    if not target.any():
        raise ValueError(
            f"{who} got no target samples; add target rows to X with a negative sample_domain "
            "(or with masked labels y=-1), e.g. via metatl.data.domains.to_domain(Xs, ys, Xt)."
        )
    if not source.any():
        raise ValueError(f"{who} got no source samples; source rows need a positive sample_domain.")
    if y is None:
        return X, y, sample_domain
    if is_masked(y[source], classification).any():
        raise ValueError(
            "some source rows have masked labels (-1/NaN); drop them or give them a negative sample_domain."
        )
    labelled_target = target & ~is_masked(y, classification)
    if target_labels == "forbid" and labelled_target.any():
        warnings.warn(
            f"{who} is unsupervised on the target but {int(labelled_target.sum())} target rows carry labels; "
            "they were ignored. Mask them (y=-1, NaN for regression) or check sample_domain, so that "
            "model selection does not leak target labels.",
            TargetLabelLeakWarning,
            stacklevel=3,
        )
        y = mask_labels(y, target, classification)
    if target_labels == "require" and not labelled_target.any():
        raise ValueError(f"{who} needs labelled target rows (negative sample_domain and an unmasked y).")
    if classification:
        check_classification_targets(y[source])
    else:
        labelled = ~is_masked(y, classification=False)
        if not np.isfinite(y[labelled].astype(float)).all():
            raise ValueError(
                "y contains infinite values in labelled rows; drop those rows or mask them (NaN) as target."
            )
    if classification and len(np.unique(y[source])) < 2:
        raise ValueError(
            f"the source has a single class ({np.unique(y[source])[0]!r}); a classifier needs at least two. "
            "Check y and sample_domain (source rows must be positive), or add samples of another class."
        )
    return X, y, sample_domain
