"""Splitting the meta-batch over processes gives the single-process run (up to float rounding), under
``train.processes``, under ``torchrun`` on two "nodes" of the loopback address, and across an elastic
restart that kills a worker mid-run. CPU, gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_and_trainer import SINUSOID, write_config
from test_image_folder import make_folder

import metatl
from metatl.cli import main
from metatl.config import ConfigError, from_dict
from metatl.engine import checkpoint as ckpt_io

TESTS = Path(__file__).resolve().parent
# the MAML run every test below repeats: 8 steps of 4 tasks, a checkpoint every 3
MAML = {
    **SINUSOID,
    "train": {**SINUSOID["train"], "iterations": 8, "meta_batch": 4, "num_threads": 1, "val_every": 3, "ckpt_every": 3},
}


def _torchrun(*args, env=None, **popen):
    """``python -m torch.distributed.run ARGS`` with this checkout's metatl importable."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(Path(metatl.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env, **popen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_weights(a, b, exact=False):
    one, two = ckpt_io.load(a), ckpt_io.load(b)
    assert one["iteration"] == two["iteration"]
    for name, value in one["learner"].items():
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(two["learner"][name], value, **tol, msg=name)


def iterations_logged(run) -> list:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def maml_runs(tmp_path_factory):
    """The MAML run in one process, and on two "nodes" (two torchrun launchers on the loopback address,
    one worker each)."""
    tmp = tmp_path_factory.mktemp("maml")
    cfg = write_config(tmp, MAML)
    assert main(["train", str(cfg), "--out", str(tmp / "one"), "--no-progress"]) == 0
    port, run_id = _free_port(), f"metatl-test-{os.getpid()}"
    nodes = [
        _torchrun(
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            run_id,
            "-m",
            "metatl",
            "train",
            str(cfg),
            "--out",
            str(tmp / "nodes"),
            "--no-progress",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    return {"config": cfg, "one": tmp / "one", "nodes": tmp / "nodes", "outputs": outputs}


def test_two_nodes_train_one_run_with_the_one_process_result(maml_runs):
    one, nodes = maml_runs["one"], maml_runs["nodes"]
    assert_same_weights(one / "last.pt", nodes / "last.pt")
    # rank 0 alone wrote the run folder and printed the results
    assert iterations_logged(nodes) == iterations_logged(one)
    assert (nodes / "results.json").exists() and (nodes / "last.pt.rng1").exists()
    assert sum("results:" in out for out in maml_runs["outputs"]) == 1
    record = json.loads((nodes / "results.json").read_text())
    assert record["iterations"] == 8


def test_an_elastic_restart_continues_from_the_last_checkpoint(maml_runs, tmp_path):
    out = tmp_path / "restarted"
    worker = _torchrun(
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        str(TESTS / "dying_worker.py"),
        "train",
        str(maml_runs["config"]),
        "--out",
        str(out),
        "--no-progress",
        env={"METATL_DIE_AT": "4"},  # rank 1 dies after the checkpoint of step 3, in step 5
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, output
    assert "resumed" in output and "at iteration 3" in output, output
    (restart,) = [json.loads(line) for line in (out / "resume_log.jsonl").read_text().splitlines()]
    assert restart["iteration"] == 3 and restart["changes"] == {}
    # the same run as the uninterrupted one (two processes in both), and its log without repeated lines
    assert_same_weights(maml_runs["nodes"] / "last.pt", out / "last.pt", exact=True)
    assert iterations_logged(out) == iterations_logged(maml_runs["nodes"])


def test_protonet_in_two_processes_trains_the_one_process_parameters(tmp_path):
    """ProtoNet (trained as a whole, BatchNorm with running statistics) through ``train.processes``."""
    root = make_folder(tmp_path / "imgs", classes=6, per_class=4)
    classes = {"train": ["class0", "class1", "class2"], "val": ["class3"], "test": ["class4", "class5"]}
    raw = {
        "name": "p",
        "algorithm": {"name": "protonet"},
        "model": {"name": "conv4_pool", "filters": 4, "bn_mode": "running"},
        "data": {
            "name": "image_folder",
            "root": str(root),
            "ways": 2,
            "shots": 1,
            "queries": 2,
            "image_size": 16,
            "classes": classes,
        },
        "train": {
            "iterations": 4,
            "meta_batch": 2,
            "val_every": 0,
            "num_threads": 1,
            "log_every": 1,
            # SGD: the convolution biases before BatchNorm have a zero gradient up to rounding, which
            # Adam would scale up to whole steps, so that rounding alone would tell the runs apart
            "optimizer": "sgd",
            "lr": 0.1,
        },
        "eval": {"episodes": 4},
    }
    cfg = write_config(tmp_path, raw)
    for procs in (1, 2):
        out = str(tmp_path / f"p{procs}")
        assert main(["train", str(cfg), "--out", out, "--no-progress", "--set", f"train.processes={procs}"]) == 0
    one, two = ckpt_io.load(tmp_path / "p1" / "last.pt"), ckpt_io.load(tmp_path / "p2" / "last.pt")
    for name, value in one["learner"].items():
        # the running statistics too: the processes' updates are composed in the one-process order
        torch.testing.assert_close(two["learner"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert iterations_logged(tmp_path / "p2") == iterations_logged(tmp_path / "p1")


def test_a_meta_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ConfigError, match="multiple"):
        from_dict({**SINUSOID, "train": {"meta_batch": 5, "processes": 2}})
    with pytest.raises(ConfigError, match="processes must be"):
        from_dict({**SINUSOID, "train": {"processes": 0}})


def test_under_a_launcher_the_run_folder_and_the_process_count_are_checked(tmp_path, monkeypatch, capsys):
    """A worker of torchrun (here a group of one, from the launcher's environment variables)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    cfg = write_config(tmp_path, {**MAML, "train": {**MAML["train"], "meta_batch": 2, "processes": 2}})
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "under torchrun, name the run folder with --out" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "train.processes=2, but the launcher started 1 processes" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()  # the group is left when the run stops


def test_the_shares_of_a_batch_are_its_consecutive_blocks():
    from metatl.engine.executors.processes import share

    episodes = list(range(6))
    assert [share(episodes, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    rows = {"source_x": torch.arange(8).view(4, 2), "source_y": torch.arange(4)}
    halves = [share(rows, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h["source_x"] for h in halves]), rows["source_x"])
    assert halves[1]["source_y"].tolist() == [2, 3]
    with pytest.raises(ConfigError, match="cannot be split evenly over 4 processes"):
        share(episodes, 0, 4)
    with pytest.raises(ConfigError, match="train it in one process"):
        share(object(), 0, 2)
