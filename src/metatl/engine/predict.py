"""``metatl adapt``: classify a folder of image files with a meta-learner adapted to a support
folder, and write the predictions as CSV. The image handling is :mod:`metatl.meta.images` (also
``learner.adapt_images``), whose names are re-exported here at their old import path."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from torch import nn

from ..data.image_folder import list_images
from ..meta.base import queries_interact, uses_batch_statistics
from ..meta.images import ImageInput, ImagePredictor, adapt_images


def classify_folder(
    learner: nn.Module,
    support_dir: str | os.PathLike,
    query_dir: str | os.PathLike,
    steps: int | None = None,
    invert: bool | None = None,
    transductive: bool = False,
) -> dict:
    """Adapt ``learner`` to ``support_dir`` (one sub-folder per class) and classify every image in
    ``query_dir`` (searched recursively; an image in a sub-folder named like a support class is
    taken as labelled, and an accuracy is reported over those): ``metatl adapt``, through
    :func:`adapt_images`.

    Returns ``{"classes": [...], "rows": [{"file", "predicted", "confidence", "true"}], "accuracy"}``
    with ``confidence`` the predicted class's probability (``predict_proba``).
    """
    support_dir, query_dir = Path(support_dir), Path(query_dir)
    predictor = adapt_images(learner, support_dir, steps=steps, invert=invert, transductive=transductive)
    paths = list_images(query_dir, recursive=True)
    if not paths:
        raise ValueError(f"query folder {query_dir} holds no images; put the images to classify there.")
    probs, kept = predictor.score_files(paths)
    if not kept:
        raise ValueError(f"none of the {len(paths)} file(s) in {query_dir} is a readable image.")
    classes = predictor.classes
    confidence, predicted = probs.max(dim=1)
    rows: list[dict] = []
    for path, p, conf in zip(kept, predicted.tolist(), confidence.tolist()):
        parent = path.parent.name if path.parent != query_dir else None
        rows.append(
            {
                "file": str(path.relative_to(query_dir)),
                "predicted": classes[p],
                "confidence": conf,
                "true": parent if parent in classes else None,
            }
        )
    labelled = [r for r in rows if r["true"] is not None]
    accuracy = sum(r["predicted"] == r["true"] for r in labelled) / len(labelled) if labelled else None
    i = predictor.input
    return {
        "classes": classes,
        "rows": rows,
        "accuracy": accuracy,
        "labelled": len(labelled),
        "input": {"in_channels": i.in_channels, "image_size": i.image_size, "invert": i.invert},
    }


def write_predictions(result: dict, path: str | os.PathLike) -> Path:
    """A CSV table: file, predicted, confidence (and true, when the query images were labelled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled = result["labelled"] > 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "predicted", "confidence"] + (["true"] if labelled else []))
        for r in result["rows"]:
            w.writerow([r["file"], r["predicted"], f"{r['confidence']:.4f}"] + ([r["true"] or ""] if labelled else []))
    return path


__all__ = [
    "ImageInput",
    "ImagePredictor",
    "adapt_images",
    "classify_folder",
    "queries_interact",
    "uses_batch_statistics",
    "write_predictions",
]
