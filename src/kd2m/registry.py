"""Name -> entry tables: every registry of kd2m (models, datasets, metrics, loss terms) adds its
entries through :func:`add_entry`, so a name is registered once, with one error if it is not."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["F", "add_entry", "registrar"]

F = TypeVar("F", bound=Callable)


def add_entry(table: dict, kind: str, name: str, entry) -> None:
    """``table[name] = entry``; a ValueError if ``name`` is already there (two components under one
    name would silently shadow each other)."""
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")
    table[name] = entry


def registrar(table: dict, kind: str) -> Callable[[str], Callable[[F], F]]:
    """A decorator factory ``register(name)`` that stores a builder in ``table`` under ``name``."""

    def register(name: str) -> Callable[[F], F]:
        def add(builder: F) -> F:
            add_entry(table, kind, name, builder)
            return builder
        return add

    return register
