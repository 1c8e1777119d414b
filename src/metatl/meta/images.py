"""Few-shot classification of a user's own image files with any meta-learner: ``metatl adapt``
(:mod:`metatl.engine.predict`) and ``learner.adapt_images`` share this one code path.

``learner.adapt(support_x, support_y)`` does the work: MAML / Reptile take inner gradient steps,
the metric-based learners compute prototypes, attention memories or class maps. Here we turn
files into the tensors the checkpoint was trained on (:class:`ImageInput`: channels, size, and the
Omniglot inversion), adapt, and classify (:class:`ImagePredictor`)::

    learner = metatl.load("runs/x/best.pt")
    predictor = learner.adapt_images("my_support")            # one sub-folder per class
    predictor.predict_images(["a.png", "b.png"])                # class names
    predictor.predict_proba_images(["a.png", "b.png"])          # (2, n_classes), columns in predictor.classes

BatchNorm: with ``bn_mode: batch`` a model normalises each batch with its own statistics, so a
prediction would depend on which other query images share the batch. By default
(``transductive=False``) each query image is therefore classified in a batch with the support
set only, as the evaluator's ``eval.transductive: false`` does; with running statistics (or no
BatchNorm) the batch does not matter and the queries go through in one batch.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.image_folder import input_format, read_image_folder, read_images, to_float
from .base import GradientMetaLearner, MetaLearner, Predictor, queries_interact

Files = str | os.PathLike | Sequence[str | os.PathLike]  # one image file, or several
Labels = Sequence[str | int] | Tensor | np.ndarray  # class names or integer ids, one per support file


@dataclass(frozen=True)
class ImageInput:
    """How image files become the input a checkpoint was trained on: ``in_channels`` (1 grayscale,
    3 RGB), ``image_size`` (square, Lanczos) and ``invert`` (``v -> 1 - v``: Omniglot models expect
    ink = 1 on a 0 background). :meth:`of` derives it from a loaded learner."""

    in_channels: int = 1
    image_size: int = 28
    invert: bool = False

    @classmethod
    def of(cls, learner: nn.Module, invert: bool | None = None) -> ImageInput:
        """The input of ``learner``: its ``input_spec`` (channels, size) and ``config`` (inverted for
        a model trained on Omniglot), as :func:`metatl.load` sets them; ``invert`` overrides."""
        return cls(*input_format(learner, invert=invert))

    def read(self, paths: Sequence[str | os.PathLike]) -> tuple[Tensor, list[Path], list[Path]]:
        """``(x, kept, skipped)``: float images ``(len(kept), c, s, s)`` of the readable files;
        unreadable ones are named in one warning."""
        images, kept, skipped = read_images(paths, self.in_channels, self.image_size)
        return to_float(images, self.invert), kept, skipped

    def load(self, paths: Files) -> Tensor:
        """Float images ``(len(paths), c, s, s)``, one per path; an unreadable file is an error (so
        the rows stay aligned with ``paths``)."""
        paths = _path_list(paths, "paths")
        images, kept, skipped = read_images(paths, self.in_channels, self.image_size, warn=False)
        if skipped:
            shown = ", ".join(str(p) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            raise ValueError(
                f"{len(skipped)} of the {len(paths)} file(s) are not readable images: {shown}; pass PNG/JPEG/... files."
            )
        return to_float(images, self.invert)

    def load_folder(self, folder: str | os.PathLike) -> tuple[Tensor, Tensor, list[str]]:
        """``(x, y, class_names)`` from a folder with one sub-folder of images per class."""
        found = read_image_folder(folder, self.in_channels, self.image_size)
        x, y = found.tensors(self.invert)
        return x, y, found.classes


def _path_list(paths, what: str) -> list[Path]:
    if isinstance(paths, (str, Path)):
        if Path(paths).is_dir():
            raise ValueError(
                f"{what}: {paths} is a folder; pass a list of image files, e.g. "
                f"metatl.data.image_folder.list_images({str(paths)!r}, recursive=True)."
            )
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"{what} is empty; pass at least one image file.")
    return paths


def _class_codes(labels, n: int) -> tuple[Tensor, list]:
    """``(codes, classes)``: labels (class names, or integer class ids) as ``0..N-1`` in sorted
    order of the distinct labels, with a clear error for float, mixed or missing labels."""
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise ValueError(
            f"labels must be a sequence with one class label per support image, got {type(labels).__name__}."
        )
    if isinstance(labels, Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be class names or integer class ids, got a tensor of dtype "
                f"{labels.dtype}; use .long() if they are whole numbers."
            )
        labels = labels.flatten().tolist() if labels.dim() <= 1 else labels
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iuUSO":
            raise ValueError(
                f"labels must be class names or integer class ids, got an array of dtype "
                f"{labels.dtype}; use .astype(int) if they are whole numbers."
            )
        labels = labels.tolist()
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(
            f"{n} support image(s) but {len(labels)} label(s); give exactly one label per image, in the same order."
        )
    kinds = set()
    for i, v in enumerate(labels):
        if isinstance(v, str):
            kinds.add("name")
        elif isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
            kinds.add("id")
        else:
            raise ValueError(
                f"label {i} is {v!r} ({type(v).__name__}); labels must be class names (str) or "
                f"integer class ids, one per support image."
            )
    if len(kinds) > 1:
        raise ValueError("labels mix class names (str) and integer ids; use one kind.")
    labels = [int(v) for v in labels] if kinds == {"id"} else labels
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[v] for v in labels], dtype=torch.long), classes


def _check_learner(learner, steps: int | None) -> None:
    """Image adaptation needs an episodic image classifier: say so for anything else, and refuse
    inner steps for a learner that takes none."""
    if not isinstance(learner, MetaLearner):
        raise ValueError(
            f"this {type(learner).__name__} checkpoint is not a meta-learner (a transfer learner "
            f"is trained for a fixed set of classes); it cannot adapt to new classes from a "
            f"support folder. `metatl adapt` takes meta-learning checkpoints (protonet, matching, "
            f"relation, maml, reptile, mann, snail, ...); score a transfer checkpoint with "
            f"`metatl eval`."
        )
    if learner.task_type != "classification":
        raise ValueError(
            f"this {type(learner).__name__} checkpoint is a {learner.task_type} model (e.g. "
            f"sinusoid); `metatl adapt` classifies images: use a checkpoint trained on image "
            f"classification episodes (omniglot or image_folder)."
        )
    if steps is None:
        return
    if not isinstance(learner, GradientMetaLearner):
        raise ValueError(
            f"--steps {steps} (steps={steps}): {type(learner).__name__} adapts without gradient "
            f"steps (a forward pass over the support set), so there are no inner steps to set; "
            f"leave --steps out. Inner steps apply to maml, reptile, meta_lstm, pretrain."
        )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"--steps must be 0 or more (inner-loop steps on the support set), got {steps}.")


def _check_ways(learner, support_x, n_classes: int) -> None:
    if not getattr(type(learner), "uses_head", True):
        return  # metric-based: any number of classes
    width = getattr(learner, "ways", None)  # sequence learners: the one-hot label size
    if not isinstance(width, int):
        with torch.no_grad():
            width = learner.model(support_x[:1]).shape[-1]
    if width != n_classes:
        raise ValueError(
            f"this {type(learner).__name__} checkpoint has a {width}-way head but the support "
            f"folder has {n_classes} classes; give it exactly {width} class sub-folders, or use "
            f"a checkpoint trained for {n_classes}-way tasks (or a metric-based one: protonet, "
            f"matching, relation take any number of classes)."
        )


@contextlib.contextmanager
def _eval_mode(learner: nn.Module):
    was_training = learner.training
    learner.eval()
    try:
        yield
    finally:
        learner.train(was_training)


def _device(learner: nn.Module) -> torch.device:
    p = next(iter(learner.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class ImagePredictor:
    """A learner adapted to a support set of image files (:func:`adapt_images`). ``classes`` are
    the support classes (folder names, or the sorted distinct labels); ``input`` the
    :class:`ImageInput` the files go through; ``predictor`` the tensor-level
    :class:`~metatl.meta.base.Predictor`."""

    def __init__(
        self,
        learner: MetaLearner,
        predictor: Predictor,
        support_x: Tensor,
        classes: list,
        image_input: ImageInput,
        transductive: bool = False,
    ):
        self.learner, self.predictor, self.support_x = learner, predictor, support_x
        self.classes, self.input, self.transductive = list(classes), image_input, transductive

    def proba(self, x: Tensor) -> Tensor:
        """Class probabilities ``(len(x), len(classes))`` of converted images ``x`` (see the module
        docstring for how BatchNorm and ``transductive`` batch them)."""
        x = x.to(self.support_x.device)
        with _eval_mode(self.learner), torch.no_grad():
            if self.transductive or not queries_interact(self.learner):
                return torch.cat([self.predictor.predict_proba(chunk) for chunk in x.split(256)]).cpu()
            return torch.cat([self.predictor(torch.cat([self.support_x, q[None]]))[-1:].softmax(-1) for q in x]).cpu()

    def predict_proba_images(self, paths: Files) -> Tensor:
        """Probabilities ``(len(paths), len(classes))``, one row per file (an unreadable file is an
        error); column ``k`` is ``classes[k]``."""
        return self.proba(self.input.load(paths))

    def predict_images(self, paths: Files) -> list:
        """The predicted class (an entry of ``classes``) of each file."""
        return [self.classes[k] for k in self.predict_proba_images(paths).argmax(1).tolist()]

    def score_files(self, paths: Files) -> tuple[Tensor, list[Path]]:
        """``(probabilities, kept)`` over the readable files of ``paths`` (the others are named in one
        warning and left out): what ``metatl adapt`` prints."""
        x, kept, _ = self.input.read(paths)
        return (self.proba(x) if kept else torch.empty(0, len(self.classes))), kept


def adapt_images(
    learner: nn.Module,
    support: Files,
    labels: Labels | None = None,
    steps: int | None = None,
    invert: bool | None = None,
    transductive: bool = False,
) -> ImagePredictor:
    """Adapt ``learner`` to image files converted as its checkpoint expects (:class:`ImageInput`).

    ``support`` is a folder with one sub-folder of images per class (``labels`` must then be
    ``None``: the folder names are the classes), or a list of image files with ``labels``, one per
    file: class names (str) or integer class ids (classes in sorted order). ``steps``: inner steps
    for MAML / Reptile (refused for a learner that takes none). ``invert`` overrides the
    checkpoint's inversion (Omniglot: inverted). Returns an :class:`ImagePredictor`.
    """
    _check_learner(learner, steps)
    image_input = ImageInput.of(learner, invert=invert)
    is_folder = isinstance(support, (str, Path)) and Path(support).is_dir()
    if is_folder:
        if labels is not None:
            raise ValueError(
                f"support {support} is a folder: its sub-folder names are the classes, so leave "
                f"labels out (or pass a list of image files with their labels)."
            )
        support_x, support_y, classes = image_input.load_folder(support)
    else:
        paths = _path_list(support, "support")
        if labels is None:
            raise ValueError(
                "labels are needed with a list of support images: one class name or integer id "
                "per image (or pass a folder with one sub-folder per class)."
            )
        support_y, classes = _class_codes(labels, len(paths))
        support_x = image_input.load(paths)
    _check_ways(learner, support_x, len(classes))
    device = _device(learner)
    support_x, support_y = support_x.to(device), support_y.to(device)
    with _eval_mode(learner):
        predictor = learner.adapt(support_x, support_y, **({} if steps is None else {"steps": steps}))
    return ImagePredictor(learner, predictor, support_x, classes, image_input, transductive)
