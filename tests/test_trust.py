"""Trust: checkpoints never run code, run folders never lose or mislabel work, resume continues
exactly, divergence is caught, and one function loads a learner for every path."""
import os

import numpy as np
import pytest
import torch

import metatl
from metatl.cli import main
from metatl.engine import checkpoint as ckpt_io

from test_cli_and_trainer import SINUSOID, write_config


class _RunsCode:
    """Unpickling this calls ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short sinusoid MAML run (best.pt, last.pt, results.json)."""
    tmp = tmp_path_factory.mktemp("trust")
    out = tmp / "run"
    assert main(["train", str(write_config(tmp, SINUSOID)), "--out", str(out), "--no-progress"]) == 0
    return out


def _crafted(path, marker):
    torch.save({"learner": {}, "config": {}, "payload": _RunsCode(marker)}, path)


@pytest.mark.parametrize("how", ["load", "eval", "adapt", "resume", "ckpt_io"])
def test_a_crafted_checkpoint_is_refused_and_its_code_does_not_run(tmp_path, how, capsys):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    _crafted(run / "last.pt", marker)
    if how == "load":
        with pytest.raises(ValueError, match="refused"):
            metatl.load(run / "last.pt")
    elif how == "ckpt_io":
        with pytest.raises(ValueError, match="posix.system|os.system|nt.system"):
            ckpt_io.load(run / "last.pt")
    elif how == "eval":
        assert main(["eval", str(run / "last.pt"), "--no-progress"]) == 2
    elif how == "adapt":
        (tmp_path / "s" / "a").mkdir(parents=True)
        (tmp_path / "q").mkdir()
        assert main(["adapt", str(run / "last.pt"), "--support", str(tmp_path / "s"),
                     "--query", str(tmp_path / "q")]) == 2
    else:
        cfg = write_config(tmp_path, SINUSOID)
        assert main(["train", str(cfg), "--out", str(run), "--resume", "--no-progress"]) == 2
    assert not marker.exists(), "the checkpoint ran code"
    if how in ("eval", "adapt", "resume"):
        assert "refused" in capsys.readouterr().err


def test_checkpoints_hold_plain_containers_only(run):
    for name in ("last.pt", "best.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(run / name) == []
        state = torch.load(run / name, weights_only=True)  # without any allow-list
        assert state["format"] == ckpt_io.FORMAT


def test_random_state_round_trips_through_a_safe_checkpoint(tmp_path):
    np.random.seed(3)
    state = ckpt_io.rng_state()
    ckpt_io.save_atomic({"rng": state}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(0), np.random.seed(0)
    ckpt_io.set_rng_state(ckpt_io.read(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_a_checkpoint_of_the_older_format_loads_safely_and_upgrades(run, tmp_path, capsys):
    """Format 1 (metatl 0.1.0): the numpy random state as numpy arrays and torch's version object."""
    state = ckpt_io.load(run / "last.pt")
    state.pop("format")
    state["rng"]["numpy"] = np.random.get_state()
    state["torch_version"] = torch.__version__
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(old)  # not plain
    learner = metatl.load(old)  # read with weights_only=True and a few data types allowed
    assert learner.task_type == "regression"
    assert main(["upgrade-checkpoint", str(old), "--out", str(tmp_path / "new.pt")]) == 0
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "new.pt") == []
    assert ckpt_io.read(tmp_path / "new.pt")["format"] == ckpt_io.FORMAT


def test_upgrade_runs_a_refused_file_only_when_trusted(tmp_path):
    marker = tmp_path / "ran"
    _crafted(tmp_path / "c.pt", marker)
    assert main(["upgrade-checkpoint", str(tmp_path / "c.pt")]) == 2
    assert not marker.exists()
    ckpt_io.upgrade(tmp_path / "c.pt", tmp_path / "d.pt", trust=True)  # the user vouches: its code runs
    assert marker.exists()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "d.pt") == []

