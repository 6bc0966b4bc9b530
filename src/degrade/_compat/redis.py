"""redis-py's internals that degrade reads. Checked against redis-py 5.0.4 and 8.1.0.

* ``ConnectionPool.get_connection()``: before 5.3 it requires a command name
  (unused by the pool); :func:`get_connection` passes one when needed. Without
  this, the limiter's lean path raised ``TypeError`` on every decision and
  answered from memory (issue found with a lowest-direct install).
* A connection's ``_writer`` (the stream the lean path writes a packed command
  to, skipping ``send_packed_command``'s per-call ``wait_for`` task) and its
  ``_reader``'s buffer (a reply already received but unread because the loop
  was busy: then a timeout was the loop's, not Redis's). Fallbacks: None, so
  the limiter takes redis-py's public ``send_packed_command`` path, and "no
  reply buffered", so such a timeout counts as Redis's.

* A ``Retry`` object's ``_retries`` and its backoff's ``_cap`` (or a
  ``ConstantBackoff``'s ``_backoff``): how long one call can take against a
  hung server, for the start-up settings check. Fallback: 0 retries and no
  backoff, which can only under-report (a warning missed, never a false one).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff, ExponentialBackoff, NoBackoff

__all__ = ["get_connection", "problems", "reply_buffered", "retry_settings", "writer"]

_NEEDS_NAME: dict[type, bool] = {}


def _needs_command_name(pool: Any) -> bool:
    cls = type(pool)
    needs = _NEEDS_NAME.get(cls)
    if needs is None:
        try:
            params = list(inspect.signature(cls.get_connection).parameters.values())[1:]
        except (TypeError, ValueError):  # pragma: no cover - not introspectable: be safe
            params = []
        needs = (
            bool(params)
            and params[0].default is inspect.Parameter.empty
            and params[0].kind
            in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
        )
        _NEEDS_NAME[cls] = needs
    return needs


async def get_connection(pool: Any) -> Any:
    """A connection from ``pool``, whatever redis-py version's signature it has."""
    if _needs_command_name(pool):
        return await pool.get_connection("EVALSHA")
    return await pool.get_connection()


def writer(conn: Any) -> asyncio.StreamWriter | None:
    """The connection's stream writer, or None (then use ``send_packed_command``)."""
    found = getattr(conn, "_writer", None)
    return found if isinstance(found, asyncio.StreamWriter) else None


def reply_buffered(conn: Any) -> bool:
    """Has a reply reached this connection's buffer, unread (the loop was busy)?"""
    reader = getattr(conn, "_reader", None)
    return bool(getattr(reader, "_buffer", None))


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
    from redis.asyncio.connection import Connection

    found: list[str] = []
    probe = Connection()
    if not hasattr(probe, "_writer") or not hasattr(probe, "_reader"):
        found.append("Connection._reader/_writer moved: the limiter takes redis-py's slower send path")
    # (asyncio.StreamReader's _buffer is the standard library's, the same on 3.11-3.13.)
    if retry_settings(Retry(NoBackoff(), 3), None) != (3, 0.0):
        found.append("Retry._retries moved: the settings check cannot count client-side retries")
    if retry_settings(Retry(ExponentialBackoff(cap=7.0), 1), None)[1] != 7.0:
        found.append("ExponentialBackoff._cap moved: the settings check under-reports the backoff")
    if retry_settings(Retry(ConstantBackoff(2.0), 1), None)[1] != 2.0:
        found.append("ConstantBackoff._backoff moved: the settings check under-reports the backoff")
    return found
