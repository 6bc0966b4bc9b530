"""RateLimiter: GCRA in Redis, one round trip per decision, auto-pipelined, with an outage policy.

This module is the facade: the arguments, ``hit()``, the storage key of a
decision, the site it declares on the dependency, and ``aclose()``. The
pieces, each a base class of :class:`RateLimiter` over the same state (set
in ``__init__`` here, declared at the top of each base):

* :mod:`degrade.ratelimit._pipeline`: asking Redis (the direct call, batches,
  hard deadlines, cutting short when Redis goes down);
* :mod:`degrade.ratelimit._wire`: the GCRA script and one ``EVALSHA`` round
  trip on a kept connection, and what its errors mean;
* :mod:`degrade.ratelimit._decisions`: the answers without Redis (memory, the
  outage policy, shed) and the signals (errors, fail-open events);
* :mod:`degrade.ratelimit._groups`: several limits of one request, all or nothing;
* :mod:`degrade.ratelimit._keys`: storage keys and ``reset()``;
* :mod:`degrade.ratelimit._stats`: the counters, ``stats()`` and its frozen
  :class:`LimiterStats`, the Prometheus and OpenTelemetry exports.

Base classes rather than helper objects: the hot path stays one method call
on the limiter, with the same attribute reads as when it was one module.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

from .. import _compat as compat
from .. import _validate
from .._compat import redis as compat_redis
from .._gcra import Decision, MemoryStore, Rate, Rates, parse_rates
from ..dependency import Dependency, Site
from ..exceptions import ConfigurationError
from ..observe import logger
from ._decisions import ERROR_LOG_INTERVAL, Clock, Fallback
from ._keys import MAX_KEY_LENGTH, Resets
from ._keys import hashed as _hashed
from ._pipeline import Pipeline
from ._stats import Counts, LimiterStats, StatsView, track
from ._wire import LUA_GCRA, MAX_CACHED_RATES, Call, Group, Pending

__all__ = ["MAX_KEY_LENGTH", "Fallback", "LimiterStats", "RateLimiter"]

_FALLBACKS = ("memory", "deny", "allow")
_ONE = 1

#: Parsed rates by their text (and each Rate by itself): one dict lookup on the hot path.
_RATES: dict[object, Rate] = {}
#: Parsed strings of several limits (off the single-limit hot path).
_GROUPS: dict[object, Rates] = {}


def _rate_slow(rate: object) -> Rate | Rates:
    try:
        return _GROUPS[rate]
    except (KeyError, TypeError):
        pass
    r = parse_rates(rate)  # type: ignore[arg-type]  # parse_rates re-checks the type
    cache: dict[object, Any] = _RATES if type(r) is Rate else _GROUPS
    if len(cache) < MAX_CACHED_RATES:
        cache[rate] = r
    return r


def _outage_policy(on_outage: Fallback, fallback: Fallback | None) -> Fallback:
    if fallback is not None:
        warnings.warn(
            "RateLimiter(fallback=...) is deprecated; use on_outage=... (the same values)",
            DeprecationWarning,
            stacklevel=3,
        )
        if on_outage not in ("memory", fallback):
            raise ConfigurationError("pass on_outage= only (fallback= is its deprecated name)")
        on_outage = fallback
    if on_outage not in _FALLBACKS:
        raise ConfigurationError(
            f"on_outage must be 'memory', 'deny' or 'allow' (fail-open); got {on_outage!r}"
        )
    return on_outage


def _check_client(redis: Any) -> None:
    if isinstance(redis, str | bytes):
        raise ConfigurationError(
            "redis takes a client, not a URL: RateLimiter(degrade.redis.client(url), dependency=...)"
        )
    if redis is not None and not callable(getattr(redis, "register_script", None)):
        raise ConfigurationError(
            "redis must be a redis.asyncio client, e.g. degrade.redis.client(url); "
            f"got {type(redis).__name__}"
        )


class RateLimiter(Pipeline, Resets):
    """GCRA rate limiting shared through Redis, with a written-down outage policy.

    ``decision = await limiter.hit(key, "100/minute")`` (or several limits that
    must all allow: ``"5/minute;100/hour"``). Each decision is one
    atomic Lua step in Redis; decisions issued in the same event-loop tick go
    out together as one ``EVALSHA`` (auto-pipelining), so under concurrency
    the limiter costs less than one round trip per decision.

    Failure mode: FAIL-SOFT by default. While Redis is known down the request
    path makes no Redis call; a call that fails or takes longer than
    ``timeout`` feeds the dependency and is answered by the outage policy:

    * ``on_outage="memory"`` (default): an in-process GCRA with the rate divided
      by ``pods``, so N pods together stay near the global limit;
    * ``on_outage="deny"``: every decision is refused (``source="deny"``; the
      middleware answers 503 with ``Retry-After``);
    * ``on_outage="allow"``: FAIL-OPEN, every request passes. Choose it only on
      purpose: it logs a warning at construction and a security-tagged event
      (log + Sentry tag ``degrade.security=fail_open``) when failing open
      starts and ends.

    An unexpected error (a bug, a wrong key type in Redis) is not an outage and
    never opens the limiter: it is counted, logged at most once a minute, and
    the decision comes from memory (``"deny"`` policy: denied).

    Saturation is not an outage either: a decision that finds ``max_pending``
    decisions waiting, no free connection in the client's pool, or Redis's
    answer unread because the event loop was late is *shed*
    (``site.shed(reason)``, ``stats().shed``), answered from memory (``"deny"``:
    denied) and never fed to the dependency. When the dependency goes down
    (whoever noticed), decisions waiting on Redis are answered by the outage
    policy at once (``stats().cut_short``) instead of at their ``timeout``.

    Args:
        redis: A ``redis.asyncio.Redis`` (``degrade.redis.client(...)``, a
            Sentinel ``master_for`` client, ...); None for a memory-only limiter.
        dependency: The Redis :class:`~degrade.Dependency` (required with ``redis``).
        on_outage: The outage policy: ``"memory"``, ``"deny"`` or ``"allow"``.
        pods: How many processes share the limit; memory decisions use rate / pods.
        prefix: Prefix of every Redis key.
        timeout: Seconds a decision waits for Redis before the outage policy answers.
        max_keys: Bound of the in-memory store (least recently used evicted, counted).
        max_batch: Most decisions per ``EVALSHA``.
        max_in_flight: Most ``EVALSHA`` calls in flight; later decisions wait and batch up.
        max_pending: Most decisions waiting for Redis; beyond it decisions are shed (counted).
        warm: Mirror Redis decisions into the memory store, so a failover does not
            hand every client a fresh bucket.
        clock: Wall-clock seconds (shared by pods through Redis), injectable for tests.
        name: Its name, for :func:`rate_limit` declared before the limiter exists
            (``rate_limit("auth", "5/minute")`` finds the managed limiter of that name).
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        dependency: Dependency | None = None,
        on_outage: Fallback = "memory",
        pods: int = 1,
        prefix: str = "degrade:rl:",
        timeout: float = 0.25,
        max_keys: int = 100_000,
        max_batch: int = 128,
        max_in_flight: int = 16,
        max_pending: int = 10_000,
        warm: bool = True,
        clock: Clock = time.time,
        fallback: Fallback | None = None,
        name: str | None = None,
    ) -> None:
        on_outage = _outage_policy(on_outage, fallback)
        _check_client(redis)
        if redis is not None and not isinstance(dependency, Dependency):
            raise ConfigurationError(
                "a RateLimiter with redis needs dependency=registry.dependency('redis', ...): "
                "its state decides when the outage policy answers"
            )
        if dependency is not None and not isinstance(dependency, Dependency):
            raise ConfigurationError(f"dependency must be a degrade Dependency; got {dependency!r}")
        for label, value in (
            ("pods", pods),
            ("max_batch", max_batch),
            ("max_in_flight", max_in_flight),
            ("max_pending", max_pending),
        ):
            _validate.count(label, value)
        timeout = _validate.seconds("timeout", timeout)
        if not isinstance(prefix, str):
            raise ConfigurationError(f"prefix must be a string; got {prefix!r}")
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(f"name must be a string or None; got {name!r}")
        #: Its name for late binding (``rate_limit("auth", ...)``), or None.
        self.name = name
        self.redis = redis
        self.dependency = dependency
        #: The outage policy: ``"memory"``, ``"deny"`` or ``"allow"``.
        self.on_outage: Fallback = on_outage
        self.pods = pods
        self.prefix = prefix
        self.timeout = timeout
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.warm = warm
        self._counts = Counts()
        self._stats = StatsView(self._counts)
        self.store = MemoryStore(max_keys)
        self._clock = clock
        self._pending: list[Pending] = []
        self._flush_scheduled = False
        #: Direct calls (made from the caller's own task) and batches in flight.
        self._direct: set[Call] = set()
        self._in_flight: dict[asyncio.Task[None], Call] = {}
        self._failing_open = False
        self._last_error_log = -ERROR_LOG_INTERVAL
        self._unexpected_streak = 0
        self._sha = ""
        self._sha_bulk = b""
        self._idle: list[Any] = []
        self._unsubscribe: Callable[[], None] | None = None
        compat.report("redis", compat_redis.problems())
        track(self)
        # The lean path needs a plain pooled client (not single_connection_client).
        self._pool: Any = None
        if redis is not None and getattr(redis, "connection", None) is None:
            pool = getattr(redis, "connection_pool", None)
            if pool is not None and hasattr(pool, "get_connection") and hasattr(pool, "release"):
                self._pool = pool
        self.site: Site | None = None
        if redis is not None and dependency is not None:
            # register_script computes the SHA with the client's own encoder
            self._set_sha(redis.register_script(LUA_GCRA).sha)
            self.site = self._register_site(dependency)
            # Redis going down (noticed by any call site or the probe) answers
            # every decision in flight at once (held weakly: no cycle through the dependency).
            self._unsubscribe = dependency.subscribe(self._on_transition)
            if on_outage == "allow":
                logger.warning(
                    "ratelimit.fail_open_configured",
                    dependency=dependency.name,
                    security="fail_open",
                    detail="while redis is down every request passes the rate limiter",
                )

    @property
    def distributed(self) -> bool:
        """True when decisions are shared through Redis (False: memory only)."""
        return self.redis is not None

    @property
    def stats(self) -> StatsView:
        """The counters: ``limiter.stats()`` is a frozen :class:`LimiterStats` snapshot.

        (Before 0.2.0 ``limiter.stats`` was the live counters. Reading or setting
        one off it, ``limiter.stats.redis``, still works for one minor version
        with a ``DeprecationWarning``.)
        """
        return self._stats

    def _register_site(self, dep: Dependency) -> Site:
        mode: Literal["fail_soft", "fail_loud"]
        if self.on_outage == "deny":
            mode, reason, described = (
                "fail_loud",
                "rate-limited requests are refused (503) while Redis is down",
                None,
            )
        elif self.on_outage == "allow":
            mode, reason, described = (
                "fail_soft",
                "FAIL-OPEN: requests are not rate limited while Redis is down (security event logged)",
                "allow every request",
            )
        else:
            per = "" if self.pods == 1 else f" / {self.pods} pods"
            mode, reason, described = (
                "fail_soft",
                f"rate limits are enforced per process (rate{per}) while Redis is down",
                f"in-memory GCRA (rate{per})",
            )
        return dep.add_site(f"degrade.ratelimit.RateLimiter[{self.prefix}]", mode, reason, fallback=described)

    # -- the request path ----------------------------------------------------

    async def hit(self, key: str, rate: str | Rate | Rates, *, cost: int = 1) -> Decision:
        """Count one request of ``key`` against ``rate`` and decide.

        Args:
            key: Who is limited (an IP, a user id, a user name from the request
                body); keys longer than 128 characters are hashed.
            rate: ``"100/minute"``, ``"5 per minute;burst=2"`` (the grammar of
                :mod:`degrade._rates`, ``limits``' own plus ``;burst=B``), several
                limits that must all allow (``"5/minute;100/hour"``), a :class:`Rate`
                or :class:`Rates`.
            cost: Requests this hit counts for.

        Returns:
            A :class:`Decision`; never raises on a Redis failure (see the class
            docstring). For several limits its fields are the most restrictive
            limit's, ``per_limit`` holds each, and none is consumed unless all allow.

        Raises:
            ValueError: an invalid rate or cost (a bug in the caller, not an outage).
        """
        try:
            r = _RATES[rate]
        except (KeyError, TypeError):
            found = _rate_slow(rate)
            if isinstance(found, Rates):
                return await self._hit_group(key, found, cost)
            r = found
        if cost is not _ONE:  # the int 1 is one object: True, 1.0 or any other cost is checked
            cost = _validate.count("cost", cost)
        if len(key) > MAX_KEY_LENGTH:
            key = _hashed(key)
        k = f"{self.prefix}{r.text}:{key}"
        # (the steps below are _decide_locally and _decide_remotely, inlined: the hot path)
        dep = self.dependency
        if dep is None or self.redis is None:
            return self._memory(k, r, cost)
        if dep.is_down and not dep.admit():
            return self._fallback(k, r, cost)
        return await self._decide_remotely(k, r, cost)

    async def _hit_group(self, key: str, rates: Rates, cost: int) -> Decision:
        if cost is not _ONE:
            cost = _validate.count("cost", cost)
        if len(key) > MAX_KEY_LENGTH:
            key = _hashed(key)
        prefix = self.prefix
        return await self._decide_group(Group(tuple(f"{prefix}{r.text}:{key}" for r in rates), rates), cost)

    async def _decide_group(self, group: Group, cost: int = 1) -> Decision:
        """Several limits of one request: all must allow, none is consumed unless all do."""
        dep = self.dependency
        if dep is None or self.redis is None:
            return self._memory_group(group, cost)
        if dep.is_down and not dep.admit():
            return self._fallback_group(group, cost)
        return await self._decide_remotely(group.buckets[0], group, cost)

    def _bucket(self, key: str, rate: Rate) -> str:
        """The storage key of ``key`` under ``rate`` (bounded in length)."""
        if len(key) > MAX_KEY_LENGTH:
            key = _hashed(key)
        return f"{self.prefix}{rate.text}:{key}"

    def _decide_locally(self, bucket: str, rate: Rate, cost: int = 1) -> Decision | None:
        """The decision when no Redis call is needed (memory only, or Redis known down), else None."""
        dep = self.dependency
        if dep is None or self.redis is None:
            return self._memory(bucket, rate, cost)
        if dep.is_down and not dep.admit():
            return self._fallback(bucket, rate, cost)
        return None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Nothing to start; present so ``registry.manage(limiter)`` works."""

    async def aclose(self) -> None:
        """Stop: answer waiting decisions, cancel calls in flight, return pooled connections.

        Waiting decisions are answered by the outage policy. Does not close the
        Redis client: the host owns it (close the limiter first).
        """
        pending, self._pending = self._pending, []
        self._resolve_fallback(pending)
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._release(conn)

    @property
    def fallback(self) -> Fallback:
        """Deprecated: :attr:`on_outage`."""
        warnings.warn("RateLimiter.fallback is deprecated; use .on_outage", DeprecationWarning, stacklevel=2)
        return self.on_outage

    def __repr__(self) -> str:
        backend = "redis" if self.redis is not None else "memory"
        return f"<RateLimiter {backend} on_outage={self.on_outage} pods={self.pods}>"
