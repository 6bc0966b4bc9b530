"""The Redis side of the limiter: the GCRA script and one ``EVALSHA`` round trip.

A round trip carries one or more decisions, ``EVALSHA sha n key... now
arg...``, packed here straight into RESP and written on a connection of the
client's own pool that the limiter keeps between calls; the reply is read with
no second timer (every call already runs under the limiter's own bound). The
script runs the same integer arithmetic as :meth:`degrade._gcra.MemoryStore.hit`.
This module knows connections and replies, never decisions: :class:`Wire` is
the part of :class:`~degrade.ratelimit.RateLimiter` that talks to Redis.

Why it is built this way (measured; each fact is also noted where it applies):

* the script answers one bulk string per call (four integers a key,
  space-separated): redis-py parses it far faster than four integers a key;
* each (rate, cost) argument is encoded once, so a decision costs one key to
  encode instead of four arguments through redis-py's generic encoder;
* the command is written directly, not through ``send_packed_command``: with a
  socket timeout redis-py wraps that write in ``asyncio.wait_for``, a task and
  a loop iteration per call (~2x the round trip on a loaded host);
* redis-py's per-command retry and bookkeeping are skipped (the Dependency is
  the retry policy): that is what lets one decision cost no more than one PING;
* a batch is written from the flush callback when a kept connection can take
  it: one event-loop iteration less per round trip.

Also here: what a round trip's errors mean (:func:`is_outage`, and the
``SHED_*`` reasons when local capacity, not Redis, ran out) and :class:`Call`,
one round trip in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, MaxConnectionsError, NoScriptError, ReadOnlyError, RedisError

from .._classify import is_dependency_error
from .._compat import redis as compat_redis
from .._gcra import Decision, Rate, Rates
from ._stats import Counts

__all__ = [
    "LUA_GCRA",
    "MAX_CACHED_RATES",
    "SHED_LOOP_LAG",
    "SHED_MAX_PENDING",
    "SHED_POOL",
    "Call",
    "Group",
    "Pending",
    "Wire",
    "bulk",
    "is_outage",
    "rate_arg",
]

#: The GCRA step for a batch of keys: the same integer arithmetic as ``MemoryStore.hit``.
#: ARGV[1] is ``now`` in microseconds, injected by the caller (not Redis ``TIME``) so the
#: memory and Redis paths are one testable function of (hits, clock); pods' clocks must
#: be NTP-synchronised, and a pod whose clock lags only sees the limit as stricter.
#: Then one argument per key: "emission capacity increment" (microseconds: the interval,
#: interval * burst, interval * cost), the same text for every hit of one rate and cost.
#: Values stay below 2**53, so Lua's doubles are exact. Returns one string of four
#: integers per key, space-separated: allowed (0/1), remaining, reset_after_us,
#: retry_after_us (one bulk string parses far faster in redis-py than 4 integers a key).
#: A group (several limits of one request, ``MemoryStore.hit_all``) starts with an
#: argument "n|emission capacity increment" and spans n keys: all are read, and all are
#: written only when all allow (no partial consumption). A single key's step is the
#: first branch, unchanged: a group costs the single-limit path one failed match only.
LUA_GCRA = """
local now = tonumber(ARGV[1])
local out = {}
local i = 1
local n = #KEYS
while i <= n do
  local e, c, inc = string.match(ARGV[i + 1], '^(%d+) (%d+) (%d+)$')
  if e then
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
    i = i + 1
  else
    local size = tonumber(string.match(ARGV[i + 1], '^(%d+)|'))
    local em, cap, held, new = {}, {}, {}, {}
    local ok = true
    for j = 0, size - 1 do
      local ge, gc, ginc = string.match(ARGV[i + j + 1], '(%d+) (%d+) (%d+)$')
      local tat = tonumber(redis.call('GET', KEYS[i + j]))
      if tat == nil or tat < now then
        tat = now
      end
      em[j], cap[j], held[j] = tonumber(ge), tonumber(gc), tat
      new[j] = tat + tonumber(ginc)
      if new[j] - cap[j] > now then
        ok = false
      end
    end
    for j = 0, size - 1 do
      if ok then
        local ahead = new[j] - now
        redis.call('SET', KEYS[i + j], string.format('%d', new[j]),
                   'PX', string.format('%d', math.ceil(ahead / 1000)))
        out[i + j] = string.format('1 %d %d 0', math.floor((cap[j] - ahead) / em[j]), ahead)
      else
        local remaining = math.floor((cap[j] - (held[j] - now)) / em[j])
        if remaining < 0 then
          remaining = 0
        end
        local allow_at = new[j] - cap[j]
        if allow_at <= now then
          out[i + j] = string.format('1 %d %d 0', remaining, held[j] - now)
        else
          out[i + j] = string.format('0 %d %d %d', remaining, held[j] - now, allow_at - now)
        end
      end
    end
    i = i + size
  end
end
return table.concat(out, ' ')
"""

#: Most entries of each cache of parsed rates and script arguments (bounded whatever callers pass).
MAX_CACHED_RATES = 1024

#: Passed to redis-py's read_response: no second timer per read, since every call
#: of the limiter already runs under its own bound (asyncio.timeout or the batch timer).
_NO_READ_TIMEOUT = math.inf
#: Connections of the client's pool the limiter keeps between calls (the rest go back).
_KEEP_CONNECTIONS = 2


class Group(NamedTuple):
    """Several limits of one request, decided together (one script group, or ``hit_all`` in memory)."""

    #: One storage key per limit, in the order of ``rates``.
    buckets: tuple[str, ...]
    rates: Rates


#: One decision waiting for Redis: (bucket, rate, cost, future); for several limits
#: (bucket of the first, Group, cost, future).
Pending = tuple[str, "Rate | Group", int, "asyncio.Future[Decision]"]

#: ``Site.shed`` reasons: local capacity ran out (saturation, never a failure of Redis).
SHED_MAX_PENDING = "max-pending"
SHED_POOL = "pool-saturated"
SHED_LOOP_LAG = "loop-lag"
#: redis-py's BlockingConnectionPool, when no connection was free within its timeout.
_NO_CONNECTION = "No connection available."


def is_outage(exc: BaseException) -> bool:
    """Is ``exc`` Redis failing (an outage of the dependency), not a bug or local saturation?"""
    # A replica that refuses writes (a failover in progress) is an outage of the master.
    return is_dependency_error(exc) or isinstance(exc, ReadOnlyError | MasterDownError)


#: The script argument of each (rate, cost): its text and its RESP bulk string, built once.
_RATE_ARGS: dict[tuple[Rate, int], tuple[str, bytes]] = {}


def rate_arg(rate: Rate, cost: int) -> tuple[str, bytes]:
    """The script argument of ``rate`` and ``cost``: its text and its RESP bulk string."""
    try:
        return _RATE_ARGS[rate, cost]
    except KeyError:
        pass
    text = f"{rate.emission_us} {rate.capacity_us} {rate.emission_us * cost}"
    data = text.encode()
    arg = (text, b"$%d\r\n%s\r\n" % (len(data), data))
    if len(_RATE_ARGS) < MAX_CACHED_RATES:
        _RATE_ARGS[rate, cost] = arg
    return arg


def bulk(data: bytes) -> bytes:
    """``data`` as a RESP bulk string."""
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


def _cut_while_idle(conn: Any) -> bool:
    """Did a kept connection lose its socket while idle (its transport saw the reset)?"""
    writer = compat_redis.writer(conn)
    return not conn.is_connected or (writer is not None and writer.transport.is_closing())


def _health_check_due(conn: Any) -> bool:
    """Would redis-py PING this connection before its next command (its health_check_interval)?"""
    interval = getattr(conn, "health_check_interval", 0)
    return bool(interval) and asyncio.get_running_loop().time() > getattr(conn, "next_health_check", 0)


def _has_reply(conn: Any) -> bool:
    """Has Redis's answer reached this connection's buffer (unread because the loop was busy)?"""
    return compat_redis.reply_buffered(conn)


class Call:
    """One round trip in flight: its waiters and how far it got."""

    __slots__ = (
        "batch",
        "bulks",
        "conn",
        "cut",
        "expired",
        "grouped",
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
        #: The batch holds a Group (its keys and replies are not one per decision).
        self.grouped = False
        self.keys: list[str] = []
        self.texts: list[str] = []
        self.bulks: list[bytes] = []


class Wire:
    """The limiter's connection-level steps: pack, write, read, reload the script, keep connections.

    A base of :class:`~degrade.ratelimit.RateLimiter`; the attributes below
    are set by its ``__init__``.
    """

    redis: Any
    _counts: Counts
    #: The client's pool when the lean path can use it (None: redis-py's generic call).
    _pool: Any
    #: Connections of that pool kept between calls (at most ``_KEEP_CONNECTIONS``).
    _idle: list[Any]
    _sha: str
    _sha_bulk: bytes

    async def _eval(self, call: Call, keys: list[str], now: int, texts: list[str], bulks: list[bytes]) -> Any:
        pool = self._pool
        if pool is None:
            return await self._eval_generic(keys, now, texts)
        # The lean path: a connection of the client's own pool, kept between
        # calls, one packed EVALSHA, one reply. It skips redis-py's per-command
        # retry and bookkeeping (the Dependency is the retry policy), which is
        # what lets one decision cost no more than one PING.
        conn = call.conn if call.written else None
        while conn is None and self._idle:
            kept = self._idle.pop()
            if not _cut_while_idle(kept):
                conn = kept
                break
            # Reset while idle (an outage cut it): not evidence. Used, each failed right
            # after a recovery and marked Redis down again (make chaos, Redis / refuse).
            self._counts.discarded_idle += 1
            await self._discard(kept)
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
        self._sha_bulk = bulk(self._sha.encode())

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
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (4 + 2 * n), self._sha_bulk, bulk(b"%d" % n)]
        for key in keys:
            data = key.encode(encoding, errors)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        parts.append(bulk(b"%d" % now))
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
            self._counts.noscript += 1
            await conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", LUA_GCRA), check_health=False)
            self._set_sha(await conn.read_response(timeout=_NO_READ_TIMEOUT))
            await conn.send_packed_command(self._pack(conn, keys, now, bulks), check_health=False)
            return await conn.read_response(timeout=_NO_READ_TIMEOUT)

    async def _eval_generic(self, keys: list[str], now: int, texts: list[str]) -> Any:
        redis = self.redis
        try:
            return await redis.execute_command("EVALSHA", self._sha, len(keys), *keys, now, *texts)
        except NoScriptError:
            self._counts.noscript += 1
            self._set_sha(await redis.script_load(LUA_GCRA))
            return await redis.execute_command("EVALSHA", self._sha, len(keys), *keys, now, *texts)

    def _write_now(self, call: Call) -> None:
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

    async def _discard(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a connection we discard anyway
            await conn.disconnect(nowait=True)
        await self._release(conn)

    @staticmethod
    def _shed_reason(call: Call, exc: BaseException | None) -> str:
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
