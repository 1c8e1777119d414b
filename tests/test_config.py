"""The config loader: every number checked by type and range, YAML errors located, required
sections named, and neutral statistics."""

import pytest

from metatl.cli import main
from metatl.config import ConfigError, from_dict, load_config

SINUSOID = "name: t\nalgorithm: {name: maml}\nmodel: {name: mlp}\ndata: {name: sinusoid}\n"


@pytest.fixture
def config_file(tmp_path):
    def write(text=SINUSOID):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return path

    return write


@pytest.mark.parametrize(
    "override, key",
    [
        ("algorithm.inner_lr=-0.4", "algorithm.inner_lr"),
        ("eval.inner_steps=-2", "eval.inner_steps"),
        ("train.val_every=-5", "train.val_every"),
        ("train.time_budget_min=-1", "train.time_budget_min"),
        ("train.time_budget_min=0", "train.time_budget_min"),
        ("train.num_threads=0", "train.num_threads"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.lr=.nan", "train.lr"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.snapshot_minutes=[1, -2]", "train.snapshot_minutes"),
        ("eval.extra_steps=[-1]", "eval.extra_steps"),
        ("data={name: omniglot, image_size: 0}", "data.image_size"),
        ("data={name: image_folder, split_fractions: [0.5, 1.5]}", "data.split_fractions"),
        ("data={name: omniglot, ways: 1}", "data.ways must be at least 2"),
        ("data={name: mnist_usps, target_labels_fraction: 2}", "data.target_labels_fraction"),
        ("data.shots=0", "data.shots"),
        ("model.hidden=[40, -1]", "model.hidden"),
    ],
)
def test_numbers_out_of_range_are_refused_by_name(config_file, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(config_file(), [override])


def test_numbers_in_range_pass(config_file):
    cfg = load_config(
        config_file(),
        [
            "algorithm.inner_lr=0.4",
            "eval.inner_steps=0",
            "train.val_every=0",
            "train.time_budget_min=0.5",
            "train.num_threads=1",
            "train.grad_clip=10",
        ],
    )
    assert (cfg.algorithm["inner_lr"], cfg.eval.inner_steps, cfg.train.grad_clip) == (0.4, 0, 10)


def test_yaml_syntax_error_in_a_file_names_file_line_and_column(config_file, capsys):
    path = config_file(SINUSOID + "train:\n  lr: [0.1\n  iterations: 3\n")
    with pytest.raises(ConfigError, match=rf"{path.name}, line \d+, column \d+"):
        load_config(path)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line" in err and "Traceback" not in err and "<unicode string>" not in err


def test_yaml_syntax_error_in_set_names_the_set_text(config_file):
    with pytest.raises(ConfigError, match=r"--set train\.lr=\[0\.1, line 1, column"):
        load_config(config_file(), ["train.lr=[0.1"])


@pytest.mark.parametrize(
    "text, missing",
    [
        ("algorithm: {name: maml}\ndata: {name: sinusoid}\n", "model.name"),
        ("algorithm: {name: maml}\nmodel: {hidden: [4]}\ndata: {name: sinusoid}\n", "model.name"),
        ("algorithm: {name: maml}\nmodel: {name: mlp}\ndata: {shots: 5}\n", "data.name"),
        ("model: {name: mlp}\ndata: {name: sinusoid}\n", "algorithm.name"),
    ],
)
def test_a_config_file_must_name_algorithm_model_and_data(config_file, text, missing):
    with pytest.raises(ConfigError, match=missing.replace(".", r"\.")):
        load_config(config_file(text))


@pytest.mark.parametrize(
    "raw", [[1, 2], {"train": [1]}, {"model": "mlp"}, {"algorithm": {"name": ["maml"]}}, {"data": {1: 2}}]
)
def test_malformed_sections_are_config_errors(raw):
    with pytest.raises(ConfigError):
        from_dict(raw)


def test_set_through_a_value_that_is_not_a_section(config_file):
    with pytest.raises(ConfigError, match="not a section"):
        load_config(config_file(), ["model.name.x=1"])


def test_statistics_are_neutral():
    from metatl.engine import mean_ci95 as engine_mean_ci95
    from metatl.stats import mean_ci95

    assert engine_mean_ci95 is mean_ci95
    assert mean_ci95([1.0, 3.0]) == {
        "mean": 2.0,
        "ci95": pytest.approx(1.96 * 2**0.5 / 2**0.5),
        "std": pytest.approx(2**0.5),
    }


# -- data sets configure themselves ------------------------------------------------------------

from dataclasses import dataclass, is_dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

from metatl.config import at_least  # noqa: E402
from metatl.data import Omniglot, build_sampler, dataset  # noqa: E402
from metatl.registry import DATASETS  # noqa: E402


@dataset("test_constant")
@dataclass
class Constant:
    """A data set defined outside the package: regression tasks with y = value."""

    value: float = 1.0
    points: int = 3

    config_ranges: ClassVar[dict] = {"points": at_least(2)}

    def sampler(self, subset):
        import torch

        from metatl.data import Episode

        class Tasks:
            task_type, out_features, input_spec = "regression", 1, {"in_features": 1}

            def sample(tasks, g):
                x = torch.rand(self.points, 1, generator=g)
                return Episode(x, torch.full_like(x, self.value), x, torch.full_like(x, self.value))

            def sample_batch(tasks, n, g):
                return [tasks.sample(g) for _ in range(n)]

        return Tasks()


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_data_set_is_a_dataclass_that_round_trips(name):
    cls = DATASETS.get(name)
    assert is_dataclass(cls) and cls.name == name
    cfg = from_dict({"data": {"name": name}})
    assert isinstance(cfg.data, cls)
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.to_dict()["data"]["name"] == name


def test_data_keys_are_the_data_sets_own():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) root in section 'data' \(omniglot\); valid keys: .*split"):
        from_dict({"data": {"name": "omniglot", "root": "x"}})
    with pytest.raises(ConfigError, match="data.name: unknown dataset 'omniglott'; valid datasets: .*omniglot"):
        from_dict({"data": {"name": "omniglott"}})
    with pytest.raises(ConfigError, match="data.split must be a string"):
        from_dict({"data": {"name": "omniglot", "split": 3}})
    cfg = from_dict({"data": {"name": "omniglot", "ways": 20, "split": "maml"}})
    assert isinstance(cfg.data, Omniglot) and (cfg.data.ways, cfg.data.split, cfg.data.name) == (20, "maml", "omniglot")


def test_a_config_stored_with_every_data_key_still_loads():
    """Configs written when one section held every data set's keys (checkpoints, run folders)."""
    old = {
        "name": "omniglot",
        "ways": 5,
        "shots": 1,
        "queries": 15,
        "train_ways": None,
        "train_shots": None,
        "train_queries": None,
        "split": "vinyals",
        "train_subset": "train",
        "image_size": 28,
        "root": None,
        "in_channels": 1,
        "classes": None,
        "split_fractions": [0.6, 0.2, 0.2],
        "split_seed": 0,
        "data_dir": None,
        "download": False,
        "direction": "mnist->usps",
        "target_labels_fraction": 0.0,
        "max_source": None,
        "max_target": None,
    }
    assert from_dict({"data": old}).data == Omniglot()
    with pytest.raises(ConfigError, match="unknown key.*root"):  # a changed key of another data set
        from_dict({"data": {**old, "root": "pictures"}})


def test_a_data_set_registered_outside_the_package_trains(tmp_path):
    from metatl.engine.trainer import Trainer

    with pytest.raises(ConfigError, match="data.points must be at least 2"):
        from_dict({"data": {"name": "test_constant", "points": 1}})
    cfg = from_dict(
        {
            "algorithm": {"name": "maml"},
            "model": {"name": "mlp", "hidden": [8]},
            "data": {"name": "test_constant", "value": 2.0},
            "train": {"iterations": 2, "meta_batch": 2, "val_every": 0, "ckpt_every": 0},
        }
    )
    assert build_sampler(cfg.data, "test").sample(__import__("torch").Generator()).query_y.shape == (3, 1)
    trainer = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert trainer.iteration == 2


def test_data_sets_check_the_config_themselves():
    with pytest.raises(ConfigError, match="unknown data.direction 'mnist->svhn'"):
        from_dict({"data": {"name": "mnist_usps", "direction": "mnist->svhn"}})
    with pytest.raises(ConfigError, match="set train.val_every=0"):
        from_dict({"data": {"name": "omniglot", "train_subset": "trainval"}})


# -- every split checked before the first step -------------------------------------------------


def image_folder(root, classes=6, per_class=4):
    import numpy as np
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), 40 * c, np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_a_validation_split_with_too_few_classes_stops_before_training(tmp_path):
    from metatl.engine.trainer import Trainer

    root = image_folder(tmp_path / "imgs")
    raw = {
        "algorithm": {"name": "protonet"},
        "model": {"name": "conv4_pool", "filters": 4},
        "data": {
            "name": "image_folder",
            "root": str(root),
            "ways": 2,
            "shots": 1,
            "queries": 1,
            "image_size": 16,
            "classes": {"train": ["class0", "class1", "class2"], "val": ["class3"], "test": ["class4", "class5"]},
        },
        "train": {"iterations": 2, "meta_batch": 1, "val_every": 1},
    }
    with pytest.raises(ValueError, match="2-way val episodes need 2 classes but the val split"):
        Trainer(from_dict(raw), tmp_path / "run", progress=False).fit()
    assert not (tmp_path / "run").exists()
    raw["train"]["val_every"] = 0  # no validation: the val split is not used
    assert Trainer(from_dict(raw), tmp_path / "run", progress=False).fit().iteration == 2


def test_more_ways_than_test_classes_stops_before_training(omniglot_dir, tmp_path, capsys):
    path = tmp_path / "omniglot.yaml"
    path.write_text(
        f"algorithm: {{name: protonet}}\nmodel: {{name: conv4_pool, filters: 4}}\n"
        f"data: {{name: omniglot, data_dir: {omniglot_dir}, ways: 2000, queries: 1}}\n"
        f"train: {{iterations: 1, meta_batch: 1, val_every: 0}}\n"
    )
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2000-way episodes need 2000 classes but the data has only 1692" in err and "test episodes" in err
    assert not (tmp_path / "run" / "last.pt").exists()
