"""Name -> constructor registries, so a new dataset or method is one file and one decorator.

The registered name is the one source of truth: ``register`` writes it on the class as ``name``,
and code that needs a method's or dataset's name reads that attribute, never a second literal.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from tbps.errors import TBPSError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to classes or factories, filled with ``@REGISTRY.register("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: Any = None, obj: T | None = None):
        """Register ``obj`` under ``name`` and set ``obj.name`` to it.

        Three forms: ``@REGISTRY.register("name")``; bare ``@REGISTRY.register``, which takes the
        object's ``__name__`` (lower-cased); and ``REGISTRY.register("name", obj)``. One object has
        one name: registering it under a second one is an error (register a subclass instead).
        """
        if name is not None and not isinstance(name, str):  # bare decorator: register(cls)
            name, obj = None, name

        def add(item: T) -> T:
            key = (name or getattr(item, "__name__")).lower()
            if key in self._items and self._items[key] is not item:
                raise TBPSError(f"{self.kind} {key!r} is already registered")
            previous = next((k for k, other in self._items.items() if other is item), key)
            if previous != key:
                raise TBPSError(f"{self.kind} {previous!r} is registered again as {key!r}: one name per "
                                f"{self.kind} (register a subclass under the second name)")
            try:
                setattr(item, "name", key)
            except (AttributeError, TypeError):  # a builtin or slotted callable: nothing to write on
                pass
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
