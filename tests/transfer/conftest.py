"""Shared fixtures: small shifted problems in the ``X, y, sample_domain`` convention."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("metatl") is None:  # not installed yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from metatl.data.domains import make_covariate_shift_regression, make_shifted_blobs  # noqa: E402

# how each registered estimator is fed: unsupervised (masked target) or supervised (labelled target)
SUPERVISED = {"tradaboost", "transfer_logistic", "transfer_ridge"}
REGRESSION = {"transfer_ridge"}


def problem(name, random_state=0, n=60):
    """``X, y, sample_domain`` suited to the registered estimator ``name``."""
    if name in REGRESSION:
        X, y, sd, yt = make_covariate_shift_regression(n, n, random_state=random_state, return_target_labels=True)
    else:
        X, y, sd, yt = make_shifted_blobs(n, n, random_state=random_state, return_target_labels=True)
    if name in SUPERVISED:  # reveal half of the target labels
        y = y.copy()
        t = np.flatnonzero(sd < 0)[: n // 2]
        y[t] = yt[: n // 2]
    return X, y, sd


@pytest.fixture
def blobs():
    return make_shifted_blobs(100, 100, random_state=0, return_target_labels=True)


@pytest.fixture
def make_problem():
    return problem
