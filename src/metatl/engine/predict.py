"""Few-shot classification of a user's own images with any meta-learner (``metatl adapt``).

``learner.adapt(support_x, support_y)`` does the work: MAML / Reptile take inner gradient steps,
the metric-based learners compute prototypes, attention memories or class maps. Here we only read
the folders, adapt, and classify each query image.

BatchNorm: with ``bn_mode: batch`` a model normalises each batch with its own statistics, so a
prediction would depend on which other query images share the batch. By default
(``transductive=False``) each query image is therefore classified in a batch with the support
set only, as the evaluator's ``eval.transductive: false`` does; with running statistics (or no
BatchNorm) the batch does not matter and the queries go through in one batch.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..data.image_folder import input_format, list_images, load_support_folder, read_images, to_float


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers without running statistics (``bn_mode: batch``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
               for m in model.modules())


def queries_interact(learner: nn.Module) -> bool:
    """Whether a query's prediction can depend on the other queries of its batch: BatchNorm with
    batch statistics, or a learner that says so with ``couples_queries = True``. Only then does a
    non-transductive prediction need one forward pass per query."""
    return uses_batch_statistics(learner) or bool(getattr(learner, "couples_queries", False))


def _check_learner(learner, steps: Optional[int]) -> Optional[int]:
    """``metatl adapt`` needs an episodic image classifier: say so for anything else. Returns the
    inner steps to use (``None`` for a learner that takes none, with a warning if some were asked)."""
    from ..meta.base import GradientMetaLearner, MetaLearner

    if not isinstance(learner, MetaLearner):
        raise ValueError(f"this {type(learner).__name__} checkpoint is not a meta-learner (a transfer learner "
                         f"is trained for a fixed set of classes); it cannot adapt to new classes from a "
                         f"support folder. `metatl adapt` takes meta-learning checkpoints (protonet, matching, "
                         f"relation, maml, reptile, mann, snail, ...); score a transfer checkpoint with "
                         f"`metatl eval`.")
    if learner.task_type != "classification":
        raise ValueError(f"this {type(learner).__name__} checkpoint is a {learner.task_type} model (e.g. "
                         f"sinusoid); `metatl adapt` classifies images: use a checkpoint trained on image "
                         f"classification episodes (omniglot or image_folder).")
    if steps is not None and steps < 0:
        raise ValueError(f"--steps must be 0 or more (inner-loop steps on the support set), got {steps}.")
    if steps is not None and not isinstance(learner, GradientMetaLearner):
        warnings.warn(f"--steps {steps} is ignored: {type(learner).__name__} adapts without gradient steps.",
                      stacklevel=3)
        return None
    return steps


def _check_ways(learner, support_x, n_classes: int) -> None:
    if not getattr(type(learner), "uses_head", True):
        return  # metric-based: any number of classes
    width = getattr(learner, "ways", None)  # sequence learners: the one-hot label size
    if not isinstance(width, int):
        with torch.no_grad():
            width = learner.model(support_x[:1]).shape[-1]
    if width != n_classes:
        raise ValueError(f"this {type(learner).__name__} checkpoint has a {width}-way head but the support "
                         f"folder has {n_classes} classes; give it exactly {width} class sub-folders, or use "
                         f"a checkpoint trained for {n_classes}-way tasks (or a metric-based one: protonet, "
                         f"matching, relation take any number of classes).")


def classify_folder(learner, support_dir, query_dir, steps: Optional[int] = None,
                    invert: Optional[bool] = None, transductive: bool = False) -> Dict:
    """Adapt ``learner`` to ``support_dir`` (one sub-folder per class) and classify every image in
    ``query_dir`` (searched recursively; an image in a sub-folder named like a support class is
    taken as labelled, and an accuracy is reported over those).

    Returns ``{"classes": [...], "rows": [{"file", "predicted", "confidence", "true"}], "accuracy"}``
    with ``confidence`` the predicted class's probability (``predict_proba``).
    """
    steps = _check_learner(learner, steps)
    c, s, inv = input_format(learner, invert=invert)
    support_x, support_y, classes = load_support_folder(support_dir, in_channels=c, image_size=s, invert=inv)
    _check_ways(learner, support_x, len(classes))
    query_dir = Path(query_dir)
    paths = list_images(query_dir, recursive=True)
    if not paths:
        raise ValueError(f"query folder {query_dir} holds no images; put the images to classify there.")
    images, kept, _ = read_images(paths, c, s)
    if not kept:
        raise ValueError(f"none of the {len(paths)} file(s) in {query_dir} is a readable image.")
    query_x = to_float(images, inv)
    learner.eval()
    predictor = learner.adapt(support_x, support_y, **({} if steps is None else {"steps": steps}))
    with torch.no_grad():
        if transductive or not queries_interact(learner):
            probs = torch.cat([predictor.predict_proba(chunk) for chunk in query_x.split(256)])
        else:
            probs = torch.cat([predictor(torch.cat([support_x, q[None]]))[-1:].softmax(-1) for q in query_x])
    confidence, predicted = probs.max(dim=1)
    rows: List[dict] = []
    for path, p, conf in zip(kept, predicted.tolist(), confidence.tolist()):
        parent = path.parent.name if path.parent != query_dir else None
        rows.append({"file": str(path.relative_to(query_dir)), "predicted": classes[p], "confidence": conf,
                     "true": parent if parent in classes else None})
    labelled = [r for r in rows if r["true"] is not None]
    accuracy = sum(r["predicted"] == r["true"] for r in labelled) / len(labelled) if labelled else None
    return {"classes": classes, "rows": rows, "accuracy": accuracy, "labelled": len(labelled),
            "input": {"in_channels": c, "image_size": s, "invert": inv}}


def write_predictions(result: Dict, path) -> Path:
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
