"""From a config to objects: the episode sources and the learner (backbone + algorithm), and the one
way back from a checkpoint to its learner (:func:`load_learner`, ``metatl.load``).

It sits beside the components, not in the engine: the engine's trainer builds its learner here, and
components that start from a trained network (a distillation teacher, a scored checkpoint) load it
here too, so that nothing below the engine imports it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .data import build_sampler
from .registry import ALGORITHMS, BACKBONES

if TYPE_CHECKING:
    from .config import Config


def task_spec(sampler: Any) -> dict:
    """What the learner needs to know of the tasks (stored in checkpoints, so a checkpoint can be
    loaded without its training data): task type, head width and input shape."""
    return {
        "task_type": sampler.task_type,
        "out_features": sampler.out_features,
        "input_spec": dict(getattr(sampler, "input_spec", {})),
    }


def learner_from_spec(cfg: Config, spec: dict) -> nn.Module:
    """The meta-learner of ``cfg`` for tasks described by :func:`task_spec`. Algorithms that set
    ``uses_head = False`` (the metric-based ones) get the backbone without a head (``out_features=0``)."""
    algo = ALGORITHMS.get(cfg.algorithm["name"])
    out_features = spec["out_features"] if getattr(algo, "uses_head", True) else 0
    model_kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    model = BACKBONES.get(cfg.model["name"])(out_features=out_features, **spec["input_spec"], **model_kwargs)
    algo_kwargs = {k: v for k, v in cfg.algorithm.items() if k != "name"}
    return algo(model, task_type=spec["task_type"], **algo_kwargs)


def build_learner(cfg: Config, sampler: Any) -> nn.Module:
    """The meta-learner of ``cfg`` for tasks like those of ``sampler``."""
    return learner_from_spec(cfg, task_spec(sampler))


# facts of the training run, not choices of an evaluation: overrides may not change them
_UNSEEN = "would feed it inputs it never saw (images are converted to the checkpoint's format)"
FIXED_DATA = {
    "image_size": _UNSEEN,
    "in_channels": _UNSEEN,
    "train_subset": "cannot change the classes it was trained on (the test classes are the same)",
}


def load_learner(
    checkpoint: str | os.PathLike, weights: str | None = None, overrides: list[str] | None = None
) -> nn.Module:
    """The learner stored in ``checkpoint``: the one way to rebuild a learner, for ``metatl eval``,
    ``metatl adapt`` and Python (``metatl.load``).

    In eval mode, with its config (after ``overrides``, e.g. ``["eval.episodes=1000"]``) as
    ``learner.config``, its input spec as ``learner.input_spec`` and what the checkpoint says of its
    training as ``learner.trained`` (``iterations``, ``train_seconds``, ``weights``). The training
    data is not needed (older checkpoints without a stored task spec fall back to building the
    training sampler). A run that kept a moving average of its weights (``train.ema_decay``) gives
    the average; ``weights="raw"`` (or ``eval.weights: raw``) gives the trained weights. Overrides
    may not change the model or the data it was trained on. Image models check their input: a wrong
    channel count or size raises a ValueError that says what to pass."""
    from . import checkpoint as ckpt_io
    from .config import ConfigError, apply_overrides, from_dict

    if weights not in (None, "averaged", "raw"):
        raise ValueError(
            f"weights={weights!r}: use 'averaged' (the moving average of a run with "
            f"train.ema_decay, the default) or 'raw' (the trained weights)."
        )
    state = ckpt_io.load(checkpoint)
    trained = from_dict(state["config"])
    cfg = from_dict(apply_overrides(state["config"], list(overrides))) if overrides else trained
    for key, why in FIXED_DATA.items():
        if getattr(cfg.data, key, None) != getattr(trained.data, key, None):
            raise ConfigError(
                f"data.{key}: {checkpoint} was trained with {key}={getattr(trained.data, key, None)!r}; "
                f"evaluating with {getattr(cfg.data, key, None)!r} {why}. Leave data.{key} as it is."
            )
    spec = state.get("task") or task_spec(build_sampler(trained.data, "train"))
    uses_head = getattr(ALGORITHMS.get(cfg.algorithm["name"]), "uses_head", True)
    if (
        uses_head
        and spec["task_type"] == "classification"
        and getattr(cfg.data, "ways", None) != getattr(trained.data, "ways", None)
    ):
        raise ConfigError(
            f"data.ways: {checkpoint} has a {trained.data.ways}-way head; evaluating it on "
            f"{cfg.data.ways}-way episodes cannot work. Leave data.ways as it is (metric-based "
            f"learners such as protonet take any number of ways)."
        )
    chosen = weights or cfg.eval.weights
    try:
        learner = learner_from_spec(cfg, spec)
        learner.load_state_dict(ckpt_io.learner_weights(state, chosen))
    except RuntimeError as err:
        raise ConfigError(
            f"{checkpoint} does not fit the model of its config after overrides "
            f"({str(err).splitlines()[0]}); do not override model.* or data.ways "
            f"when evaluating a checkpoint."
        ) from err
    learner.eval()
    learner.config, learner.input_spec = cfg, dict(spec["input_spec"])
    averaged = chosen == "averaged" and state.get("averaged") is not None
    learner.trained = {
        "iterations": state.get("iteration", 0),
        "train_seconds": state.get("train_seconds", 0.0),
        "weights": "averaged" if averaged else "raw",
    }
    if "in_channels" in learner.input_spec and "image_size" in learner.input_spec:
        check = _image_guard(learner.input_spec, cfg.data, checkpoint)
        if hasattr(learner.model, "input_check"):  # the conv nets: a hook would turn off their folded first layer
            learner.model.input_check = check
        else:  # on the first conv layer: every path to the features (forward, embed, feature maps) passes it
            first = next((m for m in learner.model.modules() if isinstance(m, nn.Conv2d)), learner.model)
            first.register_forward_pre_hook(lambda module, args: check(args[0]))
    return learner


def _image_guard(input_spec: dict, data, checkpoint):
    expected = (input_spec["in_channels"], input_spec["image_size"], input_spec["image_size"])

    def check(x):
        if x.dim() < 3 or tuple(x.shape[-3:]) != expected:
            c, s, _ = expected
            invert = ", invert=True" if getattr(data, "inverts_images", False) else ""
            raise ValueError(
                f"the model of {checkpoint} takes images of shape (n, {c}, {s}, {s}) ({c} channel(s), "
                f"{s}x{s} pixels, as trained on {data.name}); got {tuple(x.shape)}. Give it image files and "
                f"it converts them as trained: learner.adapt_images(support_folder).predict_images(paths), "
                f"or `metatl adapt`; by hand: metatl.data.image_folder.load_images(paths, in_channels={c}, "
                f"image_size={s}{invert})."
            )

    return check


__all__ = ["build_learner", "build_sampler", "learner_from_spec", "load_learner", "task_spec"]
