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
needs_data = pytest.mark.skipif(not (DATA / "mnist").is_dir() or not (DATA / "usps").is_dir(),
                                reason="real digits data not found (set METATL_DATA_DIR)")



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
    X, y, sd, yt = load_digits_domains("usps", "mnist", size=16, n_source=300, n_target=200, split="test",
                                       data_dir=DATA)
    assert X.shape == (500, 256) and (sd > 0).sum() == 300 and (y[sd < 0] == -1).all() and yt.shape == (200,)
