"""Your own images: a folder with one sub-folder per class (the torchvision ``ImageFolder`` layout)::

    root/
      cat/   001.jpg 002.png ...
      dog/   a.jpeg b.bmp ...

Any format PIL reads. Every image is converted to ``in_channels`` (1: grayscale, 3: RGB) and
resized to ``image_size`` x ``image_size`` (Lanczos, the aspect ratio is not kept), with pixel
values in [0, 1]; mixed sizes, modes and formats are fine. Transparent pixels are read as white
(paper), so a drawing kept only in its alpha mask keeps its strokes. ``invert=True`` maps ``v -> 1 - v``
(Omniglot models expect ink = 1 on a 0 background, i.e. inverted scans of dark ink on paper).

Files whose names start with ``.`` are ignored; other files PIL cannot read are skipped with one
warning that names them. A class folder with no readable image, or a root without class folders,
is an error that says what to fix.

Meta-training splits the *classes* into train / val / test: ``data.classes`` lists them per subset,
else a seeded shuffle (``data.split_seed``) is cut by ``data.split_fractions`` (default 0.6/0.2/0.2).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .episode import ClassPool

SUBSETS = ("train", "val", "test")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_images(folder, recursive: bool = False) -> list[Path]:
    """The visible files of ``folder`` (sorted; with ``recursive``, of its sub-folders too)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder; pass a folder of images.")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
        if not recursive:
            break
    return sorted(found)


def _read(path: Path, mode: str, image_size: int) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                # transparent pixels are paper: composite on white (else a drawing whose strokes
                # are only in the alpha mask would read as one black square)
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert(mode).resize((image_size, image_size), Image.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _warn_skipped(skipped: Sequence[Path]) -> None:
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:10]) + (
            f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        )
        warnings.warn(
            f"skipped {len(skipped)} file(s) that are not readable images: {shown}. Remove them or "
            f"convert them to PNG/JPEG.",
            stacklevel=3,
        )


def _check_channels(in_channels: int) -> str:
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}.")
    return "L" if in_channels == 1 else "RGB"


def read_images(
    paths: Sequence, in_channels: int = 1, image_size: int = 28, warn: bool = True
) -> tuple[Tensor, list[Path], list[Path]]:
    """Decode ``paths`` into a uint8 tensor ``(n, in_channels, image_size, image_size)``.

    Returns ``(images, kept, skipped)``: unreadable files are left out (and named in a warning).
    """
    mode = _check_channels(in_channels)
    arrays, kept, skipped = [], [], []
    for p in map(Path, paths):
        a = _read(p, mode, image_size)
        (skipped if a is None else kept).append(p)
        if a is not None:
            arrays.append(a)
    if warn:
        _warn_skipped(skipped)
    x = (
        torch.from_numpy(np.stack(arrays))
        if arrays
        else torch.empty(0, in_channels, image_size, image_size, dtype=torch.uint8)
    )
    return x, kept, skipped


def to_float(images: Tensor, invert: bool = False) -> Tensor:
    """uint8 images -> float32 in [0, 1] (``1 - v`` with ``invert``)."""
    x = images.float().div_(255.0)
    return 1.0 - x if invert else x


def load_images(paths: Sequence, in_channels: int = 1, image_size: int = 28, invert: bool = False) -> Tensor:
    """Float images ``(n, in_channels, image_size, image_size)`` in [0, 1] from image files
    (unreadable ones skipped with a warning; none readable is an error)."""
    x, kept, skipped = read_images(paths, in_channels, image_size)
    if not kept:
        raise ValueError(f"none of the {len(skipped)} file(s) given is a readable image; pass PNG/JPEG/... files.")
    return to_float(x, invert)


@dataclass
class ImageFolder:
    """A decoded class folder: ``images`` uint8 ``(n, c, s, s)``, ``labels`` ``(n,)`` int64 in
    ``0..len(classes)-1`` (classes in sorted name order), ``files`` the source of each image."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    files: list[Path]

    def counts(self) -> dict[str, int]:
        n = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, n))

    def tensors(self, invert: bool = False) -> tuple[Tensor, Tensor]:
        """``(x, y)``: float images in [0, 1] and labels, e.g. a support set for ``learner.adapt``."""
        return to_float(self.images, invert), self.labels.clone()


def read_image_folder(root, in_channels: int = 1, image_size: int = 28) -> ImageFolder:
    """Decode every class sub-folder of ``root`` (see the module docstring for the checks)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; pass a folder with one sub-folder "
            f"of images per class (root/<class>/<image>)."
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not class_dirs:
        loose = [p.name for p in root.iterdir() if p.is_file() and _visible(p)]
        hint = (
            f" It holds {len(loose)} loose file(s) (e.g. {loose[0]}): move each image into a sub-folder "
            f"named after its class."
            if loose
            else ""
        )
        raise ValueError(f"{root} has no class sub-folders; expected root/<class>/<image>.{hint}")
    images, labels, files, skipped = [], [], [], []
    for label, d in enumerate(class_dirs):
        paths = list_images(d)
        if not paths:
            raise ValueError(f"class folder {d} is empty; add images of class {d.name!r} or delete the folder.")
        x, kept, bad = read_images(paths, in_channels, image_size, warn=False)
        skipped += bad
        if not kept:
            _warn_skipped(skipped)
            raise ValueError(
                f"class folder {d} has no readable image ({len(bad)} file(s) skipped, e.g. "
                f"{bad[0].name}); add PNG/JPEG images of class {d.name!r} or delete the folder."
            )
        images.append(x)
        labels.append(torch.full((len(kept),), label, dtype=torch.long))
        files += kept
    _warn_skipped(skipped)
    return ImageFolder(torch.cat(images), torch.cat(labels), [d.name for d in class_dirs], files)


def load_support_folder(
    folder, learner=None, in_channels: int | None = None, image_size: int | None = None, invert: bool | None = None
):
    """A support set from a folder of class sub-folders: ``(support_x, support_y, class_names)``.

    With ``learner`` (from :func:`metatl.load`) the images are converted to the input it was
    trained on (channels, size, and inverted for Omniglot models unless ``invert`` says otherwise)::

        learner = metatl.load("runs/x/best.pt")
        sx, sy, names = load_support_folder("my_support", learner)
        predictor = learner.adapt(sx, sy)
    """
    c, s, inv = input_format(learner, in_channels, image_size, invert)
    folder = read_image_folder(folder, c, s)
    x, y = folder.tensors(inv)
    return x, y, folder.classes


def input_format(learner=None, in_channels=None, image_size=None, invert=None) -> tuple[int, int, bool]:
    """``(in_channels, image_size, invert)``: explicit values, else the learner's, else (1, 28, False)."""
    spec = dict(getattr(learner, "input_spec", {}) or {})
    cfg = getattr(learner, "config", None)
    c = in_channels or spec.get("in_channels", 1)
    s = image_size or spec.get("image_size", 28)
    if invert is None:
        invert = cfg is not None and getattr(cfg.data, "inverts_images", False)
    return int(c), int(s), bool(invert)


class ImageFolderClasses(ClassPool):
    """The classes ``class_ids`` of an :class:`ImageFolder`; ``get`` returns float images in [0, 1]."""

    def __init__(self, folder: ImageFolder, class_ids: Sequence[int]):
        self.images = folder.images
        self.names = [folder.classes[c] for c in class_ids]
        self._members = [torch.nonzero(folder.labels == c).flatten() for c in class_ids]
        self.counts = [len(m) for m in self._members]

    def get(self, c: int, idx: Tensor) -> Tensor:
        return to_float(self.images[self._members[c][idx]])

    def get_many(self, requests) -> Tensor:
        return to_float(self.images[torch.cat([self._members[c][idx] for c, idx in requests])])


def split_classes(
    names: Sequence[str],
    classes: dict[str, list[str]] | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Class names per subset: the given lists (checked against ``names``), else a seeded shuffle
    cut by ``fractions`` (train, val, test)."""
    names = sorted(names)
    if classes:
        unknown_subsets = sorted(set(classes) - set(SUBSETS))
        if unknown_subsets:
            raise ValueError(f"data.classes has unknown subset(s) {unknown_subsets}; use train, val, test.")
        out = {s: list(classes.get(s) or []) for s in SUBSETS}
        missing = sorted({c for cs in out.values() for c in cs} - set(names))
        if missing:
            raise ValueError(
                f"data.classes names {len(missing)} class(es) that are not sub-folders of the root "
                f"(e.g. {missing[0]!r}); fix the names or add the folders."
            )
        return out
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"data.split_fractions must be three non-negative numbers (train, val, test) "
            f"summing to 1, got {list(fractions)}."
        )
    order = [names[i] for i in np.random.RandomState(seed).permutation(len(names))]
    n_train = int(round(fractions[0] * len(names)))
    n_val = int(round(fractions[1] * len(names)))
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


_CACHE: dict[tuple, ImageFolder] = {}


def _listing_key(root: Path, in_channels: int, image_size: int) -> tuple:
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in list_images(root, recursive=True))
    return (str(root.resolve()), in_channels, image_size, stats)


def cached_image_folder(root, in_channels: int, image_size: int) -> ImageFolder:
    """:func:`read_image_folder`, decoded once per process while the files stay unchanged."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return read_image_folder(root, in_channels, image_size)  # raises the helpful error
    key = _listing_key(root, in_channels, image_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = read_image_folder(root, in_channels, image_size)
    return _CACHE[key]


def image_folder_classes(cfg, subset: str, shots: int, queries: int, ways: int) -> ImageFolderClasses:
    """The class pool of ``subset`` for a data set (:class:`~metatl.data.ImageFolderData`) (``data.root`` etc.),
    checked against the episode shape."""
    if not cfg.root:
        raise ValueError(
            "dataset image_folder needs data.root, the folder of class sub-folders "
            "(e.g. --set data.root=path/to/images)."
        )
    folder = cached_image_folder(cfg.root, cfg.in_channels, cfg.image_size)
    subsets = split_classes(folder.classes, cfg.classes, cfg.split_fractions, cfg.split_seed)
    names = subsets["train"] + subsets["val"] if subset == "trainval" else subsets[subset]
    if len(names) < ways:
        raise ValueError(
            f"{ways}-way {subset} episodes need {ways} classes but the {subset} split of "
            f"{cfg.root} has {len(names)} (of {len(folder.classes)} classes); lower data.ways / "
            f"data.train_ways, add classes, or change data.split_fractions / data.classes."
        )
    counts = folder.counts()
    need = shots + queries
    small = [f"{n} ({counts[n]})" for n in names if counts[n] < need]
    if small:
        raise ValueError(
            f"{subset} episodes take {shots} shot(s) + {queries} queries = {need} images per class, "
            f"but class(es) {', '.join(small[:10])} have fewer (images in brackets); add images, "
            f"lower data.shots / data.queries (or their train_ variants), or move those classes out."
        )
    index = {n: i for i, n in enumerate(folder.classes)}
    return ImageFolderClasses(folder, [index[n] for n in names])
