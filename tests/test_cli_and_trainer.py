"""End-to-end CLI runs for each algorithm, exact resume, NaN safety, and config errors."""

import json
import math
import platform
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_data import fake_omniglot

from metatl.cli import main
from metatl.config import ConfigError, from_dict, load_config
from metatl.engine import NonFiniteLossError, Trainer
from metatl.engine import checkpoint as ckpt_io

SINUSOID = {
    "name": "t",
    "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "model": {"name": "mlp", "hidden": [16, 16]},
    "data": {"name": "sinusoid", "shots": 5, "queries": 10},
    "train": {"iterations": 6, "meta_batch": 4, "val_every": 3, "val_episodes": 5, "ckpt_every": 3, "log_every": 1},
    "eval": {"episodes": 10, "extra_steps": [1, 5]},
}


def write_config(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


ALGOS = {
    "maml": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    "fomaml": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1, "first_order": True},
    "reptile": {"name": "reptile", "inner_lr": 0.01, "inner_steps": 3, "inner_batch": 3, "inner_steps_test": 3},
    "pretrain": {"name": "pretrain", "inner_lr": 0.01},
}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_cli_train_and_eval_sinusoid(tmp_path, algo, capsys):
    raw = dict(SINUSOID, algorithm=ALGOS[algo])
    cfg = write_config(tmp_path, raw)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    for f in (
        "config.yaml",
        "last.pt",
        "best.pt",
        "metrics.jsonl",
        "results.json",
        "learning_curve.png",
        "sinusoid_tasks.png",
    ):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    for key in (
        "algorithm",
        "dataset",
        "ways",
        "shots",
        "queries",
        "episodes",
        "metric",
        "inner_steps_test",
        "bn_mode",
        "train_seconds",
        "iterations",
        "seed",
        "metatl_version",
        "torch_version",
    ):
        assert key in res
    assert res["metric"]["name"] == "mse" and math.isfinite(res["metric"]["mean"]) and res["iterations"] == 6
    assert set(res["by_inner_steps"]) == {"1", "5"}
    printed = capsys.readouterr().out
    assert "mean +- 95% CI" in printed and "learning_curve.png" in printed
    # eval writes eval_<checkpoint>_<N>ep.json beside the checkpoint, or in --out
    assert (
        main(["eval", str(out / "last.pt"), "--out", str(tmp_path / "ev"), "--no-progress", "--set", "eval.episodes=5"])
        == 0
    )
    assert json.loads((tmp_path / "ev" / "eval_last_5ep.json").read_text())["episodes"] == 5


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "protonet_bfloat16"])
def test_cli_train_on_omniglot_shaped_data(tmp_path, algo, monkeypatch):
    from metatl.data import omniglot as omni

    root = fake_omniglot(tmp_path / "data", n_alphabets=2, n_chars=3)
    monkeypatch.setattr(
        omni, "ACCEPTED", {p: (omni.file_digests(root / "omniglot" / f"{p}.zip")["sha256"],) for p in omni.PARTS}
    )
    monkeypatch.setattr(omni, "N_CHARACTERS", 12)
    names = [f"Alpha{p[7]}{a}/character{c:02d}" for p in omni.PARTS for a in range(2) for c in range(1, 4)]
    monkeypatch.setattr(
        omni, "split_characters", lambda n, split, subset: names[:8] if subset == "train" else names[8:]
    )
    raw = {
        "name": "o",
        "algorithm": ALGOS.get(algo),
        "model": {"name": "conv4_stride", "filters": 8},
        "data": {"name": "omniglot", "ways": 3, "shots": 1, "queries": 2, "data_dir": str(root)},
        "train": {"iterations": 2, "meta_batch": 2, "val_every": 2, "val_episodes": 2},
        "eval": {"episodes": 4},
    }
    if algo == "protonet_bfloat16":
        raw.update(algorithm={"name": "protonet"}, model={"name": "conv4_pool", "filters": 8, "fast": True})
        raw["train"]["precision"] = "bfloat16"
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, raw)), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"]["name"] == "accuracy" and 0 <= res["metric"]["mean"] <= 1 and res["ways"] == 3
    assert res["train_precision"] == raw["train"].get("precision", "float32")


def _params(trainer):
    return {k: v.clone() for k, v in trainer.learner.state_dict().items()}


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_resume_continues_exactly(tmp_path, algo):
    raw = dict(SINUSOID, algorithm=ALGOS[algo])
    raw["train"] = dict(raw["train"], iterations=8, ckpt_every=100, val_every=0)
    cfg = load_config(write_config(tmp_path, raw))
    straight = Trainer(cfg, tmp_path / "a", progress=False).fit()

    cfg.train.iterations = 3
    Trainer(cfg, tmp_path / "b", progress=False).fit()
    torch.manual_seed(12345)  # whatever happened in between must not matter
    cfg.train.iterations = 8
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    resumed.resume(allow=["train.iterations"])
    assert resumed.iteration == 3
    resumed.fit()
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    raw = dict(SINUSOID)
    raw["train"] = dict(raw["train"], iterations=4, ckpt_every=2, val_every=0)
    cfg = load_config(write_config(tmp_path, raw))
    trainer = Trainer(cfg, tmp_path / "run", progress=False).fit()
    good = ckpt_io.load(tmp_path / "run" / "last.pt")
    cfg.train.iterations = 10
    cfg.algorithm["inner_lr"] = float("nan")
    bad = Trainer(cfg, tmp_path / "run", progress=False)
    bad.learner.load_state_dict(trainer.learner.state_dict())
    with pytest.raises(NonFiniteLossError, match="last good checkpoint .* untouched.*grad_clip"):
        bad.fit()
    after = ckpt_io.load(tmp_path / "run" / "last.pt")
    assert after["iteration"] == good["iteration"]
    assert all(torch.equal(after["learner"][k], good["learner"][k]) for k in good["learner"])


def test_resume_from_another_config_is_refused(tmp_path):
    raw = dict(SINUSOID)
    raw["train"] = dict(raw["train"], iterations=2, val_every=0)
    Trainer(load_config(write_config(tmp_path, raw)), tmp_path / "run", progress=False).fit()
    other = dict(raw, model={"name": "mlp", "hidden": [8]})
    t = Trainer(load_config(write_config(tmp_path, other, "other.yaml")), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="another config.*model.hidden"):
        t.resume()
    assert (
        main(["train", str(tmp_path / "other.yaml"), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 2
    )


def test_checkpoints_from_before_a_new_config_key_still_resume_and_evaluate(tmp_path):
    raw = dict(SINUSOID)
    raw["train"] = dict(raw["train"], iterations=2, val_every=0)
    Trainer(load_config(write_config(tmp_path, raw)), tmp_path / "run", progress=False).fit()
    path = tmp_path / "run" / "last.pt"
    state = ckpt_io.load(path)
    data = state["config"]["data"]
    del data["train_queries"]  # as written before data.train_queries existed ...
    data.update(ways=5, split="vinyals", root=None)  # ... and when one section held every data set's keys
    ckpt_io.save_atomic(state, path)
    t = Trainer(
        load_config(write_config(tmp_path, dict(raw, train=dict(raw["train"], iterations=3)))),
        tmp_path / "run",
        progress=False,
    )
    t.resume(allow=["train.iterations"])
    assert t.iteration == 2
    assert main(["eval", str(path), "--set", "eval.episodes=3", "--out", str(tmp_path / "ev")]) == 0


def test_evaluation_cannot_change_the_training_classes(tmp_path):
    from test_image_folder import make_folder

    root = make_folder(tmp_path / "imgs", classes=6, per_class=3)
    raw = {
        "algorithm": {"name": "protonet"},
        "model": {"name": "conv4_pool", "filters": 4, "bn_mode": "running"},
        "data": {
            "name": "image_folder",
            "root": str(root),
            "train_subset": "trainval",
            "ways": 2,
            "queries": 2,
            "image_size": 16,
            "classes": {"train": ["class0", "class1"], "val": ["class2"], "test": ["class3", "class4"]},
        },
        "train": {"iterations": 2, "meta_batch": 1, "val_every": 0},
        "eval": {"episodes": 2},
    }
    t = Trainer(load_config(write_config(tmp_path, raw)), tmp_path / "run", progress=False)
    t.fit()
    res = t.test()
    assert res["train_subset"] == "trainval"
    assert (
        main(["eval", str(tmp_path / "run" / "last.pt"), "--set", "data.train_subset=train", "train.val_every=0"]) == 2
    )


def test_unknown_config_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*lr_typo.*valid keys:.*lr"):
        load_config(write_config(tmp_path, dict(SINUSOID, train={"lr_typo": 1})))
    with pytest.raises(ConfigError, match="unknown key.*alpha.*valid keys:.*inner_lr"):
        load_config(write_config(tmp_path, dict(SINUSOID, algorithm={"name": "maml", "alpha": 0.1})))
    with pytest.raises(ConfigError, match="unknown algorithm 'mamll'.*maml"):
        load_config(write_config(tmp_path, dict(SINUSOID, algorithm={"name": "mamll"})))
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        load_config(write_config(tmp_path, SINUSOID), ["bogus.x=1"])
    with pytest.raises(ConfigError, match="train.precision.*float32, tf32, bfloat16.*'float16'"):
        load_config(write_config(tmp_path, SINUSOID), ["train.precision=float16"])
    with pytest.raises(ConfigError, match="bfloat16.*executor=vmap.*executor=threads"):
        load_config(write_config(tmp_path, SINUSOID), ["train.precision=bfloat16", "train.executor=vmap"])
    cfg = load_config(write_config(tmp_path, SINUSOID), ["train.lr=0.5", "algorithm.first_order=true"])
    assert cfg.train.lr == 0.5 and cfg.algorithm["first_order"] is True
    assert load_config(write_config(tmp_path, SINUSOID), ["train.precision=tf32"]).train.precision == "tf32"


def test_allow_tf32_sets_cudnn_and_matmul_together():
    """``train.precision: float32`` on a GPU turns TF32 off for cuDNN convolutions (on by PyTorch's
    default) and matrix products; ``tf32`` turns both on."""
    from metatl.engine.runtime import allow_tf32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        allow_tf32(False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        allow_tf32(True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_run_folder_is_not_replaced_without_overwrite(tmp_path, capsys):
    cfg, out = write_config(tmp_path, dict(SINUSOID, train={**SINUSOID["train"], "iterations": 2})), tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0
    before = (out / "last.pt").read_bytes()
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err and (out / "last.pt").read_bytes() == before
    assert (
        main(["train", str(cfg), "--out", str(out), "--no-progress", "--overwrite", "--set", "train.iterations=3"]) == 0
    )
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert iterations.count(1) == 1 and iterations == sorted(iterations) and iterations[-1] == 3  # old lines gone


def test_config_values_are_checked_by_type_and_range(tmp_path):
    path = write_config(tmp_path, SINUSOID)
    assert load_config(path, ["train.lr=1e-3", "algorithm.inner_lr=5E-2"]).train.lr == 1e-3  # YAML 1.2 floats
    for override, message in [
        ("train.lr=abc", "train.lr must be a number, got 'abc'"),
        ("data.shots=2.5", "data.shots must be a whole number"),
        ("algorithm.first_order=1", "algorithm.first_order must be true or false"),
        ("algorithm.inner_lr=fast", "algorithm.inner_lr must be a number"),
        ("train.meta_batch=0", "train.meta_batch must be at least 1"),
        ("train.iterations=-5", "train.iterations must be at least 1"),
        ("data.queries=0", "data.queries must be at least 1"),
        ("eval.episodes=0", "eval.episodes must be at least 1"),
        ("train.ema_decay=1", "train.ema_decay must lie strictly between 0 and 1"),
        ("train.ema_decay=-0.5", "train.ema_decay must lie strictly between 0 and 1"),
        ("eval.weights=best", "eval.weights must be one of averaged, raw"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])
    with pytest.raises(ConfigError, match="data.ways must be at least 2"):
        from_dict({"data": {"name": "omniglot", "ways": 1}})
    with pytest.raises(ConfigError, match="data.train_subset must be 'train' or 'trainval'"):
        from_dict({"data": {"name": "omniglot", "train_subset": "all"}})
    with pytest.raises(ConfigError, match="trainval meta-trains on the validation classes.*train.val_every=0"):
        from_dict({"data": {"name": "omniglot", "train_subset": "trainval"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train_subset in section 'data' \(sinusoid\)"):
        from_dict({"data": {"name": "sinusoid", "train_subset": "trainval"}, "train": {"val_every": 0}})
    assert (
        from_dict(
            {"data": {"name": "omniglot", "train_subset": "trainval"}, "train": {"val_every": 0}}
        ).data.train_subset
        == "trainval"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_training_on_cuda_without_cuda_says_what_to_set(tmp_path, capsys):
    cfg = write_config(tmp_path, SINUSOID)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", "train.device=cuda"]) == 2
    assert "--set train.device=cpu" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--set", "train.device=gpu"]) == 2
    assert "not a device torch knows" in capsys.readouterr().err


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("maml", "reptile", "sinusoid", "omniglot", "conv4_stride", "conv4_pool", "mlp"):
        assert name in out


def test_schedules_follow_the_iteration_or_time_budget_whichever_ends_first():
    from metatl.engine.trainer import lr_at, progress_at

    cfg = from_dict({"train": {"iterations": 1000, "lr": 1e-3, "lr_final": 1e-4, "lr_schedule": "cosine"}})
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 500) == pytest.approx(5.5e-4)
    assert lr_at(cfg, 1000) == pytest.approx(1e-4)
    # under a 10-minute budget, 5 of 10 minutes spent at iteration 100 is half-way
    timed = from_dict({"train": {"iterations": 1000, "time_budget_min": 10, "lr": 1.0, "lr_schedule": "linear"}})
    assert progress_at(timed, 100, 300.0) == pytest.approx(0.5)
    assert progress_at(timed, 900, 300.0) == pytest.approx(0.9)
    assert progress_at(timed, 10, 900.0) == 1.0
    assert lr_at(timed, 100, 300.0) == pytest.approx(0.5)
    cos = from_dict({"train": {"time_budget_min": 10, "lr": 1.0, "lr_schedule": "cosine"}})
    assert lr_at(cos, 1, 150.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ConfigError, match="cosine"):
        lr_at(from_dict({"train": {"lr_schedule": "exp"}}), 0)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) > 20
    for path in configs:
        cfg = load_config(path)
        assert cfg.name == path.stem, f"{path.name}: name {cfg.name!r} differs from the file name"


def test_a_backbone_without_parameters_is_refused_before_training(tmp_path):
    cfg = load_config(write_config(tmp_path, dict(SINUSOID, model={"name": "pixels"})))
    with pytest.raises(ConfigError, match="nothing to train.*'maml'.*'pixels'.*backbone with weights"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_results_json_is_strict_json_even_with_a_nan(tmp_path):
    from metatl.engine.trainer import write_results

    write_results(
        {"metric": {"mean": float("nan"), "ci95": float("inf")}, "scores": [1.0, float("nan")]},
        tmp_path / "results.json",
    )
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"metric": {"mean": None, "ci95": None}, "scores": [1.0, None]}


glibc_only = pytest.mark.skipif(
    not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"),
    reason="malloc tuning applies to Linux with glibc only",
)


@glibc_only
def test_keep_freed_memory_lets_a_new_tensor_reuse_freed_pages():
    # a fresh process, so the measurement does not depend on what the tests before did to malloc
    script = (
        "import ctypes, resource, torch\n"
        "from metatl.engine.runtime import keep_freed_memory\n"
        "ctypes.CDLL('libc.so.6').prctl(41, 1, 0, 0, 0)\n"  # PR_SET_THP_DISABLE: count 4 KiB pages
        "def faults():\n"
        "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(4):\n"
        "        x = torch.ones(16 << 20)\n"  # 64 MiB, above glibc's largest mmap threshold
        "        del x\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n"
        "before = faults()\n"
        "applied = keep_freed_memory()\n"
        "faults()\n"  # the first allocation after the change still takes fresh pages
        "print(applied, before, faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    applied, before, after = out.split()
    assert applied == "True"
    assert int(before) > 4 * 16000  # 4 x 16,384 pages of 4 KiB, faulted in each time
    assert int(after) < int(before) / 10


@glibc_only
def test_keep_freed_memory_holds_for_tensors_of_other_threads():
    """The task threads' tensors reuse freed pages too: glibc gives each thread an arena of its own
    (so that the task threads do not wait for one lock) whose heaps it would hand back as they
    empty, so each new thread (one per step and task shard) would fault them in again."""
    script = (
        "import ctypes, os, resource, threading, time, torch\n"
        "from metatl.engine.runtime import keep_freed_memory\n"
        "ctypes.CDLL('libc.so.6').prctl(41, 1, 0, 0, 0)\n"  # PR_SET_THP_DISABLE: count 4 KiB pages
        "def work(ids):\n"
        "    ids.append(threading.get_native_id())\n"
        "    xs = [torch.ones(4 << 20) for _ in range(8)]\n"  # 8 x 16 MiB live at once
        "    del xs\n"
        "def faults():\n"
        "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    ids = []\n"
        "    thread = threading.Thread(target=work, args=(ids,))\n"
        "    thread.start(), thread.join()\n"
        # join returns before the thread has handed its arena back; the next thread would take another
        "    while os.path.exists(f'/proc/self/task/{ids[0]}'):\n"
        "        time.sleep(0.001)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n"
        "applied = keep_freed_memory()\n"
        "first = faults(), faults()\n"  # the first two threads both took fresh pages, in our runs
        "print(applied, max(first), max(faults() for _ in range(3)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    applied, first, later = out.split()
    assert applied == "True"
    assert int(first) > 30000  # the first thread's 128 MiB (32,768 pages of 4 KiB) are fresh
    # later threads reuse them; with glibc's default top pad, 20,000-33,000 faults each time
    assert int(later) < int(first) / 4


@glibc_only
def test_keep_freed_memory_leaves_each_thread_its_own_arena():
    """Two threads allocating at once use two of glibc's arenas: with one arena for all (an earlier
    setting) the task threads queued for its lock hundreds of times a step."""
    script = (
        "import ctypes, threading, torch\n"
        "from metatl.engine.runtime import keep_freed_memory\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.fdopen.restype = ctypes.c_void_p\n"
        "libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]\n"
        "applied = keep_freed_memory()\n"
        "held = torch.ones(1 << 18)\n"
        "ready, done = threading.Event(), threading.Event()\n"
        "def work():\n"
        "    x = torch.ones(1 << 18)\n"
        "    ready.set(), done.wait()\n"
        "thread = threading.Thread(target=work)\n"
        "thread.start(), ready.wait()\n"
        "print(applied, flush=True)\n"
        "libc.malloc_info(0, libc.fdopen(1, b'w'))\n"  # XML, a <heap nr=...> element per arena
        "libc.fflush(None)\n"
        "done.set(), thread.join()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "True"
    assert out.count("<heap nr=") >= 2


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_tunes_malloc_only_when_asked(tmp_path, monkeypatch, keep):
    import metatl.engine.runtime as runtime_module

    calls = []
    monkeypatch.setattr(runtime_module, "_keep_freed_memory", lambda: calls.append(1) or True)
    raw = {**SINUSOID, "train": {**SINUSOID["train"], "keep_freed_memory": keep}}
    trainer = Trainer(from_dict(raw), tmp_path / "run", progress=False)
    assert calls == ([1] if keep else [])
    assert trainer.keeps_freed_memory is keep


def test_moving_average_follows_its_recursion():
    """The average against the recursion written out: a_1 = w_1, a_(n+1) = d_n a_n + (1 - d_n) w_(n+1)
    with d_n = min(decay, (1 + n) / (10 + n)); integer buffers are copied."""
    from metatl.engine.trainer import moving_average

    model = torch.nn.BatchNorm1d(3)  # a weight, a bias, running statistics and an integer counter
    ema = moving_average(model, 0.5)
    expected = None
    for n in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
            model.num_batches_tracked.fill_(10 * n)
        current = {k: v.clone() for k, v in model.state_dict().items()}
        d = min(0.5, (1 + n) / (10 + n))
        expected = (
            current
            if expected is None
            else {
                k: (d * expected[k] + (1 - d) * current[k]) if v.is_floating_point() else current[k]
                for k, v in current.items()
            }
        )
        ema.update_parameters(model)
        got = ema.module.state_dict()
        assert all(torch.allclose(got[k].double(), expected[k].double(), atol=1e-6) for k in expected)
    assert int(ema.module.num_batches_tracked) == 110
    assert (1 + 1) / (10 + 1) < 0.5 < (1 + 11) / (10 + 11)  # the loop covered the warm-up and the plain decay


def test_moving_average_is_checkpointed_resumed_exactly_and_scored(tmp_path, capsys):
    raw = dict(SINUSOID)
    raw["train"] = dict(raw["train"], iterations=8, ckpt_every=100, val_every=0, ema_decay=0.9)
    cfg = load_config(write_config(tmp_path, raw))
    straight = Trainer(cfg, tmp_path / "a", progress=False).fit()
    cfg.train.iterations = 3
    Trainer(cfg, tmp_path / "b", progress=False).fit()
    cfg.train.iterations = 8
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    resumed.resume(allow=["train.iterations"])
    resumed.fit()
    a, b = straight.ema.module.state_dict(), resumed.ema.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(resumed.ema.n_averaged) == 8
    raw_weights = straight.learner.state_dict()
    assert any(not torch.equal(a[k], raw_weights[k]) for k in a)  # the average is not the weights

    state = ckpt_io.load(tmp_path / "a" / "last.pt")
    assert all(torch.equal(state["averaged"][k], a[k]) for k in a)
    assert ckpt_io.learner_weights(state) is state["averaged"]
    assert ckpt_io.learner_weights(state, "raw") is state["learner"]
    import metatl

    loaded = metatl.load(tmp_path / "a" / "last.pt").state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)
    loaded = metatl.load(tmp_path / "a" / "last.pt", weights="raw").state_dict()
    assert all(torch.equal(loaded[k], raw_weights[k]) for k in a)
    with pytest.raises(ValueError, match="weights='best'.*'averaged'.*'raw'"):
        metatl.load(tmp_path / "a" / "last.pt", weights="best")

    assert straight.scored is straight.ema.module
    for weights in ("averaged", "raw"):
        out = tmp_path / f"eval_{weights}"
        assert (
            main(
                [
                    "eval",
                    str(tmp_path / "a" / "last.pt"),
                    "--no-progress",
                    "--out",
                    str(out),
                    "--set",
                    f"eval.weights={weights}",
                    "eval.episodes=5",
                ]
            )
            == 0
        )
        record = json.loads(next(out.glob("eval_last_5ep*.json")).read_text())
        assert record["weights"] == weights
        assert record["ema_decay"] == (0.9 if weights == "averaged" else None)
    scores = [
        json.loads(next((tmp_path / f"eval_{w}").glob("eval_last_5ep*.json")).read_text())["metric"]["mean"]
        for w in ("averaged", "raw")
    ]
    assert scores[0] != scores[1]

    plain = dict(raw, train=dict(raw["train"], ema_decay=None))  # a run without an average scores its weights
    Trainer(load_config(write_config(tmp_path, plain, "plain.yaml")), tmp_path / "c", progress=False).fit()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "c" / "last.pt"),
                "--no-progress",
                "--set",
                "eval.episodes=5",
                "train.ema_decay=0.9",
            ]
        )
        == 0
    )
    assert json.loads(next((tmp_path / "c").glob("eval_last_5ep*.json")).read_text())["weights"] == "raw"


@pytest.mark.parametrize(
    "old, executor",
    [
        ({"batch_tasks": True}, "vmap"),
        ({"batch_tasks": True, "compile": True}, "compile"),
        ({"batch_tasks": "inner"}, "threads_inner_vmap"),
        ({"batch_tasks": "inner", "task_threads": 1}, "inner_vmap"),
        ({"batch_tasks": False, "task_threads": "auto"}, "threads"),
        ({"task_threads": 1}, "loop"),
    ],
)
def test_old_execution_keys_load_as_train_executor_with_a_warning(tmp_path, old, executor):
    """Configs (and checkpoints) of earlier versions with MAML's batch_tasks, compile or task_threads."""
    from metatl.config import ConfigDeprecationWarning

    raw = dict(SINUSOID, algorithm={**SINUSOID["algorithm"], **old})
    with pytest.warns(ConfigDeprecationWarning, match="read as train.executor=" + executor):
        cfg = load_config(write_config(tmp_path, raw))
    assert cfg.train.executor == executor and not set(old) & set(cfg.algorithm)
    raw["train"] = dict(raw["train"], executor="loop")
    with pytest.warns(ConfigDeprecationWarning, match="ignored"):
        assert load_config(write_config(tmp_path, raw)).train.executor == "loop"


@pytest.mark.parametrize(
    "old, fast",
    [
        ({"channels_last": True}, True),
        ({"fold_first_norm": False}, False),
        ({"channels_last": False, "fold_first_norm": True}, True),
    ],
)
def test_old_conv_layout_keys_load_as_model_fast_with_a_warning(tmp_path, old, fast):
    from metatl.config import ConfigDeprecationWarning

    raw = dict(SINUSOID, algorithm={"name": "protonet"}, model={"name": "conv4_pool", "filters": 8, **old})
    with pytest.warns(ConfigDeprecationWarning, match=f"read as model.fast={fast}"):
        cfg = load_config(write_config(tmp_path, raw))
    assert cfg.model == {"name": "conv4_pool", "filters": 8, "fast": fast}


def test_budget_clock_cpu_counts_process_cpu_seconds(tmp_path, monkeypatch):
    """``train.budget_clock: cpu`` stops at the budget as the CPU clock counts it, not the wall clock."""
    from metatl.engine import trainer as trainer_module

    ticks = iter(range(0, 10_000, 20))  # each reading 20 "CPU seconds" later: one step costs 20 s
    monkeypatch.setitem(trainer_module.CLOCKS, "cpu", lambda: float(next(ticks)))
    raw = dict(SINUSOID, train={**SINUSOID["train"], "iterations": 50, "time_budget_min": 1, "budget_clock": "cpu"})
    t = Trainer(load_config(write_config(tmp_path, raw)), tmp_path / "run", progress=False).fit()
    assert t.iteration == 3 and t.train_seconds == 60  # 20 s per step: the budget of 60 s is spent after 3
    raw["train"]["budget_clock"] = "wall"
    assert Trainer(load_config(write_config(tmp_path, raw)), tmp_path / "wall", progress=False).fit().iteration == 50
    with pytest.raises(ConfigError, match="budget_clock must be 'wall'"):
        load_config(write_config(tmp_path, dict(raw, train={**raw["train"], "budget_clock": "gpu"})))


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_writes_last_pt_and_the_run_resumes_from_it(tmp_path):
    """``kill`` (or a cluster scheduler ending a job) stops training as Ctrl-C does: the trainer
    writes last.pt at the iteration reached, the command exits with 128 + SIGTERM, and --resume
    continues from there."""
    raw = dict(SINUSOID)
    raw["train"] = dict(raw["train"], iterations=100000, ckpt_every=0, val_every=0, log_every=1)
    config, out = write_config(tmp_path, raw), tmp_path / "run"
    command = [sys.executable, "-m", "metatl.cli", "train", str(config), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if len(lines) >= 20:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped (SIGTERM)" in err and "--resume" in err
    stopped_at = ckpt_io.load(out / "last.pt")["iteration"]
    assert stopped_at >= 20
    cfg = load_config(config, ["train.iterations=" + str(stopped_at + 2)])
    trainer = Trainer(cfg, out, progress=False)
    trainer.resume(allow=["train.iterations"])
    assert trainer.iteration == stopped_at
    trainer.fit()
    assert trainer.iteration == stopped_at + 2


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_a_stop_signal_waits_for_the_iteration_and_a_second_one_does_not():
    """The first SIGINT or SIGTERM only asks (the trainer stops where ``check`` is called, between
    iterations, so no checkpoint holds half a step); a second one stops at once; the previous
    handlers come back."""
    import os

    from metatl.engine.trainer import Interrupted, StopSignals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        signals.check()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert signals.by == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            signals.check()
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
