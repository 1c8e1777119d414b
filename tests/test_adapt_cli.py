"""End to end: meta-train on a tiny image folder with `metatl train`, then classify new images with
`metatl adapt` and from Python; the errors a user meets on the way."""

import csv
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import metatl
from metatl.cli import main
from metatl.data.image_folder import load_support_folder


def blob_png(path, center, width, rng, size=24):
    yy, xx = np.mgrid[0:size, 0:size]
    c = np.asarray(center) + rng.randn(2)
    img = np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * width**2)) + 0.1 * rng.randn(size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def make_classes(root, n_classes, per_class, seed, size=24):
    rng = np.random.RandomState(seed)
    specs = [(rng.uniform(5, size - 5, 2), rng.uniform(1.5, 4)) for _ in range(n_classes)]
    for c, (center, width) in enumerate(specs):
        for i in range(per_class):
            blob_png(root / f"blob{seed}_{c}" / f"{i}.png", center, width, rng, size)
    return specs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A protonet and a 3-way MAML checkpoint meta-trained for a few steps on an image folder."""
    tmp = tmp_path_factory.mktemp("run")
    make_classes(tmp / "train_imgs", n_classes=10, per_class=6, seed=0)
    runs = {}
    for algo, extra, iters in (
        ("protonet", {}, 6),
        ("maml", {"inner_lr": 0.1, "inner_steps": 1, "first_order": True}, 2),
    ):
        config = {
            "algorithm": {"name": algo, **extra},
            "model": {"name": "conv4_pool", "filters": 8},
            "data": {
                "name": "image_folder",
                "root": str(tmp / "train_imgs"),
                "image_size": 16,
                "ways": 3,
                "shots": 1,
                "queries": 2,
                "split_fractions": [0.7, 0.0, 0.3],
            },
            "train": {"iterations": iters, "meta_batch": 2, "val_every": 0, "ckpt_every": 0, "log_every": 5},
            "eval": {"episodes": 3},
        }
        path = tmp / f"{algo}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["train", str(path), "--out", str(tmp / algo), "--no-progress"]) == 0
        runs[algo] = tmp / algo / "last.pt"
    return tmp, runs


def new_task(root, n_classes=3, shots=2, queries=3, seed=7):
    """Support folder of new classes, and a query folder with labelled sub-folders and loose images."""
    rng = np.random.RandomState(seed)
    specs = [(rng.uniform(5, 19, 2), rng.uniform(1.5, 4)) for _ in range(n_classes)]
    for c, (center, width) in enumerate(specs):
        for i in range(shots):
            blob_png(root / "support" / f"new{c}" / f"{i}.png", center, width, rng)
        for i in range(queries):
            blob_png(root / "query" / f"new{c}" / f"q{i}.png", center, width, rng)
    blob_png(root / "query" / "loose.png", specs[0][0], specs[0][1], rng)
    return root / "support", root / "query"


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_train_then_adapt_writes_a_prediction_table(trained, tmp_path, capsys, algo):
    _, runs = trained
    support, query = new_task(tmp_path)
    out = tmp_path / "predictions" / "predictions.csv"
    assert (
        main(["adapt", str(runs[algo]), "--support", str(support), "--query", str(query), "--out", str(out.parent)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 classes from" in printed and "new0, new1, new2" in printed and "accuracy on the 9 labelled" in printed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10 and set(rows[0]) == {"file", "predicted", "confidence", "true"}
    assert {r["predicted"] for r in rows} <= {"new0", "new1", "new2"}
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)
    assert [r["true"] for r in rows if r["file"] == "loose.png"] == [""]


def test_python_api_and_no_training_data_needed(trained, tmp_path):
    tmp, runs = trained
    support, query = new_task(tmp_path)
    (tmp / "train_imgs").rename(tmp / "moved")  # a checkpoint works without its training data
    try:
        learner = metatl.load(runs["protonet"])
        sx, sy, names = load_support_folder(support, learner)
        assert sx.shape == (6, 1, 16, 16) and names == ["new0", "new1", "new2"]
        predictor = learner.adapt(sx, sy)
        assert predictor.predict(sx).shape == (6,)
        with pytest.raises(ValueError, match=r"takes images of shape \(n, 1, 16, 16\).*got \(6, 3, 16, 16\)"):
            learner.adapt(sx.expand(-1, 3, -1, -1), sy)
        with pytest.raises(ValueError, match=r"takes images of shape \(n, 1, 16, 16\).*got \(2, 1, 28, 28\)"):
            predictor.predict(torch.rand(2, 1, 28, 28))
        # the check leaves the conv net's folded first layer on (a hook on that layer would turn it off)
        first = learner.model.features[0]
        assert not first._forward_pre_hooks
        with mock.patch.object(first, "forward", side_effect=AssertionError("first conv called")):
            assert predictor.predict(sx).shape == (6,)
    finally:
        (tmp / "moved").rename(tmp / "train_imgs")


def test_adapt_errors_name_the_fix(trained, tmp_path, capsys):
    _, runs = trained
    support, query = new_task(tmp_path, n_classes=4)
    assert (
        main(
            [
                "adapt",
                str(runs["maml"]),
                "--support",
                str(support),
                "--query",
                str(query),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "3-way head but the support folder has 4 classes" in err and "metric-based" in err
    (tmp_path / "empty_query").mkdir()
    assert (
        main(["adapt", str(runs["protonet"]), "--support", str(support), "--query", str(tmp_path / "empty_query")]) == 2
    )
    assert "holds no images" in capsys.readouterr().err
    assert main(["adapt", str(tmp_path / "missing.pt"), "--support", str(support), "--query", str(query)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_adapt_refuses_what_cannot_classify_new_images(tmp_path):
    from metatl.engine.predict import classify_folder
    from metatl.meta import MAML, MANN
    from metatl.nn import mlp, pixels

    support, query = new_task(tmp_path, n_classes=3)
    with pytest.raises(ValueError, match="regression model.*image classification episodes"):
        classify_folder(MAML(mlp(), task_type="regression"), support, query)
    with pytest.raises(ValueError, match="Linear checkpoint.*cannot adapt to new classes.*metatl eval"):
        classify_folder(torch.nn.Linear(2, 2), support, query)
    mann = MANN(pixels(image_size=28, size=8), ways=5, hidden=8, slots=4, slot_size=4, heads=1)
    with pytest.raises(ValueError, match="5-way head but the support folder has 3 classes"):
        classify_folder(mann, support, query)  # the label size, not the 64 pixel features
    mann3 = MANN(pixels(image_size=28, size=8), ways=3, hidden=8, slots=4, slot_size=4, heads=1)
    assert len(classify_folder(mann3, support, query)["rows"]) == 10  # 9 labelled + 1 loose image
    with pytest.raises(ValueError, match="--steps must be 0 or more"):
        classify_folder(MAML(mlp()), support, query, steps=-3)
    with pytest.raises(ValueError, match="--steps 5.*MANN adapts without gradient steps.*leave --steps out"):
        classify_folder(mann3, support, query, steps=5)


def test_eval_refuses_overrides_that_change_the_model_or_its_input(trained, capsys):
    _, runs = trained
    assert main(["eval", str(runs["protonet"]), "--no-progress", "--set", "data.image_size=32"]) == 2
    assert "trained with image_size=16" in capsys.readouterr().err
    assert main(["eval", str(runs["maml"]), "--no-progress", "--set", "model.filters=16"]) == 2
    assert "does not fit the model of its config" in capsys.readouterr().err


def glyph_png(path, strokes, rng, size=40):
    """Dark ink strokes on white paper, like a scanned drawing (what a user gives an Omniglot model)."""
    from PIL import ImageDraw

    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in strokes:
        jitter = rng.randint(-2, 3, 4)
        draw.line([x0 + jitter[0], y0 + jitter[1], x1 + jitter[2], y1 + jitter[3]], fill=0, width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def glyph_task(root, n_classes=3, shots=2, queries=3, seed=3):
    rng = np.random.RandomState(seed)
    for c in range(n_classes):
        strokes = [tuple(rng.randint(4, 36, 4)) for _ in range(3)]
        for i in range(shots):
            glyph_png(root / "support" / f"glyph{c}" / f"{i}.png", strokes, rng)
        for i in range(queries):
            glyph_png(root / "query" / f"glyph{c}" / f"q{i}.png", strokes, rng)
    return root / "support", root / "query"


def as_omniglot_checkpoint(path, out):
    """The same weights, recorded as trained on Omniglot (whose models take inverted images)."""
    from dataclasses import fields

    from metatl.data import Omniglot
    from metatl.engine import checkpoint as ckpt_io

    state = ckpt_io.load(path)
    keep = {f.name for f in fields(Omniglot)}  # the image folder's keys that Omniglot has too
    state["config"]["data"] = {"name": "omniglot", **{k: v for k, v in state["config"]["data"].items() if k in keep}}
    ckpt_io.save_atomic(state, out)
    return out


@pytest.mark.parametrize("dataset", ["image_folder", "omniglot"])
def test_cli_and_python_give_the_same_predictions(trained, tmp_path, capsys, dataset):
    from metatl.data.image_folder import list_images

    _, runs = trained
    ckpt = (
        runs["protonet"]
        if dataset == "image_folder"
        else as_omniglot_checkpoint(runs["protonet"], tmp_path / "omni.pt")
    )
    support, query = glyph_task(tmp_path)
    out = tmp_path / "predictions.csv"
    assert main(["adapt", str(ckpt), "--support", str(support), "--query", str(query), "--out", str(tmp_path)]) == 0
    assert (" inverted" in capsys.readouterr().out) == (dataset == "omniglot")
    cli = {r["file"]: r for r in csv.DictReader(out.open())}

    learner = metatl.load(ckpt)
    predictor = learner.adapt_images(support)
    assert predictor.classes == ["glyph0", "glyph1", "glyph2"]
    assert predictor.input.invert == (dataset == "omniglot") and predictor.input.image_size == 16
    files = list_images(query, recursive=True)
    names = predictor.predict_images(files)
    proba = predictor.predict_proba_images(files)
    assert proba.shape == (9, 3) and torch.allclose(proba.sum(1), torch.ones(9))
    assert [cli[str(f.relative_to(query))]["predicted"] for f in files] == names
    assert [cli[str(f.relative_to(query))]["confidence"] for f in files] == [f"{p:.4f}" for p in proba.max(1).values]

    # a list of files with labels (names or integer ids) is the same support set as the folder
    support_files = list_images(support, recursive=True)
    by_name = learner.adapt_images(support_files, [f.parent.name for f in support_files])
    assert by_name.predict_images(files) == names
    by_id = learner.adapt_images(support_files, [int(f.parent.name[-1]) for f in support_files])
    assert by_id.classes == [0, 1, 2] and by_id.predict_images(files) == [int(n[-1]) for n in names]
    assert torch.equal(by_id.predict_proba_images(files), proba)
    # a tensor of the wrong shape is refused with advice that converts as trained
    advice = r"learner.adapt_images\(support_folder\).*image_size=16" + (
        ", invert=True" if dataset == "omniglot" else r"\)"
    )
    with pytest.raises(ValueError, match=advice):
        learner.adapt(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))


def test_adapt_images_labels_and_steps_get_clear_errors(trained, tmp_path, capsys):
    _, runs = trained
    support, query = glyph_task(tmp_path)
    files = sorted(support.rglob("*.png"))
    learner = metatl.load(runs["protonet"])
    with pytest.raises(ValueError, match="label 0 is 0.0 \\(float\\); labels must be class names"):
        learner.adapt_images(files, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="tensor of dtype torch.float32"):
        learner.adapt_images(files, torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="array of dtype float64"):
        learner.adapt_images(files, np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="6 support image\\(s\\) but 5 label\\(s\\)"):
        learner.adapt_images(files, [0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="6 support image\\(s\\) but 7 label\\(s\\)"):
        learner.adapt_images(files, [0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="mix class names"):
        learner.adapt_images(files, [0, 0, 1, 1, "b", "b"])
    with pytest.raises(ValueError, match="labels are needed"):
        learner.adapt_images(files)
    with pytest.raises(ValueError, match="is a folder.*leave labels out"):
        learner.adapt_images(support, [0, 1])
    with pytest.raises(ValueError, match="steps=2.*ProtoNet adapts without gradient steps"):
        learner.adapt_images(support, steps=2)
    predictor = learner.adapt_images(support)
    with pytest.raises(ValueError, match="is a folder; pass a list of image files"):
        predictor.predict_images(query)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="1 of the 2 file\\(s\\) are not readable images: .*notes.txt"):
        predictor.predict_images([files[0], tmp_path / "notes.txt"])
    # the CLI refuses inner steps for a learner that takes none
    assert (
        main(
            [
                "adapt",
                str(runs["protonet"]),
                "--support",
                str(support),
                "--query",
                str(query),
                "--steps",
                "3",
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 2
    )
    assert "ProtoNet adapts without gradient steps" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
