"""Every reach into a driver's private internals, one module per driver.

The fast paths of degrade read a few private attributes of SQLAlchemy,
redis-py and aiormq (an idle pooled connection taken without I/O, the
``BEGIN`` SQLAlchemy would send lazily, redis-py's retry settings, aiormq's
transport factory). Each module here:

* names the versions it was checked against;
* answers with a safe fallback when an internal is missing or changed (the
  slower, always-correct path), never with an error on the request path;
* says which fast paths are unavailable (``problems()``), so that a test fails
  loudly on a driver version that changed them (``tests/unit/test_compat.py``,
  run at the newest versions and at the declared floors), instead of the
  library falling back silently;
* logs a fallback that is taken once, at start-up (:func:`report`).
"""

from __future__ import annotations

from ..observe import logger

__all__ = ["report"]

_reported: set[str] = set()


def report(driver: str, problems: list[str]) -> None:
    """Log ``degrade.compat.fallback`` once per driver when a fast path is unavailable."""
    if not problems or driver in _reported:
        return
    _reported.add(driver)
    logger.warning(
        "degrade.compat.fallback",
        driver=driver,
        problems=problems,
        detail="the slower, always-correct path is used; please report this with the driver's version",
    )
