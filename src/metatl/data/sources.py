"""The registered data sets: each a dataclass whose fields are its config keys (``data.*``).

A config's ``data`` section is ``name`` plus the keyword arguments of the class registered under
that name, checked against its fields' types and ``config_ranges``. A data set gives its episode
source per split with :meth:`sampler` and may check the rest of the config with ``check_config``.
To add one::

    @dataset("my_data")
    @dataclass
    class MyData:
        shots: int = 5
        config_ranges: ClassVar[dict] = {"shots": at_least(1)}

        def sampler(self, subset: str): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..config import SEED, Config, ConfigError, Range, at_least
from ..registry import DATASETS
from .episode import EpisodeSampler

if TYPE_CHECKING:
    from .sinusoid import SinusoidTasks

T = TypeVar("T")
TRAINING = ("train", "trainval")  # the classes meta-training may draw from (data.train_subset)
SUBSETS = ("train", "val", "test", "trainval")
WHY_WAYS = "a 1-way task is always answered right"


def dataset(name: str) -> Callable[[T], T]:
    """Register a data set class under ``name`` (``data.name``); ``cls.name`` is set to it."""

    def decorator(cls: T) -> T:
        cls.name = name
        return DATASETS.register(name)(cls)

    return decorator


DEFAULT = "sinusoid"  # the data set of a config built in Python without a data section


def default_data():
    return DATASETS.get(DEFAULT)()


@dataclass
class Episodes:
    """The episode shape shared by every data set of few-shot tasks: ``ways`` classes (or none, for
    regression), ``shots`` support and ``queries`` query examples per class for evaluation; the
    ``train_*`` keys set meta-training's episodes (null: the evaluation values)."""

    shots: int = 1
    queries: int = 15
    train_shots: int | None = None
    train_queries: int | None = None

    name: ClassVar[str] = ""
    config_ranges: ClassVar[dict[str, Range]] = {
        "ways": at_least(2, WHY_WAYS),
        "shots": at_least(1),
        "queries": at_least(1),
        "train_ways": at_least(2, WHY_WAYS),
        "train_shots": at_least(1),
        "train_queries": at_least(0),
        "image_size": at_least(1),
        "split_seed": SEED,
    }

    def episode_shape(self, subset: str) -> tuple[int | None, int, int]:
        """``(ways, shots, queries)`` of ``subset``'s episodes (``ways`` None for regression)."""
        train = subset in TRAINING
        pick = lambda key: getattr(self, "train_" + key, None) if train else None  # noqa: E731
        values = [getattr(self, key, None) if pick(key) is None else pick(key) for key in ("ways", "shots", "queries")]
        return values[0], values[1], values[2]

    def _keys(self, subset: str) -> str:
        """The config keys that set ``subset``'s episode shape, for error messages."""
        train = subset in TRAINING
        keys = []
        for key, value in zip(("ways", "shots", "queries"), self.episode_shape(subset)):
            if value is not None:
                prefix = "train_" if train and getattr(self, "train_" + key, None) is not None else ""
                keys.append(f"data.{prefix}{key}={value}")
        return ", ".join(keys)


@dataclass
class ClassEpisodes(Episodes):
    """N-way K-shot classification episodes over disjoint train / val / test classes."""

    ways: int = 5
    train_ways: int | None = None
    train_subset: str = "train"  # classes of meta-training: train, or trainval (train + val; no validation then)
    # training labels: episode (0..ways-1 per episode) or class (the index among all training classes,
    # for one classifier over every base class: the pretraining of Baseline / Baseline++)
    train_labels: str = "episode"

    def check_config(self, cfg: Config) -> None:
        if self.train_labels not in EpisodeSampler.LABELS:
            raise ConfigError(
                f"data.train_labels must be 'episode' (labels 0..ways-1 in each episode) or 'class' "
                f"(each class's index among all training classes, for algorithm baseline or "
                f"baseline_pp), got {self.train_labels!r}."
            )
        if self.train_subset not in TRAINING:
            raise ConfigError(
                f"data.train_subset must be 'train' or 'trainval' (the training and validation "
                f"classes together), got {self.train_subset!r}."
            )
        if self.train_subset == "trainval" and cfg.train.val_every:
            raise ConfigError(
                "data.train_subset=trainval meta-trains on the validation classes, so validation "
                "would score trained classes; set train.val_every=0."
            )

    def _episodes(self, pool, subset: str) -> EpisodeSampler:
        """An :class:`EpisodeSampler` whose errors name the config keys that set the episode shape."""
        ways, shots, queries = self.episode_shape(subset)
        labels = self.train_labels if subset in TRAINING else "episode"
        try:
            return EpisodeSampler(pool, ways, shots, queries, labels=labels)
        except ValueError as err:
            raise ValueError(f"{err.args[0]} ({subset} episodes: {self._keys(subset)})") from None

    @staticmethod
    def _check_subset(subset: str) -> None:
        if subset not in SUBSETS:
            raise ValueError(f"unknown subset {subset!r}; use one of {SUBSETS}.")


@dataset("sinusoid")
@dataclass
class Sinusoid(Episodes):
    """MAML sinusoid regression; ``shots`` = K support points, ``queries`` = query points."""

    def check_config(self, cfg: Config) -> None:
        if self.train_queries == 0:
            raise ConfigError(
                "data.train_queries must be at least 1 for sinusoid tasks (the query points "
                "are the meta-training loss)."
            )

    def sampler(self, subset: str) -> SinusoidTasks:
        from .sinusoid import SinusoidTasks

        _, shots, queries = self.episode_shape(subset)
        tasks = SinusoidTasks(shots=shots, queries=queries)
        tasks.input_spec = {"in_features": 1}
        return tasks


@dataset("omniglot")
@dataclass
class Omniglot(ClassEpisodes):
    """Omniglot N-way K-shot episodes, characters x 4 rotations as classes."""

    split: str = "vinyals"  # vinyals (1028/172/423 characters) or maml (1200/423)
    image_size: int = 28
    data_dir: str | None = None  # default: $METATL_DATA_DIR, then the user cache
    download: bool = False

    inverts_images: ClassVar[bool] = True  # models see white strokes on black: a user's drawings are inverted

    def sampler(self, subset: str) -> EpisodeSampler:
        from .omniglot import omniglot_classes

        self._check_subset(subset)
        pool = omniglot_classes(subset, self.split, self.data_dir, self.image_size, download_missing=self.download)
        sampler = self._episodes(pool, subset)
        sampler.input_spec = {"in_channels": 1, "image_size": self.image_size}
        return sampler


@dataset("image_folder")
@dataclass
class ImageFolderData(ClassEpisodes):
    """Your own images: ``data.root`` with one sub-folder per class, classes split train/val/test."""

    root: str | None = None  # the folder of class sub-folders
    in_channels: int = 1  # 1 (grayscale) or 3 (RGB); images are converted
    image_size: int = 28
    classes: dict[str, list[str]] | None = None  # {train: [...], val: [...], test: [...]}
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # else a seeded split
    split_seed: int = 0

    config_ranges: ClassVar[dict[str, Range]] = {**ClassEpisodes.config_ranges, "split_fractions": Range(0, 1)}

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        if self.in_channels not in (1, 3):
            raise ConfigError(f"data.in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}.")

    def sampler(self, subset: str) -> EpisodeSampler:
        from .image_folder import image_folder_classes

        self._check_subset(subset)
        ways, shots, queries = self.episode_shape(subset)
        pool = image_folder_classes(self, subset, shots, queries, ways)
        sampler = self._episodes(pool, subset)
        sampler.input_spec = {"in_channels": self.in_channels, "image_size": self.image_size}
        return sampler


@dataset("digits_episodes")
@dataclass
class DigitsEpisodes(ClassEpisodes):
    """N-way K-shot episodes of handwritten digits (MNIST, USPS or scikit-learn digits): cross-domain tests.

    Images are 1-channel ``image_size`` x ``image_size`` in [0, 1] with ink = 1 on a 0 background,
    the convention of the Omniglot data set (whose black-on-white scans are inverted when read), and
    framed like MNIST (:mod:`metatl.data.digits`): a model meta-trained on Omniglot takes them as
    they are. There are only ten classes, so the subsets are not class-disjoint: ``test`` and
    ``val`` episodes are drawn from the domain's test images, ``train`` from its training images.
    Made for testing models trained elsewhere (``metatl eval CKPT --set data.name=digits_episodes``,
    ``metatl compare``)."""

    domain: str = "mnist"  # mnist, usps or sklearn_digits
    image_size: int = 28
    usps_frame: str = "pad"  # pad: 16x16 USPS padded by 6 px to 28x28 (skada-bench); stretch: resized
    data_dir: str | None = None  # default: $METATL_DATA_DIR, then the user cache
    download: bool = False

    def check_config(self, cfg: Config) -> None:
        super().check_config(cfg)
        from .digits import DOMAINS, USPS_FRAMES

        if self.domain not in DOMAINS:
            raise ConfigError(f"data.domain must be one of {', '.join(DOMAINS)}, got {self.domain!r}.")
        if self.usps_frame not in USPS_FRAMES:
            raise ConfigError(f"data.usps_frame must be one of {', '.join(USPS_FRAMES)}, got {self.usps_frame!r}.")
        for key, ways in (("ways", self.ways), ("train_ways", self.train_ways)):
            if ways is not None and ways > 10:
                raise ConfigError(f"data.{key}={ways}: digits have 10 classes; use at most 10 ways.")

    def sampler(self, subset: str) -> EpisodeSampler:
        from .digits import _domain
        from .episode import TensorClassPool

        self._check_subset(subset)
        split = "train" if subset in TRAINING else "test"
        x, y = _domain(self.domain, split, self.image_size, self.data_dir, self.download, self.usps_frame)
        sampler = self._episodes(TensorClassPool(x, y), subset)
        sampler.input_spec = {"in_channels": 1, "image_size": self.image_size}
        return sampler


@dataset("mnist_usps")
@dataclass
class MnistUsps:
    """Digits domain adaptation: MNIST, USPS, scikit-learn digits; labelled source, unlabelled target.

    ``data.direction`` names source and target; see :func:`metatl.data.digits.digits_adaptation`."""

    direction: str = "mnist->usps"  # source->target among mnist, usps, sklearn_digits
    image_size: int = 28
    usps_frame: str = "pad"  # pad: 16x16 USPS padded by 6 px to 28x28 (skada-bench); stretch: resized to fill it
    standardize: str = "none"  # none: values in [0, 1]; domain: each domain by its own training mean and std
    test_protocol: str = "official"  # official: target test split; holdout: holdout_fraction of target train
    holdout_fraction: float = 0.2
    target_labels_fraction: float = 0.0  # e.g. 0.01: fine-tuning on 1% of the target training labels
    # transferability / few-label fine-tuning: exactly this many revealed target labels per class
    # (instead of target_labels_fraction; null: use the fraction)
    target_labels_per_class: int | None = None
    max_source: int | None = None  # use at most this many training rows per domain (quick runs)
    max_target: int | None = None
    split_seed: int = 0
    data_dir: str | None = None  # default: $METATL_DATA_DIR, then the user cache
    download: bool = False

    name: ClassVar[str] = ""
    config_ranges: ClassVar[dict[str, Range]] = {
        "image_size": at_least(1),
        "target_labels_fraction": Range(0, 1),
        "target_labels_per_class": at_least(1),
        "max_source": at_least(1),
        "max_target": at_least(1),
        "split_seed": SEED,
        "holdout_fraction": Range(0, 1, open_low=True, open_high=True),
    }

    def check_config(self, cfg: Config) -> None:
        from .digits import _check_options, _parse_direction

        try:
            _parse_direction(self.direction)
            _check_options(self)
        except ValueError as err:
            raise ConfigError(err.args[0]) from None
        if self.target_labels_per_class is not None and self.target_labels_fraction:
            raise ConfigError(
                "data.target_labels_per_class and data.target_labels_fraction both reveal target labels; "
                "set one of them (the other to null / 0)."
            )

    def sampler(self, subset: str) -> Any:  # a DomainPairSampler ("train") or a LabelledSet
        from .digits import digits_adaptation

        return digits_adaptation(self, subset)


# Every data set's field, with the default it had when one DataConfig held them all: configs
# stored by those versions (checkpoints, run folders) list each one; they are dropped when unchanged.
LEGACY_DEFAULTS = {
    "ways": 5,
    "shots": 1,
    "queries": 15,
    "train_ways": None,
    "train_shots": None,
    "train_queries": None,
    "split": "vinyals",
    "train_subset": "train",
    "image_size": 28,
    "root": None,
    "in_channels": 1,
    "classes": None,
    "split_fractions": [0.6, 0.2, 0.2],
    "split_seed": 0,
    "data_dir": None,
    "download": False,
    "direction": "mnist->usps",
    "target_labels_fraction": 0.0,
    "max_source": None,
    "max_target": None,
    "usps_frame": "pad",
    "standardize": "none",
    "test_protocol": "official",
    "holdout_fraction": 0.2,
}


def build_sampler(data: Any, subset: str) -> Any:
    """The episode source for ``subset`` ("train", "val" or "test") of a data set (``cfg.data``);
    "train" draws from the classes its ``train_subset`` names ("train" or "trainval")."""
    if subset == "train":
        subset = getattr(data, "train_subset", "train")
    return data.sampler(subset)
