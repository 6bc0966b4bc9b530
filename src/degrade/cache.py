"""A read-through Redis cache that never fails a read on Redis's account.

``await cache.get_or_load(key, loader)`` returns the cached value or runs
``loader`` (your Postgres query), stores its result for ``ttl`` seconds and
returns it. Redis is an optimisation here, never a requirement:

* Redis down (known to the :class:`~degrade.Dependency`): no Redis call at all;
  the loader runs and nothing is written.
* Redis failing or slower than ``timeout``: the read counts as a failure on the
  dependency, the loader runs, nothing is written.
* Concurrent misses for one key in one process share one loader call
  (single-flight), so an outage or an expiry does not stampede the database.
* Reads in flight when the dependency goes down (``timeout=`` set) are answered
  at once as misses: the loader runs, nothing is written.
* Local limits (a full single-flight map, the process's cap of abandoned calls)
  are saturation, not an outage: counted as shed on the read site
  (``Site.shed_calls``), never a failure of the dependency.
* The loader's own errors propagate unchanged and are never cached.
* ``stale=StaleTier(...)`` (``_stale.py``): keys recently seen in Redis answer from
  memory while it cannot, marked stale by :meth:`FailSoftCache.get_entry`.

``cache.stats()`` is a frozen :class:`CacheStats` snapshot of its counters.

Failure mode: FAIL-SOFT. The runbook lists the cache's read, write and
invalidate sites under the Redis dependency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from . import _binding, _validate
from ._stale import Answer, CacheEntry, StaleStore, StaleTier
from .dependency import Dependency, Site
from .exceptions import ConfigurationError
from .modes import fail_soft, site_of
from .observe import logger
from .redis import warn_problems

__all__ = ["CacheEntry", "CacheStats", "FailSoftCache", "JSONSerializer", "Serializer", "StaleTier"]

T = TypeVar("T")

#: The reason a miss is shed (loads without sharing) when the single-flight map is full.
SHED_SINGLEFLIGHT = "singleflight-full"


class Serializer(Protocol):
    """How values are stored: ``dumps`` to bytes or str, ``loads`` back.

    ``loads`` may raise on data it cannot read; the cache then treats the entry
    as a miss and overwrites it.
    """

    def dumps(self, value: Any) -> bytes | str:
        """Encode one value for Redis."""
        ...

    def loads(self, data: bytes | str) -> Any:
        """Decode what :meth:`dumps` produced."""
        ...


class JSONSerializer:
    """The default serializer: compact UTF-8 JSON (dicts, lists, str, numbers, bool, None).

    A value JSON cannot encode raises ``TypeError`` from :meth:`dumps`: that is a
    bug in the caller, not an outage, so it is not swallowed.
    """

    def dumps(self, value: Any) -> bytes:
        """Encode ``value`` as compact JSON."""
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes | str) -> Any:
        """Decode JSON."""
        return json.loads(data)


class _LeaderGone(Exception):
    """The caller loading a shared key was cancelled; its waiters load again."""


def _settle(shared: asyncio.Future[Any], exc: BaseException) -> None:
    shared.set_exception(exc)
    shared.exception()  # mark it retrieved: there may be no waiter to read it


class _Skipped(enum.Enum):
    WRITE = "nothing written"
    INVALIDATE = "nothing deleted: the entry lives until its ttl"

    def __repr__(self) -> str:
        return self.value


class _Read(enum.Enum):
    MISS = "cache miss"  # Redis answered: no such key
    UNAVAILABLE = "cache miss: the loader answers, nothing is written"  # Redis down, failing or slow

    def __repr__(self) -> str:  # the runbook shows a site's fallback by its repr
        return self.value


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters (since it was made), for tests, metrics and debugging.

    ``cache.stats()`` makes one on each call: later reads do not change it, so a
    test can keep one and compare.
    """

    hits: int = 0
    misses: int = 0
    #: Reads answered without Redis (down, failing or too slow).
    unavailable: int = 0
    #: Loader calls made.
    loads: int = 0
    #: Callers that shared another caller's in-flight load instead of loading.
    coalesced: int = 0
    #: Misses that could not join the single-flight map because it was full (also
    #: counted as shed, reason ``"singleflight-full"``, on the read site).
    uncoalesced: int = 0
    #: Entries that could not be decoded and were treated as misses.
    decode_errors: int = 0
    #: Stale tier (``stale=``): reads it answered; copies dropped as older than ``stale_for``,
    #: evicted at ``max_bytes``, removed by invalidate() (or a newer value Redis did not take); its size.
    stale: int = 0
    stale_expired: int = 0
    stale_evicted: int = 0
    stale_invalidated: int = 0
    stale_entries: int = 0
    stale_bytes: int = 0


@dataclass(slots=True)
class _Counts:
    """The live counters behind :class:`CacheStats`, bumped in place on every read."""

    hits: int = 0
    misses: int = 0
    unavailable: int = 0
    loads: int = 0
    coalesced: int = 0
    uncoalesced: int = 0
    decode_errors: int = 0


_COUNTERS = frozenset(f.name for f in dataclasses.fields(_Counts))  # the names stats had before 0.2.0


class _Stats:
    """``cache.stats``: call it for a :class:`CacheStats` snapshot.

    Deprecated: a counter read (or set) off it, ``cache.stats.hits``, is the
    live value, as when ``stats`` was a mutable ``CacheStats`` (before 0.2.0).
    It still works, with a ``DeprecationWarning``, for one minor version.
    """

    __slots__ = ("_counts", "_tier")
    _counts: _Counts
    _tier: StaleStore | None

    def __init__(self, counts: _Counts, tier: StaleStore | None = None) -> None:
        object.__setattr__(self, "_counts", counts)
        object.__setattr__(self, "_tier", tier)

    def __call__(self) -> CacheStats:
        c = self._counts
        return CacheStats(
            hits=c.hits,
            misses=c.misses,
            unavailable=c.unavailable,
            loads=c.loads,
            coalesced=c.coalesced,
            uncoalesced=c.uncoalesced,
            decode_errors=c.decode_errors,
            **(self._tier.counts() if self._tier is not None else {}),
        )

    def __getattr__(self, name: str) -> int:
        if name not in _COUNTERS:
            raise AttributeError(f"FailSoftCache.stats has no attribute {name!r}")
        _deprecated(name)
        return cast(int, getattr(self._counts, name))

    def __setattr__(self, name: str, value: object) -> None:
        if name not in _COUNTERS:
            raise AttributeError(f"FailSoftCache.stats has no attribute {name!r}")
        _deprecated(name)
        setattr(self._counts, name, value)

    def __repr__(self) -> str:
        return repr(self())


def _deprecated(name: str) -> None:
    warnings.warn(
        f"FailSoftCache.stats.{name} is deprecated; use FailSoftCache.stats().{name} (a frozen snapshot)",
        DeprecationWarning,
        stacklevel=3,
    )


class FailSoftCache:
    """A read-through cache in Redis whose failures cost a cache miss, never an error.

    Failure mode: FAIL-SOFT. While ``dependency`` is down no Redis call is made;
    a Redis error or a call slower than ``timeout`` counts as a failure on
    ``dependency``; in both cases the loader answers and nothing is written.
    Loader errors propagate unchanged (and are not cached). ``CancelledError``
    always propagates. With ``stale=``, a key seen in Redis within ``stale_for``
    answers from memory instead of the loader, marked stale (:meth:`get_entry`).

    Args:
        client: A ``redis.asyncio.Redis`` (build it with :func:`degrade.redis.client`;
            a client with slow-to-fail settings is warned about once).
        dependency: The Redis dependency this cache consults and feeds, or its
            name (``"redis"``), bound at the first call as ``@fail_soft("redis")`` is.
        ttl: Seconds an entry lives. It also bounds how stale an entry can
            be when an :meth:`invalidate` could not reach Redis.
        prefix: Prepended to every key.
        serializer: Encodes values; :class:`JSONSerializer` by default.
        timeout: Hard bound of each Redis call, in seconds (``None``: only the
            client's own socket timeout). With a bound, a Redis call in flight
            when ``dependency`` goes down is abandoned at once (a miss; the
            loader answers); without one it runs until the client gives up.
        max_inflight: Most keys loading at once in the single-flight map; a
            miss beyond it loads on its own, counted in ``stats().uncoalesced``
            and shed on the read site (reason ``"singleflight-full"``): local
            saturation, never a failure of ``dependency``.
        stale: A :class:`StaleTier`: keep values seen in Redis in memory (LRU,
            ``max_bytes``) and serve them, for at most ``stale_for`` seconds,
            while Redis cannot answer. None (the default): no tier.
        name: Shown in the runbook and logs.
    """

    def __init__(
        self,
        client: Any,
        dependency: Dependency | str,
        ttl: float,
        *,
        prefix: str = "degrade:cache:",
        serializer: Serializer | None = None,
        timeout: float | None = 0.25,
        max_inflight: int = 1024,
        stale: StaleTier | None = None,
        name: str = "cache",
    ) -> None:
        if not (isinstance(dependency, Dependency) or (isinstance(dependency, str) and dependency.strip())):
            raise ConfigurationError(
                "dependency must be a Dependency (from registry.dependency()) or its name "
                f"(e.g. 'redis'); got {dependency!r}"
            )
        ttl = _validate.seconds("ttl", ttl)
        max_inflight = _validate.count("max_inflight", max_inflight)
        if not isinstance(prefix, str):
            raise ConfigurationError(f"prefix must be a str; got {prefix!r}")
        if serializer is not None and not (
            callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None))
        ):
            raise ConfigurationError("serializer must have dumps(value) and loads(data) methods")
        warn_problems(client, component=f"FailSoftCache[{name}]")
        self.client = client
        self.dependency = dependency
        self.ttl = ttl
        self.prefix = prefix
        self.serializer: Serializer = serializer if serializer is not None else JSONSerializer()
        self.max_inflight = max_inflight
        self.name = name
        self._counts = _Counts()
        self._stale = StaleStore.of(stale)  # None without a tier; refuses anything but a StaleTier
        self._stats = _Stats(self._counts, self._stale)
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._warned_decode = False

        async def read(full_key: str) -> bytes | str | _Read:
            data: bytes | str | None = await client.get(full_key)
            return _Read.MISS if data is None else data

        async def write(full_key: str, data: bytes | str, ttl_ms: int) -> None:
            await client.set(full_key, data, px=ttl_ms)

        async def invalidate(full_key: str) -> None:
            await client.delete(full_key)

        _name(read, f"FailSoftCache[{name}].read")
        _name(write, f"FailSoftCache[{name}].write")
        _name(invalidate, f"FailSoftCache[{name}].invalidate")
        self._read = fail_soft(
            dependency,
            fallback=_Read.UNAVAILABLE,
            timeout=timeout,
            reason="cache read fails soft: every read is a miss and the loader (e.g. Postgres) answers"
            + ("" if stale is None else stale.runbook_note()),
        )(read)
        self._write = fail_soft(
            dependency,
            fallback=_Skipped.WRITE,
            timeout=timeout,
            reason="cache write is skipped while Redis is down or slow; the next read loads again",
        )(write)
        self._invalidate = fail_soft(
            dependency,
            fallback=_Skipped.INVALIDATE,
            timeout=timeout,
            reason=f"invalidate cannot reach Redis: the old entry may be served until its ttl ({ttl:g}s)",
        )(invalidate)
        #: The read site: where reads answered without Redis and shed misses are counted.
        self._read_site: Site | _binding.LateSite = (
            site_of(self._read) if isinstance(dependency, Dependency) else _binding.LateSite(self._read)
        )

    @property
    def stats(self) -> _Stats:
        """The counters: ``cache.stats()`` is a frozen :class:`CacheStats` snapshot.

        (Before 0.2.0 ``cache.stats`` was the live counters. Reading or setting
        one off it, ``cache.stats.hits``, still works for one minor version with
        a ``DeprecationWarning``; use ``cache.stats().hits``.)
        """
        return self._stats

    async def get_or_load(
        self, key: str, loader: Callable[[], Awaitable[T]], *, ttl: float | None = None
    ) -> T:
        """The cached value of ``key``, or ``await loader()`` (stored for ``ttl`` seconds).

        Failure mode: FAIL-SOFT. Redis down, failing or slow: ``loader()``'s
        result, nothing written, no error. ``loader``'s exceptions propagate
        unchanged to every caller that shared the call. A value the serializer
        cannot encode raises its error (``TypeError`` for JSON): a bug, not an outage.

        Args:
            key: The cache key (``prefix`` is prepended).
            loader: Async callable taking no arguments that loads the value.
            ttl: Overrides the cache's ttl for this entry.
        """
        return (await self._get(key, loader, ttl))[0]

    async def get_entry(
        self, key: str, loader: Callable[[], Awaitable[T]], *, ttl: float | None = None
    ) -> CacheEntry[T]:
        """Like :meth:`get_or_load`, but a :class:`CacheEntry`: the value and where it came from.

        Failure mode: FAIL-SOFT, as :meth:`get_or_load`. ``entry.stale`` is True
        when Redis could not answer and the stale tier did (``entry.age``
        seconds old); ``entry.source`` tells a hit, a miss and an unavailable read apart.
        """
        return CacheEntry(*await self._get(key, loader, ttl))

    async def _get(self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None) -> Answer[T]:
        if ttl is not None:
            ttl = _validate.seconds("ttl", ttl)
        while True:
            shared = self._inflight.get(key)
            if shared is None:
                break
            self._counts.coalesced += 1
            try:
                # shield: a waiter that goes away must not cancel the shared result
                return cast("Answer[T]", await asyncio.shield(shared))
            except _LeaderGone:
                continue  # the caller that was loading was cancelled: load (or join) anew
        if len(self._inflight) >= self.max_inflight:
            # Local saturation, not an outage: the miss loads on its own (no sharing),
            # counted and logged (degrade.shed, rate-limited) on the read site;
            # Redis's state is not touched.
            self._counts.uncoalesced += 1
            self._read_site.shed(SHED_SINGLEFLIGHT)
            return await self._fill(key, loader, ttl)
        # This caller loads; later callers for the key wait on `shared`. The load
        # runs inline (no task per call), so a known outage stays cheap.
        shared = asyncio.get_running_loop().create_future()
        self._inflight[key] = shared
        try:
            value = await self._fill(key, loader, ttl)
        except Exception as exc:
            _settle(shared, exc)
            raise
        except BaseException:  # cancelled (or exiting): waiters retry rather than inherit it
            _settle(shared, _LeaderGone())
            raise
        else:
            shared.set_result(value)
            return value
        finally:
            if self._inflight.get(key) is shared:
                del self._inflight[key]

    async def _fill(self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None) -> Answer[T]:
        full_key = self.prefix + key
        cached = await self._read(full_key)
        tier = self._stale
        if cached is _Read.UNAVAILABLE:
            self._counts.unavailable += 1
            if tier is not None and (found := tier.serve(key, self.serializer.loads, self._decode_error)):
                return found[0], "stale", found[1]
            self._counts.loads += 1
            return await loader(), "unavailable", None
        if cached is not _Read.MISS:
            try:
                value = self.serializer.loads(cached)
            except Exception as exc:  # unreadable entry: a miss, overwritten below
                self._decode_error(exc)
            else:
                self._counts.hits += 1
                if tier is not None:
                    tier.remember(key, cached)
                return cast(T, value), "hit", None
        self._counts.misses += 1
        self._counts.loads += 1
        value = await loader()
        data = self.serializer.dumps(value)
        ttl_ms = max(1, round((self.ttl if ttl is None else ttl) * 1000))
        written = await self._write(full_key, data, ttl_ms) is not _Skipped.WRITE
        if tier is not None:  # keep what Redis now holds; an older copy is superseded either way
            tier.remember(key, data) if written else tier.forget(key)
        return value, "miss", None

    def _decode_error(self, exc: Exception) -> None:
        self._counts.decode_errors += 1
        if not self._warned_decode:
            self._warned_decode = True
            logger.warning(
                "cache.decode_error",
                cache=self.name,
                error=type(exc).__name__,
                detail="entries the serializer cannot read are treated as misses; see stats().decode_errors",
            )

    async def invalidate(self, key: str) -> bool:
        """Delete ``key``; True when Redis confirmed it.

        Failure mode: FAIL-SOFT. False while Redis is down or failing: the old
        entry (if any) may then be served until its ttl runs out. The stale
        tier's copy (``stale=``) is dropped either way.
        """
        if self._stale is not None:
            self._stale.forget(key)
        return await self._invalidate(self.prefix + key) is not _Skipped.INVALIDATE

    def __repr__(self) -> str:
        dependency = getattr(self.dependency, "name", self.dependency)
        return f"<FailSoftCache {self.name!r} ttl={self.ttl:g}s dependency={dependency!r}>"


def _name(fn: Callable[..., Any], qualname: str) -> None:
    # The runbook names a site by module + qualname; give the closures readable ones.
    fn.__qualname__ = qualname
    fn.__name__ = qualname.rsplit(".", 1)[-1]
