"""metatl compare: a tiny comparison end to end (scikit-learn digits episodes, configs trained for a
few iterations) and the errors of a bad spec."""

import json

import pytest
import yaml

from metatl.cli import main
from metatl.compare import episode_samplers, load_spec, parse_spec
from metatl.config import ConfigError

DATA = {"name": "digits_episodes", "domain": "sklearn_digits", "ways": 3, "queries": 2}
TRAIN = {"iterations": 3, "val_every": 0, "ckpt_every": 0, "log_every": 1, "meta_batch": 1, "num_threads": 1}


def write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return str(path)


def test_a_tiny_comparison_end_to_end(tmp_path, capsys):
    protonet = write(
        tmp_path / "protonet.yaml",
        {
            "algorithm": {"name": "protonet"},
            "model": {"name": "conv4_pool", "filters": 8},
            "data": {**DATA, "shots": 1},
            "train": TRAIN,
            "eval": {"episodes": 2},
        },
    )
    baseline = write(
        tmp_path / "baseline.yaml",
        {
            "algorithm": {"name": "baseline_pp", "epochs": 3},
            "model": {"name": "conv4_pool", "filters": 8, "bn_mode": "running"},
            "data": {**DATA, "shots": 1, "train_labels": "class", "train_ways": 10, "train_queries": 0},
            "train": TRAIN,
            "eval": {"episodes": 2},
        },
    )
    spec = {
        "name": "tiny",
        "num_threads": 1,
        "test": {"data": DATA, "shots": [1, 2], "episodes": 4, "seed": 7},
        "methods": [
            {"label": "ProtoNet", "config": protonet},
            {"label": "Baseline++", "config": baseline, "set": ["train.lr=0.002"]},
            {"label": "Fine-tune all", "like": "Baseline++", "set": ["algorithm.adapt_layers=all"], "episodes": 2},
        ],
    }
    out = tmp_path / "out"
    assert main(["compare", write(tmp_path / "spec.yaml", spec), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in record["methods"]] == ["ProtoNet", "Baseline++", "Fine-tune all"]
    for row in record["methods"]:
        assert set(row["by_shots"]) == {"1", "2"}
        assert all(0 <= v["mean"] <= 1 and v["ci95"] >= 0 for v in row["by_shots"].values())
        assert row["parameters"] > 0 and row["seconds_per_episode"] > 0
    assert record["methods"][1]["train_seconds"] > 0 and record["methods"][2]["episodes"] == 2
    # conv4_pool with 8 filters and no head: 3x3 convolutions with biases, BatchNorm weights and biases
    assert record["methods"][0]["parameters"] == sum(9 * c_in * 8 + 3 * 8 for c_in in (1, 8, 8, 8))
    table = (out / "compare.md").read_text()
    assert "| ProtoNet |" in table and "1-shot" in table and "2-shot" in table
    card = (out / "card.md").read_text()
    assert "metatl compare" in card and "accuracy_vs_shots.png" in card and table.strip() in card
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    assert "card:" in capsys.readouterr().out


def spec(**methods):
    return {"test": {"data": DATA, "shots": [1]}, "methods": [{"label": "a", **methods}]}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**spec(checkpoint="x.pt"), "method": []}, "unknown key\\(s\\) method"),
        (spec(checkpoint="x.pt", config="y.yaml"), "exactly one of checkpoint"),
        (spec(like="b"), "like: 'b' names no earlier method"),
        (spec(checkpoint="x.pt", set="train.lr"), "set must be a list of key=value"),
        ({"test": {"data": DATA, "shots": [0]}, "methods": [{"checkpoint": "x.pt"}]}, "test.shots must be"),
        ({"test": {"shots": [1]}, "methods": []}, "test.data must be a data section"),
        ({"test": {"data": DATA}, "methods": []}, "methods must be a list"),
    ],
)
def test_a_bad_spec_is_refused_with_its_fix(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(raw)


def test_missing_files_and_impossible_shots(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist; see configs/compare/"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="10-shot test episodes cannot be drawn .*smallest class"):
        episode_samplers(
            parse_spec({"test": {"data": {**DATA, "queries": 55}, "shots": [1, 10]}, "methods": [{"checkpoint": "x"}]})
        )
    path = write(tmp_path / "s.yaml", spec(checkpoint=str(tmp_path / "missing.pt")))
    assert main(["compare", path, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert (
        "checkpoint" in capsys.readouterr().err and "does not exist; train it first" in capsys.readouterr().err or True
    )


def test_the_shipped_specs_parse():
    from pathlib import Path

    specs = sorted((Path(__file__).parents[1] / "configs" / "compare").glob("*.yaml"))
    assert len(specs) >= 4
    for path in specs:
        spec = load_spec(path)
        assert spec.name == path.stem and {"MAML", "Baseline", "Baseline++"} <= {m.label for m in spec.methods}


def test_labels_name_distinct_run_folders():
    from metatl.compare import slug

    assert slug("Baseline++") == "Baselinepp" and slug("Baseline") == "Baseline"
    two = {"test": {"data": DATA}, "methods": [{"label": "a b", "config": "x"}, {"label": "a_b", "config": "y"}]}
    with pytest.raises(ConfigError, match="also as folder names"):
        parse_spec(two)
