"""Argument checks shared by every constructor: one rule per kind of value.

Each returns the value normalised (seconds as ``float``) or raises
:class:`~degrade.ConfigurationError` with a message that names the argument,
says what it takes and shows what it got. Booleans are never numbers here
(``True`` is an ``int`` to Python, never a sensible timeout), and neither are
infinity or NaN: a bound that can never fire is no bound.
"""

from __future__ import annotations

import math

from .exceptions import ConfigurationError

__all__ = ["count", "fraction", "int_range", "optional_seconds", "seconds", "whole_seconds"]


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def seconds(label: str, value: object, *, allow_zero: bool = False) -> float:
    """A finite number of seconds, > 0 (>= 0 with ``allow_zero``)."""
    if not _number(value) or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{label} must be a finite number of seconds {bound}; got {value!r}")
    return float(value)  # type: ignore[arg-type]


def optional_seconds(label: str, value: object, *, allow_zero: bool = False) -> float | None:
    """Like :func:`seconds`, or None."""
    return None if value is None else seconds(label, value, allow_zero=allow_zero)


def whole_seconds(label: str, value: object) -> int:
    """A whole number of seconds >= 0 (``Retry-After``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{label} must be a whole number of seconds >= 0; got {value!r}")
    return value


def count(label: str, value: object, *, minimum: int = 1) -> int:
    """An ``int`` >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{label} must be an int >= {minimum}; got {value!r}")
    return value


def int_range(label: str, value: object, *, minimum: int, maximum: int) -> int:
    """An ``int`` in ``minimum..maximum``, both included (a port, a quorum)."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigurationError(f"{label} must be an int in {minimum}..{maximum}; got {value!r}")
    return value


def fraction(label: str, value: object) -> float:
    """A finite number in (0, 1] (a failure or slow-call rate threshold)."""
    if not _number(value) or not 0 < value <= 1:  # type: ignore[operator]
        raise ConfigurationError(f"{label} must be a number in (0, 1]; got {value!r}")
    return float(value)  # type: ignore[arg-type]
