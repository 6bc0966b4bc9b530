"""RateLimiter: GCRA in Redis, one round trip per decision, auto-pipelined, with an outage policy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, MaxConnectionsError, NoScriptError, ReadOnlyError, RedisError

from .. import _compat as compat
from .._classify import is_dependency_error
from .._compat import redis as compat_redis
from .._extras import optional
from .._gcra import Decision, MemoryStore, Rate, parse_rate
from ..dependency import Dependency, Site
from ..exceptions import ConfigurationError
from ..observe import logger, otel_observable, report_to_sentry, security_event

__all__ = ["Fallback", "LimiterStats", "RateLimiter"]

Fallback = Literal["memory", "deny", "allow"]
Clock = Callable[[], float]

#: Longest key kept as given; longer keys are replaced by a hash (bounded Redis and memory keys).
MAX_KEY_LENGTH = 128

#: The GCRA step for a batch of keys: the same integer arithmetic as ``MemoryStore.hit``.
#: ARGV[1] is ``now`` in microseconds, injected by the caller (not Redis ``TIME``) so the
#: memory and Redis paths are one testable function of (hits, clock); pods' clocks must
#: be NTP-synchronised, and a pod whose clock lags only sees the limit as stricter.
#: Then one argument per key: "emission capacity increment" (microseconds: the interval,
#: interval * burst, interval * cost), the same text for every hit of one rate and cost.
#: Values stay below 2**53, so Lua's doubles are exact. Returns one string of four
#: integers per key, space-separated: allowed (0/1), remaining, reset_after_us,
#: retry_after_us (one bulk string parses far faster in redis-py than 4 integers a key).
LUA_GCRA = """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local e, c, inc = string.match(ARGV[i + 1], '^(%d+) (%d+) (%d+)$')
  local emission, capacity, increment = tonumber(e), tonumber(c), tonumber(inc)
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then
    tat = now
  end
  local new_tat = tat + increment
  local allow_at = new_tat - capacity
  if allow_at <= now then
    local ahead = new_tat - now
    redis.call('SET', KEYS[i], string.format('%d', new_tat),
               'PX', string.format('%d', math.ceil(ahead / 1000)))
    out[i] = string.format('1 %d %d 0', math.floor((capacity - ahead) / emission), ahead)
  else
    local remaining = math.floor((capacity - (tat - now)) / emission)
    if remaining < 0 then
      remaining = 0
    end
    out[i] = string.format('0 %d %d %d', remaining, tat - now, allow_at - now)
  end
end
return table.concat(out, ' ')
"""

_US = 1_000_000
_FALLBACKS = ("memory", "deny", "allow")
_ERROR_LOG_INTERVAL = 60.0
#: Unexpected errors in a row (no success between) after which the limiter says loudly
#: that it is not using Redis (a critical log line and one Sentry event per streak).
UNEXPECTED_LOUD = 20

#: Passed to redis-py's read_response: no second timer per read, since every call
#: of the limiter already runs under its own bound (asyncio.timeout or the batch timer).
_NO_READ_TIMEOUT = math.inf
#: Connections of the client's pool the limiter keeps between calls (the rest go back).
_KEEP_CONNECTIONS = 2

Pending = tuple[str, Rate, int, "asyncio.Future[Decision]"]

#: ``Site.shed`` reasons: local capacity ran out (saturation, never a failure of Redis).
SHED_MAX_PENDING = "max-pending"
SHED_POOL = "pool-saturated"
SHED_LOOP_LAG = "loop-lag"
#: redis-py's BlockingConnectionPool, when no connection was free within its timeout.
_NO_CONNECTION = "No connection available."


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    prometheus: Any = optional("prometheus_client")
    if prometheus is None:
        return None
    return prometheus.Counter(name, doc, list(labels))


_OVERFLOW = _counter(
    "degrade_ratelimit_overflow_total",
    "Rate-limit decisions shed (answered from memory, not a failure) because too many waited for Redis.",
)
_ERRORS = _counter(
    "degrade_ratelimit_errors_total",
    "Unexpected (non-outage) errors of the Redis rate limiter, by exception class.",
    ("error",),
)


def _is_outage(exc: BaseException) -> bool:
    # A replica that refuses writes (a failover in progress) is an outage of the master.
    return is_dependency_error(exc) or isinstance(exc, ReadOnlyError | MasterDownError)


@functools.lru_cache(maxsize=512)
def _per_pod(rate: Rate, pods: int) -> Rate:
    return rate.per_pod(pods)


#: Parsed rates by their text (and each Rate by itself): one dict lookup on the hot path.
_RATES: dict[object, Rate] = {}
_MAX_CACHED_RATES = 1024
_new = tuple.__new__  # builds a Decision without its Python-level __new__


def _hashed(key: str) -> str:
    return "h:" + hashlib.blake2b(key.encode("utf-8", "backslashreplace"), digest_size=16).hexdigest()


def _rate_slow(rate: object) -> Rate:
    r = parse_rate(rate)  # type: ignore[arg-type]  # parse_rate re-checks the type
    if len(_RATES) < _MAX_CACHED_RATES:
        _RATES[rate] = r
    return r


#: The script argument of each (rate, cost): its text and its RESP bulk string, built once.
_RATE_ARGS: dict[tuple[Rate, int], tuple[str, bytes]] = {}


def _rate_arg(rate: Rate, cost: int) -> tuple[str, bytes]:
    try:
        return _RATE_ARGS[rate, cost]
    except KeyError:
        pass
    text = f"{rate.emission_us} {rate.capacity_us} {rate.emission_us * cost}"
    data = text.encode()
    arg = (text, b"$%d\r\n%s\r\n" % (len(data), data))
    if len(_RATE_ARGS) < _MAX_CACHED_RATES:
        _RATE_ARGS[rate, cost] = arg
    return arg


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _no_connection(exc: BaseException) -> bool:
    """The client's own pool had no free connection in time (local capacity, not an outage)."""
    if isinstance(exc, MaxConnectionsError):
        return True
    # BlockingConnectionPool: ConnectionError("No connection available.") from its wait's
    # timeout. (The message matters: a connect that times out on the network, ETIMEDOUT,
    # is a ConnectionError from a TimeoutError too, and that is Redis's failure.)
    return (
        isinstance(exc, RedisConnectionError)
        and isinstance(exc.__cause__, TimeoutError)
        and str(exc) == _NO_CONNECTION
    )


def _health_check_due(conn: Any) -> bool:
    """Would redis-py PING this connection before its next command (its health_check_interval)?"""
    interval = getattr(conn, "health_check_interval", 0)
    return bool(interval) and asyncio.get_running_loop().time() > getattr(conn, "next_health_check", 0)


def _has_reply(conn: Any) -> bool:
    """Has Redis's answer reached this connection's buffer (unread because the loop was busy)?"""
    return compat_redis.reply_buffered(conn)


class _Call:
    """One round trip in flight: its waiters and how far it got."""

    __slots__ = (
        "batch",
        "bulks",
        "conn",
        "cut",
        "expired",
        "keys",
        "now",
        "phase",
        "replied",
        "task",
        "texts",
        "timeout",
        "timer",
        "written",
    )

    def __init__(self, batch: list[Pending] | None) -> None:
        #: The decisions waiting on it (None: a direct call, its caller awaits it).
        self.batch = batch
        #: "pool" while waiting for a connection of a saturated pool, then "wire".
        self.phase = "wire"
        self.conn: Any = None
        #: Ended early: the dependency went down while it was out.
        self.cut = False
        #: Why the batch timer answered its waiters ("timeout", or a shed reason); "" if it did not.
        self.expired = ""
        #: Redis's answer had arrived when the call was cut off (the loop was late, not Redis).
        self.replied = False
        self.task: asyncio.Task[Any] | None = None
        self.timeout: asyncio.Timeout | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: The command was written from the flush callback, on ``conn``: only the reply is awaited.
        self.written = False
        self.now = 0
        self.keys: list[str] = []
        self.texts: list[str] = []
        self.bulks: list[bytes] = []


class LimiterStats:
    """Counters of one limiter (plain ints, cheap to read in tests and health output)."""

    __slots__ = ("batches", "cut_short", "errors", "fallback", "noscript", "overflow", "redis", "shed")

    def __init__(self) -> None:
        #: Decisions answered by Redis.
        self.redis = 0
        #: EVALSHA round trips (each carries one or more decisions).
        self.batches = 0
        #: Decisions answered by the outage policy (Redis down, failing or too slow).
        self.fallback = 0
        #: Decisions that did not wait for Redis because too many were already waiting.
        self.overflow = 0
        #: Decisions answered without Redis for lack of *local* capacity (``max_pending``
        #: overflow, the client's pool exhausted, an event loop too late to read a reply
        #: that had arrived): saturation, never counted as a failure of Redis.
        self.shed = 0
        #: Decisions in flight answered by the outage policy the moment Redis went down.
        self.cut_short = 0
        #: Unexpected errors (not outages) on the Redis path.
        self.errors = 0
        #: Scripts reloaded after NOSCRIPT (a Redis restart, failover or SCRIPT FLUSH).
        self.noscript = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"LimiterStats({fields})"


#: Live limiters, read by the OpenTelemetry instrument at collection (never per decision).
_LIVE: weakref.WeakSet[RateLimiter] = weakref.WeakSet()
_OTEL_REGISTERED = False


def _otel_decisions() -> Iterable[tuple[float, Mapping[str, str]]]:
    totals: dict[tuple[str, str], float] = {}
    for limiter in list(_LIVE):
        stats = limiter.stats
        for source, value in (("redis", stats.redis), ("fallback", stats.fallback), ("shed", stats.shed)):
            key = (limiter.prefix, source)
            totals[key] = totals.get(key, 0.0) + value
    prefix_, source_ = "degrade.ratelimit.prefix", "degrade.ratelimit.source"
    return [(v, {prefix_: p, source_: src}) for (p, src), v in totals.items()]


def _track(limiter: RateLimiter) -> None:
    global _OTEL_REGISTERED  # noqa: PLW0603 - registered once per process, at the first limiter
    _LIVE.add(limiter)
    if not _OTEL_REGISTERED:
        _OTEL_REGISTERED = True
        otel_observable(
            "degrade.ratelimit.decisions",
            "Rate-limit decisions by where they were made: redis, fallback (outage policy), shed.",
            _otel_decisions,
            unit="{decision}",
        )


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


class RateLimiter:
    """GCRA rate limiting shared through Redis, with a written-down outage policy.

    ``decision = await limiter.hit(key, "100/minute")``. Each decision is one
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
    (``site.shed(reason)``, ``stats.shed``), answered from memory (``"deny"``:
    denied) and never fed to the dependency. When the dependency goes down
    (whoever noticed), decisions waiting on Redis are answered by the outage
    policy at once (``stats.cut_short``) instead of at their ``timeout``.

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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{label} must be a whole number >= 1; got {value!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds; got {timeout!r}")
        if not isinstance(prefix, str):
            raise ConfigurationError(f"prefix must be a string; got {prefix!r}")
        self.redis = redis
        self.dependency = dependency
        #: The outage policy: ``"memory"``, ``"deny"`` or ``"allow"``.
        self.on_outage: Fallback = on_outage
        self.pods = pods
        self.prefix = prefix
        self.timeout = float(timeout)
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.warm = warm
        self.stats = LimiterStats()
        self.store = MemoryStore(max_keys)
        self._clock = clock
        self._pending: list[Pending] = []
        self._flush_scheduled = False
        #: Direct calls (made from the caller's own task) and batches in flight.
        self._direct: set[_Call] = set()
        self._in_flight: dict[asyncio.Task[None], _Call] = {}
        self._failing_open = False
        self._last_error_log = -_ERROR_LOG_INTERVAL
        self._unexpected_streak = 0
        self._sha = ""
        self._sha_bulk = b""
        self._idle: list[Any] = []
        self._unsubscribe: Callable[[], None] | None = None
        compat.report("redis", compat_redis.problems())
        _track(self)
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

    async def hit(self, key: str, rate: str | Rate, *, cost: int = 1) -> Decision:
        """Count one request of ``key`` against ``rate`` and decide.

        Args:
            key: Who is limited (an IP, a user id); keys longer than 128
                characters are hashed.
            rate: ``"N/second|minute|hour|day"`` with optional ``";burst=B"``, or a :class:`Rate`.
            cost: Requests this hit counts for.

        Returns:
            A :class:`Decision`; never raises on a Redis failure (see the class docstring).

        Raises:
            ValueError: an invalid rate or cost (a bug in the caller, not an outage).
        """
        try:
            r = _RATES[rate]
        except (KeyError, TypeError):
            r = _rate_slow(rate)
        if cost != 1 and (isinstance(cost, bool) or not isinstance(cost, int) or cost < 1):
            raise ConfigurationError(f"cost must be a whole number >= 1; got {cost!r}")
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

    async def _decide_remotely(self, bucket: str, rate: Rate, cost: int = 1) -> Decision:
        """Ask Redis: at once when idle, else batched with the other decisions of this tick."""
        dep = self.dependency
        if dep is None:  # pragma: no cover - callers check _decide_locally first
            return self._memory(bucket, rate, cost)
        if not self._direct and not self._in_flight and not self._pending:
            # Idle: go now, from the caller's own task (no extra loop iterations).
            # Hits arriving while this call is out batch up behind it.
            return await self._call_direct(bucket, rate, cost, dep)
        if len(self._pending) >= self.max_pending:
            # Local capacity ran out, Redis did not fail: shed, never a failure.
            self.stats.overflow += 1
            if _OVERFLOW is not None:
                _OVERFLOW.inc()
            return self._shed(bucket, rate, cost, SHED_MAX_PENDING)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((bucket, rate, cost, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _memory(self, key: str, rate: Rate, cost: int) -> Decision:
        m = rate if self.pods == 1 else _per_pod(rate, self.pods)
        now = int(self._clock() * _US)
        allowed, remaining, reset, retry = self.store.hit(key, now, m.emission_us, m.capacity_us, cost)
        return _new(Decision, (allowed, m.limit, remaining, reset / _US, retry / _US, "memory"))

    def _fallback(self, key: str, rate: Rate, cost: int, *, unexpected: bool = False) -> Decision:
        self.stats.fallback += 1
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
        self.stats.shed += 1
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
        self.stats.redis += 1
        return _new(Decision, (allowed == 1, rate.limit, remaining, reset / _US, retry / _US, "redis"))

    def _values(self, reply: Any, n: int) -> list[Any] | None:
        """The 4 * n integers (bytes or str) of the script's reply; None (reported) when it is not that."""
        if isinstance(reply, bytes | str):
            values = reply.split()
            if len(values) == 4 * n:
                return values
        self._report_error(TypeError(f"unexpected reply of {type(reply).__name__}"))
        return None

    def _succeeded(self, dep: Dependency, started: float) -> None:
        self.stats.batches += 1
        self._unexpected_streak = 0
        if dep.failures or dep.counts_calls:  # a rate rule counts every round trip; SlowCalls times it
            dep.record_success(dep.clock() - started if dep.times_calls else None)
        if self._failing_open and not dep.is_down:
            self._end_fail_open()

    def _failed(self, exc: Exception, dep: Dependency) -> bool:
        """Feed the dependency with ``exc``; True when it is unexpected (not an outage)."""
        if _is_outage(exc):
            dep.record_failure(exc)
            return False
        self._report_error(exc)
        return True

    @staticmethod
    def _shed_reason(call: _Call, exc: BaseException | None) -> str:
        """Why a call that got no answer in time is local saturation ("" when it is Redis's failure).

        Our own bound (``TimeoutError``) while waiting for a connection of an
        exhausted pool, or after Redis's answer had already arrived (the loop
        was too busy to read it), and the pool's own "no connection" errors,
        are local capacity: Redis never failed.
        """
        if exc is None or (isinstance(exc, TimeoutError) and not isinstance(exc, RedisError)):
            if call.phase == "pool":
                return SHED_POOL
            if call.replied or (call.conn is not None and _has_reply(call.conn)):
                return SHED_LOOP_LAG
            return ""
        if _no_connection(exc):
            return SHED_POOL
        return ""

    async def _call_direct(self, key: str, rate: Rate, cost: int, dep: Dependency) -> Decision:
        call = _Call(None)
        self._direct.add(call)
        now = int(self._clock() * _US)
        text, bulk = _rate_arg(rate, cost)
        started = dep.clock() if dep.times_calls else 0.0
        try:
            # redis-py unwinds a cancelled call at once (it drops the connection
            # without waiting), so asyncio.timeout is a hard enough bound here.
            # The dependency going down meanwhile moves its deadline to now.
            async with asyncio.timeout(self.timeout) as call.timeout:
                reply = await self._eval(call, [key], now, [text], [bulk])
        except Exception as exc:
            if call.cut:  # Redis went down meanwhile: the outage is already counted
                self.stats.cut_short += 1
                return self._fallback(key, rate, cost)
            reason = self._shed_reason(call, exc)
            if reason:
                return self._shed(key, rate, cost, reason)
            unexpected = self._failed(exc, dep)
            return self._fallback(key, rate, cost, unexpected=unexpected)
        finally:
            self._direct.discard(call)
            if self._pending and not self._flush_scheduled:  # decisions waited for this slot
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        self._succeeded(dep, started)
        values = self._values(reply, 1)
        if values is None:
            return self._fallback(key, rate, cost, unexpected=True)
        return self._from_redis(key, rate, now, values, 0)

    # -- batching ------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        dep = self.dependency
        if dep is not None and dep.is_down and not dep.admit():
            # Went down while these waited: no call, the outage policy answers.
            pending, self._pending = self._pending, []
            self._resolve_fallback(pending)
            return
        loop = asyncio.get_running_loop()
        while self._pending and len(self._in_flight) + len(self._direct) < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            call = _Call(batch)
            self._arguments(call, batch)
            self._write_now(call)
            task = call.task = loop.create_task(self._send(call))
            self._in_flight[task] = call
            task.add_done_callback(self._sent)
            # A hard bound: at the deadline the waiters get the outage policy's answer
            # at once, whatever the driver does while it unwinds the cancelled call.
            call.timer = loop.call_later(self.timeout, self._expire, call)
        # The rest waits for a free slot (_sent flushes again), batching up meanwhile.

    def _arguments(self, call: _Call, batch: list[Pending]) -> None:
        call.now = int(self._clock() * _US)
        keys, texts, bulks = call.keys, call.texts, call.bulks
        for key, rate, cost, _ in batch:
            keys.append(key)
            text, bulk = _rate_arg(rate, cost)
            texts.append(text)
            bulks.append(bulk)

    def _write_now(self, call: _Call) -> None:
        """Write the batch from the flush callback when a kept connection can take it at once.

        The ``_send`` task then only awaits the reply: one event-loop iteration
        less per round trip, and on a busy loop an iteration is milliseconds.
        """
        if not self._idle:
            return
        conn = self._idle[-1]
        writer = compat_redis.writer(conn)
        if (
            writer is None
            or not conn.is_connected
            or writer.transport.is_closing()
            or _health_check_due(conn)
        ):
            return  # _send takes the usual way (connect, or PING first)
        self._idle.pop()
        writer.write(self._pack(conn, call.keys, call.now, call.bulks))
        call.conn = conn
        call.written = True

    def _sent(self, task: asyncio.Task[None]) -> None:
        call = self._in_flight.pop(task, None)
        if call is not None and call.timer is not None:
            call.timer.cancel()
        if call is not None and call.written and call.conn is not None:
            # Cancelled before it ran: the connection holds a command whose reply nobody reads.
            conn, call.conn = call.conn, None
            task.get_loop().create_task(self._discard(conn))
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            task.get_loop().call_soon(self._flush)

    async def _discard(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a connection we discard anyway
            await conn.disconnect(nowait=True)
        await self._release(conn)

    async def _send(self, call: _Call) -> None:
        dep = self.dependency
        batch = call.batch
        if dep is None or batch is None:  # pragma: no cover - hit() only batches when a dependency is set
            self._resolve_fallback(batch or [])
            return
        now = call.now
        started = dep.clock() if dep.times_calls else 0.0
        try:
            reply = await self._eval(call, call.keys, now, call.texts, call.bulks)
        except asyncio.CancelledError:
            self._resolve_fallback(batch)
            raise
        except Exception as exc:
            if call.cut or call.expired:  # the waiters were answered and it was counted then
                return
            reason = self._shed_reason(call, exc)
            if reason:
                self._resolve_shed(batch, reason)
            else:
                self._resolve_fallback(batch, unexpected=self._failed(exc, dep))
            return
        finally:
            if call.timer is not None:
                call.timer.cancel()
        self._succeeded(dep, started)
        values = self._values(reply, len(batch))
        if values is None:
            self._resolve_fallback(batch, unexpected=True)
            return
        i = 0
        for key, rate, _cost, future in batch:
            decision = self._from_redis(key, rate, now, values, i)
            i += 4
            if not future.done():
                future.set_result(decision)

    async def _eval(
        self, call: _Call, keys: list[str], now: int, texts: list[str], bulks: list[bytes]
    ) -> Any:
        pool = self._pool
        if pool is None:
            return await self._eval_generic(keys, now, texts)
        # The lean path: a connection of the client's own pool, kept between
        # calls, one packed EVALSHA, one reply. It skips redis-py's per-command
        # retry and bookkeeping (the Dependency is the retry policy), which is
        # what lets one decision cost no more than one PING.
        conn = call.conn if call.written else self._idle.pop() if self._idle else None
        if conn is None:
            can_get = getattr(pool, "can_get_connection", None)
            if can_get is not None and not can_get():
                call.phase = "pool"  # every connection is out: a wait here is local saturation
            conn = await compat_redis.get_connection(pool)
            call.phase = "wire"
        call.conn = conn
        try:
            reply = await self._roundtrip(conn, keys, now, texts, bulks, written=call.written)
        except BaseException:
            call.replied = _has_reply(conn)
            # redis-py drops the socket on its own errors; make sure of it for
            # ours (a cancellation between send and read) before pooling it again.
            with contextlib.suppress(Exception):  # a connection we discard anyway
                await conn.disconnect(nowait=True)
            await self._release(conn)
            raise
        finally:
            call.conn = None
        if len(self._idle) < _KEEP_CONNECTIONS:
            self._idle.append(conn)
        else:
            await self._release(conn)
        return reply

    async def _release(self, conn: Any) -> None:
        # A pool that was reset or closed meanwhile no longer knows the connection.
        with contextlib.suppress(KeyError, ValueError):
            await self._pool.release(conn)

    def _set_sha(self, sha: Any) -> None:
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        self._sha_bulk = _bulk(self._sha.encode())

    def _pack(self, conn: Any, keys: list[str], now: int, bulks: list[bytes]) -> bytes:
        """``EVALSHA sha n key... now arg...`` in RESP, built directly (keys in the client's encoding).

        The rate arguments come pre-encoded (one per rate and cost), so a
        decision costs one key to encode instead of four arguments through
        redis-py's generic encoder.
        """
        if not self._sha_bulk:
            self._set_sha(self._sha)
        encoder = conn.encoder
        encoding, errors = encoder.encoding, encoder.encoding_errors
        n = len(keys)
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (4 + 2 * n), self._sha_bulk, _bulk(b"%d" % n)]
        for key in keys:
            data = key.encode(encoding, errors)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        parts.append(_bulk(b"%d" % now))
        parts += bulks
        return b"".join(parts)

    async def _roundtrip(
        self,
        conn: Any,
        keys: list[str],
        now: int,
        texts: list[str],
        bulks: list[bytes],
        *,
        written: bool = False,
    ) -> Any:
        writer = compat_redis.writer(conn)
        if written and writer is not None:  # by _write_now, from the flush callback
            await writer.drain()
        elif writer is not None and conn.is_connected and not _health_check_due(conn):
            # Connected and no health check due: write the command directly.
            # redis-py's send_packed_command wraps this write in asyncio.wait_for
            # when the client has a socket timeout, which costs a task and a
            # loop iteration per call (~2x the round trip on a loaded host);
            # our own bound covers the write instead.
            writer.write(self._pack(conn, keys, now, bulks))
            await writer.drain()
        else:  # connect, or PING first (the client's health_check_interval), as redis-py does
            await conn.send_packed_command(self._pack(conn, keys, now, bulks))
        try:
            return await conn.read_response(timeout=_NO_READ_TIMEOUT)
        except NoScriptError:
            # Redis restarted, failed over or had SCRIPT FLUSH: load it and go again.
            self.stats.noscript += 1
            await conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", LUA_GCRA), check_health=False)
            self._set_sha(await conn.read_response(timeout=_NO_READ_TIMEOUT))
            await conn.send_packed_command(self._pack(conn, keys, now, bulks), check_health=False)
            return await conn.read_response(timeout=_NO_READ_TIMEOUT)

    async def _eval_generic(self, keys: list[str], now: int, texts: list[str]) -> Any:
        redis = self.redis
        try:
            return await redis.execute_command("EVALSHA", self._sha, len(keys), *keys, now, *texts)
        except NoScriptError:
            self.stats.noscript += 1
            self._set_sha(await redis.script_load(LUA_GCRA))
            return await redis.execute_command("EVALSHA", self._sha, len(keys), *keys, now, *texts)

    def _resolve_fallback(self, batch: list[Pending], *, unexpected: bool = False) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                future.set_result(self._fallback(key, rate, cost, unexpected=unexpected))

    def _resolve_shed(self, batch: list[Pending], reason: str) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                future.set_result(self._shed(key, rate, cost, reason))

    def _expire(self, call: _Call) -> None:
        task = call.task
        if task is None or task.done() or call.cut:
            return
        batch = call.batch or []
        reason = self._shed_reason(call, None)
        call.expired = reason or "timeout"
        if reason:
            self._resolve_shed(batch, reason)
            if reason == SHED_LOOP_LAG:
                return  # Redis answered: let the task read it (and count the success)
        else:
            if self.dependency is not None:
                self.dependency.record_failure(TimeoutError(f"rate limiter gave up after {self.timeout:g}s"))
            self._resolve_fallback(batch)
        task.cancel()

    # -- following the dependency ------------------------------------------------

    def _on_transition(self, dep: Dependency) -> None:
        """Redis went down: answer every decision waiting on it now, by the outage policy.

        Decisions queued for a round trip and those in flight (batched or
        direct) stop waiting for their timeout: a blackholed Redis would hold
        them ``timeout`` seconds each, for nothing. Counted in ``stats.cut_short``.
        """
        if not dep.is_down:
            return
        pending, self._pending = self._pending, []
        self._cut(pending)
        try:
            current = asyncio.current_task()
        except RuntimeError:  # no running loop: nothing of ours is in flight
            current = None
        for task, call in list(self._in_flight.items()):
            if call.cut:
                continue
            call.cut = True
            self._cut(call.batch or [])
            if task is not current and not task.done():
                task.cancel()
        for call in list(self._direct):
            if call.cut or call.timeout is None:
                continue
            call.cut = True
            with contextlib.suppress(RuntimeError):  # already past its deadline or finished
                call.timeout.reschedule(-1.0)  # in the past: it fires on the next loop iteration

    def _cut(self, batch: list[Pending]) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                self.stats.cut_short += 1
                future.set_result(self._fallback(key, rate, cost))

    # -- signals -------------------------------------------------------------

    def _report_error(self, exc: BaseException) -> None:
        self.stats.errors += 1
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
        if _ERRORS is not None:
            _ERRORS.labels(error=name).inc()
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
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
