"""Trust: checkpoints never run code, run folders never lose or mislabel work, resume continues
exactly, divergence is caught, and one function loads a learner for every path."""

import datetime
import json
import os
import platform

import numpy as np
import pytest
import torch
from test_cli_and_trainer import SINUSOID, write_config

import metatl
from metatl.cli import main
from metatl.engine import checkpoint as ckpt_io


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
        assert (
            main(["adapt", str(run / "last.pt"), "--support", str(tmp_path / "s"), "--query", str(tmp_path / "q")]) == 2
        )
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


def test_upgrade_never_runs_a_refused_file(tmp_path):
    marker = tmp_path / "ran"
    _crafted(tmp_path / "c.pt", marker)
    assert main(["upgrade-checkpoint", str(tmp_path / "c.pt")]) == 2
    with pytest.raises(ValueError, match="refused"):
        ckpt_io.upgrade(tmp_path / "c.pt", tmp_path / "d.pt")
    assert not marker.exists() and not (tmp_path / "d.pt").exists()


# -- run folders ------------------------------------------------------------------------------
def test_eval_writes_beside_the_run_and_never_over_its_results(run, capsys):
    before = (run / "results.json").read_text()
    assert main(["eval", str(run / "last.pt"), "--no-progress", "--set", "eval.episodes=4"]) == 0
    assert (run / "results.json").read_text() == before
    ev = json.loads((run / "eval_last_4ep.json").read_text())
    assert ev["episodes"] == 4 and ev["checkpoint"].endswith("last.pt")
    assert main(["eval", str(run / "best.pt"), "--no-progress", "--set", "eval.episodes=4", "eval.inner_steps=2"]) == 0
    assert (run / "eval_best_4ep_inner_steps2.json").exists()


def test_results_record_python_commit_and_date(run):
    res = json.loads((run / "results.json").read_text())
    assert res["python_version"] == platform.python_version()
    assert datetime.datetime.fromisoformat(res["date"]).tzinfo is not None
    assert "metatl_commit" in res  # None outside a git checkout
    from metatl.engine.run import git_commit

    if git_commit() is not None:
        assert res["metatl_commit"].split("+")[0] == git_commit().split("+")[0]


def test_overwrite_clears_the_replaced_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, SINUSOID)), "--out", str(out), "--no-progress"]) == 0
    assert (out / "best.pt").exists()
    (out / "notes.txt").write_text("mine")
    (out / "eval_last_9ep.json").write_text("{}")
    raw = dict(SINUSOID, train=dict(SINUSOID["train"], val_every=0))
    assert (
        main(["train", str(write_config(tmp_path, raw, "b.yaml")), "--out", str(out), "--no-progress", "--overwrite"])
        == 0
    )
    assert not (out / "best.pt").exists() and not (out / "eval_last_9ep.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="never validated.*last.pt"):
        metatl.load(out / "best.pt")


def test_adapt_out_is_a_folder_and_never_replaces_another_file(run, tmp_path, capsys):
    ckpt = run / "last.pt"
    size = ckpt.stat().st_size
    assert main(["adapt", str(ckpt), "--support", str(tmp_path), "--query", str(tmp_path), "--out", str(ckpt)]) == 2
    assert "is a file" in capsys.readouterr().err and ckpt.stat().st_size == size
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "predictions.csv").write_text("my own table\n")
    assert (
        main(["adapt", str(ckpt), "--support", str(tmp_path), "--query", str(tmp_path), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not a predictions table" in capsys.readouterr().err
    assert (tmp_path / "o" / "predictions.csv").read_text() == "my own table\n"


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    from metatl.config import load_config
    from metatl.engine import Trainer

    raw = dict(SINUSOID, train=dict(SINUSOID["train"], iterations=3, val_every=0, ckpt_every=0))
    cfg = write_config(tmp_path, raw)
    out = tmp_path / "run"
    Trainer(load_config(cfg), out, progress=False).fit()  # last.pt at iteration 3
    with open(out / "metrics.jsonl", "a") as f:  # what a killed longer run logged after it
        for i in (4, 5):
            f.write(json.dumps({"iteration": i, "loss": 1.0}) + "\n")
        f.write('{"iteration": 6, "lo')
    raw["train"]["iterations"] = 5
    assert (
        main(
            [
                "train",
                str(write_config(tmp_path, raw)),
                "--out",
                str(out),
                "--resume",
                "--no-progress",
                "--allow-change",
                "train.iterations",
            ]
        )
        == 0
    )
    its = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert its == sorted(set(its)) and its[-1] == 5


# -- resume -----------------------------------------------------------------------------------
def test_resume_refuses_any_unnamed_change_and_records_the_named_ones(tmp_path, capsys):
    raw = dict(SINUSOID, train=dict(SINUSOID["train"], iterations=3, val_every=0))
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, raw)), "--out", str(out), "--no-progress"]) == 0
    written = (out / "config.yaml").read_text()
    for key, value in (("train.meta_batch", 8), ("train.lr", 0.01), ("eval.episodes", 7)):
        assert (
            main(
                [
                    "train",
                    str(out / "config.yaml"),
                    "--out",
                    str(out),
                    "--resume",
                    "--no-progress",
                    "--set",
                    f"{key}={value}",
                    "train.iterations=5",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert key in err and "--allow-change" in err
        assert (out / "config.yaml").read_text() == written and not (out / "resume_log.jsonl").exists()
    assert (
        main(
            [
                "train",
                str(out / "config.yaml"),
                "--out",
                str(out),
                "--resume",
                "--no-progress",
                "--set",
                "train.iterations=5",
                "--allow-change",
                "train.iterations",
            ]
        )
        == 0
    )
    assert "train.iterations: 3 -> 5" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "resume_log.jsonl").read_text().splitlines()]
    assert log[-1]["iteration"] == 3 and log[-1]["changes"] == {"train.iterations": {"run": 3, "now": 5}}
    assert ckpt_io.load(out / "last.pt")["iteration"] == 5
    # resumed with nothing changed: config.yaml is not rewritten
    before = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(before + "# a note\n")
    assert main(["train", str(out / "config.yaml"), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert (out / "config.yaml").read_text() == before + "# a note\n"


# -- divergence -------------------------------------------------------------------------------
@pytest.mark.parametrize("lr,optimizer", [("1e6", "adam"), ("1e38", "adam"), ("1e38", "sgd")])
def test_an_exploding_run_stops_with_a_true_message_and_writes_no_weights(tmp_path, capsys, lr, optimizer):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(write_config(tmp_path, SINUSOID)),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                f"train.lr={lr}",
                f"train.optimizer={optimizer}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "diverged" in err and ("exploded" in err or "overflowed" in err or "NaN" in err)
    assert "no checkpoint was written" in err and "untouched" not in err
    assert not any(out.glob("*.pt")) and not (out / "results.json").exists()


def test_a_diverging_resume_leaves_last_pt_as_it_was(tmp_path, capsys):
    raw = dict(SINUSOID, train=dict(SINUSOID["train"], iterations=3, val_every=0))
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, raw)), "--out", str(out), "--no-progress"]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                str(out / "config.yaml"),
                "--out",
                str(out),
                "--resume",
                "--no-progress",
                "--set",
                "train.lr=1e38",
                "train.iterations=6",
                "--allow-change",
                "train.lr",
                "train.iterations",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"the last good checkpoint {out / 'last.pt'} (iteration 3) is untouched" in err
    assert (out / "last.pt").read_bytes() == before
    weights = ckpt_io.load(out / "last.pt")["learner"]
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in weights.values())


def test_the_guard_sees_a_finite_loss_explode_and_keeps_quiet_otherwise():
    from metatl.engine.divergence import DivergenceGuard

    guard = DivergenceGuard(factor=1000, window=3)
    assert all(guard.loss(v) is None for v in [2.0, 1.5, 1.0, 0.9, 1e-3, 50.0, 0.5])  # noise, a spike
    assert guard.loss(1e5) is None  # one spike in the window: the median stays low
    assert "loss exploded" in guard.loss(1e5)
    quiet = DivergenceGuard(factor=None, window=3)
    assert all(quiet.loss(v) is None for v in [1.0, 1.0, 1.0, 1e9, 1e9, 1e9])
    assert "NaN or infinite" in quiet.weights([torch.tensor([1.0, float("inf")])])


# -- one load, a CLI that only dispatches -----------------------------------------------------
def test_python_m_metatl_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "metatl", "list"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and "algorithms:" in done.stdout


def test_eval_rebuilds_the_learner_through_load_learner_without_training_data(run, monkeypatch):
    from metatl import build
    from metatl.engine import trainer

    assert not hasattr(trainer, "load_trainer") and not hasattr(__import__("metatl.cli").cli, "train_and_test")
    splits, loads = [], []
    real_sampler, real_load = build.build_sampler, build.load_learner
    monkeypatch.setattr(build, "build_sampler", lambda cfg, split: splits.append(split) or real_sampler(cfg, split))
    monkeypatch.setattr(build, "load_learner", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    import metatl.data

    monkeypatch.setattr(metatl.data, "build_sampler", build.build_sampler)
    assert main(["eval", str(run / "last.pt"), "--no-progress", "--set", "eval.episodes=3"]) == 0
    assert loads and "train" not in splits and "val" not in splits
    learner = metatl.load(run / "last.pt", overrides=["eval.episodes=3"])
    assert learner.config.eval.episodes == 3 and learner.trained["iterations"] == SINUSOID["train"]["iterations"]
