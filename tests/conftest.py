import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_dir():
    env = os.environ.get("METATL_DATA_DIR")
    for d in (Path(env) if env else None, SHARED):
        if d is not None and (d / "omniglot" / "images_background.zip").exists():
            return d
    return None


@pytest.fixture
def omniglot_dir():
    d = shared_data_dir()
    if d is None:
        pytest.skip("real Omniglot data not found (set METATL_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_cache(_session_cache, monkeypatch):
    """Keep caches written by tests out of the user's home (one cache for the whole session)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_session_cache))
