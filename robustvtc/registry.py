"""Name -> class registries with wildcard listing (timm's ``list_models("vit_*")`` style)."""
from __future__ import annotations

import fnmatch
from typing import Callable, Generic, TypeVar

from .errors import UserInputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name")
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserInputError(f"unknown {self.kind} {name!r}; accepted: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def items(self):
        return sorted(self._items.items())
