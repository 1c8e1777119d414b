"""``functional_call``: a module run with given parameters and buffers, as
``torch.func.functional_call(module, params, args, strict=False)`` (weights tied), with less
work per call.

PyTorch's version walks the whole module tree on every call, twice (to find tied tensors, then to
swap each tensor in by its dotted name). MAML calls it once per task and step, and on a CPU that
walk is a measurable share of a small task's forward pass; while it runs, it holds Python's GIL,
which the meta-batch's task threads (:mod:`metatl.engine.executors.threads`) then wait for. Here the walk is
done once per module tree and kept (:class:`_Plan`): each dotted name is resolved to the
dictionary and key it lives in, and tied tensors are found. Each call checks that the tree is
still the same, with one light pass over the submodules' dictionaries (the identity of every
submodule, parameter and buffer), and rebuilds the plan when it is not (a submodule or parameter
replaced, added or removed). Models with tied or shared tensors, and names that are not a
parameter or buffer of the model, go to PyTorch's version, which handles them.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

from torch import Tensor, nn
from torch.func import functional_call as _torch_functional_call

from .backbones import _compiling

_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan]" = weakref.WeakKeyDictionary()


def _structure(module: nn.Module) -> List:
    """The identity of every submodule and of every parameter and buffer (with its name) in
    ``module``'s tree, in a fixed order: it changes when anything in the tree is replaced, added
    or removed."""
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        out.append(id(m))
        for store in (m._parameters, m._buffers):
            out.extend(store)  # the names, then the tensors' identities
            out.extend(map(id, store.values()))
        stack.extend(sub for sub in m._modules.values() if sub is not None)
    return out


class _Plan:
    """Where each parameter and buffer of a module tree lives: dotted name -> (the dictionary,
    its key); ``tied``: some tensor is reachable under two names (tied weights, a shared
    submodule). Holding the dictionaries keeps their tensors alive, so while the plan exists no new
    tensor can take an old one's identity and leave the structure looking unchanged."""

    def __init__(self, module: nn.Module, structure: List):
        self.structure = structure
        self.slots: Dict[str, Tuple[dict, str]] = {}
        seen = set()
        self.tied = False
        for prefix, m in module.named_modules(remove_duplicate=False):
            for store in (m._parameters, m._buffers):
                for key, t in store.items():
                    if t is None:
                        continue
                    self.slots[f"{prefix}.{key}" if prefix else key] = (store, key)
                    self.tied = self.tied or id(t) in seen
                    seen.add(id(t))


def functional_call(module: nn.Module, params: Dict[str, Tensor], args, kwargs=None):
    """``module(*args, **kwargs)`` with the tensors of ``params`` (dotted names, as
    ``named_parameters()``; a subset is fine: the rest come from the module) in place of its
    parameters and buffers, which are put back afterwards. The same as
    ``torch.func.functional_call(module, params, args, kwargs, strict=False)``, including
    ``torch.func`` transforms' tensors in ``params`` and a buffer the forward pass reassigns
    (written back to ``params``)."""
    if not isinstance(args, tuple):
        args = (args,)
    if _compiling():  # traced, the plans would become guards that fail at the next call: a recompile each time
        return _torch_functional_call(module, params, args, kwargs, strict=False)
    structure = _structure(module)
    plan = _PLANS.get(module)
    if plan is None or plan.structure != structure:
        plan = _PLANS[module] = _Plan(module, structure)
    if plan.tied or any(name not in plan.slots for name in params):
        return _torch_functional_call(module, params, args, kwargs, strict=False)
    swapped = []
    try:
        for name, value in params.items():
            store, key = plan.slots[name]
            swapped.append((name, store, key, store[key], value))
            store[key] = value
        return module(*args, **(kwargs or {}))
    finally:
        for name, store, key, original, value in reversed(swapped):
            if store[key] is not value:  # reassigned by the forward pass (a buffer)
                params[name] = store[key]
            store[key] = original
