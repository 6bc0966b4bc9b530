"""The limiter's storage keys, and forgetting them: ``await limiter.reset(key)``.

A bucket is stored under ``prefix + rate.text + ":" + key`` (in Redis and in
the memory store alike); a key longer than :data:`MAX_KEY_LENGTH` is replaced
by a hash first, so stored keys stay short whatever a key function returns.

:class:`Resets` is the part of :class:`~degrade.ratelimit.RateLimiter` that
deletes a key's buckets: with its rates known, one ``DEL``; without, a
``SCAN`` for ``prefix*:key`` whose matches are checked (the part between the
prefix and the key must be a rate's text, which never holds ``:``, so the key
``"b"`` does not take the buckets of the key ``"a:b"``). Meant for tests and
operators, not for the request path.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from .._gcra import MemoryStore, Rate, Rates, parse_rates
from ..exceptions import ConfigurationError

__all__ = ["MAX_KEY_LENGTH", "RESET_TIMEOUT", "Resets", "hashed"]

#: Longest key kept as given; longer keys are replaced by a hash (bounded Redis and memory keys).
MAX_KEY_LENGTH = 128
#: Keys asked of Redis per SCAN step.
_SCAN_COUNT = 1000
#: Seconds a reset may take in Redis (a SCAN walks the whole database).
RESET_TIMEOUT = 10.0


def hashed(key: str) -> str:
    """The stored form of a key longer than :data:`MAX_KEY_LENGTH`."""
    return "h:" + hashlib.blake2b(key.encode("utf-8", "backslashreplace"), digest_size=16).hexdigest()


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class Resets:
    """Forgetting a key's buckets; a base of :class:`~degrade.ratelimit.RateLimiter`."""

    redis: Any
    prefix: str
    store: MemoryStore

    async def reset(self, key: str, rate: str | Rate | Rates | None = None) -> None:
        """Delete ``key``'s buckets, in Redis and in memory: the key starts afresh.

        ``await limiter.reset("user:42")`` forgets every rate's bucket of the key;
        ``await limiter.reset("user:42", "5/minute")`` only that rate's (one
        ``DEL``; several limits: each of theirs). ``key`` is the key as given to
        :meth:`hit`; the middleware and :func:`rate_limit` count a client in
        ``"<policy name>|<client key>"`` (``"login|203.0.113.9"``). Without
        ``rate`` it ``SCAN``s Redis for the key (the whole keyspace of the
        database: for tests and operators, not for the request path).

        Failure mode: FAIL-LOUD. The memory buckets are forgotten in any case;
        a Redis error propagates (and so does ``TimeoutError`` after
        :data:`RESET_TIMEOUT` seconds), since a reset that did not happen must
        not look like one.

        Raises:
            ConfigurationError: a key that is not a string, or a bad rate.
        """
        if not isinstance(key, str):
            raise ConfigurationError(f"reset() takes the key as a string; got {type(key).__name__}")
        if len(key) > MAX_KEY_LENGTH:
            key = hashed(key)
        prefix, suffix = self.prefix, ":" + key
        if rate is not None:
            parsed = parse_rates(rate)
            rates = (parsed,) if isinstance(parsed, Rate) else tuple(parsed)
            buckets = [f"{prefix}{r.text}{suffix}" for r in rates]
        else:
            buckets = [b for b in self.store.kept() if _owns(b, prefix, suffix)]
        for bucket in buckets:
            self.store.delete(bucket)
        if self.redis is None:
            return
        async with asyncio.timeout(RESET_TIMEOUT):
            names: list[Any] = list(buckets)
            if rate is None:
                pattern = _glob_escape(prefix) + "*" + _glob_escape(suffix)
                names = [
                    name
                    async for name in self.redis.scan_iter(match=pattern, count=_SCAN_COUNT)
                    if _owns(_text(name), prefix, suffix)
                ]
            if names:
                await self.redis.delete(*names)


def _text(name: Any) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)


def _owns(bucket: str, prefix: str, suffix: str) -> bool:
    """Is ``bucket`` a rate's bucket of the key (``prefix + rate text + suffix``, the text without ':')?"""
    if not (bucket.startswith(prefix) and bucket.endswith(suffix)):
        return False
    middle = bucket[len(prefix) : len(bucket) - len(suffix)]
    return bool(middle) and ":" not in middle
