"""Splitting the meta-batch over processes gives the single-process run (up to float rounding)."""

import pytest
import torch
from test_cli_and_trainer import SINUSOID, write_config

from metatl.cli import main
from metatl.config import ConfigError, from_dict
from metatl.engine import checkpoint as ckpt_io


def test_two_processes_train_the_same_parameters_as_one(tmp_path):
    raw = {**SINUSOID, "train": {**SINUSOID["train"], "iterations": 8, "meta_batch": 4, "num_threads": 1}}
    cfg = write_config(tmp_path, raw)
    for procs in (1, 2):
        assert (
            main(
                [
                    "train",
                    str(cfg),
                    "--out",
                    str(tmp_path / f"p{procs}"),
                    "--no-progress",
                    "--set",
                    f"train.processes={procs}",
                ]
            )
            == 0
        )
    one = ckpt_io.load(tmp_path / "p1" / "last.pt")
    two = ckpt_io.load(tmp_path / "p2" / "last.pt")
    assert two["iteration"] == one["iteration"] == 8
    for name, value in one["learner"].items():
        torch.testing.assert_close(two["learner"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # process 0 alone wrote the run folder's files, once
    lines = (tmp_path / "p2" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "p1" / "metrics.jsonl").read_text().splitlines())
    assert (tmp_path / "p2" / "results.json").exists()


def test_a_meta_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ConfigError, match="multiple"):
        from_dict({**SINUSOID, "train": {"meta_batch": 5, "processes": 2}})
    with pytest.raises(ConfigError, match="processes must be"):
        from_dict({**SINUSOID, "train": {"processes": 0}})


def test_a_split_run_resumes_exactly(tmp_path):
    raw = {
        **SINUSOID,
        "train": {
            **SINUSOID["train"],
            "iterations": 6,
            "meta_batch": 4,
            "num_threads": 1,
            "processes": 2,
            "val_every": 0,
            "ckpt_every": 0,
        },
    }
    cfg = write_config(tmp_path, raw)
    assert main(["train", str(cfg), "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    assert (
        main(["train", str(cfg), "--out", str(tmp_path / "halves"), "--no-progress", "--set", "train.iterations=3"])
        == 0
    )
    assert (tmp_path / "halves" / "last.pt.rng1").exists()  # process 1's own random state
    assert (
        main(
            [
                "train",
                str(cfg),
                "--out",
                str(tmp_path / "halves"),
                "--no-progress",
                "--resume",
                "--allow-change",
                "train.iterations",
            ]
        )
        == 0
    )
    a = ckpt_io.load(tmp_path / "straight" / "last.pt")
    b = ckpt_io.load(tmp_path / "halves" / "last.pt")
    assert a["iteration"] == b["iteration"] == 6
    for name, value in a["learner"].items():
        torch.testing.assert_close(b["learner"][name], value, rtol=0, atol=0, msg=name)
