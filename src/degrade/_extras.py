"""Helpers for optional extras: import a driver or say which extra installs it."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .exceptions import MissingExtraError


def _missing(exc: ImportError, module: str) -> bool:
    """True when ``exc`` says ``module`` itself (or a package above it) is not installed.

    Any other import error (a broken install, a missing name inside the package,
    a dependency of the package) propagates with its own message: only the
    optional package being absent is the "install the extra" case.
    """
    if isinstance(exc, ModuleNotFoundError):
        name = exc.name or ""
        return module == name or module.startswith(name + ".")
    return sys.modules.get(module, False) is None  # blocked (None in sys.modules), as tests do


def require(module: str, extra: str, *, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if not _missing(exc, module):
            raise
        raise MissingExtraError(
            f"{feature} needs the {module!r} package, which is not installed; "
            f"install it with: pip install 'degrade[{extra}]'"
        ) from exc


def optional(module: str) -> ModuleType | None:
    """Import ``module`` if it is installed, else return None (other import errors propagate)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if not _missing(exc, module):
            raise
        return None
