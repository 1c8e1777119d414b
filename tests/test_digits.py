"""MNIST / USPS loaders, data-dir resolution and the small download helper."""

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("metatl") is None:  # not installed yet: use the source tree
    sys.path.insert(0, str(REPO / "src"))

from metatl.data import digits  # noqa: E402
from metatl.data.digits import load_digits_domains, load_mnist, load_usps, resize_images  # noqa: E402

DATA = Path(os.environ.get("METATL_DATA_DIR") or REPO.parent / "shared" / "data")
needs_data = pytest.mark.skipif(
    not (DATA / "mnist").is_dir() or not (DATA / "usps").is_dir(),
    reason="real digits data not found (set METATL_DATA_DIR)",
)


def test_resize_keeps_constants_and_range():
    imgs = np.random.default_rng(0).random((3, 16, 16))
    up, down = resize_images(imgs, 28), resize_images(imgs, 8)
    assert up.shape == (3, 28, 28) and down.shape == (3, 8, 8)
    np.testing.assert_allclose(resize_images(np.full((1, 16, 16), 0.3), 28), 0.3, atol=1e-6)
    np.testing.assert_allclose(down.mean(axis=(1, 2)), imgs.mean(axis=(1, 2)), atol=1e-6)  # area averaging
    assert up.min() >= imgs.min() - 1e-6 and up.max() <= imgs.max() + 1e-6


def test_download_checks_sha256_and_renames_atomically(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"digits" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "file.bin"
    assert digits.download([src.as_uri()], dest, (good,)) == dest
    assert dest.read_bytes() == src.read_bytes() and not dest.with_name("file.bin.part").exists()
    with pytest.raises(ValueError, match="not an accepted checksum"):
        digits.download([src.as_uri()], tmp_path / "other.bin", ("0" * 64,))
    assert not (tmp_path / "other.bin").exists()


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="METATL_DATA_DIR.*download=True"):
        load_mnist("test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no official download"):
        load_usps("test", data_dir=tmp_path)


@needs_data
def test_shared_files_match_the_accepted_checksums():
    for rel, accepted in digits.CHECKSUMS.items():
        if (DATA / rel).exists():
            assert digits.verify(DATA / rel, accepted), rel


@needs_data
def test_mnist_test_split():
    X, y = load_mnist("test", data_dir=DATA)
    assert X.shape == (10000, 784) and X.dtype == np.float32 and 0 <= X.min() and X.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


@needs_data
def test_usps_h5_and_libsvm_agree():
    X, y = load_usps("train", data_dir=DATA)
    assert X.shape == (7291, 256)
    np.testing.assert_array_equal(np.bincount(y), [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644])
    Xh, yh = load_usps("test", size=28, data_dir=DATA)
    Xl, yl = load_usps("test", size=28, data_dir=DATA, fmt="libsvm")
    assert Xh.shape == Xl.shape == (2007, 784)
    np.testing.assert_array_equal(yh, yl)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(Xh[:200], Xl[:200])]
    assert np.median(corr) > 0.9


@needs_data
def test_mnist_to_usps_domains():
    X, y, sd, yt = load_digits_domains(
        "usps", "mnist", size=16, n_source=300, n_target=200, split="test", data_dir=DATA
    )
    assert X.shape == (500, 256) and (sd > 0).sum() == 300 and (y[sd < 0] == -1).all() and yt.shape == (200,)


# -- frames, standardization, protocols, the third domain ---------------------------------------
from metatl.config import from_dict  # noqa: E402
from metatl.data.digits import (  # noqa: E402
    DIRECTIONS,
    digits_adaptation,
    digits_splits,
    frame_sklearn_digits,
    frame_usps,
    holdout_split,
    load_sklearn_digits,
)


def _ink_box(img, thr=0.5):
    rows, cols = np.nonzero(img > thr)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_usps_pad_keeps_the_digit_16_px_tall_and_stretch_fills_the_frame():
    img = np.ones((1, 16, 16))  # a digit that fills its 16x16 box, as USPS digits do
    pad, stretch = frame_usps(img, 28, "pad")[0], frame_usps(img, 28, "stretch")[0]
    assert pad.shape == stretch.shape == (28, 28)
    assert _ink_box(pad) == (6, 21, 6, 21)  # 6 px of background on every side
    assert pad[:6].max() == 0 and pad[:, 22:].max() == 0
    assert _ink_box(stretch) == (0, 27, 0, 27)
    np.testing.assert_array_equal(frame_usps(np.eye(16)[None], 28, "pad")[0, 6:22, 6:22], np.eye(16))
    assert frame_usps(img, 14, "pad").shape == (1, 14, 14)
    with pytest.raises(ValueError, match="pad, stretch"):
        frame_usps(img, 28, "crop")


def test_sklearn_digits_are_upsampled_to_20_px_and_padded_to_28():
    framed = frame_sklearn_digits(np.ones((2, 8, 8)), 28)
    assert framed.shape == (2, 28, 28) and _ink_box(framed[0]) == (4, 23, 4, 23)
    X, y = load_sklearn_digits("train")
    Xt, yt = load_sklearn_digits("test")
    assert X.shape == (1198, 784) and Xt.shape == (599, 784) and X.dtype == np.float32
    assert 0 <= X.min() and X.max() <= 1 and set(np.unique(y)) == set(range(10))
    assert np.abs(np.bincount(y) / len(y) - np.bincount(yt) / len(yt)).max() < 0.01  # stratified
    rows = lambda A: {a.tobytes() for a in A}  # noqa: E731
    assert not rows(X) & rows(Xt)


def test_six_directions():
    assert len(DIRECTIONS) == 6 and "usps->sklearn_digits" in DIRECTIONS and "mnist->mnist" not in DIRECTIONS


def test_holdout_split_is_disjoint_and_covers_every_row():
    keep, held = holdout_split(1000, 0.2, 3)
    assert len(held) == 200 and len(keep) == 800
    assert set(keep.tolist()).isdisjoint(held.tolist()) and set(keep.tolist()) | set(held.tolist()) == set(range(1000))
    assert holdout_split(1000, 0.2, 3)[1].tolist() == held.tolist() != holdout_split(1000, 0.2, 4)[1].tolist()
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_split(10, 1.0, 0)


def _cfg(**data):
    return from_dict(
        {"algorithm": {"name": "source_only"}, "model": {"name": "digits_cnn"}, "data": {"name": "mnist_usps", **data}}
    ).data


@pytest.fixture
def tiny_digits(tmp_path):
    """Fake MNIST / USPS files: 40 / 20 MNIST and 50 / 20 USPS rows."""
    import gzip

    import h5py

    rng = np.random.default_rng(0)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "usps").mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        for kind, magic, arr in (
            ("images-idx3", 2051, rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", 2049, np.arange(n) % 10),
        ):
            header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            with gzip.open(tmp_path / "mnist" / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.astype(np.uint8).tobytes())
    with h5py.File(tmp_path / "usps" / "usps.h5", "w") as f:
        for split, n in (("train", 50), ("test", 20)):
            f.create_dataset(f"{split}/data", data=rng.random((n, 256)).astype(np.float32))
            f.create_dataset(f"{split}/target", data=(np.arange(n) % 10).astype(np.int32))
    return tmp_path


def test_standardize_domain_gives_each_training_domain_zero_mean_unit_std(tiny_digits):
    cfg = _cfg(direction="usps->mnist", data_dir=str(tiny_digits), standardize="domain")
    parts = digits_splits(cfg)
    for key in ("source_train", "target_train"):
        x = parts[key][0]
        assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4, key
    raw = digits_splits(_cfg(direction="usps->mnist", data_dir=str(tiny_digits)))
    assert raw["source_train"][0].min() >= 0 and raw["source_train"][0].max() <= 1
    # the test rows use the training statistics of their own domain
    mean, std = float(raw["target_train"][0].mean()), float(raw["target_train"][0].std())
    torch_close = np.testing.assert_allclose
    torch_close(parts["target_test"][0].numpy(), ((raw["target_test"][0] - mean) / std).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="standardize"):
        digits_splits(_cfg(direction="usps->mnist", data_dir=str(tiny_digits), standardize="global"))


def test_holdout_protocol_scores_on_held_out_target_training_rows(tiny_digits):
    cfg = _cfg(direction="mnist->usps", data_dir=str(tiny_digits), test_protocol="holdout")
    parts = digits_splits(cfg)
    train, test = parts["target_train"][0], parts["target_test"][0]
    assert len(train) == 40 and len(test) == 10  # 80 / 20 of the 50 USPS training rows
    rows = lambda A: {a.numpy().tobytes() for a in A}  # noqa: E731
    assert not rows(train) & rows(test)
    assert len(digits_adaptation(cfg, "test").x) == 10
    official = digits_adaptation(_cfg(direction="mnist->usps", data_dir=str(tiny_digits)), "test")
    assert len(official.x) == 20 and "usps test" in official.record["eval_set"]


def test_usps_frame_option_reaches_the_images(tiny_digits):
    pad = digits_splits(_cfg(direction="mnist->usps", data_dir=str(tiny_digits)))["target_train"][0]
    stretch = digits_splits(_cfg(direction="mnist->usps", data_dir=str(tiny_digits), usps_frame="stretch"))[
        "target_train"
    ][0]
    assert pad.shape == stretch.shape == (50, 1, 28, 28)
    assert pad[:, :, :6].abs().max() == 0 and stretch[:, :, :6].abs().max() > 0


def test_sklearn_digits_domain_through_the_adaptation_source(tiny_digits):
    cfg = _cfg(direction="sklearn_digits->usps", data_dir=str(tiny_digits))
    train = digits_adaptation(cfg, "train")
    assert train.source_x.shape == (1198, 1, 28, 28) and train.target_x.shape == (50, 1, 28, 28)
    assert len(digits_adaptation(cfg, "val").x) == 599


def test_sgd_momentum_weight_decay_and_auto_device():
    import torch

    from metatl.engine.trainer import check_device, make_optimizer

    cfg = from_dict(
        {
            "algorithm": {"name": "source_only"},
            "model": {"name": "digits_cnn"},
            "data": {"name": "mnist_usps"},
            "train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.6, "weight_decay": 1e-5, "device": "auto"},
        }
    )
    opt = make_optimizer(cfg, [torch.zeros(2, requires_grad=True)])
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.6 and opt.defaults["weight_decay"] == 1e-5
    assert check_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@needs_data
def test_real_padded_usps_matches_skada_bench_statistics():
    X, _ = load_usps("train", size=28, data_dir=DATA, frame="pad")
    # skada-bench standardizes padded USPS (torchvision's LIBSVM copy) with mean .0806, std .2063; the
    # ESL / h5 copy read here has the same mean and a wider spread (std .250): its values are scaled
    # differently, which is why data.standardize=domain measures each domain instead of quoting constants
    assert abs(X.mean() - 0.0806) < 0.005 and abs(X.std() - 0.250) < 0.005


@needs_data
def test_source_only_smoke_run_learns_usps_to_sklearn_digits(tmp_path):
    """A short CPU run: 60 SGD steps on USPS, scored on scikit-learn's digits, well above chance."""
    from metatl.engine.trainer import Trainer

    cfg = from_dict(
        {
            "algorithm": {"name": "source_only"},
            "model": {"name": "digits_cnn"},
            "data": {
                "name": "mnist_usps",
                "direction": "usps->sklearn_digits",
                "data_dir": str(DATA),
                "standardize": "domain",
            },
            "train": {
                "iterations": 60,
                "meta_batch": 32,
                "optimizer": "sgd",
                "lr": 0.1,
                "momentum": 0.6,
                "val_every": 0,
                "ckpt_every": 0,
                "log_every": 100,
            },
        }
    )
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    acc = trainer.test()["metric"]["mean"]
    assert acc > 0.3, f"target accuracy {acc:.3f} after 60 steps (chance 0.1)"
