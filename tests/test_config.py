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


@pytest.mark.parametrize("override, key", [
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
    ("data.image_size=0", "data.image_size"),
    ("data.shots=0", "data.shots"),
    ("model.hidden=[40, -1]", "model.hidden"),
])
def test_numbers_out_of_range_are_refused_by_name(config_file, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(config_file(), [override])


def test_numbers_in_range_pass(config_file):
    cfg = load_config(config_file(), ["algorithm.inner_lr=0.4", "eval.inner_steps=0", "train.val_every=0",
                                      "train.time_budget_min=0.5", "train.num_threads=1", "train.grad_clip=10"])
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


@pytest.mark.parametrize("text, missing", [
    ("algorithm: {name: maml}\ndata: {name: sinusoid}\n", "model.name"),
    ("algorithm: {name: maml}\nmodel: {hidden: [4]}\ndata: {name: sinusoid}\n", "model.name"),
    ("algorithm: {name: maml}\nmodel: {name: mlp}\ndata: {shots: 5}\n", "data.name"),
    ("model: {name: mlp}\ndata: {name: sinusoid}\n", "algorithm.name"),
])
def test_a_config_file_must_name_algorithm_model_and_data(config_file, text, missing):
    with pytest.raises(ConfigError, match=missing.replace(".", r"\.")):
        load_config(config_file(text))


@pytest.mark.parametrize("raw", [[1, 2], {"train": [1]}, {"model": "mlp"}, {"algorithm": {"name": ["maml"]}},
                                 {"data": {1: 2}}])
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
    assert mean_ci95([1.0, 3.0]) == {"mean": 2.0, "ci95": pytest.approx(1.96 * 2 ** 0.5 / 2 ** 0.5),
                                     "std": pytest.approx(2 ** 0.5)}
