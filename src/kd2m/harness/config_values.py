"""A config's values as written: comma lists and seed counts read, and values quoted in errors.

The command line gives lists as comma lists (``--metrics w2,cw2``, ``--seeds 5,7``) and YAML as
lists; these read both. :func:`quote` bounds how much of a value an error message repeats.
"""
from __future__ import annotations

import reprlib

from ..errors import ConfigError

__all__ = ["MAX_QUOTE_CHARS", "quote", "str_list", "int_list", "float_list", "seed_list"]

#: How much of a value an error message quotes: a few items, a few levels, short strings.
_QUOTE = reprlib.Repr()  # (keyword arguments need Python 3.12)
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, 60, 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6
MAX_QUOTE_CHARS = 100


def quote(value) -> str:
    """``repr(value)`` for an error message, bounded in time and length (never the whole of a huge
    value: a YAML alias bomb's repr runs to gigabytes)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= MAX_QUOTE_CHARS else text[:MAX_QUOTE_CHARS - 1] + "…"


def str_list(key, value) -> list:
    """A comma list (command line) or a YAML list of names."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of names or a comma list, got {quote(value)}")
    return value


def int_list(key, value: str) -> list:
    """A comma list of integers."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{key}: expected integers, got {value!r}") from None


def float_list(key: str, value) -> list:
    """A comma list (command line) or a YAML list of numbers, as floats."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(items, list) or any(isinstance(v, bool) for v in items):
            raise ValueError
        return [float(v) for v in items if not (isinstance(v, str) and not v.strip())]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: a comma list of numbers (e.g. 0,0.3,1,3,10), got {value!r:.60}") from None


def seed_list(seeds, key: str = "seeds") -> list:
    """Seeds as given: a count N (seeds 0..N-1), a comma list or a list of distinct integers ≥ 0."""
    if isinstance(seeds, bool):
        raise ConfigError(f"{key}: expected a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"{key}: a count must be at least 1, got {seeds} "
                              f"(to run one seed N alone give a list: --{key.replace('_', '-')} N, — with the comma — "
                              f"or {key}: [N])")
        return list(range(seeds))
    if isinstance(seeds, str):
        seeds = int_list(key, seeds)
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{key}: expected a count or a non-empty list of integers, got {seeds!r:.60}")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{key}: expected distinct integers ≥ 0, got {seeds!r:.60}")
    return seeds
