"""metatl: meta-learning and transfer learning in PyTorch, one data model, one trainer, one evaluator."""

__version__ = "0.1.0"

import os  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from . import data, meta, nn, transfer  # noqa: E402,F401  (registers every component)
from .config import Config, load_config  # noqa: E402
from .data import Episode, EpisodeSampler, SinusoidTasks  # noqa: E402
from .meta import MAML, Reptile, adapt  # noqa: E402
from .registry import ALGORITHMS, BACKBONES, DATASETS, ESTIMATORS  # noqa: E402

if TYPE_CHECKING:
    import torch


def load(
    checkpoint: str | os.PathLike, weights: str | None = None, overrides: list[str] | None = None
) -> "torch.nn.Module":
    """The learner stored in a checkpoint: ``metatl.load(path).adapt(support_x, support_y)``.

    The training data is not needed; ``learner.config`` is the run's config and
    ``learner.input_spec`` the input it takes (see :func:`metatl.build.load_learner`).
    ``weights="raw"`` gives the trained weights of a run that kept a moving average of them
    (``train.ema_decay``), whose average is the default.
    """
    from .build import load_learner

    return load_learner(checkpoint, weights, overrides)


__all__ = [
    "ALGORITHMS",
    "BACKBONES",
    "DATASETS",
    "ESTIMATORS",
    "Config",
    "Episode",
    "EpisodeSampler",
    "MAML",
    "Reptile",
    "SinusoidTasks",
    "adapt",
    "load",
    "load_config",
    "__version__",
]
