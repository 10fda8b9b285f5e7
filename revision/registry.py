"""A name -> implementation table for the things a user picks by name: alignment methods (revision/align/base.py),
encoder families (revision/encoders/base.py), projector types (revision/projector.py). Adding one is one class or
function plus its registration; asking for an unknown name is one clear error listing the choices."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of name -> T that knows what its entries are called (`kind`, for messages)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, value: T) -> T:
        self[name] = value
        return value

    def names(self) -> tuple[str, ...]:
        return tuple(self)

    def lookup(self, name: str) -> T:
        """The entry `name`; an unknown name raises ValueError naming the choices."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self[name]
