"""Typed run configuration, stored as YAML.

A config has five sections. ``data``, ``train`` and ``eval`` are dataclasses below; ``algorithm``
and ``model`` hold a registered ``name`` plus that component's keyword arguments, checked against
its signature. Any unknown key is an error that lists the valid ones. Overrides use dotted keys
(``--set train.lr=0.01 algorithm.first_order=true``); values are parsed as YAML.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.1 wants ``1.0e-3``; 1.2 does not)."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=YAMLLoader)


PRECISIONS = ("float32", "tf32", "bfloat16")  # train.precision
WEIGHTS = ("averaged", "raw")  # eval.weights
EPISODE_DATASETS = ("omniglot", "image_folder")  # N-way classification episodes over train/val/test classes


class ConfigError(ValueError):
    """A config problem, with the fix in the message."""


@dataclass
class DataConfig:
    name: str = "sinusoid"
    ways: int = 5  # evaluation episodes: N ways, K shots, Q queries per class
    shots: int = 1
    queries: int = 15
    train_ways: Optional[int] = None  # meta-training episodes (default: the evaluation values)
    train_shots: Optional[int] = None
    train_queries: Optional[int] = None
    split: str = "vinyals"  # omniglot: vinyals (1028/172/423) or maml (1200/423)
    train_subset: str = "train"  # classes of meta-training: train, or trainval (train + val; no validation then)
    image_size: int = 28
    root: Optional[str] = None  # image folders: the folder of class sub-folders
    in_channels: int = 1  # image folders: 1 (grayscale) or 3 (RGB); images are converted
    classes: Optional[Dict[str, List[str]]] = None  # image folders: {train: [...], val: [...], test: [...]}
    split_fractions: List[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # else a seeded split
    split_seed: int = 0
    data_dir: Optional[str] = None  # default: $METATL_DATA_DIR, then the user cache
    download: bool = False
    # domain adaptation (mnist_usps): source->target, target labels revealed for training, subsampling
    direction: str = "mnist->usps"  # or usps->mnist
    target_labels_fraction: float = 0.0  # e.g. 0.01: fine-tuning on 1% of the target training labels
    max_source: Optional[int] = None  # use at most this many training rows per domain (quick runs)
    max_target: Optional[int] = None


@dataclass
class TrainConfig:
    iterations: int = 1000
    meta_batch: int = 25
    optimizer: str = "adam"  # adam or sgd (the outer / meta optimizer)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant, linear or cosine (to lr_final at the end of the run), or step
    lr_final: float = 0.0
    lr_step_every: Optional[int] = None  # step schedule: multiply lr by lr_gamma every this many iterations
    lr_gamma: float = 0.5
    grad_clip: Optional[float] = None  # max global norm of the meta-gradient
    val_every: int = 500
    val_episodes: int = 100
    ckpt_every: int = 500
    log_every: int = 10
    time_budget_min: Optional[float] = None  # stop after this many minutes of training
    snapshot_minutes: List[float] = field(default_factory=list)  # keep checkpoints at these minutes
    seed: int = 0
    device: str = "cpu"
    num_threads: Optional[int] = None  # threads per process (default: torch's, or 1 with processes > 1)
    processes: int = 1  # split each meta-batch over this many processes (torch.distributed)
    # float32: full float32, also on GPUs (TF32 off); tf32: CUDA convolutions and matrix products in TF32;
    # bfloat16: meta-loss under torch.autocast (parameters stay float32)
    precision: str = "float32"
    keep_freed_memory: bool = True  # glibc malloc reuses freed pages (no page faults each step)
    ema_decay: Optional[float] = None  # also keep an exponential moving average of the weights (e.g. 0.999)


@dataclass
class EvalConfig:
    episodes: int = 600
    seed: int = 1234  # the fixed test episodes are drawn from this seed
    inner_steps: Optional[int] = None  # override the algorithm's test-time inner steps
    transductive: bool = True  # BatchNorm "batch" mode: normalise the query set as one batch
    extra_steps: List[int] = field(default_factory=list)  # also report these test-time inner steps
    plot_tasks: int = 3  # regression: test tasks to plot
    weights: str = "averaged"  # with train.ema_decay: score the averaged weights, or "raw" ones


@dataclass
class Config:
    name: str = "run"
    algorithm: Dict[str, Any] = field(default_factory=lambda: {"name": "maml"})
    model: Dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def dump(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
OPEN_SECTIONS = ("algorithm", "model")


def _check_keys(where: str, given, valid) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: "
                          f"{', '.join(sorted(valid))}.")


_DESCRIBE = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _matches(value, tp) -> bool:
    """Whether a YAML value fits the annotation ``tp`` (scalars, Optional, List, Dict)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
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
    if origin in (list, List):
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return True  # Any, or a type this check does not know


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, List):
        return f"a list of {_describe(args[0]).replace('a ', '', 1)}s" if args else "a list"
    if origin in (dict, Dict):
        return "a mapping"
    return _DESCRIBE.get(tp, getattr(tp, "__name__", str(tp)))


def _check_type(where: str, value, tp) -> None:
    if not _matches(value, tp):
        raise ConfigError(f"{where} must be {_describe(tp)}, got {value!r}; fix it in the config or "
                          f"with --set {where}=VALUE.")


def _component_types(obj) -> Dict[str, Any]:
    """The annotation of each keyword argument of a registered component, else its default's type."""
    target = obj.__init__ if isinstance(obj, type) else obj
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


def component_keys(obj) -> List[str]:
    """Keyword arguments a registered component accepts (its config keys besides ``name``)."""
    skip = {"self", "model", "task_type", "in_features", "in_channels", "out_features", "image_size"}
    return [p.name for p in inspect.signature(obj).parameters.values()
            if p.name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def from_dict(raw: dict) -> Config:
    raw = dict(raw or {})
    top = [f.name for f in dataclasses.fields(Config)]
    _check_keys("the config", raw, top)
    kwargs: Dict[str, Any] = {}
    if "name" in raw:
        kwargs["name"] = str(raw["name"])
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        _check_keys(f"section {section!r}", values, [f.name for f in dataclasses.fields(cls)])
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            _check_type(f"{section}.{key}", value, hints[key])
        kwargs[section] = cls(**values)
    for section in OPEN_SECTIONS:
        values = dict(raw.get(section) or getattr(Config(), section))
        if "name" not in values:
            raise ConfigError(f"section {section!r} needs a 'name' (see `metatl list`).")
        kwargs[section] = values
    cfg = Config(**kwargs)
    validate_components(cfg)
    return cfg


def validate_components(cfg: Config) -> None:
    from .data import TRAINING
    from .registry import ALGORITHMS, BACKBONES, DATASETS

    for section, registry in (("algorithm", ALGORITHMS), ("model", BACKBONES)):
        values = getattr(cfg, section)
        try:
            obj = registry.get(values["name"])
        except KeyError as err:
            raise ConfigError(f"{section}.name: {err.args[0]}") from None
        _check_keys(f"section {section!r} ({values['name']})", set(values) - {"name"}, component_keys(obj))
        types = _component_types(obj)
        for key, value in values.items():
            if key != "name" and key in types:
                _check_type(f"{section}.{key}", value, types[key])
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r}; valid: {', '.join(DATASETS)}.")
    at_least = [("train.iterations", cfg.train.iterations, 1), ("train.meta_batch", cfg.train.meta_batch, 1),
                ("eval.episodes", cfg.eval.episodes, 1), ("data.shots", cfg.data.shots, 1),
                ("data.queries", cfg.data.queries, 1), ("data.train_shots", cfg.data.train_shots, 1),
                ("data.train_queries", cfg.data.train_queries, 0)]
    if cfg.data.name in EPISODE_DATASETS:
        at_least += [("data.ways", cfg.data.ways, 2), ("data.train_ways", cfg.data.train_ways, 2)]
    for key, value, low in at_least:
        if value is not None and value < low:
            why = " (a 1-way task is always answered right)" if key.endswith("ways") else ""
            raise ConfigError(f"{key} must be at least {low}, got {value}{why}; set it with --set {key}=...")
    if not (isinstance(cfg.train.processes, int) and cfg.train.processes >= 1):
        raise ConfigError(f"train.processes must be a whole number >= 1, got {cfg.train.processes!r}.")
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got "
                          f"{cfg.train.precision!r} (float16 needs loss scaling, which metatl does not do; "
                          f"use bfloat16).")
    if cfg.train.precision == "bfloat16" and cfg.algorithm.get("batch_tasks"):
        raise ConfigError(f"train.precision=bfloat16 cannot run with algorithm.batch_tasks="
                          f"{str(cfg.algorithm['batch_tasks']).lower()} (the vmap "
                          "path's double backward mixes dtypes under autocast); set "
                          "algorithm.batch_tasks=false or train.precision=float32.")
    decay = cfg.train.ema_decay
    if decay is not None and not 0 < decay < 1:
        raise ConfigError(f"train.ema_decay must lie strictly between 0 and 1 (e.g. 0.999), got {decay!r}; "
                          f"or leave it null to keep no average of the weights.")
    if cfg.eval.weights not in WEIGHTS:
        raise ConfigError(f"eval.weights must be one of {', '.join(WEIGHTS)}, got {cfg.eval.weights!r}.")
    if cfg.data.train_subset not in TRAINING:
        raise ConfigError(f"data.train_subset must be 'train' or 'trainval' (the training and validation "
                          f"classes together), got {cfg.data.train_subset!r}.")
    if cfg.data.train_subset == "trainval":
        if cfg.data.name not in EPISODE_DATASETS:
            raise ConfigError(f"data.train_subset=trainval needs a dataset with validation classes "
                              f"(omniglot, image_folder), not {cfg.data.name!r}; use data.train_subset=train.")
        if cfg.train.val_every:
            raise ConfigError("data.train_subset=trainval meta-trains on the validation classes, so validation "
                              "would score trained classes; set train.val_every=0.")
    if cfg.train.meta_batch % cfg.train.processes:
        raise ConfigError(f"train.meta_batch={cfg.train.meta_batch} cannot be split evenly over "
                          f"train.processes={cfg.train.processes}; make the meta-batch a multiple of it.")


def parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=0.01).")
    key, value = text.split("=", 1)
    return key.strip().split("."), load_yaml(value)


def apply_overrides(raw: dict, overrides: List[str]) -> dict:
    raw = dict(raw or {})
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path, overrides: Optional[List[str]] = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples.")
    raw = load_yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of sections (name, algorithm, model, data, train, eval).")
    raw.setdefault("name", path.stem)
    return from_dict(apply_overrides(raw, overrides or []))
