"""The Python snippets of the docs run as written (in a folder holding the files they name)."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from metatl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc):
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def run_snippets(doc, folder, monkeypatch, needs=()):
    """Run every Python block of ``doc`` whose text names all of ``needs``, with ``folder`` as the
    working directory; returns how many ran."""
    monkeypatch.chdir(folder)
    blocks = [b for b in python_blocks(doc) if all(n in b for n in needs)]
    for code in blocks:
        exec(compile(code, f"{doc} snippet", "exec"), {"__name__": "__snippet__"})
    return len(blocks)


def blob(path, center, rng, size=24):
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / 8.0) + 0.1 * rng.rand(size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).convert("RGB").save(path)


def test_metric_md_image_snippets(tmp_path, monkeypatch, capsys):
    rng = np.random.RandomState(0)
    for c in range(6):
        for i in range(4):
            blob(tmp_path / "train" / f"c{c}" / f"{i}.png", rng.uniform(4, 20, 2), rng)
    config = {
        "algorithm": {"name": "protonet"},
        "model": {"name": "conv4_pool", "filters": 8},
        "data": {
            "name": "image_folder",
            "root": str(tmp_path / "train"),
            "image_size": 16,
            "ways": 2,
            "shots": 1,
            "queries": 1,
            "split_fractions": [0.67, 0.0, 0.33],
        },
        "train": {"iterations": 2, "meta_batch": 1, "val_every": 0, "ckpt_every": 0},
        "eval": {"episodes": 2},
    }
    (tmp_path / "flowers.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "flowers.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    work = tmp_path / "work"
    (work / "runs" / "my_flowers").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "last.pt", work / "runs" / "my_flowers" / "best.pt")
    for name, center in (("daisy", (6, 6)), ("rose", (17, 17))):
        for i in (1, 2):
            blob(work / "my_support" / name / f"{i}.jpg", center, rng)
    blob(work / "a.jpg", (6, 6), rng)
    blob(work / "b.png", (17, 17), rng)
    capsys.readouterr()
    assert run_snippets("docs/metric.md", work, monkeypatch, needs=["adapt_images"]) >= 1
    printed = capsys.readouterr().out
    assert "['daisy', 'rose']" in printed


def test_readme_python_snippets(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "maml_sinusoid_demo.yaml", tmp_path / "configs")
    assert (
        main(
            [
                "train",
                str(ROOT / "configs" / "maml_sinusoid_demo.yaml"),
                "--out",
                str(tmp_path / "runs" / "demo"),
                "--no-progress",
                "--set",
                "train.iterations=2",
                "train.val_every=0",
                "train.ckpt_every=0",
                "eval.episodes=2",
                "eval.extra_steps=[]",
            ]
        )
        == 0
    )
    if not python_blocks("README.md"):
        pytest.skip("README has no Python snippet")
    assert run_snippets("README.md", tmp_path, monkeypatch) == len(python_blocks("README.md"))
