"""Name -> constructor registries, so a new dataset or method is one file and one decorator."""

from __future__ import annotations

from typing import Generic, TypeVar

from tbps.errors import TBPSError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to classes or factories, filled with ``@REGISTRY.register("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None, obj: T | None = None):
        """Register ``obj`` under ``name``; used bare as a decorator it takes the object's name."""

        def add(item: T) -> T:
            key = (name or getattr(item, "__name__")).lower()
            if key in self._items and self._items[key] is not item:
                raise TBPSError(f"{self.kind} {key!r} is already registered")
            self._items[key] = item
            return item

        if obj is not None:
            return add(obj)
        return add

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise TBPSError(f"unknown {self.kind} {name!r} (known: {known})")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items
