"""Task and episode sources. The data sets of configs (``data.name``) are registered dataclasses in
:mod:`metatl.data.sources`; ``build_sampler(cfg.data, subset)`` gives a split's episode source."""

from __future__ import annotations

from .episode import ClassPool, Episode, EpisodeSampler, TensorClassPool, fixed_episodes, stack_episodes
from .sinusoid import SinusoidTasks
from .sources import (
    SUBSETS,
    TRAINING,
    ClassEpisodes,
    DigitsEpisodes,
    Episodes,
    ImageFolderData,
    MnistUsps,
    Omniglot,
    Sinusoid,
    build_sampler,
    dataset,
)

__all__ = [
    "ClassEpisodes",
    "ClassPool",
    "DigitsEpisodes",
    "Episode",
    "EpisodeSampler",
    "Episodes",
    "ImageFolderData",
    "MnistUsps",
    "Omniglot",
    "Sinusoid",
    "SinusoidTasks",
    "SUBSETS",
    "TRAINING",
    "TensorClassPool",
    "build_sampler",
    "dataset",
    "fixed_episodes",
    "stack_episodes",
]
