"""redis-py's internals that degrade reads. Checked against redis-py 5.0.4 and 8.1.0.

* A ``Retry`` object's ``_retries`` and its backoff's ``_cap`` (or a
  ``ConstantBackoff``'s ``_backoff``): how long one call can take against a
  hung server, for the start-up settings check. Fallback: 0 retries and no
  backoff, which can only under-report (a warning missed, never a false one).
"""

from __future__ import annotations

from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff, ExponentialBackoff, NoBackoff

__all__ = ["problems", "retry_settings"]


def retry_settings(retry: object, retry_on_error: object) -> tuple[int, float]:
    """(retries, longest backoff) that redis-py derives for each connection."""
    if isinstance(retry, Retry):
        backoff = getattr(retry, "_backoff", None)
        cap = getattr(backoff, "_cap", None)
        if cap is None:
            cap = getattr(backoff, "_backoff", 0.0)  # ConstantBackoff keeps its wait here
        count = int(getattr(retry, "_retries", 0))
        return (count if count >= 0 else -1), float(cap or 0.0)
    if retry_on_error:  # redis-py turns retry_on_error / retry_on_timeout into one retry
        return 1, 0.0
    return 0, 0.0


def problems() -> list[str]:
    """Which of the reads above the installed redis-py cannot do (empty: all of them)."""
    found: list[str] = []
    if retry_settings(Retry(NoBackoff(), 3), None) != (3, 0.0):
        found.append("Retry._retries moved: the settings check cannot count client-side retries")
    if retry_settings(Retry(ExponentialBackoff(cap=7.0), 1), None)[1] != 7.0:
        found.append("ExponentialBackoff._cap moved: the settings check under-reports the backoff")
    if retry_settings(Retry(ConstantBackoff(2.0), 1), None)[1] != 2.0:
        found.append("ConstantBackoff._backoff moved: the settings check under-reports the backoff")
    return found
