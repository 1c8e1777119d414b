"""train.logger: TensorBoard event files and MLflow runs hold what metrics.jsonl holds, and resume appends."""

import json

import pytest
import yaml

from metatl.cli import main
from metatl.config import ConfigError, from_dict
from metatl.engine import loggers

SINUSOID = {
    "name": "t",
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "model": {"name": "mlp", "hidden": [8]},
    "data": {"name": "sinusoid", "shots": 5, "queries": 5},
    "train": {"iterations": 4, "meta_batch": 2, "val_every": 2, "val_episodes": 3, "ckpt_every": 2, "log_every": 2},
    "eval": {"episodes": 4, "plot_tasks": 0},
}


def train(tmp_path, logger, *extra, iterations=4):
    raw = dict(SINUSOID, train={**SINUSOID["train"], "logger": logger, "iterations": iterations})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress", *extra]) == 0
    return out


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_lr_and_throughput(tmp_path):
    out = train(tmp_path, "jsonl")
    steps = [r for r in records(out) if "loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 4]
    assert all(r["lr"] == pytest.approx(1e-3) and r["episodes_per_s"] > 0 for r in steps)
    assert not (out / "tensorboard").exists() and not (out / "mlflow").exists()


def test_tensorboard_event_files_read_back_with_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(tmp_path, ["jsonl", "tensorboard"])
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as killed:  # what a run killed after the checkpoint logged
        killed.add_scalar("train/loss", 1e9, 5)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 5, "loss": 1e9}) + "\n")
    main(["train", str(out / "config.yaml"), "--out", str(out), "--no-progress", "--resume"]
         + ["--set", "train.iterations=6", "--allow-change", "train.iterations"])  # fmt: skip
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/lr", "train/episodes_per_s", "val/mse", "val/ci95"} <= tags
    jsonl = records(out)
    for tag, key in (("train/loss", "loss"), ("val/mse", "val_mse"), ("train/lr", "lr")):
        logged = {e.step: e.value for e in acc.Scalars(tag)}
        expected = {r["iteration"]: r[key] for r in jsonl if key in r}
        assert sorted(logged) == sorted(expected), tag  # resume purged nothing twice, lost nothing
        assert all(logged[s] == pytest.approx(expected[s], rel=1e-6) for s in expected), tag
    assert [e.step for e in acc.Scalars("val/mse")] == [2, 4, 6]  # across the resume


def test_mlflow_store_has_params_metrics_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = train(tmp_path, "mlflow", iterations=2)
    main(["train", str(out / "config.yaml"), "--out", str(out), "--no-progress", "--resume"]
         + ["--set", "train.iterations=4", "--allow-change", "train.iterations"])  # fmt: skip
    kept = json.loads((out / "mlflow_run.json").read_text())
    assert kept["tracking_uri"].startswith("sqlite:///") and str(out / "mlflow" / "mlflow.db") in kept["tracking_uri"]
    client = MlflowClient(kept["tracking_uri"])
    assert len(client.search_runs([client.get_experiment_by_name("t").experiment_id])) == 1  # resumed: one run
    run = client.get_run(kept["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["algorithm.name"] == "maml"
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert loss == {r["iteration"]: pytest.approx(r["loss"]) for r in records(out) if "loss" in r}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mse")] == [2, 4]
    assert "test/mse" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "results.json", "last.pt"} <= artifacts


def test_logger_errors(tmp_path, monkeypatch):
    raw = dict(SINUSOID, train={**SINUSOID["train"], "logger": ["jsonl", "wandb"]})
    with pytest.raises(ConfigError, match="train.logger must be one of jsonl, tensorboard, mlflow"):
        from_dict(raw)
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'metatl\[tensorboard\]'"):
        loggers.check_available(["jsonl", "tensorboard"])
