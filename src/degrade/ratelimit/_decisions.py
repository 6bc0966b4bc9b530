"""A limiter's answers other than Redis's own, and what it reports meanwhile.

:class:`Decider` is the part of :class:`~degrade.ratelimit.RateLimiter` that
turns a situation into a :class:`~degrade._gcra.Decision`:

* ``_memory``: the in-process GCRA (:class:`~degrade._gcra.MemoryStore`) at
  the rate divided by ``pods``, so N pods together stay near the global limit;
* ``_fallback``: the outage policy (``"memory"``, ``"deny"`` or ``"allow"``,
  fail-open, which starts a security event);
* ``_shed``: local capacity ran out (saturation, never a failure of Redis);
* ``_from_redis``: the script's reply, mirrored into the memory store when
  ``warm`` so that a failover does not hand every client a fresh bucket.

And the signals: an unexpected error on the Redis path is counted, logged at
most once a minute, and after ``UNEXPECTED_LOUD`` in a row said loudly (a
critical log line and one Sentry event per streak); failing open starts and
ends with a security event. Nothing here waits or talks to Redis.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Literal

from .._gcra import Decision, MemoryStore, Rate
from ..dependency import Dependency, Site
from ..observe import logger, report_to_sentry, security_event
from ._stats import ERRORS, Counts

__all__ = ["ERROR_LOG_INTERVAL", "UNEXPECTED_LOUD", "US", "Clock", "Decider", "Fallback"]

Fallback = Literal["memory", "deny", "allow"]
Clock = Callable[[], float]

#: Microseconds per second: the unit of the memory store and of the script.
US = 1_000_000
ERROR_LOG_INTERVAL = 60.0
#: Unexpected errors in a row (no success between) after which the limiter says loudly
#: that it is not using Redis (a critical log line and one Sentry event per streak).
UNEXPECTED_LOUD = 20


@functools.lru_cache(maxsize=512)
def _per_pod(rate: Rate, pods: int) -> Rate:
    return rate.per_pod(pods)


_new = tuple.__new__  # builds a Decision without its Python-level __new__


class Decider:
    """The limiter's answers without a round trip, and its signals.

    A base of :class:`~degrade.ratelimit.RateLimiter`; the attributes below
    are set by its ``__init__``.
    """

    dependency: Dependency | None
    on_outage: Fallback
    pods: int
    warm: bool
    store: MemoryStore
    site: Site | None
    _counts: Counts
    _clock: Clock
    _failing_open: bool
    _last_error_log: float
    _unexpected_streak: int

    def _memory(self, key: str, rate: Rate, cost: int) -> Decision:
        m = rate if self.pods == 1 else _per_pod(rate, self.pods)
        now = int(self._clock() * US)
        allowed, remaining, reset, retry = self.store.hit(key, now, m.emission_us, m.capacity_us, cost)
        return _new(Decision, (allowed, m.limit, remaining, reset / US, retry / US, "memory", ()))

    def _fallback(self, key: str, rate: Rate, cost: int, *, unexpected: bool = False) -> Decision:
        self._counts.fallback += 1
        if self.site is not None:
            self.site.count()
        policy = self.on_outage
        if policy == "memory" or (unexpected and policy == "allow"):
            return self._memory(key, rate, cost)
        if policy == "deny":
            retry = float(self.dependency.retry_after) if self.dependency is not None else 1.0
            return Decision(False, rate.limit, 0, retry, retry, "deny")
        if not self._failing_open:
            self._start_fail_open()
        return Decision(True, rate.limit, rate.limit, 0.0, 0.0, "allow")

    def _shed(self, key: str, rate: Rate, cost: int, reason: str) -> Decision:
        """The answer when local capacity ran out (saturation, not an outage).

        Counted as shed on the site (``degrade_shed_total``), never as a failure
        or a degraded call. Memory answers (the ``"deny"`` policy denies, for 1 s);
        ``"allow"`` does not fail open here: Redis is not down.
        """
        self._counts.shed += 1
        if self.site is not None:
            self.site.shed(reason)
        if self.on_outage == "deny":
            return Decision(False, rate.limit, 0, 1.0, 1.0, "deny")
        return self._memory(key, rate, cost)

    def _from_redis(self, key: str, rate: Rate, now: int, values: list[Any], i: int) -> Decision:
        allowed, remaining, reset, retry = (
            int(values[i]),
            int(values[i + 1]),
            int(values[i + 2]),
            int(values[i + 3]),
        )
        if self.warm:
            # The same fraction of the bucket used, at the per-pod rate.
            m = rate if self.pods == 1 else _per_pod(rate, self.pods)
            self.store.warm(key, now, reset * m.capacity_us // rate.capacity_us)
        self._counts.redis += 1
        return _new(Decision, (allowed == 1, rate.limit, remaining, reset / US, retry / US, "redis", ()))

    def _values(self, reply: Any, n: int) -> list[Any] | None:
        """The 4 * n integers (bytes or str) of the script's reply; None (reported) when it is not that."""
        if isinstance(reply, bytes | str):
            values = reply.split()
            if len(values) == 4 * n:
                return values
        self._report_error(TypeError(f"unexpected reply of {type(reply).__name__}"))
        return None

    # -- signals -------------------------------------------------------------

    def _report_error(self, exc: BaseException) -> None:
        self._counts.errors += 1
        if self.site is not None:
            self.site.unexpected_errors += 1
        self._unexpected_streak += 1
        name = type(exc).__name__
        if self._unexpected_streak == UNEXPECTED_LOUD:
            # Not one bug in a thousand decisions: the limiter is not using Redis at all.
            logger.critical(
                "ratelimit.not_using_redis",
                error=name,
                consecutive=self._unexpected_streak,
                detail="every decision hits an unexpected error on the redis path and is answered "
                "from memory; check the redis-py version (degrade.compat.fallback) and the key",
            )
            report_to_sentry(
                "degrade: rate limiter is not using Redis",
                level="error",
                tags={"degrade.component": "ratelimit", "degrade.error": name},
                fingerprint=["degrade", "ratelimit", "not_using_redis"],
                extras={"consecutive": self._unexpected_streak},
            )
        if ERRORS is not None:
            ERRORS.labels(error=name).inc()
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.error(
                "ratelimit.error",
                error=name,
                fallback="deny" if self.on_outage == "deny" else "memory",
                detail="unexpected error on the redis path; not an outage, the limiter stays closed",
            )

    def _start_fail_open(self) -> None:
        self._failing_open = True
        name = self.dependency.name if self.dependency is not None else "redis"
        security_event(
            "ratelimit.fail_open",
            kind="fail_open",
            dependency=name,
            transition="open",
            message=f"degrade: rate limiter failing open ({name} is down)",
            fingerprint=["degrade", "ratelimit", "fail_open", name, "open"],
            detail="redis is down: requests pass the rate limiter unchecked",
        )

    def _end_fail_open(self) -> None:
        self._failing_open = False
        name = self.dependency.name if self.dependency is not None else "redis"
        security_event(
            "ratelimit.fail_open_ended",
            kind="fail_open",
            dependency=name,
            transition="closed",
            message=f"degrade: rate limiter enforcing again ({name} recovered)",
            fingerprint=["degrade", "ratelimit", "fail_open", name, "closed"],
            sentry_level="info",
            detail="redis is back: the rate limiter enforces limits again",
        )
