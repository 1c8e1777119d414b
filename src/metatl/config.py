"""Typed run configuration, stored as YAML.

A config has five sections. ``train`` and ``eval`` are dataclasses below; ``algorithm``, ``model``
and ``data`` hold a registered ``name`` plus that component's keyword arguments, checked against its
signature (a data set is a dataclass, :mod:`metatl.data.sources`, and ``cfg.data`` is an instance
of it). Any unknown key is an error that lists the valid ones; every number is checked against its
type and range (``config_ranges``); a component may check the whole config with ``check_config``.
Overrides use dotted keys (``--set train.lr=0.01 algorithm.first_order=true``); values are parsed
as YAML. This module names no data set and no algorithm.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.1 wants ``1.0e-3``; 1.2 does not)."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str = "<string>"):
    """``text`` parsed as YAML; a syntax error is a :class:`ConfigError` naming ``source`` (a file,
    or the ``--set`` text), the line and the column."""
    try:
        return yaml.load(text, Loader=YAMLLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = "; ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise ConfigError(
            f"{where}: not valid YAML ({problem or err}); fix the syntax there "
            f"(quote a value that holds ':', '#', '[' or '{{')."
        ) from None


PRECISIONS = ("float32", "tf32", "bfloat16")  # train.precision
OPTIMIZERS = ("adam", "sgd")  # train.optimizer
SCHEDULES = ("constant", "linear", "cosine", "step")  # train.lr_schedule
WEIGHTS = ("averaged", "raw")  # eval.weights
LOGGERS = ("jsonl", "tensorboard", "mlflow")  # train.logger (metatl.engine.loggers)


class ConfigError(ValueError):
    """A config problem, with the fix in the message."""


@dataclass(frozen=True)
class Range:
    """Where a config number may lie: ``low``/``high`` (``None``: unbounded), each bound included
    unless ``open_low``/``open_high``. Sections and components declare theirs in a class attribute
    ``config_ranges = {"key": Range(...)}``; a list of numbers is checked element by element."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    why: str = ""  # said after the range in the error, e.g. "a 1-way task is always answered right"

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # (a whole number is finite; may not fit a float)
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def describe(self) -> str:
        low = None if self.low is None else f"{'above' if self.open_low else 'at least'} {self.low!r}"
        high = None if self.high is None else f"{'below' if self.open_high else 'at most'} {self.high!r}"
        text = " and ".join(p for p in (low, high) if p) or "a finite number"
        return f"{text} ({self.why})" if self.why else text


def at_least(low: float, why: str = "") -> Range:
    return Range(low, why=why)


def above(low: float) -> Range:
    return Range(low, open_low=True)


ANY = Range()  # any finite number
SEED = Range(0, 2**63 - 1)  # what torch.manual_seed takes
COMPONENT_RANGE = at_least(0)  # a component's number with no declared range: it counts or scales something


@dataclass
class TrainConfig:
    iterations: int = 1000
    meta_batch: int = 25
    optimizer: str = "adam"  # adam or sgd (the outer / meta optimizer)
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0  # L2 penalty added to the gradient (torch.optim's weight_decay)
    lr_schedule: str = "constant"  # constant, linear or cosine (to lr_final at the end of the run), or step
    lr_final: float = 0.0
    lr_step_every: int | None = None  # step schedule: multiply lr by lr_gamma every this many iterations
    lr_gamma: float = 0.5
    grad_clip: float | None = None  # max global norm of the meta-gradient
    val_every: int = 500
    val_episodes: int = 100
    ckpt_every: int = 500
    log_every: int = 10
    time_budget_min: float | None = None  # stop after this many minutes of training
    snapshot_minutes: list[float] = field(default_factory=list)  # keep checkpoints at these minutes
    # what the training time (budget, snapshots, schedules) counts: wall seconds, or cpu seconds of this
    # process (all its threads), which compares runs fairly on a shared machine
    budget_clock: str = "wall"
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (cuda when available, else cpu)
    # intra-op threads per process: auto (the cores other processes leave free, re-counted as the run goes),
    # a count, or null (torch's choice, or 1 with processes > 1)
    num_threads: int | str | None = "auto"
    processes: int = 1  # split each meta-batch over this many processes (torch.distributed)
    # float32: full float32, also on GPUs (TF32 off); tf32: CUDA convolutions and matrix products in TF32;
    # bfloat16: meta-loss under torch.autocast (parameters stay float32)
    precision: str = "float32"
    # how a gradient-based meta-learner's meta-batch runs (metatl.engine.executors): auto, loop, inner_vmap,
    # vmap, compile, threads or threads_inner_vmap; the same meta-gradient, a question of speed
    executor: str = "auto"
    # gradient checkpointing of the inner loop: recompute each second-order inner step in the backward pass
    # instead of keeping its graph (the memory of one inner step, not k; metatl.engine.recompute)
    inner_checkpoint: bool = False
    keep_freed_memory: bool = True  # glibc malloc reuses freed pages, an arena per thread
    ema_decay: float | None = None  # also keep an exponential moving average of the weights (e.g. 0.999)
    divergence_factor: float | None = 1000.0  # stop when loss or weight norm grows this much (engine/divergence.py)
    # where records go besides metrics.jsonl (always written): jsonl (nothing more), tensorboard, mlflow, or a list
    # (engine/loggers.py); tracking_uri: MLflow's (default $MLFLOW_TRACKING_URI, else a SQLite store in the run folder)
    logger: str | list[str] = "jsonl"
    tracking_uri: str | None = None

    config_ranges: ClassVar[dict[str, Range]] = {
        "iterations": at_least(1),
        "meta_batch": at_least(1),
        "lr": above(0),
        "lr_final": at_least(0),
        "momentum": Range(0, 1, open_high=True),
        "weight_decay": at_least(0),
        "lr_step_every": at_least(1),
        "lr_gamma": above(0),
        "grad_clip": above(0),
        "val_every": at_least(0),
        "val_episodes": at_least(1),
        "ckpt_every": at_least(0),
        "log_every": at_least(1),
        "time_budget_min": above(0),
        "snapshot_minutes": at_least(0),
        "seed": SEED,
        "num_threads": at_least(1),
        "processes": at_least(1),
        "divergence_factor": above(1),
    }  # ema_decay: validate_components


@dataclass
class EvalConfig:
    episodes: int = 600
    seed: int = 1234  # the fixed test episodes are drawn from this seed
    inner_steps: int | None = None  # override the algorithm's test-time inner steps
    transductive: bool = True  # BatchNorm "batch" mode: normalise the query set as one batch
    extra_steps: list[int] = field(default_factory=list)  # also report these test-time inner steps
    plot_tasks: int = 3  # test tasks drawn in <data.name>_tasks.png by a data source that draws (sinusoid)
    weights: str = "averaged"  # with train.ema_decay: score the averaged weights, or "raw" ones

    config_ranges: ClassVar[dict[str, Range]] = {
        "episodes": at_least(1),
        "seed": SEED,
        "inner_steps": at_least(0),
        "extra_steps": at_least(0),
        "plot_tasks": at_least(0),
    }


@dataclass
class Config:
    name: str = "run"
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "maml"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})
    data: Any = field(default_factory=lambda: default_data())  # an instance of a registered data set
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["data"] = {"name": self.data.name, **values["data"]}
        return values

    def dump(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def default_data():
    """The data set of a config without a ``data`` section (configs built in Python)."""
    from .data.sources import default_data

    return default_data()


SECTIONS = {"train": TrainConfig, "eval": EvalConfig}
OPEN_SECTIONS = ("algorithm", "model")
REQUIRED = {"algorithm": "algorithm", "model": "backbone", "data": "dataset"}  # what a config file must name


def _check_keys(where: str, given, valid) -> None:
    unknown = sorted(str(k) for k in set(given) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(sorted(valid))}.")


_DESCRIBE = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _matches(value, tp) -> bool:
    """Whether a YAML value fits the annotation ``tp`` (scalars, Optional, List, Dict)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, list):
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin in (dict, dict):
        return isinstance(value, dict)
    return True  # Any, or a type this check does not know


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, list):
        return f"a list of {_describe(args[0]).replace('a ', '', 1)}s" if args else "a list"
    if origin in (dict, dict):
        return "a mapping"
    return _DESCRIBE.get(tp, getattr(tp, "__name__", str(tp)))


def _check_type(where: str, value, tp) -> None:
    if not _matches(value, tp):
        raise ConfigError(
            f"{where} must be {_describe(tp)}, got {value!r}; fix it in the config or with --set {where}=VALUE."
        )


def _numbers(value) -> list:
    """The numbers in a config value: itself, or the elements of a (nested) list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return []


def _check_range(where: str, value, allowed: Range) -> None:
    for number in _numbers(value):
        if number not in allowed:
            of = f" (in {value!r})" if number is not value else ""
            raise ConfigError(
                f"{where} must be {allowed.describe()}, got {number!r}{of}; fix it in the config "
                f"or with --set {where}=VALUE."
            )


def check_values(
    where: str, values: dict, types: dict[str, Any], ranges: dict[str, Range], default: Range = ANY
) -> None:
    """Type-check ``values`` (a section's keys without ``name``) against ``types`` and their numbers
    against ``ranges`` (``default`` for a number without a declared range)."""
    for key, value in values.items():
        if key in types:
            _check_type(f"{where}.{key}", value, types[key])
        _check_range(f"{where}.{key}", value, ranges.get(key, default))


def _component_types(obj) -> dict[str, Any]:
    """The annotation of each keyword argument of a registered component, else its default's type."""
    target = obj.__init__ if isinstance(obj, type) and not dataclasses.is_dataclass(obj) else obj
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: fall back to the defaults
        hints = {}
    types = {}
    for p in inspect.signature(obj).parameters.values():
        if p.name in hints:
            types[p.name] = hints[p.name]
        elif isinstance(p.default, bool):
            types[p.name] = bool
        elif isinstance(p.default, (int, float)):
            types[p.name] = float  # a number; an int default does not forbid 0.5
        elif isinstance(p.default, str):
            types[p.name] = str
    return types


def component_keys(obj) -> list[str]:
    """Keyword arguments a registered component accepts (its config keys besides ``name``)."""
    if dataclasses.is_dataclass(obj):  # a data set: its fields
        return [f.name for f in dataclasses.fields(obj) if f.init]
    skip = {"self", "model", "task_type", "in_features", "in_channels", "out_features", "image_size"}
    return [
        p.name
        for p in inspect.signature(obj).parameters.values()
        if p.name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _section(raw: dict, section: str, default=None) -> dict:
    values = raw.get(section)
    if values is None:
        return dict(default or {})
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} must be a mapping of keys to values, got {values!r}.")
    return dict(values)


class ConfigDeprecationWarning(FutureWarning):
    """A config key that was renamed or replaced; the config still loads, with the new setting."""


_EXECUTOR_OF = {
    (False, False): "threads",
    (False, True): "loop",
    ("inner", False): "threads_inner_vmap",
    ("inner", True): "inner_vmap",
    (True, False): "vmap",
    (True, True): "vmap",
}


def migrate(raw: dict) -> dict:
    """``raw`` with keys of earlier versions mapped to their replacements, each with a
    :class:`ConfigDeprecationWarning`: MAML's ``batch_tasks``, ``compile`` and MAML's and Reptile's
    ``task_threads`` became ``train.executor``; the conv nets' ``channels_last`` and
    ``fold_first_norm`` became ``model.fast``."""
    raw = dict(raw)
    if not all(isinstance(raw.get(section) or {}, dict) for section in ("algorithm", "model", "train")):
        return raw  # malformed: from_dict says so
    model = dict(raw.get("model") or {})
    layout = {k: model.pop(k) for k in ("channels_last", "fold_first_norm") if k in model}
    if layout:
        given = ", ".join(f"model.{k}={v!r}" for k, v in layout.items())
        if "fast" not in model:
            model["fast"] = bool(layout.get("fold_first_norm", True))
        warnings.warn(
            f"{given} is obsolete: read as model.fast={model['fast']} (the conv nets' fast kernels, "
            f"on by default). Set model.fast instead.",
            ConfigDeprecationWarning,
            stacklevel=3,
        )
        raw["model"] = model
    algorithm = dict(raw.get("algorithm") or {})
    old = {k: algorithm.pop(k) for k in ("batch_tasks", "compile", "task_threads") if k in algorithm}
    if not old:
        return raw
    raw["algorithm"] = algorithm
    train = dict(raw.get("train") or {})
    batch = old.get("batch_tasks", False)
    batch = "inner" if batch == "inner" else bool(batch)
    executor = "compile" if old.get("compile") and batch is True else _EXECUTOR_OF[batch, old.get("task_threads") == 1]
    given = ", ".join(f"algorithm.{k}={v!r}" for k, v in old.items())
    if "executor" in train:
        warnings.warn(
            f"{given} is obsolete and ignored: train.executor={train['executor']} chooses how the "
            f"meta-batch runs. Remove the old key(s).",
            ConfigDeprecationWarning,
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"{given} is obsolete: read as train.executor={executor}. Set train.executor instead "
            f"(auto picks the fastest valid one).",
            ConfigDeprecationWarning,
            stacklevel=3,
        )
        train["executor"] = executor
        raw["train"] = train
    return raw


def from_dict(raw: dict) -> Config:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"a config must be a mapping of sections (name, algorithm, model, data, train, eval), got {raw!r}."
        )
    raw = migrate(dict(raw or {}))
    top = [f.name for f in dataclasses.fields(Config)]
    _check_keys("the config", raw, top)
    kwargs: dict[str, Any] = {}
    if "name" in raw:
        kwargs["name"] = str(raw["name"])
    for section, cls in SECTIONS.items():
        values = _section(raw, section)
        _check_keys(f"section {section!r}", values, [f.name for f in dataclasses.fields(cls)])
        check_values(section, values, typing.get_type_hints(cls), getattr(cls, "config_ranges", {}))
        kwargs[section] = cls(**values)
    for section in OPEN_SECTIONS:
        kwargs[section] = _section(raw, section, getattr(Config(), section))
    kwargs["data"] = _data(_section(raw, "data")) if raw.get("data") is not None else default_data()
    cfg = Config(**kwargs)
    validate_components(cfg)
    return cfg


def _component(section: str, values: dict, registry, keys=None):
    """The registered class or factory that ``values["name"]`` names in ``registry``, after checking
    ``values``' keys (``keys``: the valid ones, default its signature's), types and ranges."""
    if not isinstance(values.get("name"), str):
        got = f", got {values['name']!r}" if "name" in values else ""
        raise ConfigError(f"section {section!r} needs a 'name'{got} (see `metatl list`).")
    try:
        obj = registry.get(values["name"])
    except KeyError as err:
        raise ConfigError(f"{section}.name: {err.args[0]}") from None
    given = {k: v for k, v in values.items() if k != "name"}
    _check_keys(f"section {section!r} ({values['name']})", given, component_keys(obj) if keys is None else keys)
    check_values(section, given, _component_types(obj), getattr(obj, "config_ranges", {}), COMPONENT_RANGE)
    return obj


def _data(values: dict):
    """The data set instance of a ``data`` section. Configs stored before each data set declared its
    own keys list every data set's keys; those still at their old defaults are dropped."""
    from .data.sources import LEGACY_DEFAULTS
    from .registry import DATASETS

    name = values.get("name")
    if isinstance(name, str) and name in DATASETS:
        keys = {f.name for f in dataclasses.fields(DATASETS.get(name))}
        values = {
            k: v
            for k, v in values.items()
            if k == "name" or k in keys or k not in LEGACY_DEFAULTS or LEGACY_DEFAULTS[k] != v
        }
    cls = _component("data", values, DATASETS)
    return cls(**{k: v for k, v in values.items() if k != "name"})


def validate_components(cfg: Config) -> None:
    """Each component's keys, types and ranges, its own ``check_config(cfg)``, then the checks
    that span sections."""
    from .registry import ALGORITHMS, BACKBONES

    components = [
        _component(section, getattr(cfg, section), registry)
        for section, registry in (("algorithm", ALGORITHMS), ("model", BACKBONES))
    ]
    for component in (*components, cfg.data):
        if callable(getattr(component, "check_config", None)):
            component.check_config(cfg)
    if not (isinstance(cfg.train.processes, int) and cfg.train.processes >= 1):
        raise ConfigError(f"train.processes must be a whole number >= 1, got {cfg.train.processes!r}.")
    threads = cfg.train.num_threads
    if not (threads is None or threads == "auto" or (isinstance(threads, int) and threads >= 1)):
        raise ConfigError(
            f"train.num_threads must be 'auto' (the free cores), a whole number >= 1 or null, got {threads!r}."
        )
    if cfg.train.budget_clock not in ("wall", "cpu"):
        raise ConfigError(
            f"train.budget_clock must be 'wall' (seconds on the clock) or 'cpu' (this process's CPU "
            f"seconds, all threads), got {cfg.train.budget_clock!r}."
        )
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got "
            f"{cfg.train.precision!r} (float16 needs loss scaling, which metatl does not do; "
            f"use bfloat16)."
        )
    if cfg.train.precision == "bfloat16" and ("vmap" in cfg.train.executor or cfg.train.executor == "compile"):
        raise ConfigError(
            f"train.precision=bfloat16 cannot run with train.executor={cfg.train.executor} (the vmap "
            "path's double backward mixes dtypes under autocast); set "
            "train.executor=threads (or auto) or train.precision=float32."
        )
    if cfg.train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.train.optimizer!r}.")
    if cfg.train.lr_schedule not in SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(SCHEDULES)}, got {cfg.train.lr_schedule!r}.")
    if cfg.train.lr_schedule == "step" and cfg.train.lr_step_every is None:
        raise ConfigError("train.lr_schedule: step needs train.lr_step_every >= 1 (e.g. 2000).")
    decay = cfg.train.ema_decay
    if decay is not None and not 0 < decay < 1:
        raise ConfigError(
            f"train.ema_decay must lie strictly between 0 and 1 (e.g. 0.999), got {decay!r}; "
            f"or leave it null to keep no average of the weights."
        )
    logger_names(cfg.train.logger)  # the names only: their packages are checked when training starts
    if cfg.eval.weights not in WEIGHTS:
        raise ConfigError(f"eval.weights must be one of {', '.join(WEIGHTS)}, got {cfg.eval.weights!r}.")
    if cfg.train.meta_batch % cfg.train.processes:
        raise ConfigError(
            f"train.meta_batch={cfg.train.meta_batch} cannot be split evenly over "
            f"train.processes={cfg.train.processes}; make the meta-batch a multiple of it."
        )


def logger_names(value) -> list[str]:
    """``train.logger`` (a name or a list of names) as a list, each checked."""
    names = [value] if isinstance(value, str) else list(value or [])
    if not names or any(n not in LOGGERS for n in names):
        raise ConfigError(
            f"train.logger must be one of {', '.join(LOGGERS)} or a list of them (e.g. [jsonl, "
            f"tensorboard]), got {value!r}."
        )
    return names


def parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=0.01).")
    key, value = text.split("=", 1)
    return key.strip().split("."), load_yaml(value, f"--set {text}")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw or {})
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            inner = node.get(part)
            if inner is not None and not isinstance(inner, dict):
                raise ConfigError(
                    f"--set {text}: {'.'.join(path[: i + 1])} is {inner!r}, not a section "
                    f"that can hold {path[i + 1]!r}."
                )
            node[part] = dict(inner or {})
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples.")
    raw = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of sections (name, algorithm, model, data, train, eval).")
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    for section in REQUIRED:
        if not isinstance(raw.get(section), dict) or "name" not in raw[section]:
            what = "a section" if not isinstance(raw.get(section), dict) else "a 'name' in its section"
            raise ConfigError(
                f"{path} has no {section}.name: a run config needs {what} {section!r} that names "
                f"the {REQUIRED[section]} (e.g. {section}:\n  name: ...; `metatl list` shows them)."
            )
    return from_dict(raw)
