"""Name -> builder tables for datasets and models: a new component is one function plus one
decorator line (metrics have their own, which also validates inputs: kd2m.metrics._base)."""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict, kind: str) -> Callable[[str], Callable[[F], F]]:
    """A decorator factory ``register(name)`` that stores a builder in ``table`` under ``name``."""

    def register(name: str) -> Callable[[F], F]:
        def add(builder: F) -> F:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = builder
            return builder
        return add

    return register
