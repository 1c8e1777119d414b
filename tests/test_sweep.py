"""metatl sweep: workers sharing one SQLite study run N trials in all, pruning stops a run, bad spaces say why."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metatl.config import ConfigError, load_config

optuna = pytest.importorskip("optuna")
from metatl.sweep import load_space, run_sweep  # noqa: E402

SINUSOID = {
    "name": "s",
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "model": {"name": "mlp", "hidden": [8]},
    "data": {"name": "sinusoid", "shots": 5, "queries": 5},
    "train": {"iterations": 4, "meta_batch": 2, "val_every": 2, "val_episodes": 3, "ckpt_every": 2, "log_every": 2},
    "eval": {"episodes": 4, "plot_tasks": 0},
}
SPACE = {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "algorithm.inner_steps": {"low": 1, "high": 3}}


def files(tmp_path, space=SPACE):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(SINUSOID))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return tmp_path / "cfg.yaml", tmp_path / "space.yaml"


def test_two_workers_share_one_study(tmp_path):
    cfg, space = files(tmp_path)
    out, n = tmp_path / "sweep", 4
    cmd = [sys.executable, "-m", "metatl", "sweep", str(cfg), "--space", str(space), "--trials", str(n)]
    cmd += ["--out", str(out), "--study", "shared", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [w.communicate(timeout=300)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(n))  # N in all: none lost, none extra
    assert all(t.state.name == "COMPLETE" for t in trials)  # MedianPruner waits for 5 finished trials
    assert all("Trial" in log for log in logs)  # both workers ran trials
    folders = sorted(p.name for p in out.glob("trial_*"))
    assert folders == [f"trial_{i:04d}" for i in range(n)]
    for t in trials:  # each trial ran once, in its own folder, with its own values
        run = Path(t.user_attrs["run_folder"])
        stored = yaml.safe_load((run / "config.yaml").read_text())
        assert stored["train"]["lr"] == pytest.approx(t.params["train.lr"])
        assert stored["algorithm"]["inner_steps"] == t.params["algorithm.inner_steps"]
        assert not (run / "resume_log.jsonl").exists()
        iterations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert iterations == [1, 2, 2, 4, 4]  # one run: train and validation lines, never repeated
    rows = list(csv.reader((out / "summary.csv").open()))
    assert rows[0] == [
        "trial",
        "algorithm.inner_steps",
        "train.lr",
        "value",
        "state",
        "run_folder",
    ]  # the space's order
    assert len(rows) == n + 1
    assert (out / "optimization_history.png").exists() and (out / "param_importances.png").exists()


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trial_stops_early(tmp_path):
    cfg, space = files(tmp_path)
    study, out = run_sweep(cfg, space, 1, out=tmp_path / "sweep", pruner=AlwaysPrune())
    (trial,) = study.trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [2]
    run = Path(trial.user_attrs["run_folder"])
    assert max(json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run / "results.json").exists()  # stopped at the first validation of 4 iterations
    import torch

    assert torch.load(run / "last.pt", weights_only=True)["iteration"] == 2  # a clean stop: last.pt written
    assert "pruned" in (out / "summary.md").read_text()


def test_direction_follows_the_metric_and_trials_share_an_mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg, space = files(tmp_path)
    out = tmp_path / "sweep"
    study, _ = run_sweep(cfg, space, 1, out=out, pruner="none", overrides=["train.logger=[jsonl, mlflow]"])
    assert study.direction.name == "MINIMIZE"  # MSE
    assert study.trials[0].value == pytest.approx(
        [json.loads(line) for line in (out / "trial_0000" / "metrics.jsonl").open()][-1]["val_mse"]
    )
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")  # the sweep's store, not one per trial
    (run,) = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert run.info.run_name == "trial_0000" and run.data.metrics["val/mse"] == pytest.approx(study.trials[0].value)
    assert not (out / "trial_0000" / "mlflow").exists() and (out / "artifacts").is_dir()


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lrr": {"low": 0.1, "high": 1.0}}, r"train.lrr=0.1 does not make a valid config: unknown key\(s\) lrr"),
        (
            {"train.lr": {"low": 0.0, "high": 1.0}},
            r"train.lr=0.0 does not make a valid config: train.lr must be above 0",
        ),
        ({"train.lr": {"low": 1.0, "high": 0.1}}, r"low \(1.0\) is above high \(0.1\)"),
        ({"train.lr": {"low": 0.0, "high": 0.1, "log": True}}, "a log range needs low > 0"),
        ({"train.lr": {"low": 0.1}}, "needs numbers 'low' and 'high'"),
        ({"train.lr": {"low": 0.1, "hi": 0.2}}, r"unknown field\(s\) hi"),
        ({"train.lr": 0.1}, "must map to a range or choices"),
        ({"lr": [0.1, 0.2]}, "is not a config key"),
        ({"train.optimizer": {"choices": ["adam", "adamw"]}}, "train.optimizer='adamw' does not make a valid config"),
        ([1, 2], "must map config keys to ranges or choices"),
    ],
)
def test_bad_space_says_what_is_wrong(tmp_path, space, message):
    cfg, path = files(tmp_path, space)
    with pytest.raises(ConfigError, match=message):
        load_space(path, cfg)


def test_space_file_in_configs_loads():
    root = Path(__file__).resolve().parents[1]
    space = load_space(root / "configs/spaces/maml_sinusoid.yaml", root / "configs/maml_sinusoid_demo.yaml")
    assert [p.kind for p in space] == ["float", "float", "int", "categorical"]
    assert load_config(root / "configs/maml_sinusoid_demo.yaml").train.val_every > 0


def test_sweep_needs_validation(tmp_path):
    cfg, space = files(tmp_path)
    with pytest.raises(ConfigError, match="train.val_every is 0"):
        run_sweep(cfg, space, 1, out=tmp_path / "sweep", overrides=["train.val_every=0"])


def test_trial_claimed_past_the_total_is_failed_not_run(monkeypatch):
    """Without a lock (any storage but a SQLite file) two workers may both see room for the last
    trial; the one whose trial number is past the total marks it failed as surplus and stops."""
    from metatl.sweep import claim_trial

    study = optuna.create_study()
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    monkeypatch.setattr(study, "get_trials", lambda **kw: [])  # the count another worker saw
    assert claim_trial(study, "postgresql://elsewhere", 2) is None
    monkeypatch.undo()
    surplus = study.trials[-1]
    assert surplus.number == 2 and surplus.state.name == "FAIL" and "surplus" in surplus.user_attrs
    assert claim_trial(study, "postgresql://elsewhere", 2) is None  # full: nothing new asked
    assert len(study.trials) == 3
    assert claim_trial(study, "postgresql://elsewhere", 4).number == 3
