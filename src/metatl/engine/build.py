"""From a config to objects: the episode sources and the learner (backbone + algorithm)."""
from __future__ import annotations

from ..data import build_sampler
from ..registry import ALGORITHMS, BACKBONES


def build_learner(cfg, sampler):
    """The meta-learner of ``cfg`` for tasks like those of ``sampler``."""
    model_kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    spec = dict(getattr(sampler, "input_spec", {}))
    model = BACKBONES.get(cfg.model["name"])(out_features=sampler.out_features, **spec, **model_kwargs)
    algo_kwargs = {k: v for k, v in cfg.algorithm.items() if k != "name"}
    return ALGORITHMS.get(cfg.algorithm["name"])(model, task_type=sampler.task_type, **algo_kwargs)


__all__ = ["build_learner", "build_sampler"]
