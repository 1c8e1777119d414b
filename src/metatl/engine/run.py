"""Run folders: what a run writes, where an evaluation goes, and what a result records.

A run folder holds ``config.yaml``, checkpoints (``last.pt``, ``best.pt``, ``snapshot_<m>min.pt``),
``metrics.jsonl``, ``resume_log.jsonl``, plots and ``results.json`` (the test of the training run).
``metatl eval`` writes ``eval_<checkpoint>_<N>ep.json`` beside them (never ``results.json``);
``metatl adapt`` writes ``predictions.csv`` in its ``--out`` folder. ``--overwrite`` removes the
files of the run it replaces, and only those.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

# what a run writes (glob patterns); --overwrite removes these and nothing else
RUN_FILES = (
    "config.yaml",
    "last.pt",
    "best.pt",
    "snapshot_*min.pt",
    "*.pt.rng*",
    ".*.pt.tmp*",
    "metrics.jsonl",
    "resume_log.jsonl",
    "results.json",
    ".results.json.tmp",
    "eval_*.json",
    "learning_curve.png",
    "*_tasks.png",  # a data source's task plot (sinusoid_tasks.png)
    "tensorboard/events.out.tfevents.*",
    "mlflow_run.json",
    "mlflow/**/*",  # the default MLflow store (metatl.engine.loggers)
)
PREDICTIONS = "predictions.csv"
PREDICTIONS_HEADER = "file,predicted,confidence"


def clear_run(out) -> list[Path]:
    """Remove the files of the run in ``out`` (see :data:`RUN_FILES`); returns what was removed.
    Anything else in the folder stays."""
    out = Path(out)
    removed = []
    for pattern in RUN_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def eval_name(checkpoint, episodes: int, overrides: list[str] | None = None) -> str:
    """``eval_<checkpoint stem>_<N>ep[_<overrides>].json``: an evaluation's file, named by what it
    scored, so that it never replaces the training run's ``results.json`` or another evaluation."""
    extra = [o.split(".", 1)[-1] for o in overrides or [] if not o.startswith("eval.episodes=")]
    tail = "".join(f"_{re.sub(r'[^A-Za-z0-9._+-]+', '', o.replace('=', ''))}" for o in extra)[:80]
    return f"eval_{Path(checkpoint).stem}_{episodes}ep{tail}.json"


def predictions_path(out) -> Path:
    """``out/predictions.csv`` for ``metatl adapt --out out``: ``out`` is a folder (as for train and
    eval). Refuses to write over anything but an earlier predictions table."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file; --out names a folder (metatl adapt writes {PREDICTIONS} in it). "
            f"Nothing was written."
        )
    path = out / PREDICTIONS
    if path.exists():
        with open(path, errors="replace") as f:
            first = f.readline().strip()
        if not first.startswith(PREDICTIONS_HEADER):
            raise ValueError(
                f"{path} exists and is not a predictions table of metatl adapt; it was left as it "
                f"is. Pass another --out folder."
            )
    return path


def trim_metrics(path, iteration: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``iteration`` (a resumed run's checkpoint): lines of
    iterations after it were logged by the interrupted run and are logged again. Returns the number
    of lines removed."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the interruption
            continue
        if record.get("iteration", 0) <= iteration:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def git_commit() -> str | None:
    """The commit of the metatl source when it runs from a git checkout (``+dirty`` with local
    changes), else None."""
    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
    """What traces a result to the software that made it: Python's version, metatl's git commit
    (None outside a checkout) and the UTC date and time."""
    return {
        "python_version": platform.python_version(),
        "metatl_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def table(rows, headers) -> str:
    """Rows as aligned text columns under ``headers``."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def results_table(results: dict) -> str:
    """A results record (``results.json``, ``eval_*.json``) as a table."""
    m = results["metric"]
    fmt = (lambda v: f"{100 * v:.2f}%") if m["name"] == "accuracy" else (lambda v: f"{v:.4f}")
    setting = results.get("setting") or (
        f"{results['ways']}-way {results['shots']}-shot" if results.get("ways") else f"K={results['shots']}"
    )
    rows = [
        [
            results["algorithm"],
            results["dataset"],
            setting,
            results["inner_steps_test"],
            m["name"],
            f"{fmt(m['mean'])} +- {fmt(m['ci95'])}",
            results["episodes"],
        ]
    ]
    for steps, r in (results.get("by_inner_steps") or {}).items():
        rows.append(["", "", "", steps, m["name"], f"{fmt(r['mean'])} +- {fmt(r['ci95'])}", results["episodes"]])
    return table(rows, ["algorithm", "dataset", "setting", "test steps", "metric", "mean +- 95% CI", "episodes"])


def train(cfg, out, progress: bool = True, resume: bool = False, overwrite: bool = False, allow_changes=(), hooks=()):
    """``metatl train``: check the run folder ``out`` (a run there is continued only with
    ``resume``, replaced only with ``overwrite``, which first removes its files), then train and
    test. Returns the test results (in process 0; None in the others). ``hooks`` (e.g. a sweep's
    pruning) run in one process only.

    In a worker started by ``torchrun`` it trains in the launcher's process group; with
    ``train.processes: N`` outside one it starts N such workers through the same launcher
    (:func:`metatl.engine.distributed.launch`). After an elastic restart (``torchrun
    --max-restarts``) the workers continue the run from its last checkpoint, as ``resume`` does."""
    from ..config import ConfigError
    from . import distributed
    from .trainer import check_device

    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them.")
    if distributed.restarts():  # the launcher restarted the workers: continue from the last checkpoint
        resume, overwrite = (out / "last.pt").exists(), False
    elif not resume and not overwrite and (out / "last.pt").exists():
        raise ConfigError(
            f"{out} already holds a run (last.pt): continue it with --resume, replace it "
            f"with --overwrite, or train into another folder with --out."
        )
    device = check_device(cfg.train.device)  # "auto" resolved here, so every process agrees
    allow_changes = tuple(allow_changes)
    if not distributed.launched():
        if overwrite:
            clear_run(out)  # no file of the replaced run (best.pt, snapshots, evaluations) stays beside the new one
        if cfg.train.processes > 1:
            if hooks:
                raise ConfigError(
                    "trainer hooks (e.g. metatl sweep's pruning) run in one process: set train.processes=1."
                )
            return distributed.launch(
                _worker, cfg.train.processes, str(device), cfg, out, progress, resume, allow_changes
            )
        return train_and_test(cfg, out, progress, resume, allow_changes, hooks)
    with distributed.process_group(device):
        world = distributed.world_size()
        if hooks and world > 1:
            raise ConfigError(
                "trainer hooks (e.g. metatl sweep's pruning) run in one process: run it without torchrun."
            )
        if cfg.train.processes not in (1, world):
            raise ConfigError(
                f"train.processes={cfg.train.processes}, but the launcher started {world} processes; under "
                f"torchrun the launcher sets the number of processes (leave train.processes at 1)."
            )
        if overwrite and distributed.rank() == 0:
            clear_run(out)
        if overwrite:
            distributed.barrier()  # nobody reads the folder before it is cleared
        return train_and_test(cfg, out, progress, resume, allow_changes, hooks)


def _worker(cfg, out: Path, progress: bool, resume: bool, allow_changes: tuple):
    """A worker of ``train.processes``: the path of a worker that torchrun starts."""
    return train(cfg, out, progress, resume, False, allow_changes)


def train_and_test(cfg, out: Path, progress: bool = True, resume: bool = False, allow_changes=(), hooks=()) -> dict:
    """Train ``cfg`` into the run folder ``out`` (continuing it with ``resume``, config changes
    allowed for the keys in ``allow_changes``; ``hooks``: see :class:`~metatl.engine.trainer.Trainer`),
    then test it and report; in every process of a split run (only process 0 tests and returns the
    results, the others return None). The loggers are closed last, with the results and plots."""
    from .trainer import Trainer

    trainer = Trainer(cfg, out, progress=progress, hooks=hooks)
    try:
        results = _train_and_test(trainer, cfg, out, resume, allow_changes)
    except BaseException:
        trainer.close_loggers("failed")  # (fit closed them already when it stopped)
        raise
    trainer.close_loggers("finished")
    return results


def _train_and_test(trainer, cfg, out: Path, resume: bool, allow_changes) -> dict | None:
    from . import plots

    if resume:
        trainer.resume(allow=allow_changes)
        if trainer.rank == 0:
            changed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in trainer.resumed_changes.items())
            print(
                f"resumed {out} at iteration {trainer.iteration}"
                + (f" with {changed} (recorded in {out / 'resume_log.jsonl'})" if changed else "")
            )
    trainer.fit()
    if trainer.rank != 0:
        return None
    results = trainer.test()
    print(results_table(results))
    procs = f" in {trainer.world} processes" if trainer.world > 1 else ""
    print(f"trained {trainer.iteration} iterations in {trainer.train_seconds / 60:.1f} min{procs}; run folder: {out}")
    print(f"results: {out / 'results.json'}")
    print(f"plot: {plots.learning_curve(out)}")
    if cfg.eval.plot_tasks and hasattr(trainer.test_tasks, "draw_task"):  # a data source that can draw its tasks
        path = out / f"{cfg.data.name}_tasks.png"
        print(f"plot: {plots.task_plots(trainer.scored, trainer.test_tasks, path, cfg.eval.plot_tasks, cfg.eval.seed)}")
    return results


def evaluate_checkpoint(checkpoint, overrides=None, out=None, progress: bool = True):
    """Score ``checkpoint`` on its config's fixed test episodes (after ``overrides``) and write
    ``eval_<checkpoint>_<N>ep.json`` in ``out`` (default: the checkpoint's folder), never over the
    run's ``results.json``. Returns ``(results, path)``."""
    from ..build import load_learner
    from ..data import build_sampler
    from .trainer import check_device, score_on_test, write_results

    learner = load_learner(checkpoint, overrides=overrides)
    cfg = learner.config
    device = check_device(cfg.train.device)
    learner.to(device)
    results = score_on_test(
        cfg,
        learner,
        build_sampler(cfg.data, "test"),
        device,
        progress,
        learner.trained["iterations"],
        learner.trained["train_seconds"],
        str(checkpoint),
        learner.trained["weights"],
    )
    folder = Path(out) if out else Path(checkpoint).parent
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / eval_name(
        checkpoint,
        results["episodes"],  # what was scored (a data source may count its own)
        [o for o in overrides or [] if not o.startswith(("data.data_dir=", "data.download="))],
    )
    write_results(results, path)
    return results, path
