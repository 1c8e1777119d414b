"""``metatl sweep``: a hyper-parameter search over any config key, on Optuna.

A *space* file (YAML) maps config keys to ranges or choices::

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}     # a float range (log scale)
    algorithm.inner_steps: {low: 1, high: 5}             # an int range (whole-number bounds; step: 2 ...)
    algorithm.first_order: {choices: [true, false]}      # categorical (a plain list works too)

(``type: float | int | categorical`` may be given; without it the bounds' types decide.) Each
trial is a normal ``metatl train`` run in ``OUT/trial_NNNN`` with the trial's values as ``--set``
overrides. Its objective is the validation metric (``train.val_every`` must be set) at the last
validation of the run: accuracy is maximised, MSE and losses minimised. Every validation is reported
to the trial, and the pruner (``MedianPruner`` by default) may stop a trial there: the run writes
``last.pt`` and ends, and the trial is marked pruned. A run that diverges is marked failed and
the sweep goes on.

The study lives in ``--storage`` (default ``sqlite:///OUT/optuna.db``; any URL Optuna accepts,
e.g. ``postgresql://...`` for workers on many machines). Several ``metatl sweep`` processes given
the same storage and study share it (``load_if_exists``): ``--trials N`` is the study's total,
counted over every worker (each claims a trial under a lock), so N trials run in all. Each worker ends by
writing ``summary.md`` and ``summary.csv`` (trial, parameters, value, state, run folder) and
Optuna's plots (``optimization_history.png``, ``param_importances.png``) for the whole study.

Needs ``pip install 'metatl[sweep]'`` (Optuna).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: there, create a shared study before starting workers at once
    fcntl = None

from .config import ConfigError, load_config, load_yaml
from .engine.trainer import StopRun

KINDS = ("float", "int", "categorical")
PRUNERS = ("median", "none")  # --pruner (a pruner object in Python)
RUN_PREFIX = "trial_"


def require_optuna():
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("metatl sweep needs Optuna, which is not installed: pip install 'metatl[sweep]'.")
    import optuna

    return optuna


@dataclass(frozen=True)
class Param:
    """One dimension of the space: a config key and its range (``float``/``int``: ``low``..``high``,
    on a log scale with ``log``, in steps of ``step``) or its ``choices`` (``categorical``)."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list:
        """The values whose configs must all load: both bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(key, spec, where: str) -> Param:
    """A space entry (``key: spec``) as a :class:`Param`, or a ConfigError that says what to write."""
    example = f"{key}: {{low: 0.001, high: 0.1, log: true}} or {key}: {{choices: [a, b]}}"
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"{where}: {key!r} is not a config key; keys look like section.key (e.g. train.lr).")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {key} must map to a range or choices, got {spec!r}; write {example}.")
    unknown = sorted(set(spec) - {"type", "low", "high", "log", "step", "choices"})
    if unknown:
        raise ConfigError(
            f"{where}: {key} has unknown field(s) {', '.join(unknown)}; valid: type, low, high, log, step, choices."
        )
    kind = spec.get("type") or (
        "categorical"
        if "choices" in spec
        else "int"
        if all(isinstance(spec.get(b), int) and not isinstance(spec.get(b), bool) for b in ("low", "high"))
        else "float"
    )
    if kind not in KINDS:
        raise ConfigError(f"{where}: {key}: type must be one of {', '.join(KINDS)}, got {kind!r}.")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or set(spec) - {"type", "choices"}:
            raise ConfigError(
                f"{where}: {key}: a categorical parameter needs a non-empty list 'choices' and nothing else."
            )
        if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in choices):
            raise ConfigError(f"{where}: {key}: choices must be numbers, strings, true/false or null, got {choices!r}.")
        return Param(key, kind, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if "choices" in spec or not (_number(low) and _number(high)):
        raise ConfigError(
            f"{where}: {key}: a {kind} range needs numbers 'low' and 'high' (got {low!r}, {high!r}); write {example}."
        )
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ConfigError(f"{where}: {key}: an int range needs whole-number low, high and step.")
    if low > high:
        raise ConfigError(f"{where}: {key}: low ({low}) is above high ({high}).")
    if not isinstance(log, bool) or (log and low <= 0):
        raise ConfigError(f"{where}: {key}: log must be true or false, and a log range needs low > 0 (got {low}).")
    if step is not None and (not _number(step) or step <= 0 or log):
        raise ConfigError(f"{where}: {key}: step must be a positive number, and cannot be combined with log.")
    if kind == "int":
        return Param(key, kind, int(low), int(high), log, int(step) if step else None)
    return Param(key, kind, float(low), float(high), log, float(step) if step else None)


def override(key: str, value) -> str:
    """``key=value`` as ``--set`` reads it (JSON is valid YAML: strings quoted, true/false, null)."""
    return f"{key}={json.dumps(value)}"


def load_space(path, config, overrides=()) -> list[Param]:
    """The parameters of the space file ``path``, each checked against ``config``: the config must
    load with each bound (or each choice), so a wrong key or an out-of-range bound stops the sweep
    before its first trial."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"space file {path} does not exist; see configs/spaces/ for an example.")
    raw = load_yaml(path.read_text(), str(path))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{path} must map config keys to ranges or choices, e.g. train.lr: {{low: 0.0001, high: 0.01, log: true}}."
        )
    space = [parse_param(key, spec, str(path)) for key, spec in raw.items()]
    for p in space:
        for value in p.extremes():
            try:
                load_config(config, [*overrides, override(p.key, value)])
            except ConfigError as err:
                raise ConfigError(f"{path}: {p.key}={value!r} does not make a valid config: {err.args[0]}") from None
    return space


def objective_of(cfg) -> tuple[str, str]:
    """``(record key, direction)``: the validation metric the trainer logs for ``cfg`` and whether a
    larger value is better (accuracy) or a smaller one (MSE, losses)."""
    from .data import build_sampler
    from .meta.base import METRIC_NAME

    tasks = build_sampler(cfg.data, "val")
    metric = METRIC_NAME[getattr(tasks, "task_type", "classification")]
    return f"val_{metric}", "maximize" if metric == "accuracy" else "minimize"


class Pruned(StopRun):
    """The pruner stopped this trial at a validation."""


class PruningHook:
    """A trainer hook (see :class:`~metatl.engine.trainer.Trainer`): each validation value goes to
    ``trial.report(value, iteration)``; when ``trial.should_prune()`` the run stops (:class:`Pruned`)."""

    def __init__(self, trial, key: str):
        self.trial, self.key, self.value = trial, key, None

    def log(self, record: dict) -> None:
        if self.key not in record:
            return
        self.value, step = record[self.key], int(record["iteration"])
        self.trial.report(self.value, step)
        if self.trial.should_prune():
            raise Pruned(f"trial {self.trial.number} pruned at iteration {step} ({self.key}={self.value:.4g})")

    def close(self, status: str) -> None:
        pass


def make_pruner(pruner):
    optuna = require_optuna()
    if pruner is None or pruner == "median":
        return optuna.pruners.MedianPruner()
    if pruner == "none":
        return optuna.pruners.NopPruner()
    if isinstance(pruner, str):
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}.")
    return pruner  # an optuna pruner


def open_study(storage: str, name: str, direction: str, pruner):
    """The study ``name`` in ``storage``, created or joined. For a SQLite file, workers take turns
    creating its tables (a lock file beside it: two creating them at once collide) and each waits
    up to a minute for another's write instead of failing."""
    optuna = require_optuna()
    with _sqlite_lock(storage):
        if storage.startswith("sqlite:"):
            storage = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, pruner=pruner, load_if_exists=True
        )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {name!r} in the storage was created to {study.direction.name.lower()} and this "
            f"config's validation metric is to {direction}; pass another --study name."
        )
    return study


@contextlib.contextmanager
def _sqlite_lock(storage: str):
    """An exclusive lock on ``<database>.lock`` for a SQLite file URL (``sqlite:///path``), else nothing."""
    path = storage[len("sqlite:///") :] if storage.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or fcntl is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim_trial(study, storage: str, trials: int):
    """A new trial of ``study`` while it holds fewer than ``trials`` (of every worker and state),
    else None. For a SQLite file the count and the new trial are one step under the lock beside
    it, so workers sharing it run exactly ``trials``. Other storages have no such lock: a trial two
    workers claim at once past the total is marked failed as surplus and not run."""
    optuna = require_optuna()
    with _sqlite_lock(storage):
        if len(study.get_trials(deepcopy=False)) >= trials:
            return None
        trial = study.ask()
    if trial.number >= trials:
        trial.set_user_attr("surplus", f"claimed past --trials {trials} by workers at once; not run")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    return trial


def run_trial(study, trial, objective) -> None:
    """Run ``objective`` on ``trial`` and tell the study how it ended: complete with its value,
    pruned, or failed when the run diverged (the sweep goes on) or raised (the error propagates)."""
    from .engine.divergence import DivergenceError

    optuna = require_optuna()
    state, log = optuna.trial.TrialState, optuna.logging.get_logger("optuna.study.study")
    try:
        value = objective(trial)
    except optuna.TrialPruned as stop:
        study.tell(trial, state=state.PRUNED)
        log.info(f"Trial {trial.number} pruned. {stop}")
        return
    except DivergenceError as err:
        study.tell(trial, state=state.FAIL)
        log.warning(f"Trial {trial.number} failed: {err}")
        return
    except BaseException:
        study.tell(trial, state=state.FAIL)
        raise
    study.tell(trial, value)
    log.info(f"Trial {trial.number} finished with value {value} and parameters {trial.params}.")


def run_sweep(
    config,
    space,
    trials: int,
    storage: str | None = None,
    study: str | None = None,
    out=None,
    overrides=(),
    pruner="median",
    progress: bool = False,
):
    """Run trials of ``config`` over ``space`` (a space file) until the study holds ``trials``
    trials, then write the summary and the plots. Returns the Optuna study and the sweep folder."""
    from .engine.run import train

    optuna = require_optuna()
    cfg = load_config(config, list(overrides))
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a whole number >= 1, got {trials!r}.")
    if not cfg.train.val_every:
        raise ConfigError(
            "metatl sweep optimises the validation metric, but train.val_every is 0; validate during "
            "training with --set train.val_every=N (e.g. a tenth of train.iterations)."
        )
    if cfg.train.processes != 1:
        raise ConfigError(
            f"metatl sweep runs each trial in one process (train.processes={cfg.train.processes}); set "
            f"train.processes=1 and start several `metatl sweep` workers on the same --storage instead."
        )
    params = load_space(space, config, overrides)
    pruner = make_pruner(pruner)
    key, direction = objective_of(cfg)
    name = study or f"{cfg.name}_sweep"
    out = Path(out or Path("runs") / name)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study_ = open_study(storage, name, direction, pruner)
    overrides = [*overrides, *shared_mlflow(cfg, out)]

    def objective(trial):
        values = {p.key: p.suggest(trial) for p in params}
        folder = out / f"{RUN_PREFIX}{trial.number:04d}"
        trial.set_user_attr("run_folder", str(folder))
        trial_cfg = load_config(config, [*overrides, *(override(k, v) for k, v in values.items())])
        hook = PruningHook(trial, key)
        try:
            train(trial_cfg, folder, progress=progress, hooks=[hook])
        except Pruned as stop:
            raise optuna.TrialPruned(str(stop)) from None
        if hook.value is None:
            raise ConfigError(f"trial {trial.number} never validated ({key}); check train.val_every.")
        return hook.value

    while (trial := claim_trial(study_, storage, trials)) is not None:
        run_trial(study_, trial, objective)
    write_summary(study_, out, [p.key for p in params])
    return study_, out


def shared_mlflow(cfg, out: Path) -> list[str]:
    """With ``train.logger`` including mlflow and no tracking URI given (``train.tracking_uri``,
    ``MLFLOW_TRACKING_URI``), every trial logs to one SQLite store of the sweep, ``OUT/mlflow.db``
    (experiment: the config's name), created here once; returns the override that says so."""
    from .config import logger_names

    if (
        "mlflow" not in logger_names(cfg.train.logger)
        or cfg.train.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
    ):
        return []
    from .engine.loggers import check_available, mlflow_experiment

    check_available("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    with _sqlite_lock(uri):  # workers take turns creating its tables and the experiment
        mlflow_experiment(MlflowClient(uri), uri, os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name)
    return [override("train.tracking_uri", uri)]


def summary_rows(study, keys: list[str]) -> list[list]:
    rows = []
    for t in study.trials:
        value = "" if t.value is None else f"{t.value:.6g}"
        rows.append(
            [
                t.number,
                *(t.params.get(k, "") for k in keys),
                value,
                t.state.name.lower(),
                t.user_attrs.get("run_folder", ""),
            ]
        )
    return rows


def write_summary(study, out, keys: list[str]) -> list[Path]:
    """``summary.csv``, ``summary.md`` and Optuna's plots of ``study`` in ``out``; returns the paths."""
    out = Path(out)
    headers = ["trial", *keys, "value", "state", "run_folder"]
    rows = summary_rows(study, keys)
    with open(out / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([headers, *rows])
    lines = [
        f"# Sweep {study.study_name}",
        "",
        f"Objective: the last validation value, to {study.direction.name.lower()}.",
        "",
    ]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        lines += [f"Best: trial {best.number}, value {best.value:.6g}, {best.params}", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    cell = lambda c: f"{c:.4g}" if isinstance(c, float) else str(c)  # noqa: E731 (the CSV keeps every digit)
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    drawn = plots(study, out)
    lines += ["", *(f"![{p.stem}]({p.name})" if isinstance(p, Path) else p for p in drawn)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return [out / "summary.csv", out / "summary.md", *(p for p in drawn if isinstance(p, Path))]


def plots(study, out: Path) -> list:
    """Optuna's optimization history and parameter importances (matplotlib) as PNG files in ``out``:
    their paths, and for a plot that cannot be drawn yet a sentence saying why."""
    from .engine import plots as _agg  # noqa: F401 (the non-interactive backend)

    optuna = require_optuna()
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    notes = []
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # matplotlib's legend of a study with no finished trial
        drawings = [("optimization_history", vis.plot_optimization_history)]
        varied = {k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1}
        if len(done) >= 2 and varied:
            drawings.append(("param_importances", vis.plot_param_importances))
        else:
            notes.append("Parameter importances need two completed trials with different values.")
        for name, draw in drawings:
            ax = draw(study)
            path = out / f"{name}.png"
            ax.figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
            notes.append(path)
    return notes
