"""The learner builders, at their old import path: they live in :mod:`metatl.build`."""

from ..build import FIXED_DATA, build_learner, build_sampler, learner_from_spec, load_learner, task_spec

__all__ = ["FIXED_DATA", "build_learner", "build_sampler", "learner_from_spec", "load_learner", "task_spec"]
