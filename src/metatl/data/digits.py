"""MNIST, USPS and scikit-learn's digits as transfer domains (the classic MNIST <-> USPS task, plus a third).

Files and formats (see the shared data README for provenance):

* MNIST: the four official IDX files, gzip-compressed, under ``<data_dir>/mnist/``
  (``train-images-idx3-ubyte.gz`` ...), 28x28 uint8.
* USPS: ``<data_dir>/usps/usps.h5`` (HDF5: ``/train|test/data`` float32 (n, 256) in [0, 1],
  ``/train|test/target``), or the LIBSVM files ``usps.bz2`` / ``usps.t.bz2`` (lines
  ``label 1:v ... 256:v``, labels 1-10 for digits 0-9, values in [-1, 1]). 16x16.

* scikit-learn digits: :func:`sklearn.datasets.load_digits` (1,797 UCI optdigits, 8x8, values
  0-16), shipped with scikit-learn, no file needed.

Every loader returns ``X`` of shape ``(n, size * size)``, float32 in [0, 1], and ``y`` int64 in 0-9.
Images are resized with separable linear interpolation (:func:`resize_images`).

**Frames.** An MNIST digit is about 20 px tall, centred in a 28x28 frame. The other domains are put
into the same geometry before any resizing (:func:`frame_usps`, :func:`frame_sklearn_digits`):

* USPS ``frame="pad"`` (the default of ``data.usps_frame``): the 16x16 digit (which fills its box) is padded by 6 px on each
  side to 28x28, as skada-bench's ``datasets/deep_mnist_usps.py`` does (``Pad(6)``).
  ``frame="stretch"``: the 16x16 image is resized to fill the whole frame (digits about 28 px tall,
  the form of tllib and of earlier metatl versions; it costs 13 to 32 points of accuracy).
* scikit-learn digits: the 8x8 image is upsampled to 20x20 and padded by 4 px to 28x28.

A frame other than 28x28 (``size``) resizes the 28x28 framed image.

``data_dir`` is found by :func:`resolve_data_dir`: the argument, then ``$METATL_DATA_DIR``, then
``../shared/data`` next to the repository when it exists, then ``~/.cache/metatl``. With
``download=True`` missing files are fetched from the official locations (MNIST: Yann LeCun's site
and the PyTorch mirror; USPS LIBSVM files: the LIBSVM data page) and verified by sha256.
``usps.h5`` has no official download location: copy it by hand.
"""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

import numpy as np

from .files import download, matches, resolve_data_dir

MNIST_MIRRORS = ("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
LIBSVM_USPS = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"

# accepted sha256 of each file, and of its decompressed bytes (either one may match)
CHECKSUMS = {
    "mnist/train-images-idx3-ubyte.gz": (
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "mnist/train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "mnist/t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    "usps/usps.bz2": ("3771e9dd6ba685185f89867b6e249233dd74652389f263963b3b741e994b034f",),
    "usps/usps.t.bz2": ("a9c0164e797d60142a50604917f0baa604f326e9a689698763793fa5d12ffc4e",),
    "usps/usps.h5": ("734f88c541104a956d88be2c95d03b4a463ffd74ccc2ba9c80841fb98e3fcb36",),
}


def verify(path: Path, accepted) -> bool:
    """True when the file's sha256, or that of its gunzipped content, is in ``accepted``."""
    return matches(path, accepted)


def _file(rel: str, data_dir, download_missing: bool, urls=()) -> Path:
    path = resolve_data_dir(data_dir) / rel
    if path.exists():
        return path
    if download_missing and urls:
        return download(urls, path, CHECKSUMS[rel])
    hint = (
        " or pass download=True (`--download` / data.download: true on the command line)"
        if urls
        else " (it has no official download location: copy it there by hand)"
    )
    raise FileNotFoundError(f"{path} not found. Set METATL_DATA_DIR (or data_dir=) to the folder holding {rel}{hint}.")


# --------------------------------------------------------------------------- image helpers


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation matrix with aligned pixel centres."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    M = np.zeros((n_out, n_in))
    M[np.arange(n_out), lo] += 1 - frac
    M[np.arange(n_out), hi] += frac
    if n_out < n_in:  # downsampling: average over the footprint to avoid aliasing
        M = np.zeros((n_out, n_in))
        edges = np.linspace(0, n_in, n_out + 1)
        for i in range(n_out):
            for j in range(n_in):
                M[i, j] = max(0.0, min(edges[i + 1], j + 1) - max(edges[i], j))
        M /= M.sum(1, keepdims=True)
    return M


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(n, h, w)`` images to ``(n, size, size)``: ``R_h @ img @ R_w^T`` (linear up, area down)."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)
    Rh, Rw = _interp_matrix(h, size), _interp_matrix(w, size)
    return (Rh @ images.astype(np.float64) @ Rw.T).astype(np.float32)


def pad_images(images: np.ndarray, pad: int) -> np.ndarray:
    """``(n, h, w)`` -> ``(n, h + 2 pad, w + 2 pad)``, zeros (background) around each image."""
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad)))


USPS_FRAMES = ("pad", "stretch")


def frame_usps(images: np.ndarray, size: int = 28, frame: str = "pad") -> np.ndarray:
    """16x16 USPS digits into an MNIST-like ``size`` x ``size`` frame (see the module docstring).

    ``pad``: pad 6 px each side (16 -> 28, the digit keeps 16 px of 28, close to MNIST's 20 of 28),
    then resize to ``size``; ``stretch``: resize the 16x16 image straight to ``size``.
    """
    if frame == "pad":
        return resize_images(pad_images(images, 6), size)
    if frame == "stretch":
        return resize_images(images, size)
    raise ValueError(
        f"usps frame must be one of {', '.join(USPS_FRAMES)}; got {frame!r} "
        f"(data.usps_frame: pad follows skada-bench, stretch fills the frame)."
    )


def frame_sklearn_digits(images: np.ndarray, size: int = 28) -> np.ndarray:
    """8x8 scikit-learn digits (values in [0, 1]) upsampled to 20x20, padded by 4 to 28x28, resized to ``size``."""
    return resize_images(pad_images(resize_images(images, 20), 4), size)


def _finish(images, labels, size, frame=None):
    X = (frame(images) if frame is not None else resize_images(images, size)).reshape(len(images), -1)
    return np.clip(X, 0.0, 1.0), labels.astype(np.int64)


# --------------------------------------------------------------------------- loaders


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip-compressed) IDX file: magic 2049 = labels (n,), 2051 = images (n, rows, cols)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    magic, n = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    if magic == 2049:
        return np.frombuffer(data, np.uint8, count=n, offset=8)
    if magic == 2051:
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        return np.frombuffer(data, np.uint8, count=n * rows * cols, offset=16).reshape(n, rows, cols)
    raise ValueError(f"{path} is not an IDX file (magic {magic}); expected 2049 or 2051.")


def load_mnist(split="train", *, size=28, data_dir=None, download=False):
    """MNIST ``X (n, size*size)`` in [0, 1] and ``y (n,)``; ``split`` is 'train' (60,000) or 'test' (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        arrays.append(read_idx(_file(f"mnist/{name}", data_dir, download, [m + name for m in MNIST_MIRRORS])))
    images, labels = arrays
    return _finish(images / 255.0, labels, size)


def read_libsvm_usps(path: Path):
    """``(n, 16, 16)`` images in [0, 1] and labels 0-9 from a LIBSVM USPS file (labels 1-10, values in [-1, 1])."""
    opener = bz2.open if path.suffix == ".bz2" else open
    rows, labels = [], []
    with opener(path, "rt") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            labels.append(int(float(parts[0])) - 1)
            x = np.full(256, -1.0)
            for item in parts[1:]:
                k, v = item.split(":")
                x[int(k) - 1] = float(v)
            rows.append(x)
    return (np.array(rows).reshape(-1, 16, 16) + 1.0) / 2.0, np.array(labels)


def load_usps(split="train", *, size=16, data_dir=None, fmt="h5", download=False, frame="stretch"):
    """USPS ``X (n, size*size)`` in [0, 1] and ``y (n,)`` in 0-9.

    ``frame``: ``'stretch'`` resizes the 16x16 image to ``size`` (``size=16``: the raw digits);
    ``'pad'`` pads it to 28x28 first (:func:`frame_usps`; the adaptation source's default).
    ``fmt='h5'`` reads ``usps/usps.h5`` (train 7,291, test 2,007); ``fmt='libsvm'`` reads
    ``usps/usps.bz2`` (train) or ``usps/usps.t.bz2`` (test). The two formats were normalised
    differently, so their pixel values differ slightly for the same digit.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    if fmt == "h5":
        import h5py

        with h5py.File(_file("usps/usps.h5", data_dir, False), "r") as f:
            images, labels = f[split]["data"][:].reshape(-1, 16, 16), f[split]["target"][:]
    elif fmt == "libsvm":
        name = "usps.bz2" if split == "train" else "usps.t.bz2"
        images, labels = read_libsvm_usps(_file(f"usps/{name}", data_dir, download, [LIBSVM_USPS + name]))
    else:
        raise ValueError(f"fmt must be 'h5' or 'libsvm'; got {fmt!r}.")
    return _finish(images, labels, size, lambda im: frame_usps(im, size, frame))


SKLEARN_TEST_FRACTION = 1 / 3  # load_digits has no official split: a fixed stratified one (seed 0)


def load_sklearn_digits(split="train", *, size=28, data_dir=None, download=False):
    """scikit-learn's 8x8 digits (1,797 UCI optdigits) framed like MNIST (:func:`frame_sklearn_digits`).

    ``X (n, size*size)`` in [0, 1] (pixel / 16) and ``y (n,)``. The set has no train/test split, so a
    fixed class-stratified one (seed 0) gives 'train' 1,198 and 'test' 599 rows. ``data_dir`` and
    ``download`` are accepted for a uniform signature and ignored (the data ships with scikit-learn).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    bunch = load_digits()
    images, labels = bunch.images / 16.0, bunch.target
    train, test = train_test_split(
        np.arange(len(labels)), test_size=SKLEARN_TEST_FRACTION, random_state=0, stratify=labels
    )
    rows = train if split == "train" else test
    return _finish(images[rows], labels[rows], size, lambda im: frame_sklearn_digits(im, size))


def load_digits_domains(
    source="mnist",
    target="usps",
    *,
    size=16,
    n_source=2000,
    n_target=1800,
    split="train",
    data_dir=None,
    random_state=0,
    return_target_labels=True,
):
    """``X, y, sample_domain`` (+ ``y_target_true``) for a digits adaptation task, e.g. MNIST -> USPS.

    ``n_source`` / ``n_target`` rows are drawn at random (None: all rows). Target labels are masked.
    """
    from metatl.data.domains import to_domain

    loaders = LOADERS
    rng = np.random.default_rng(random_state)
    parts = []
    for name, n in ((source, n_source), (target, n_target)):
        X, y = loaders[name](split, size=size, data_dir=data_dir)
        idx = rng.permutation(len(X))[:n] if n is not None else np.arange(len(X))
        parts += [X[idx], y[idx]]
    X, y, sd = to_domain(parts[0], parts[1], parts[2])
    return (X, y, sd, parts[3]) if return_target_labels else (X, y, sd)


# --------------------------------------------------------------------------- adaptation source

DOMAINS = ("mnist", "usps", "sklearn_digits")
LOADERS = {"mnist": load_mnist, "usps": load_usps, "sklearn_digits": load_sklearn_digits}
DIRECTIONS = tuple(f"{a}->{b}" for a in DOMAINS for b in DOMAINS if a != b)
STANDARDIZE = ("none", "domain")
TEST_PROTOCOLS = ("official", "holdout")


def _parse_direction(direction: str):
    if direction not in DIRECTIONS:
        raise ValueError(
            f"unknown data.direction {direction!r}; use one of {', '.join(DIRECTIONS)} "
            f'(quote it on the command line: --set "data.direction=usps->mnist").'
        )
    return direction.split("->")


_CACHE: dict = {}


def _domain(name: str, split: str, size: int, data_dir, download: bool = False, usps_frame: str = "pad"):
    """``(X (n, 1, size, size) float32 tensor, y (n,) int64 tensor)`` in [0, 1], cached per process
    (the benchmark trains many runs on the same arrays)."""
    import torch

    key = (name, split, size, str(resolve_data_dir(data_dir)), usps_frame if name == "usps" else None)
    if key not in _CACHE:
        extra = {"frame": usps_frame} if name == "usps" else {}
        X, y = LOADERS[name](split, size=size, data_dir=data_dir, download=download, **extra)
        _CACHE[key] = (torch.from_numpy(X).view(-1, 1, size, size), torch.from_numpy(y))
    return _CACHE[key]


def domain_statistics(x) -> tuple:
    """``(mean, std)`` of every pixel of ``x`` (a domain's training images), as Python floats."""
    return float(x.mean()), float(x.std())


def standardize(x, stats: tuple):
    """``(x - mean) / std`` with a domain's own ``(mean, std)`` (:func:`domain_statistics`)."""
    mean, std = stats
    return (x - mean) / max(std, 1e-12)


def _subsample(X, y, n, seed: int):
    import torch

    if n is None or n >= len(X):
        return X, y
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]
    return X[idx], y[idx]


def holdout_split(n: int, fraction: float, seed: int):
    """``(train_rows, test_rows)``: a seeded random ``fraction`` of ``range(n)`` held out, the rest kept
    (skada-bench scores on 20% of the target training split; ``fraction=0.2``)."""
    import torch

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.holdout_fraction must lie strictly between 0 and 1 (e.g. 0.2); got {fraction}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(fraction * n))
    return torch.sort(perm[k:]).values, torch.sort(perm[:k]).values


def labelled_subset(y, fraction: float, seed: int):
    """Indices of a class-stratified ``fraction`` of the rows (at least one per class), seeded."""
    import torch

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.target_labels_fraction must be in [0, 1]; got {fraction}.")
    if fraction == 0:
        return torch.zeros(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        rows = torch.nonzero(y == c).flatten()
        k = max(1, round(fraction * len(rows)))
        picks.append(rows[torch.randperm(len(rows), generator=g)[:k]])
    return torch.sort(torch.cat(picks)).values


def labelled_per_class(y, per_class: int, seed: int):
    """Indices of exactly ``per_class`` seeded random rows of every class (few-label fine-tuning:
    1, 5 or 10 labelled target examples per class)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        rows = torch.nonzero(y == c).flatten()
        if len(rows) < per_class:
            raise ValueError(
                f"data.target_labels_per_class={per_class}, but class {int(c)} has only {len(rows)} target "
                f"training rows (data.max_target caps them); lower it or raise data.max_target."
            )
        picks.append(rows[torch.randperm(len(rows), generator=g)[:per_class]])
    return torch.sort(torch.cat(picks)).values


def _check_options(cfg) -> None:
    for key, value, valid in (
        ("usps_frame", cfg.usps_frame, USPS_FRAMES),
        ("standardize", cfg.standardize, STANDARDIZE),
        ("test_protocol", cfg.test_protocol, TEST_PROTOCOLS),
    ):
        if value not in valid:
            raise ValueError(f"data.{key} must be one of {', '.join(valid)}; got {value!r}.")


def digits_splits(cfg) -> dict:
    """The arrays of a digits adaptation task: ``source_train``, ``source_test`` (held-out source),
    ``target_train`` (unlabelled pool; its labels are read only for revealed rows) and ``target_test``
    (scoring only), each ``(x (n, 1, s, s), y (n,))``, framed and standardized (see
    :func:`digits_adaptation`)."""
    source, target = _parse_direction(cfg.direction)
    _check_options(cfg)
    size, seed = cfg.image_size, cfg.split_seed

    def get(name, split):
        return _domain(name, split, size, cfg.data_dir, cfg.download, cfg.usps_frame)

    xs, ys = get(source, "train")
    xt, yt = get(target, "train")
    xs_test, ys_test = get(source, "test")
    if cfg.test_protocol == "holdout":
        keep, held = holdout_split(len(xt), cfg.holdout_fraction, seed + 4)
        (xt, yt), (xt_test, yt_test) = (xt[keep], yt[keep]), (xt[held], yt[held])
    else:
        xt_test, yt_test = get(target, "test")
    if cfg.standardize == "domain":  # each domain by the statistics of all its training images
        s_stats, t_stats = domain_statistics(get(source, "train")[0]), domain_statistics(get(target, "train")[0])
        xs, xs_test = standardize(xs, s_stats), standardize(xs_test, s_stats)
        xt, xt_test = standardize(xt, t_stats), standardize(xt_test, t_stats)
    return {
        "source_train": _subsample(xs, ys, cfg.max_source, seed),
        "target_train": _subsample(xt, yt, cfg.max_target, seed + 1),
        "source_test": _subsample(xs_test, ys_test, cfg.max_source, seed + 2),
        "target_test": _subsample(xt_test, yt_test, cfg.max_target, seed + 3),
    }


def digits_adaptation(cfg, subset: str):
    """The digits adaptation source (MNIST, USPS, scikit-learn digits) for a data set
    (:class:`~metatl.data.MnistUsps`).

    ``data.direction`` is ``source->target`` among ``mnist``, ``usps`` and ``sklearn_digits``
    (six directions). Every domain is 1-channel ``image_size`` x ``image_size``, framed like MNIST
    (``data.usps_frame``: ``pad`` or ``stretch``; see the module docstring).

    * ``data.standardize``: ``none`` keeps values in [0, 1]; ``domain`` standardizes each domain with
      the mean and std of its own training images (skada-bench: MNIST .1307 / .3081, padded USPS
      .0806 / .2063). Target statistics use no labels.
    * ``data.test_protocol``: ``official`` scores on the target's test split (MNIST 10,000, USPS
      2,007, scikit-learn digits 599); ``holdout`` holds out a seeded ``holdout_fraction`` (0.2) of
      the target *training* split for scoring and adapts on the rest (skada-bench's protocol).
    * ``train``: the source training split with labels, the target training rows without labels
      (:class:`~metatl.data.adaptation.DomainPairSampler`). ``target_labels_fraction`` reveals a
      class-stratified fraction of the target training labels (seed ``split_seed``);
      ``target_labels_per_class`` reveals exactly that many per class instead.
    * ``val``: the labelled source test split -- held-out *source* accuracy, so validation never
      reads target labels.
    * ``test``: the target test rows (per ``test_protocol``), labels for scoring only.

    ``max_source`` / ``max_target`` cap the rows taken from each source / target split (seeded
    random subsets, for quick runs).
    """
    from .adaptation import DomainPairSampler, LabelledSet

    source, target = _parse_direction(cfg.direction)
    parts = digits_splits(cfg)
    record = {
        "setting": cfg.direction,
        "direction": cfg.direction,
        "ways": None,
        "shots": None,
        "queries": None,
        "target_labels_fraction": cfg.target_labels_fraction,
        "target_labels_per_class": getattr(cfg, "target_labels_per_class", None),
        "image_size": cfg.image_size,
        "usps_frame": cfg.usps_frame,
        "standardize": cfg.standardize,
        "test_protocol": cfg.test_protocol,
    }
    if subset == "train":
        (xs, ys), (xt, yt) = parts["source_train"], parts["target_train"]
        per_class = getattr(cfg, "target_labels_per_class", None)
        revealed = (
            labelled_per_class(yt, per_class, cfg.split_seed)
            if per_class
            else labelled_subset(yt, cfg.target_labels_fraction, cfg.split_seed)
        )
        return DomainPairSampler(xs, ys, xt, yt, revealed, out_features=10)
    if subset == "val":
        x, y = parts["source_test"]
        return LabelledSet(x, y, {**record, "eval_set": f"{source} test (source, held out)"}, out_features=10)
    if subset == "test":
        x, y = parts["target_test"]
        where = "test" if cfg.test_protocol == "official" else f"{cfg.holdout_fraction:.0%} of train held out"
        return LabelledSet(x, y, {**record, "eval_set": f"{target} {where} ({len(x)} images)"}, out_features=10)
    raise ValueError(f"unknown subset {subset!r}; use train, val or test.")
