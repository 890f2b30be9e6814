"""timm-style name registries (models, heads, attacks, defenses, metrics)."""
from __future__ import annotations

from typing import Callable, Dict, List, TypeVar

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str = None):
        def deco(fn: T) -> T:
            key = (name or fn.__name__).lower()
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = fn
            return fn
        return deco

    def get(self, name: str) -> Callable:
        key = str(name).lower()
        if key not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[key]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in self._items
