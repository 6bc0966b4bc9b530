"""RateLimiter: GCRA in Redis, one round trip per decision, auto-pipelined, with an outage policy."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from redis.exceptions import MasterDownError, NoScriptError, ReadOnlyError

from .._classify import is_dependency_error
from .._extras import optional
from .._gcra import Decision, MemoryStore, Rate, parse_rate
from ..dependency import Dependency, Site
from ..exceptions import ConfigurationError
from ..observe import logger, security_event

__all__ = ["Fallback", "LimiterStats", "RateLimiter"]

Fallback = Literal["memory", "deny", "allow"]
Clock = Callable[[], float]

#: Longest key kept as given; longer keys are replaced by a hash (bounded Redis and memory keys).
MAX_KEY_LENGTH = 128

#: The GCRA step for a batch of keys: the same integer arithmetic as ``MemoryStore.hit``.
#: ARGV[1] is ``now`` in microseconds, injected by the caller (not Redis ``TIME``) so the
#: memory and Redis paths are one testable function of (hits, clock); pods' clocks must
#: be NTP-synchronised, and a pod whose clock lags only sees the limit as stricter.
#: Then three numbers per key: emission interval, capacity (interval * burst) and
#: increment (interval * cost), all microseconds. Values stay below 2**53, so Lua's
#: doubles are exact. Returns four integers per key:
#: allowed (0/1), remaining, reset_after_us, retry_after_us.
LUA_GCRA = """
local now = tonumber(ARGV[1])
local out = {}
local n = 0
for i = 1, #KEYS do
  local j = 3 * i - 1
  local emission = tonumber(ARGV[j])
  local capacity = tonumber(ARGV[j + 1])
  local increment = tonumber(ARGV[j + 2])
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
    out[n + 1] = 1
    out[n + 2] = math.floor((capacity - ahead) / emission)
    out[n + 3] = ahead
    out[n + 4] = 0
  else
    local remaining = math.floor((capacity - (tat - now)) / emission)
    if remaining < 0 then
      remaining = 0
    end
    out[n + 1] = 0
    out[n + 2] = remaining
    out[n + 3] = tat - now
    out[n + 4] = allow_at - now
  end
  n = n + 4
end
return out
"""

_US = 1_000_000
_FALLBACKS = ("memory", "deny", "allow")
_ERROR_LOG_INTERVAL = 60.0
#: Passed to redis-py's read_response: no second timer per read, since every call
#: of the limiter already runs under its own bound (asyncio.timeout or the batch timer).
_NO_READ_TIMEOUT = math.inf
#: Connections of the client's pool the limiter keeps between calls (the rest go back).
_KEEP_CONNECTIONS = 2

Pending = tuple[str, Rate, int, "asyncio.Future[Decision]"]


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    prometheus: Any = optional("prometheus_client")
    if prometheus is None:
        return None
    return prometheus.Counter(name, doc, list(labels))


_OVERFLOW = _counter(
    "degrade_ratelimit_overflow_total",
    "Rate-limit decisions answered by the outage policy because too many were waiting for Redis.",
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


class LimiterStats:
    """Counters of one limiter (plain ints, cheap to read in tests and health output)."""

    __slots__ = ("batches", "errors", "fallback", "noscript", "overflow", "redis")

    def __init__(self) -> None:
        #: Decisions answered by Redis.
        self.redis = 0
        #: EVALSHA round trips (each carries one or more decisions).
        self.batches = 0
        #: Decisions answered by the outage policy (Redis down, failing or too slow).
        self.fallback = 0
        #: Decisions that did not wait for Redis because too many were already waiting.
        self.overflow = 0
        #: Unexpected errors (not outages) on the Redis path.
        self.errors = 0
        #: Scripts reloaded after NOSCRIPT (a Redis restart, failover or SCRIPT FLUSH).
        self.noscript = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"LimiterStats({fields})"


class RateLimiter:
    """GCRA rate limiting shared through Redis, with a written-down outage policy.

    ``decision = await limiter.hit(key, "100/minute")``. Each decision is one
    atomic Lua step in Redis; decisions issued in the same event-loop tick go
    out together as one ``EVALSHA`` (auto-pipelining), so under concurrency
    the limiter costs less than one round trip per decision.

    Failure mode: FAIL-SOFT by default. While Redis is known down the request
    path makes no Redis call; a call that fails or takes longer than
    ``timeout`` feeds the dependency and is answered by the outage policy:

    * ``fallback="memory"`` (default): an in-process GCRA with the rate divided
      by ``pods``, so N pods together stay near the global limit;
    * ``fallback="deny"``: every decision is refused (``source="deny"``; the
      middleware answers 503 with ``Retry-After``);
    * ``fallback="allow"``: FAIL-OPEN, every request passes. Choose it only on
      purpose: it logs a warning at construction and a security-tagged event
      (log + Sentry tag ``degrade.security=fail_open``) when failing open
      starts and ends.

    An unexpected error (a bug, a wrong key type in Redis) is not an outage and
    never opens the limiter: it is counted, logged at most once a minute, and
    the decision comes from memory (``"deny"`` policy: denied).

    Args:
        redis: A ``redis.asyncio.Redis`` (``degrade.redis.client(...)``, a
            Sentinel ``master_for`` client, ...); None for a memory-only limiter.
        dependency: The Redis :class:`~degrade.Dependency` (required with ``redis``).
        fallback: The outage policy: ``"memory"``, ``"deny"`` or ``"allow"``.
        pods: How many processes share the limit; memory decisions use rate / pods.
        prefix: Prefix of every Redis key.
        timeout: Seconds a decision waits for Redis before the outage policy answers.
        max_keys: Bound of the in-memory store (least recently used evicted, counted).
        max_batch: Most decisions per ``EVALSHA``.
        max_in_flight: Most ``EVALSHA`` calls in flight; later decisions wait and batch up.
        max_pending: Most decisions waiting for Redis; beyond it the policy answers (counted).
        warm: Mirror Redis decisions into the memory store, so a failover does not
            hand every client a fresh bucket.
        clock: Wall-clock seconds (shared by pods through Redis), injectable for tests.
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        dependency: Dependency | None = None,
        fallback: Fallback = "memory",
        pods: int = 1,
        prefix: str = "degrade:rl:",
        timeout: float = 0.25,
        max_keys: int = 100_000,
        max_batch: int = 128,
        max_in_flight: int = 16,
        max_pending: int = 10_000,
        warm: bool = True,
        clock: Clock = time.time,
    ) -> None:
        if fallback not in _FALLBACKS:
            raise ConfigurationError(
                f"fallback must be 'memory', 'deny' or 'allow' (fail-open); got {fallback!r}"
            )
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
        self.fallback: Fallback = fallback
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
        self._direct = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._failing_open = False
        self._last_error_log = -_ERROR_LOG_INTERVAL
        self._sha = ""
        self._idle: list[Any] = []
        # The lean path needs a plain pooled client (not single_connection_client).
        self._pool: Any = None
        if redis is not None and getattr(redis, "connection", None) is None:
            pool = getattr(redis, "connection_pool", None)
            if pool is not None and hasattr(pool, "get_connection") and hasattr(pool, "release"):
                self._pool = pool
        self.site: Site | None = None
        if redis is not None and dependency is not None:
            # register_script computes the SHA with the client's own encoder
            self._sha = redis.register_script(LUA_GCRA).sha
            self.site = self._register_site(dependency)
            if fallback == "allow":
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
        if self.fallback == "deny":
            mode, reason, described = (
                "fail_loud",
                "rate-limited requests are refused (503) while Redis is down",
                None,
            )
        elif self.fallback == "allow":
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
            self.stats.overflow += 1
            if _OVERFLOW is not None:
                _OVERFLOW.inc()
            return self._fallback(bucket, rate, cost)
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
        policy = self.fallback
        if policy == "memory" or (unexpected and policy == "allow"):
            return self._memory(key, rate, cost)
        if policy == "deny":
            retry = float(self.dependency.retry_after) if self.dependency is not None else 1.0
            return Decision(False, rate.limit, 0, retry, retry, "deny")
        if not self._failing_open:
            self._start_fail_open()
        return Decision(True, rate.limit, rate.limit, 0.0, 0.0, "allow")

    def _from_redis(self, key: str, rate: Rate, now: int, reply: list[int], i: int) -> Decision:
        allowed, remaining, reset, retry = reply[i : i + 4]
        if self.warm:
            # The same fraction of the bucket used, at the per-pod rate.
            m = rate if self.pods == 1 else _per_pod(rate, self.pods)
            self.store.warm(key, now, reset * m.capacity_us // rate.capacity_us)
        self.stats.redis += 1
        return _new(Decision, (allowed == 1, rate.limit, remaining, reset / _US, retry / _US, "redis"))

    def _succeeded(self, dep: Dependency) -> None:
        self.stats.batches += 1
        if dep.failures:
            dep.record_success()
        if self._failing_open and not dep.is_down:
            self._end_fail_open()

    def _failed(self, exc: Exception, dep: Dependency) -> bool:
        """Feed the dependency with ``exc``; True when it is unexpected (not an outage)."""
        if _is_outage(exc):
            dep.record_failure(exc)
            return False
        self._report_error(exc)
        return True

    async def _call_direct(self, key: str, rate: Rate, cost: int, dep: Dependency) -> Decision:
        self._direct += 1
        now = int(self._clock() * _US)
        try:
            # redis-py unwinds a cancelled call at once (it drops the connection
            # without waiting), so asyncio.timeout is a hard enough bound here.
            async with asyncio.timeout(self.timeout):
                reply = await self._eval(
                    [key], [now, rate.emission_us, rate.capacity_us, rate.emission_us * cost]
                )
        except Exception as exc:
            unexpected = self._failed(exc, dep)
            return self._fallback(key, rate, cost, unexpected=unexpected)
        finally:
            self._direct -= 1
            if self._pending and not self._flush_scheduled:  # decisions waited for this slot
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        self._succeeded(dep)
        if not isinstance(reply, list) or len(reply) != 4:
            self._report_error(TypeError(f"unexpected reply of {type(reply).__name__}"))
            return self._fallback(key, rate, cost, unexpected=True)
        return self._from_redis(key, rate, now, reply, 0)

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
        while self._pending and len(self._in_flight) + self._direct < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            task = loop.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._sent)
        # The rest waits for a free slot (_sent flushes again), batching up meanwhile.

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            task.get_loop().call_soon(self._flush)

    async def _send(self, batch: list[Pending]) -> None:
        dep = self.dependency
        if dep is None:  # pragma: no cover - hit() only batches when a dependency is set
            self._resolve_fallback(batch)
            return
        loop = asyncio.get_running_loop()
        expired: list[bool] = []
        # A hard bound: at the deadline the waiters get the outage policy's answer
        # at once, whatever the driver does while it unwinds the cancelled call.
        timer = loop.call_later(self.timeout, self._expire, batch, asyncio.current_task(), expired)
        now = int(self._clock() * _US)
        args: list[Any] = [now]
        keys = []
        for key, rate, cost, _ in batch:
            keys.append(key)
            args += (rate.emission_us, rate.capacity_us, rate.emission_us * cost)
        try:
            reply = await self._eval(keys, args)
        except asyncio.CancelledError:
            self._resolve_fallback(batch)
            raise
        except Exception as exc:
            if not expired:  # else _expire already fed the dependency and answered
                self._resolve_fallback(batch, unexpected=self._failed(exc, dep))
            return
        finally:
            timer.cancel()
        self._succeeded(dep)
        if not isinstance(reply, list) or len(reply) != 4 * len(batch):
            self._report_error(TypeError(f"unexpected reply of {type(reply).__name__}"))
            self._resolve_fallback(batch, unexpected=True)
            return
        i = 0
        for key, rate, _cost, future in batch:
            decision = self._from_redis(key, rate, now, reply, i)
            i += 4
            if not future.done():
                future.set_result(decision)

    async def _eval(self, keys: list[str], args: list[Any]) -> Any:
        pool = self._pool
        if pool is None:
            return await self._eval_generic(keys, args)
        # The lean path: a connection of the client's own pool, kept between
        # calls, one packed EVALSHA, one reply. It skips redis-py's per-command
        # retry and bookkeeping (the Dependency is the retry policy), which is
        # what lets one decision cost no more than one PING.
        conn = self._idle.pop() if self._idle else await pool.get_connection()
        try:
            reply = await self._roundtrip(conn, len(keys), keys, args)
        except BaseException:
            # redis-py drops the socket on its own errors; make sure of it for
            # ours (a cancellation between send and read) before pooling it again.
            with contextlib.suppress(Exception):  # a connection we discard anyway
                await conn.disconnect(nowait=True)
            await self._release(conn)
            raise
        if len(self._idle) < _KEEP_CONNECTIONS:
            self._idle.append(conn)
        else:
            await self._release(conn)
        return reply

    async def _release(self, conn: Any) -> None:
        # A pool that was reset or closed meanwhile no longer knows the connection.
        with contextlib.suppress(KeyError, ValueError):
            await self._pool.release(conn)

    async def _roundtrip(self, conn: Any, nkeys: int, keys: list[str], args: list[Any]) -> Any:
        packed = conn.pack_command("EVALSHA", self._sha, nkeys, *keys, *args)
        writer = getattr(conn, "_writer", None)
        if (
            writer is not None
            and conn.is_connected
            and not (
                getattr(conn, "health_check_interval", 0)
                and asyncio.get_running_loop().time() > getattr(conn, "next_health_check", 0)
            )
        ):
            # Connected and no health check due: write the command directly.
            # redis-py's send_packed_command wraps this write in asyncio.wait_for
            # when the client has a socket timeout, which costs a task and a
            # loop iteration per call (~2x the round trip on a loaded host);
            # our own bound covers the write instead.
            writer.writelines(packed)
            await writer.drain()
        else:  # connect, or PING first (the client's health_check_interval), as redis-py does
            await conn.send_packed_command(packed)
        try:
            return await conn.read_response(timeout=_NO_READ_TIMEOUT)
        except NoScriptError:
            # Redis restarted, failed over or had SCRIPT FLUSH: load it and go again.
            self.stats.noscript += 1
            await conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", LUA_GCRA), check_health=False)
            sha = await conn.read_response(timeout=_NO_READ_TIMEOUT)
            self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            await conn.send_packed_command(
                conn.pack_command("EVALSHA", self._sha, nkeys, *keys, *args), check_health=False
            )
            return await conn.read_response(timeout=_NO_READ_TIMEOUT)

    async def _eval_generic(self, keys: list[str], args: list[Any]) -> Any:
        redis = self.redis
        try:
            return await redis.execute_command("EVALSHA", self._sha, len(keys), *keys, *args)
        except NoScriptError:
            self.stats.noscript += 1
            self._sha = await redis.script_load(LUA_GCRA)
            return await redis.execute_command("EVALSHA", self._sha, len(keys), *keys, *args)

    def _resolve_fallback(self, batch: list[Pending], *, unexpected: bool = False) -> None:
        for key, rate, cost, future in batch:
            if not future.done():
                future.set_result(self._fallback(key, rate, cost, unexpected=unexpected))

    def _expire(self, batch: list[Pending], task: asyncio.Task[Any] | None, expired: list[bool]) -> None:
        if task is None or task.done():
            return
        expired.append(True)
        if self.dependency is not None:
            self.dependency.record_failure(TimeoutError(f"rate limiter gave up after {self.timeout:g}s"))
        self._resolve_fallback(batch)
        task.cancel()

    # -- signals -------------------------------------------------------------

    def _report_error(self, exc: BaseException) -> None:
        self.stats.errors += 1
        name = type(exc).__name__
        if _ERRORS is not None:
            _ERRORS.labels(error=name).inc()
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.error(
                "ratelimit.error",
                error=name,
                fallback="deny" if self.fallback == "deny" else "memory",
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

    def __repr__(self) -> str:
        backend = "redis" if self.redis is not None else "memory"
        return f"<RateLimiter {backend} fallback={self.fallback} pods={self.pods}>"
