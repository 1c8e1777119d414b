"""Where data lives, and fetching it safely.

The data folder is chosen in this order: the ``data_dir`` argument (``--data-dir``), the
environment variable ``METATL_DATA_DIR``, a ``shared/data`` folder beside the checkout (our
development machines), then the user cache folder ``~/.cache/metatl`` (``$XDG_CACHE_HOME``).
Downloads show a progress bar, resume a partial file, check the sha256 against a list of accepted
checksums, and appear under their final name only once verified.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message says how to get it by hand."""


ENV_VAR = "METATL_DATA_DIR"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metatl"


def _beside_checkout() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / ".git").exists() and candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: os.PathLike | None = None) -> Path:
    """The data folder: argument, then ``$METATL_DATA_DIR``, then ``shared/data`` beside the
    checkout, then the user cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return _beside_checkout() or user_cache_dir()


def file_digests(path: os.PathLike, chunk: int = 1 << 20) -> dict:
    """``{"sha256": hex, "md5": hex}`` of a file, in one pass."""
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            for h in hashes.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashes.items()}


def matches(path: os.PathLike, accepted: Iterable[str]) -> bool:
    """Whether the file's sha256 or md5 (or, for a ``.gz`` file, the sha256 of its decompressed
    bytes) is one of ``accepted``."""
    accepted = set(accepted)
    if accepted & set(file_digests(path).values()):
        return True
    if str(path).endswith(".gz"):
        import gzip

        h = hashlib.sha256()
        try:
            with gzip.open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return False
        return h.hexdigest() in accepted
    return False


def verify(path: os.PathLike, accepted: Iterable[str]) -> None:
    """Raise a clear error unless :func:`matches` accepts the file (sha256, or md5 for official
    files published only with an md5)."""
    accepted = set(accepted)
    if not matches(path, accepted):
        digests = file_digests(path)
        raise ValueError(
            f"{path} has sha256 {digests['sha256']}, which is not an accepted checksum for this file "
            f"(accepted: {', '.join(sorted(accepted))}). The file is corrupt or a different "
            f"version: delete it and download it again (pass download=True / --download)."
        )


def download(urls, dest: os.PathLike, accepted: Iterable[str], *, progress: bool = True) -> Path:
    """Download ``dest`` from the first of ``urls`` (one URL or a list of mirrors) that works, with
    resume and checksum verification; the final name appears only once the file is verified."""
    if isinstance(urls, str):
        urls = [urls]
    errors = []
    for url in urls:
        try:
            return _download_one(url, dest, accepted, progress=progress)
        except (RuntimeError, ValueError) as err:
            errors.append(str(err))
    if len(errors) == 1:
        raise (ValueError if "checksum" in errors[0] else DownloadError)(errors[0])
    raise DownloadError(f"could not download {Path(dest).name} from any mirror:\n  " + "\n  ".join(errors))


def _download_one(url: str, dest: os.PathLike, accepted: Iterable[str], *, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # the partial file is already complete
            response = None
        else:
            raise DownloadError(
                f"downloading {url} failed: HTTP {err.code}. Download it by hand "
                f"and put it at {dest}, or set {ENV_VAR} to a folder that has it."
            ) from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"cannot download {url} ({err}). Without network: copy the file to {dest} by hand, "
            f"or point --data-dir / {ENV_VAR} at a folder that already has it."
        ) from err
    if response is not None:
        with response:
            if done and getattr(response, "status", None) != 206:  # server ignored the Range header: start over
                done = 0
            length = response.headers.get("Content-Length")
            total = int(length) + done if length else None
            with (
                open(part, "ab" if done else "wb") as f,
                tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
            ):
                for block in iter(lambda: response.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
    try:
        verify(part, accepted)
    except ValueError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest
