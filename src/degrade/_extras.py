"""Helpers for optional extras: import a driver or say which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .exceptions import MissingExtraError


def require(module: str, extra: str, *, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the {module!r} package, which is not installed; "
            f"install it with: pip install 'degrade[{extra}]'"
        ) from exc


def optional(module: str) -> ModuleType | None:
    """Import ``module`` if it is installed, else return None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
