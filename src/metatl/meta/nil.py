"""NIL, "No Inner Loop" (Raghu, Raghu, Bengio and Vinyals, ICLR 2020, "Rapid Learning or Feature
Reuse?", sec. 5): a test-time classifier that keeps a meta-trained network's body and drops its head.
With ``z = f(x)`` the body's features (the input of the head)::

    p(c | x) = sum_{i: y_i = c} a_i(x),     a(x) = softmax_i( cos(f(x), f(x_i)) )

over the support set ``{(x_i, y_i)}``: the support labels weighted by the query's cosine similarity
to each support example (attention as in Matching Networks), no gradient step at all. The paper
uses it to show that a MAML or ANIL network's test accuracy is the quality of its features. It is
the ``nil`` option of :class:`~metatl.meta.maml.MAML` and its variants
(``metatl eval CKPT --set algorithm.nil=true`` scores a MAML, ANIL or Meta-SGD checkpoint so).
The paper weighs the labels by the cosine similarities; the softmax here makes the scores
probabilities and, for one shot, picks the same class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def find_head(model: nn.Module, head: str | None = None) -> str:
    """The name of the model's head module: ``head`` when given (checked), else the submodule named
    ``head`` (the conv nets), else the last module that holds parameters of its own (an MLP's last
    ``Linear``)."""
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules or head == "" or not any(True for _ in modules[head].parameters()):
            names = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
            raise ValueError(
                f"head={head!r} names no module with parameters of the {type(model).__name__}; "
                f"give the name of its last layer, one of: {', '.join(names[-6:])}."
            )
        return head
    if isinstance(modules.get("head"), nn.Module) and any(True for _ in modules["head"].parameters()):
        return "head"
    owners = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError(f"the {type(model).__name__} has no layer with parameters to serve as its head.")
    return owners[-1]


def in_module(name: str, module: str) -> bool:
    """Whether the parameter ``name`` belongs to the module ``module``."""
    return name.startswith(module + ".")


def body_features(model: nn.Module, head: str, x: Tensor) -> Tensor:
    """``f(x)``: what the model feeds its head module for ``x``, flattened to ``(n, d)``."""
    captured = []
    hook = dict(model.named_modules())[head].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise ValueError(
            f"NIL needs a model that calls its head {head!r} once per forward pass; it ran {len(captured)} times."
        )
    return captured[0].flatten(1)


def nil_log_probs(query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """``log p(c | x)`` for query features ``(q, d)``, support features ``(s, d)`` and their labels
    ``(s,)``: ``(q, ways)`` (``-inf`` for a class without support examples)."""
    similarity = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T
    return (similarity.softmax(-1) @ F.one_hot(support_y, ways).to(similarity.dtype)).log()


def nil_forward(model: nn.Module, head: str, support_x: Tensor, support_y: Tensor):
    """The NIL classifier of a support set: ``x -> log p(c | x)`` (the model as it is, no step)."""
    with torch.no_grad():
        support = body_features(model, head, support_x)
    ways = int(support_y.max()) + 1
    return lambda x: nil_log_probs(body_features(model, head, x), support, support_y, ways)
