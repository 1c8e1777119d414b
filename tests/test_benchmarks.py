"""The benchmark suite's shape: at most ten scripts, each reached by `python -m benchmarks`, and every
command the results page prints accepted as written by the script (or `metatl` and the config) it
names. Nothing is measured here: each command is parsed, not run."""

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from metatl.cli import build_parser
from metatl.config import ConfigDeprecationWarning, load_config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scripts() -> set[str]:
    return {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}


def test_at_most_ten_benchmark_scripts():
    assert len(scripts()) <= 10, f"benchmarks/ holds {len(scripts())} scripts: {sorted(scripts())}"


def test_every_script_is_reached_by_the_entry_point(tmp_path):
    entry = load(BENCH / "__main__.py", "benchmarks_main")
    reached = set()
    for name, runs in entry.BENCHMARKS.items():
        for quick in (False, True):
            for run in runs(quick, str(tmp_path)):
                assert (BENCH / run[0]).exists(), f"`python -m benchmarks {name}` runs {run[0]}, which is missing"
                reached.add(run[0])
    assert scripts() - {"learn2learn_compare.py"} <= reached, (
        f"not reachable through `python -m benchmarks`: {sorted(scripts() - reached)}"
    )


def page_commands() -> list[str]:
    """Every `python benchmarks/...` and `metatl ...` command in backticks on docs/results.md."""
    page = (ROOT / "docs" / "results.md").read_text()
    commands = []
    for text in re.findall(r"`([^`\n]*)`", page):  # the page's code spans, in order
        if re.match(r"([A-Z_]+=\S+ )*(python benchmarks/|python -m benchmarks |metatl )", text):
            commands += [c.strip() for c in text.split(";")]
    return sorted(set(commands))


class Parsed(Exception):
    """Raised instead of running a benchmark once its options are parsed."""


@pytest.fixture
def parse_only(monkeypatch):
    """``ArgumentParser.parse_args`` parses (and fails as usual on bad options), then stops the script."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.syspath_prepend(str(BENCH))
    return monkeypatch


def test_results_page_commands_are_accepted_as_written(parse_only, capsys):
    commands = page_commands()
    assert len(commands) > 20, "the results page lists fewer commands than expected: is the pattern still right?"
    checked = set()
    for command in commands:
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
            words.pop(0)
        where = f"docs/results.md prints `{command}`"
        if words[0] == "metatl":
            with pytest.raises(Parsed) as parsed:
                build_parser().parse_args(words[1:])
            args = parsed.value.args[0]
            if args.command == "train":  # the config and its overrides load, in today's keys (S: a seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("error", ConfigDeprecationWarning)
                    load_config(ROOT / args.config, [o.replace("=S", "=0") for o in args.set or []])
            continue
        if words[:3] == ["python", "-m", "benchmarks"]:  # the entry point's names; its scripts parse the rest
            entry = load(BENCH / "__main__.py", "benchmarks_main")
            assert words[3] in entry.BENCHMARKS, f"{where}, but `{words[3]}` is not one of {sorted(entry.BENCHMARKS)}"
            continue
        assert words[0] == "python" and words[1].startswith("benchmarks/"), where
        script = ROOT / words[1]
        assert script.exists(), f"{where}, but {words[1]} is not in benchmarks/"
        module = load(script, f"bench_{script.stem}")
        parse_only.setattr("sys.argv", [str(script), *words[2:]])
        try:
            code = module.main(words[2:]) if "argv" in module.main.__code__.co_varnames else module.main()
        except Parsed:
            checked.add(command)
            continue
        except SystemExit as exit:
            pytest.fail(f"{where}, and its script exits with {exit.code}: {capsys.readouterr().err}")
        pytest.fail(f"{where}, and its script returned {code} before parsing its options")
    assert checked, "no benchmark command was checked"


def test_transfer_grid_reuses_finished_runs_from_its_workdir(tmp_path, monkeypatch):
    """A grid of hours runs in parts: a finished run's record in --workdir is reused by a later
    invocation with the same settings, and not when a setting that changes the run differs."""
    bench = load(BENCH / "transfer_digits.py", "transfer_digits_bench")
    trained = []

    def fake_run(method, direction, seed, weight, args, workdir):
        trained.append((method, weight, args.epochs))
        return {"config": bench.run_config(method, direction, seed, weight, args), "accuracy": 0.5}

    monkeypatch.setattr(bench, "one_run", fake_run)
    args = argparse.Namespace(
        iterations=None, epochs=10.0, batch=256, image_size=28, data_dir=None, max_rows=None,
        usps_frame="pad", protocol="holdout", device="auto",
    )  # fmt: skip
    first, reused = bench.cached_or_run("dann", "usps->mnist", 0, 0.1, args, tmp_path)
    assert not reused and trained == [("dann", 0.1, 10.0)]
    moved = argparse.Namespace(**{**vars(args), "data_dir": "elsewhere", "device": "cpu"})
    again, reused = bench.cached_or_run("dann", "usps->mnist", 0, 0.1, moved, tmp_path)
    assert reused and again == first and len(trained) == 1
    longer = argparse.Namespace(**{**vars(args), "epochs": 20.0})
    _, reused = bench.cached_or_run("dann", "usps->mnist", 0, 0.1, longer, tmp_path)
    assert not reused and trained[-1] == ("dann", 0.1, 20.0)
    _, reused = bench.cached_or_run("dann", "usps->mnist", 0, 1.0, args, tmp_path)
    assert not reused and len(trained) == 3


def test_budget_keeps_finished_runs_and_continues_stopped_ones(tmp_path):
    """accuracy.py budget run again: a run finished with the same settings is kept, one stopped on
    the way resumes from its checkpoint, and one with other settings (another budget) is retrained."""
    bench = load(BENCH / "accuracy.py", "accuracy_bench")
    name = "maml_omniglot_5w1s"
    budget = ["train.time_budget_min=60", "train.budget_clock=cpu", "train.snapshot_minutes=[30,60]"]
    folder = tmp_path / name
    assert bench.how_to_train(name, folder, budget, fresh=False) == "--overwrite"  # never run
    folder.mkdir()
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [*budget, "data.data_dir=elsewhere"])
    cfg.dump(folder / "config.yaml")
    assert bench.how_to_train(name, folder, budget, fresh=False) == "--overwrite"  # started, no checkpoint
    (folder / "last.pt").write_bytes(b"")
    assert bench.how_to_train(name, folder, budget, fresh=False) == "--resume"
    assert bench.how_to_train(name, folder, budget, fresh=True) == "--overwrite"
    other = ["train.time_budget_min=10", *budget[1:]]
    assert bench.how_to_train(name, folder, other, fresh=False) == "--overwrite"
    (folder / "results.json").write_text("{}")
    assert bench.how_to_train(name, folder, budget, fresh=False) is None
    assert bench.how_to_train(name, folder, other, fresh=False) == "--overwrite"


def test_budget_stops_its_runs_so_that_they_write_their_checkpoints(tmp_path):
    """Stopping accuracy.py budget (Ctrl-C, SIGTERM) passes SIGTERM on to its training processes,
    on which ``metatl train`` writes last.pt, and waits for them: a run left alone would train on,
    unseen, and one killed would lose what it trained since its last checkpoint."""
    bench = load(BENCH / "accuracy.py", "accuracy_bench")
    script = "import signal, sys, time\n"
    script += "signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], 'w').write('saved'), sys.exit(3)))\n"
    script += "open(sys.argv[1] + '.up', 'w').close()\n"
    script += "time.sleep(60)\n"
    marks = [tmp_path / f"run{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(m)]) for m in marks]
    deadline = time.monotonic() + 60
    while not all(m.with_suffix(".up").exists() for m in marks) and time.monotonic() < deadline:
        time.sleep(0.05)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    bench.stop_runs([*procs, done])
    assert [p.returncode for p in procs] == [3, 3]
    assert all(m.read_text() == "saved" for m in marks)
