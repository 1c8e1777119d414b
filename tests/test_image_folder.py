"""Image folders: decoding and conversion, class splits, episodes, and every bad input with its message."""

import numpy as np
import pytest
import torch
from PIL import Image

from metatl.config import from_dict
from metatl.data import build_sampler
from metatl.data.image_folder import load_images, load_support_folder, read_image_folder, split_classes


def save(path, size=(20, 20), mode="L", fmt=None, value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    shape = size[::-1] + ((len(mode),) if mode in ("RGB", "RGBA") else ())
    a = rng.randint(0, 256, shape).astype(np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(a, mode=mode if mode != "P" else "L").convert(mode).save(path, format=fmt)
    return path


def make_folder(root, classes=6, per_class=4):
    for c in range(classes):
        for i in range(per_class):
            save(root / f"class{c}" / f"{i}.png", value=40 * c, seed=i)
    return root


def test_mixed_formats_sizes_and_modes_are_converted(tmp_path):
    root = tmp_path / "imgs"
    save(root / "a" / "gray.png", (30, 20), "L", value=255)
    save(root / "a" / "rgb.jpg", (64, 64), "RGB", value=0)
    save(root / "b" / "rgba.png", (12, 40), "RGBA", value=128)
    save(root / "b" / "palette.gif", (28, 28), "P", value=10)
    save(root / "b" / "pic.bmp", (5, 5), "RGB", value=200)
    (root / "b" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored silently
    for channels in (1, 3):
        folder = read_image_folder(root, in_channels=channels, image_size=16)
        assert folder.images.shape == (5, channels, 16, 16) and folder.images.dtype == torch.uint8
        assert folder.classes == ["a", "b"] and folder.labels.tolist() == [0, 0, 1, 1, 1]
        assert folder.counts() == {"a": 2, "b": 3}
    x, y = folder.tensors()
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[0], torch.ones_like(x[0]), atol=1 / 255)  # white gray.png stays 1.0
    x_inv, _ = folder.tensors(invert=True)
    torch.testing.assert_close(x_inv, 1 - x)


def test_transparent_pixels_read_as_white_paper(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)  # black everywhere; the stroke is only in the alpha mask
    a[4:12, 7:9, 3] = 255
    path = tmp_path / "stroke.png"
    Image.fromarray(a, mode="RGBA").save(path)
    x = load_images([path], in_channels=1, image_size=16)[0]
    assert x.shape == (1, 16, 16)
    assert x[0, 0, 0] == 1.0 and x[0, 8, 7] == 0.0  # white paper, black ink
    assert (x < 0.5).float().mean() == pytest.approx(16 / 256)


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=2, per_class=2)
    (root / "class0" / "notes.txt").write_text("not an image")
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*(notes\.txt.*broken\.png|broken\.png.*notes\.txt)"):
        folder = read_image_folder(root, image_size=8)
    assert folder.counts() == {"class0": 2, "class1": 2}
    with pytest.warns(UserWarning, match="notes.txt"):
        with pytest.raises(ValueError, match="none of the 1 file"):
            load_images([root / "class0" / "notes.txt"])


def test_a_class_with_nothing_readable_is_an_error(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=2, per_class=2)
    (root / "junk").mkdir()
    (root / "junk" / "a.png").write_text("text")
    with pytest.warns(UserWarning, match="a.png"):
        with pytest.raises(ValueError, match=r"class folder .*junk has no readable image.*add PNG/JPEG images"):
            read_image_folder(root)


def test_empty_class_folder_missing_root_and_loose_files(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=2, per_class=2)
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty is empty; add images .* or delete the folder"):
        read_image_folder(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "nope")
    flat = tmp_path / "flat"
    save(flat / "x.png")
    with pytest.raises(ValueError, match=r"no class sub-folders.*loose file.*x.png.*move each image"):
        read_image_folder(flat)


def test_class_splits_from_lists_or_a_seeded_fraction():
    names = [f"c{i}" for i in range(10)]
    a = split_classes(names, fractions=(0.6, 0.2, 0.2), seed=3)
    assert [len(a[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(names)
    assert a == split_classes(names, fractions=(0.6, 0.2, 0.2), seed=3) != split_classes(names, seed=4)
    lists = split_classes(names, classes={"train": ["c0", "c1"], "test": ["c9"]})
    assert lists == {"train": ["c0", "c1"], "val": [], "test": ["c9"]}
    with pytest.raises(ValueError, match="not sub-folders"):
        split_classes(names, classes={"train": ["dog"]})
    with pytest.raises(ValueError, match="summing to 1"):
        split_classes(names, fractions=(0.5, 0.2, 0.2))


def test_registered_dataset_gives_episodes_and_names_the_problem(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=6, per_class=4)
    data = {
        "name": "image_folder",
        "root": str(root),
        "ways": 2,
        "shots": 1,
        "queries": 2,
        "image_size": 12,
        "in_channels": 3,
        "classes": {"train": ["class0", "class1", "class2"], "test": ["class3", "class4"]},
    }
    sampler = build_sampler(from_dict({"data": data}).data, "train")
    ep = sampler.sample(torch.Generator().manual_seed(0))
    assert ep.support_x.shape == (2, 3, 12, 12) and ep.query_x.shape == (4, 3, 12, 12)
    assert sampler.input_spec == {"in_channels": 3, "image_size": 12}
    with pytest.raises(ValueError, match=r"3-way test episodes need 3 classes but the test split .* has 2"):
        build_sampler(from_dict({"data": {**data, "ways": 3}}).data, "test")
    for i in range(2):
        (root / "class2" / f"{i}.png").unlink()  # class2 now has 2 images
    with pytest.raises(
        ValueError, match=r"1 shot\(s\) \+ 2 queries = 3 images per class, but class\(es\) class2 \(2\)"
    ):
        build_sampler(from_dict({"data": data}).data, "train")
    with pytest.raises(ValueError, match="needs data.root"):
        build_sampler(from_dict({"data": {"name": "image_folder"}}).data, "train")


def test_trainval_meta_trains_on_the_training_and_validation_classes(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=6, per_class=3)
    data = {
        "name": "image_folder",
        "root": str(root),
        "ways": 2,
        "shots": 1,
        "queries": 1,
        "image_size": 8,
        "classes": {"train": ["class0", "class1"], "val": ["class2", "class3"], "test": ["class4", "class5"]},
    }
    for subset, classes in (("train", 2), ("trainval", 4)):
        cfg = from_dict(
            {"data": {**data, "train_subset": subset, "train_ways": 2, "train_queries": 2}, "train": {"val_every": 0}}
        ).data
        train = build_sampler(cfg, "train")
        assert len(train.pool.counts) == classes
        assert (train.ways, train.queries) == (2, 2)  # the train_* episode shape applies to trainval too
        val = build_sampler(cfg, "val")
        assert len(val.pool.counts) == 2 and val.queries == 1  # val and test keep their own classes


def test_support_folder_helper(tmp_path):
    root = make_folder(tmp_path / "support", classes=3, per_class=2)
    x, y, names = load_support_folder(root, in_channels=1, image_size=10)
    assert x.shape == (6, 1, 10, 10) and y.tolist() == [0, 0, 1, 1, 2, 2] and names == ["class0", "class1", "class2"]
