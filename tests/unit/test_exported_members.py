"""The public surface: degrade.__all__ and each public module's __all__."""

from __future__ import annotations
import __future__

import importlib
import types

import pytest

import degrade

PUBLIC_MODULES = [
    "degrade.cache",
    "degrade.checks",
    "degrade.db",
    "degrade.dependency",
    "degrade.eventbus",
    "degrade.exceptions",
    "degrade.hatch",
    "degrade.health",
    "degrade.modes",
    "degrade.policies",
    "degrade.observe",
    "degrade.ratelimit",
    "degrade.redis",
    "degrade.registry",
    "degrade.responses",
    "degrade.revocation",
    "degrade.runbook",
    "degrade.testing",
    "degrade.testing.drill",
]


#: Names of degrade.__all__ that the package imports on first use (their extra is optional).
LAZY = {"health_router"}


def _isort_order(names: list[str]) -> list[str]:
    """The order ruff's RUF022 keeps: CONSTANTS, then CamelCase, then the rest; each sorted."""

    def key(name: str) -> tuple[int, str]:
        bare = name.lstrip("_")
        if bare.isupper() and len(bare) > 1:
            return (0, name)
        if bare[:1].isupper():
            return (1, name)
        return (2, name)

    return sorted(set(names), key=key)


def test_all_is_sorted() -> None:
    """degrade.__all__ is sorted and has no duplicates."""
    assert degrade.__all__ == _isort_order(degrade.__all__)


def test_every_name_in_all_is_importable() -> None:
    """Every name in __all__ exists on the package."""
    for name in degrade.__all__:
        assert getattr(degrade, name) is not None, name


def test_every_public_attribute_is_exported() -> None:
    """Every public attribute of the package (except submodules and __future__ flags) is in __all__."""
    public = {
        name
        for name, value in vars(degrade).items()
        if not name.startswith("_")
        and not isinstance(value, __future__._Feature)
        and not (isinstance(value, types.ModuleType) and name != "checks")
    }
    # Imported on first use (its extra is optional): present once looked up.
    public |= LAZY
    assert public == set(degrade.__all__) - {"__version__"}


def test_design_names_are_exported() -> None:
    """The names DESIGN.md promises are part of the public API."""
    promised = {
        "Registry",
        "Severity",
        "fail_soft",
        "fail_loud",
        "DependencyUnavailable",
        "checks",
        "health_routes",
        "exception_handlers",
    }
    assert promised <= set(degrade.__all__)


def test_version_is_a_string() -> None:
    """__version__ is exported as a string."""
    assert isinstance(degrade.__version__, str)
    assert degrade.__version__


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_module_all_is_sorted_and_importable(module_name: str) -> None:
    """Each public module's __all__ is sorted and names only what it defines."""
    module = importlib.import_module(module_name)
    names = module.__all__
    assert names == _isort_order(names)
    for name in names:
        assert hasattr(module, name), f"{module_name}.{name}"


def test_exported_objects_come_from_their_modules() -> None:
    """Names re-exported by the package are the same objects as in their modules."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name in degrade.__all__:
                assert getattr(degrade, name) is getattr(module, name), name
