"""The one extension point: named registries of algorithms, data sets, backbones and estimators.

A component registers itself where it is defined::

    @ALGORITHMS.register("maml")
    class MAML: ...

and is looked up by name from configs and the CLI (``metatl list`` prints every registry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """A name -> object mapping with a helpful error for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice; pick another name.")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, Any]]:
        return sorted(self._items.items())


ALGORITHMS = Registry("algorithm")  # meta-learning algorithms and deep transfer objectives
DATASETS = Registry("dataset")  # task / episode sources
BACKBONES = Registry("backbone")  # nn.Module factories
ESTIMATORS = Registry("estimator")  # classical (scikit-learn style) transfer estimators
