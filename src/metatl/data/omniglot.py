"""Omniglot (Lake et al. 2015) read from the official ``images_background.zip`` and
``images_evaluation.zip``.

Every image is resized to ``image_size`` x ``image_size`` (Lanczos, as the MAML code does) with ink
= 1.0 and background = 0.0. Each character in each of four rotations (0/90/180/270 degrees) is its
own class. The decoded images are cached as one tensor file in the user cache folder, keyed by the
zips' checksums, so only the first run decodes the 32,460 PNGs.

Splits (character lists shipped in ``metatl/data/splits``):

- ``vinyals``: 1028 / 172 / 423 characters for train / val / test (Vinyals et al. 2016; the
  same character lists as the Prototypical Networks code).
- ``maml``: the MAML paper's 1200 / 423 split: the 1623 characters in sorted order, shuffled with
  seed 1; the first 1200 are for meta-training (of which the last 100 serve as validation, as in
  the MAML code) and the remaining 423 for testing.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .episode import ClassPool
from .files import download, file_digests, resolve_data_dir, user_cache_dir

PARTS = ("images_background", "images_evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{part}.zip"
# md5 of the official zips (as published) and sha256 of the pixel-exact rebuilds in our shared data.
ACCEPTED = {
    "images_background": (
        "68d2efa1b9178cc56df9314c21c6e718",
        "37aafe0dae96bcd7226e14b3656693eaeb70be97364d677dc23a8192460cad13",
    ),
    "images_evaluation": (
        "6b91aef0f799c5bb55b94e3f2daec811",
        "5590a0638eb1b1f75d263d88b6f4a5b098f6d70ef66918b1438d501cbbcbb05b",
    ),
}
N_CHARACTERS, N_DRAWERS = 1623, 20
SPLITS_DIR = Path(__file__).parent / "splits"


def _zip_dir(data_dir: Path) -> Path:
    """Accept either the data folder (with an ``omniglot/`` sub-folder) or the folder of the zips."""
    sub = data_dir / "omniglot"
    return sub if sub.is_dir() or not (data_dir / f"{PARTS[0]}.zip").exists() else data_dir


def _read_zip(path: Path, image_size: int):
    from PIL import Image

    names: dict[str, list[np.ndarray]] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for entry in sorted(z.namelist()):
                parts = entry.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                with Image.open(io.BytesIO(z.read(entry))) as im:
                    im = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
                    ink = 255 - np.asarray(im, dtype=np.uint8)
                names.setdefault(f"{parts[1]}/{parts[2]}", []).append(ink)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"{path} is not a readable zip ({err}); delete it and download it again "
            f"(--download), or copy an intact official file there."
        ) from err
    return names


def load_images(data_dir: os.PathLike | None = None, image_size: int = 28, download_missing: bool = False):
    """All 1623 characters as a uint8 tensor ``(1623, 20, image_size, image_size)`` (ink high)
    and the list of ``"Alphabet/characterNN"`` names in the same order."""
    root = _zip_dir(resolve_data_dir(data_dir))
    zips = {part: root / f"{part}.zip" for part in PARTS}
    keys = []
    for part, path in zips.items():
        if not path.exists():
            if not download_missing:
                raise FileNotFoundError(
                    f"Omniglot file {path} is missing. Pass --download (download=True) to fetch it "
                    f"from {URL.format(part=part)}, or point --data-dir / METATL_DATA_DIR at a folder "
                    f"that holds omniglot/{part}.zip."
                )
            download(URL.format(part=part), path, ACCEPTED[part])
        digests = file_digests(path)
        if not set(ACCEPTED[part]) & set(digests.values()):
            raise ValueError(
                f"{path} has sha256 {digests['sha256']}, not an accepted checksum for "
                f"{part}.zip: the file is corrupt or a different version. Delete it and "
                f"download it again (--download)."
            )
        keys.append(digests["sha256"][:8])
    cache = user_cache_dir() / f"omniglot_{image_size}px_{'_'.join(keys)}.pt"
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            return blob["images"], blob["names"]
        except Exception as err:  # a damaged cache (e.g. a full disk) is rebuilt from the zips
            warnings.warn(
                f"the Omniglot cache {cache} is unreadable ({type(err).__name__}); "
                f"decoding the zips again and replacing it.",
                stacklevel=2,
            )
    names: dict[str, list[np.ndarray]] = {}
    for path in zips.values():
        names.update(_read_zip(path, image_size))
    order = sorted(names)
    if len(order) != N_CHARACTERS or any(len(names[n]) != N_DRAWERS for n in order):
        raise ValueError(
            f"expected {N_CHARACTERS} characters with {N_DRAWERS} images each in "
            f"{root}, found {len(order)}; the zips are incomplete: download them again."
        )
    images = torch.from_numpy(np.stack([np.stack(names[n]) for n in order]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    torch.save({"images": images, "names": order}, tmp)
    os.replace(tmp, cache)
    return images, order


def split_characters(names: list[str], split: str, subset: str) -> list[str]:
    """The characters of ``subset`` ("train", "val", "test", or "trainval") under ``split``."""
    if subset == "trainval":
        return split_characters(names, split, "train") + split_characters(names, split, "val")
    if subset not in ("train", "val", "test"):
        raise ValueError(f"unknown Omniglot subset {subset!r}; use train, val, test or trainval.")
    if split == "vinyals":
        return (SPLITS_DIR / f"omniglot_vinyals_{subset}.txt").read_text().split()
    if split == "maml":
        order = np.random.RandomState(1).permutation(len(names))
        chosen = {"train": order[:1100], "val": order[1100:1200], "test": order[1200:]}[subset]
        return [names[i] for i in sorted(chosen)]
    raise ValueError(f"unknown Omniglot split {split!r}; use 'vinyals' (1028/172/423) or 'maml' (1200/423).")


class OmniglotClasses(ClassPool):
    """The classes of one subset: each character in each rotation (``rotations`` of 0/90/180/270).

    ``get`` returns float32 images ``(n, 1, H, W)`` in [0, 1], ink = 1.
    """

    def __init__(self, images: torch.Tensor, names: list[str], characters: list[str], rotations=(0, 1, 2, 3)):
        index = {n: i for i, n in enumerate(names)}
        missing = [c for c in characters if c not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} split characters are not in the data (e.g. {missing[0]}); "
                f"the Omniglot files are incomplete."
            )
        self.images = images
        self.rotations = tuple(rotations)
        self.chars = [index[c] for c in characters]
        self.counts = [images.shape[1]] * (len(self.chars) * len(self.rotations))

    def get(self, c: int, idx: torch.Tensor) -> torch.Tensor:
        char, rot = divmod(c, len(self.rotations))
        x = self.images[self.chars[char], idx].float().div_(255.0).unsqueeze(1)
        return torch.rot90(x, self.rotations[rot], dims=(2, 3))

    def get_many(self, requests) -> torch.Tensor:
        """The examples of each ``(class, indices)`` request, one gather for all of them, then one
        rotation per rotation angle."""
        r, per_char = len(self.rotations), self.images.shape[1]
        sizes = torch.tensor([len(idx) for _, idx in requests])
        first = torch.tensor([self.chars[c // r] * per_char for c, _ in requests]).repeat_interleave(sizes)
        x = self.images.flatten(0, 1).index_select(0, first + torch.cat([idx for _, idx in requests]))
        turns = [self.rotations[c % r] for c, _ in requests]
        for k in set(turns) - {0}:
            rows = torch.tensor([t == k for t in turns]).repeat_interleave(sizes).nonzero().squeeze(1)
            x.index_copy_(0, rows, torch.rot90(x.index_select(0, rows), k, dims=(1, 2)))
        return x.float().div_(255.0).unsqueeze(1)


def omniglot_classes(
    subset: str,
    split: str = "vinyals",
    data_dir=None,
    image_size: int = 28,
    rotations=(0, 1, 2, 3),
    download_missing: bool = False,
) -> OmniglotClasses:
    images, names = load_images(data_dir, image_size, download_missing)
    return OmniglotClasses(images, names, split_characters(names, split, subset), rotations)
