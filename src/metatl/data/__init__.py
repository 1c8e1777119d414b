"""Task and episode sources, registered by name (``data.name`` in a config)."""
from __future__ import annotations

from ..registry import DATASETS
from .episode import ClassPool, Episode, EpisodeSampler, TensorClassPool, fixed_episodes, stack_episodes
from .sinusoid import SinusoidTasks

TRAINING = ("train", "trainval")  # the classes meta-training may draw from (data.train_subset)
SUBSETS = ("train", "val", "test", "trainval")


def _episode_shape(cfg, subset: str):
    train = subset in TRAINING
    pick = lambda a, b: a if (train and a is not None) else b  # noqa: E731
    return pick(cfg.train_ways, cfg.ways), pick(cfg.train_shots, cfg.shots), pick(cfg.train_queries, cfg.queries)


def _episodes(pool, cfg, subset: str) -> EpisodeSampler:
    """An :class:`EpisodeSampler` whose errors name the config keys that set the episode shape."""
    ways, shots, queries = _episode_shape(cfg, subset)
    try:
        return EpisodeSampler(pool, ways, shots, queries)
    except ValueError as err:
        train = subset in TRAINING
        keys = [f"data.{'train_' if train and getattr(cfg, 'train_' + k) is not None else ''}{k}={v}"
                for k, v in (("ways", ways), ("shots", shots), ("queries", queries))]
        raise ValueError(f"{err.args[0]} ({subset} episodes: {', '.join(keys)})") from None


@DATASETS.register("sinusoid")
def sinusoid_tasks(cfg, subset: str) -> SinusoidTasks:
    """MAML sinusoid regression; ``shots`` = K support points, ``queries`` = query points."""
    _, shots, queries = _episode_shape(cfg, subset)
    tasks = SinusoidTasks(shots=shots, queries=queries)
    tasks.input_spec = {"in_features": 1}
    return tasks


@DATASETS.register("omniglot")
def omniglot_tasks(cfg, subset: str) -> EpisodeSampler:
    """Omniglot N-way K-shot episodes, characters x 4 rotations as classes."""
    from .omniglot import omniglot_classes

    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; use one of {SUBSETS}.")
    pool = omniglot_classes(subset, cfg.split, cfg.data_dir, cfg.image_size, download_missing=cfg.download)
    sampler = _episodes(pool, cfg, subset)
    sampler.input_spec = {"in_channels": 1, "image_size": cfg.image_size}
    return sampler


@DATASETS.register("image_folder")
def image_folder_tasks(cfg, subset: str) -> EpisodeSampler:
    """Your own images: ``data.root`` with one sub-folder per class, classes split train/val/test."""
    from .image_folder import image_folder_classes

    if subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; use one of {SUBSETS}.")
    ways, shots, queries = _episode_shape(cfg, subset)
    pool = image_folder_classes(cfg, subset, shots, queries, ways)
    sampler = _episodes(pool, cfg, subset)
    sampler.input_spec = {"in_channels": cfg.in_channels, "image_size": cfg.image_size}
    return sampler


@DATASETS.register("mnist_usps")
def mnist_usps(cfg, subset: str):
    """MNIST <-> USPS domain adaptation (``data.direction``); labelled source, unlabelled target."""
    from .digits import digits_adaptation

    return digits_adaptation(cfg, subset)


def build_sampler(cfg, subset: str):
    """The episode source for ``subset`` ("train", "val" or "test") of a :class:`DataConfig`;
    "train" draws from the classes ``cfg.train_subset`` names ("train" or "trainval")."""
    if subset == "train":
        subset = cfg.train_subset
    return DATASETS.get(cfg.name)(cfg, subset)


__all__ = ["ClassPool", "Episode", "EpisodeSampler", "SinusoidTasks", "TensorClassPool",
           "build_sampler", "fixed_episodes", "stack_episodes"]
