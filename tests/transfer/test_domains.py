"""The X, y, sample_domain convention and the shifted-data generators."""

import numpy as np
import pytest

from metatl.data.domains import (
    make_covariate_shift_regression,
    make_shifted_blobs,
    make_shifted_moons,
    split_domains,
    to_domain,
)


@pytest.mark.parametrize(
    "gen",
    [
        make_shifted_moons,
        make_shifted_blobs,
        make_covariate_shift_regression,
        lambda **kw: make_shifted_blobs(shift="target", **kw),
    ],
)
def test_generators_follow_the_convention(gen):
    X, y, sd, yt = gen(n_source=40, n_target=30, random_state=0, return_target_labels=True)
    assert X.shape[0] == y.shape[0] == sd.shape[0] == 70 and yt.shape == (30,)
    assert (sd[:40] > 0).all() and (sd[40:] < 0).all()
    masked = np.isnan(y[40:]) if y.dtype.kind == "f" else y[40:] == -1
    assert masked.all()
    X2, *_ = gen(n_source=40, n_target=30, random_state=0)
    np.testing.assert_array_equal(X, X2)


def test_covariate_vs_target_shift():
    _, y, sd, yt = make_shifted_blobs(4000, 4000, shift="target", random_state=0, return_target_labels=True)
    assert abs(y[sd > 0].mean() - 0.5) < 0.03 and abs(yt.mean() - 0.8) < 0.03
    _, y, sd, yt = make_shifted_blobs(4000, 4000, shift="covariate", random_state=0, return_target_labels=True)
    assert abs(y[sd > 0].mean() - 0.5) < 0.03 and abs(yt.mean() - 0.5) < 0.03


def test_to_domain_roundtrip():
    Xs, ys, Xt, yt = np.ones((3, 2)), np.array([0, 1, 0]), np.zeros((2, 2)), np.array([1, 1])
    X, y, sd = to_domain(Xs, ys, Xt, yt, mask_target=False)
    for a, b in zip(split_domains(X, y, sd), (Xs, ys, Xt, yt)):
        np.testing.assert_array_equal(a, b)
    assert (to_domain(Xs, ys, Xt, yt)[1][3:] == -1).all()
