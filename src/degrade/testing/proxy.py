"""A fault-injecting TCP proxy: make any TCP service fail on demand, in tests and drills.

:class:`FaultProxy` listens on ``127.0.0.1`` (a free port) and forwards every
connection to one upstream service. Sync setters switch faults on and off;
every fault applies to connections that are already open (a pooled client keeps
its connections) as well as to new ones::

    proxy = await FaultProxy.start("127.0.0.1", 6379)
    client = redis.asyncio.Redis.from_url(proxy.url_for("redis://127.0.0.1:6379/0"))
    proxy.blackhole()            # accepted, nothing forwarded: the client times out
    proxy.up()                   # frozen connections resume
    await proxy.close()

Design decisions:

* **The proxy runs its own event loop in a daemon thread.** A proxy inside the
  test's loop is starved by the code under test (a blocking call, a sync
  ``TestClient`` whose app runs in another thread, a loop that pytest-asyncio
  or anyio closes between tests); a thread makes it independent of all of
  them: it works from sync tests, pytest-asyncio and anyio tests and Starlette's
  ``TestClient``, and is closed synchronously at fixture teardown. The GIL still
  applies: while the code under test burns CPU, the proxy waits at most one
  switch interval (``sys.getswitchinterval()``, 5 ms) for its turn.
* **Setters return once the fault is in force.** Each one runs in the proxy's
  thread and the caller waits for it (bounded by ``CONTROL_TIMEOUT``), so the
  line after ``proxy.refuse()`` already sees refused connections. Setters are
  thread-safe.
* **refuse closes the listening socket, so a connect fails with
  ECONNREFUSED at once**, exactly as when the service is down. A second socket
  bound to the same port (``SO_REUSEPORT``, never listening) keeps the port
  reserved, so ``up()`` listens on the same port again and no other socket can
  take it in between.
* **up() after blackhole resumes frozen connections**: held data is delivered
  in order, as when a network partition heals and TCP retransmits. A client
  that gave up meanwhile has closed its side already. To model the other
  outcome, call ``reset()`` before ``up()``.
* **Everything is bounded**: at most ``max_connections`` open connections
  (more are reset and counted as ``rejected``), at most ``MAX_HELD`` bytes
  held per direction of a connection (reading from the sender pauses beyond
  it, which is TCP back-pressure), every connect to the upstream bounded by
  ``connect_timeout``, every control call and the shutdown bounded.

Faults (combine freely, except that refuse and blackhole replace each other):

=====================  ==================================================================
``refuse()``           new connections refused (ECONNREFUSED); open ones reset (RST)
``blackhole()``        new connections accepted, nothing forwarded either way; open
                       ones freeze
``latency(s, jitter)`` each chunk delayed by ``s`` +/- ``jitter`` seconds, each way,
                       order kept
``reset()``            one-shot: open connections reset (RST); new ones served as usual
``limit_data(n)``      a connection is cut (RST) once ``n`` bytes have passed it
``slow_close(s)``      a close (FIN) from either side reaches the other ``s`` late
``up()``               every fault cleared; frozen connections resume
=====================  ==================================================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import math
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast, overload

from ..exceptions import ConfigurationError

__all__ = ["Fault", "FaultProxy", "Outage", "ProxyStats"]

#: A fault name accepted by :meth:`FaultProxy.outage`.
Fault = Literal["refuse", "blackhole", "reset", "latency", "limit_data", "slow_close"]
Mode = Literal["up", "refuse", "blackhole"]

#: Most bytes held (delayed or frozen) per direction of one connection before
#: the proxy stops reading from the sender (TCP back-pressure takes over).
MAX_HELD = 1024 * 1024
#: Default cap of connections open at once; beyond it new ones are reset.
MAX_CONNECTIONS = 256
#: Seconds a control call (a setter) may wait for the proxy's thread.
CONTROL_TIMEOUT = 5.0
#: Seconds ``start()`` may wait for the proxy to listen.
START_TIMEOUT = 5.0
#: Seconds ``close()`` may wait for the proxy's thread to finish.
CLOSE_TIMEOUT = 5.0

_FAULTS = ("refuse", "blackhole", "reset", "latency", "limit_data", "slow_close")
_LINGER_RST = struct.pack("ii", 1, 0)


class _Mark(enum.Enum):
    EOF = "eof"  # pass a close (FIN) on
    CUT = "cut"  # limit_data reached: reset the connection


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of a proxy's counters (since it started).

    Attributes:
        accepted: Connections that reached the proxy. A connect refused while
            the proxy refuses never reaches it and is not counted, so
            ``accepted == 0`` proves that no client tried to connect while the
            proxy was up or blackholed.
        open: Connections open now.
        bytes_up: Bytes forwarded from clients to the service.
        bytes_down: Bytes forwarded from the service to clients.
        held: Bytes held now (delayed by latency or frozen by blackhole).
        resets: Connections the proxy reset (``reset()``, ``refuse()``, a
            reset from the other side passed on).
        cut: Connections cut by ``limit_data``.
        rejected: Connections reset at once because ``max_connections`` were open.
        upstream_failures: Connections reset because the service could not be reached.
        dropped_bytes: Bytes received but never forwarded (cut off by
            ``limit_data``, or addressed to a side that was already gone).
    """

    accepted: int
    open: int
    bytes_up: int
    bytes_down: int
    held: int
    resets: int
    cut: int
    rejected: int
    upstream_failures: int
    dropped_bytes: int


def _rst(transport: asyncio.Transport) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees ECONNRESET."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class _Half(asyncio.Protocol):
    """One socket of a proxied connection: the client's or the service's."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.paused = False  # our writes to it are paused (its buffer is full)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport, by asyncio's contract
        self.conn.engine.live.add(self)
        self.conn.made(self, self.transport)

    def data_received(self, data: bytes) -> None:
        self.conn.received(self, data)

    def eof_received(self) -> bool:
        self.conn.eof(self)
        return True  # keep the socket: the other direction may still carry data

    def pause_writing(self) -> None:
        self.paused = True
        self.conn.flow_to(self).update_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.conn.flow_to(self).flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.engine.live.discard(self)
        self.conn.lost(self, exc)


class _Flow:
    """One direction of a connection: a delay line from ``src`` to ``dst``."""

    def __init__(self, conn: _Conn, src: _Half, dst: _Half, *, up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up
        self.queue: deque[tuple[float, bytes | _Mark]] = deque()
        self.held = 0
        self.last_deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.eof_seen = False  # src closed its side
        self.eof_sent = False  # ... and we passed that on to dst
        self.reading_paused = False

    def can_pass(self) -> bool:
        engine = self.conn.engine
        transport = self.dst.transport
        return (
            not self.queue
            and engine.mode != "blackhole"
            and engine.delay == 0.0
            and engine.jitter == 0.0
            and transport is not None
            and not self.dst.paused
            and not transport.is_closing()
        )

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        engine = self.conn.engine
        if transport.is_closing():
            engine.dropped_bytes += len(data)
            return
        transport.write(data)
        if self.up:
            engine.bytes_up += len(data)
        else:
            engine.bytes_down += len(data)

    def push(self, item: bytes | _Mark, extra: float = 0.0) -> None:
        engine = self.conn.engine
        deadline = max(engine.loop.time() + engine.sample_delay() + extra, self.last_deadline)
        self.last_deadline = deadline
        self.queue.append((deadline, item))
        if isinstance(item, bytes):
            self.held += len(item)
            engine.held += len(item)
        self.flush()

    def _on_timer(self) -> None:
        self.timer = None
        self.flush()

    def flush(self) -> None:
        """Deliver what is due, unless frozen; keep a timer for what is not yet due."""
        conn = self.conn
        engine = conn.engine
        transport = self.dst.transport
        if conn.dead:
            return
        if engine.mode != "blackhole" and transport is not None:
            now = engine.loop.time()
            while self.queue:
                deadline, item = self.queue[0]
                if deadline > now:
                    if self.timer is None:
                        self.timer = engine.loop.call_at(deadline, self._on_timer)
                    break
                if self.dst.paused and item is not _Mark.CUT:
                    break  # resume_writing() flushes again
                self.queue.popleft()
                if not self._deliver(transport, item):
                    return  # the connection ended
        # Frozen, not connected yet, or waiting: hold, up to MAX_HELD.
        self.update_reading()

    def _deliver(self, transport: asyncio.Transport, item: bytes | _Mark) -> bool:
        conn = self.conn
        if isinstance(item, bytes):
            self.held -= len(item)
            conn.engine.held -= len(item)
            self.write(transport, item)
            return True
        if item is _Mark.CUT:
            conn.engine.cut += 1
            conn.abort(count=False)
            return False
        self.eof_sent = True
        if not transport.is_closing():
            try:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            except OSError:
                # The peer reset its socket after closing it (asyncio stops reading
                # at EOF, so that RST went unnoticed): the connection is gone.
                conn.engine.resets += 1
                conn.abort(count=False)
                return False
        if conn.other(self).eof_sent:
            conn.finish()
            return False
        return True

    def update_reading(self) -> None:
        """Pause reading from ``src`` while ``dst`` is full or too much is held."""
        transport = self.src.transport
        if transport is None or transport.is_closing() or self.eof_seen:
            return
        want_pause = self.held >= MAX_HELD or self.dst.paused
        if want_pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif not want_pause and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    def expedite(self) -> None:
        """Make everything held due now, order kept (``up()``: back to normal)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue = deque((0.0, item) for _, item in self.queue)
        self.last_deadline = 0.0

    def discard(self) -> None:
        """Drop everything held (the connection is gone)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        engine = self.conn.engine
        for _, item in self.queue:
            if isinstance(item, bytes):
                engine.dropped_bytes += len(item)
                engine.held -= len(item)
        self.queue.clear()
        self.held = 0


class _Conn:
    """One proxied connection: the client's socket, the service's, two flows."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.client = _Half(self)
        self.upstream = _Half(self)
        self.up = _Flow(self, self.client, self.upstream, up=True)
        self.down = _Flow(self, self.upstream, self.client, up=False)
        self.budget = engine.limit  # bytes left before limit_data cuts it
        self.cutting = False
        self.dead = False
        self.task: asyncio.Task[None] | None = None

    def flow_from(self, half: _Half) -> _Flow:
        return self.up if half is self.client else self.down

    def flow_to(self, half: _Half) -> _Flow:
        return self.down if half is self.client else self.up

    def other(self, flow: _Flow) -> _Flow:
        return self.down if flow is self.up else self.up

    def made(self, half: _Half, transport: asyncio.Transport) -> None:
        engine = self.engine
        if half is self.upstream:
            if self.dead:
                _rst(transport)  # the client left while we were connecting
                return
            self.up.flush()
            return
        engine.accepted += 1
        if engine.mode == "refuse" or engine.closing:
            # accepted just before the listener closed: still a refusal
            engine.resets += 1
            self.abort(count=False)
            return
        if len(engine.conns) >= engine.max_connections:
            engine.rejected += 1
            self.abort(count=False)
            return
        engine.conns.add(self)
        self.task = engine.spawn(self._connect())

    async def _connect(self) -> None:
        engine = self.engine
        # Blackholed: hold the client without touching the service until up().
        while engine.mode == "blackhole":
            await engine.thawed.wait()
        try:
            async with asyncio.timeout(engine.connect_timeout):
                await engine.loop.create_connection(
                    lambda: self.upstream, engine.upstream_host, engine.upstream_port
                )
        except Exception:  # refused, timed out, unresolvable: the client is reset
            engine.upstream_failures += 1
            self.abort(count=False)

    def received(self, half: _Half, data: bytes) -> None:
        engine = self.engine
        if self.dead or self.cutting:
            engine.dropped_bytes += len(data)
            return
        flow = self.flow_from(half)
        cut = False
        if self.budget is not None:
            if len(data) >= self.budget:
                engine.dropped_bytes += len(data) - self.budget
                data = data[: self.budget]
                self.budget = 0
                self.cutting = cut = True
            else:
                self.budget -= len(data)
        transport = flow.dst.transport
        if data:
            if not cut and transport is not None and flow.can_pass():
                flow.write(transport, data)
            else:
                flow.push(data)
        if cut:
            flow.push(_Mark.CUT)

    def eof(self, half: _Half) -> None:
        flow = self.flow_from(half)
        if self.dead or self.cutting or flow.eof_seen:
            return
        flow.eof_seen = True
        flow.push(_Mark.EOF, extra=self.engine.linger)

    def lost(self, half: _Half, exc: Exception | None) -> None:
        if self.dead:
            return
        if exc is not None:
            # A reset (or a socket error) on one side is passed on as a reset.
            self.engine.resets += 1
            self.abort(count=False)
            return
        # Closed without an error and not by us: what was meant for it is lost,
        # and the close is passed on like a FIN.
        towards = self.flow_to(half)
        towards.discard()
        towards.eof_sent = True
        source = self.flow_from(half)
        if not source.eof_seen:
            self.eof(half)  # delivering that FIN finishes the connection
        elif source.eof_sent:
            self.finish()

    def finish(self) -> None:
        """Both sides closed: close both sockets gracefully."""
        if self.dead:
            return
        self.dead = True
        self.engine.conns.discard(self)
        for flow in (self.up, self.down):
            flow.discard()
        for half in (self.client, self.upstream):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.close()

    def abort(self, *, count: bool = True) -> None:
        """Reset both sides (RST) and forget the connection."""
        if self.dead:
            return
        self.dead = True
        engine = self.engine
        engine.conns.discard(self)
        if count:
            engine.resets += 1
        for flow in (self.up, self.down):
            flow.discard()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        for half in (self.client, self.upstream):
            if half.transport is not None and not half.transport.is_closing():
                _rst(half.transport)


class _Engine:
    """The proxy proper. Everything here runs in the proxy's own thread."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str,
        max_connections: int,
        connect_timeout: float,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.mode: Mode = "up"
        self.delay = 0.0
        self.jitter = 0.0
        self.limit: int | None = None
        self.linger = 0.0
        self.closing = False
        self.server: asyncio.Server | None = None
        self.holder: socket.socket | None = None
        self.conns: set[_Conn] = set()
        self.live: set[_Half] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.thawed = asyncio.Event()  # set unless blackholed
        self.thawed.set()
        self.stop = asyncio.Event()
        self._rng = random.Random()  # noqa: S311 - jitter, not security
        self.accepted = self.bytes_up = self.bytes_down = self.held = 0
        self.resets = self.cut = self.rejected = self.upstream_failures = self.dropped_bytes = 0

    # -- life cycle ----------------------------------------------------------

    def run(self, ready: concurrent.futures.Future[None], finished: concurrent.futures.Future[None]) -> None:
        """The thread's body: listen, report ready, serve until stopped, clean up."""
        try:
            self.loop.run_until_complete(self._main(ready))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        except Exception as exc:  # reported to start(); the thread must not die silently
            _settle(ready, exc)
        finally:
            self.loop.close()
            _settle(ready, RuntimeError("the fault proxy's thread stopped before listening"))
            finished.set_result(None)

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._reserve_port()
            await self.listen()
        except Exception as exc:
            self._release_port()
            _settle(ready, exc)
            return
        _settle(ready, None)
        try:
            await self.stop.wait()
        finally:
            await self._shutdown()

    def _new_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        return sock

    def _reserve_port(self) -> None:
        # A bound, never-listening socket keeps the port ours while refuse()
        # has closed the listener (connects to it get ECONNREFUSED).
        if not hasattr(socket, "SO_REUSEPORT"):
            return
        holder = self._new_socket()
        try:
            holder.bind((self.listen_host, 0))
        except OSError:
            holder.close()
            raise
        self.holder = holder
        self.port = holder.getsockname()[1]

    def _release_port(self) -> None:
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    async def listen(self) -> None:
        """Listen (again) on the proxy's port."""
        if self.server is not None:
            return
        sock = self._new_socket()
        try:
            sock.bind((self.listen_host, self.port))
            self.port = sock.getsockname()[1]
            self.server = await self.loop.create_server(self._accept, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            raise

    def _accept(self) -> _Half:
        return _Conn(self).client

    def stop_listening(self) -> None:
        """Close the listening socket: connects are refused by the kernel."""
        server, self.server = self.server, None
        if server is not None:
            server.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _shutdown(self) -> None:
        self.closing = True
        self.stop_listening()
        self.reset_all(count=False)
        for half in list(self.live):  # connections closing gracefully, too
            if half.transport is not None:
                _rst(half.transport)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT / 2)
        # Transports close their sockets in a callback: let those run (bounded).
        for _ in range(500):
            if not self.live:
                break
            await asyncio.sleep(0.002)
        self._release_port()

    # -- faults (called through FaultProxy._control) --------------------------

    def sample_delay(self) -> float:
        if self.jitter == 0.0:
            return self.delay
        return max(0.0, self.delay + self._rng.uniform(-self.jitter, self.jitter))

    def reset_all(self, *, count: bool = True) -> None:
        for conn in list(self.conns):
            conn.abort(count=count)

    def flush_all(self) -> None:
        for conn in list(self.conns):
            for flow in (conn.up, conn.down):
                flow.expedite()
                flow.flush()

    async def do_refuse(self) -> None:
        self.mode = "refuse"
        self.thawed.set()  # every waiting connection is reset below
        self.stop_listening()
        self.reset_all()

    async def do_blackhole(self) -> None:
        await self.listen()
        self.mode = "blackhole"
        self.thawed.clear()

    async def do_latency(self, seconds: float, jitter: float) -> None:
        self.delay = seconds
        self.jitter = jitter

    async def do_reset(self) -> None:
        self.reset_all()

    async def do_limit_data(self, nbytes: int) -> None:
        self.limit = nbytes
        for conn in self.conns:
            if not conn.cutting:
                conn.budget = nbytes

    async def do_slow_close(self, seconds: float) -> None:
        self.linger = seconds

    async def do_up(self) -> None:
        await self.listen()
        self.mode = "up"
        self.delay = self.jitter = self.linger = 0.0
        self.limit = None
        for conn in self.conns:
            conn.budget = None
        self.thawed.set()
        self.flush_all()

    def stats(self) -> ProxyStats:
        return ProxyStats(
            accepted=self.accepted,
            open=len(self.conns),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            held=self.held,
            resets=self.resets,
            cut=self.cut,
            rejected=self.rejected,
            upstream_failures=self.upstream_failures,
            dropped_bytes=self.dropped_bytes,
        )


def _settle(future: concurrent.futures.Future[None], exc: BaseException | None) -> None:
    """Resolve ``future`` unless it is resolved or cancelled already (start() gave up)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


def _seconds(label: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{label} must be a finite number of seconds; got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigurationError(f"{label} must be {'>' if positive else '>='} 0 seconds; got {value!r}")
    return float(value)


def _count(label: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{label} must be an int >= {minimum}; got {value!r}")
    return value


class FaultProxy:
    """A TCP proxy in front of one service, with faults switched on demand.

    Start it with ``await FaultProxy.start(host, port)`` (or
    :meth:`start_sync`), point the client at :meth:`url_for`, then call the
    fault setters. It runs in its own daemon thread (see the module docstring).

    Failure mode: it *is* the failure. Misuse fails loudly: bad arguments raise
    :class:`~degrade.ConfigurationError`, a setter on a closed proxy raises
    ``RuntimeError``, a setter the proxy's thread does not confirm within
    ``CONTROL_TIMEOUT`` raises ``TimeoutError``. Closing is idempotent and
    bounded; it resets every connection still open.
    """

    def __init__(self, engine: _Engine, thread: threading.Thread, finished: concurrent.futures.Future[None]):
        # Internal: use FaultProxy.start() or FaultProxy.start_sync().
        self._engine = engine
        self._thread = thread
        self._finished = finished
        self._lock = threading.Lock()
        self._closed = False

    # -- starting and stopping -----------------------------------------------

    @classmethod
    def _launch(
        cls, host: str, port: int, *, max_connections: int, connect_timeout: float
    ) -> tuple[FaultProxy, concurrent.futures.Future[None]]:
        if not isinstance(host, str) or not host:
            raise ConfigurationError(f"host must be a non-empty string such as '127.0.0.1'; got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be an int in 1..65535; got {port!r}")
        engine = _Engine(
            host,
            port,
            listen_host="127.0.0.1",
            max_connections=_count("max_connections", max_connections, minimum=1),
            connect_timeout=_seconds("connect_timeout", connect_timeout, positive=True),
        )
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=engine.run, args=(ready, finished), name=f"degrade-fault-proxy[{host}:{port}]", daemon=True
        )
        thread.start()
        return cls(engine, thread, finished), ready

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = 5.0,
    ) -> FaultProxy:
        """Start a proxy in front of ``host:port``; it listens on ``127.0.0.1:<proxy.port>``.

        The service need not be up: a connection the proxy cannot pass on
        (refused, or no answer within ``connect_timeout``) is reset and counted
        in ``stats.upstream_failures``.

        Args:
            host: The service's host (name, IPv4 or IPv6 address).
            port: The service's port.
            max_connections: Connections open at once; more are reset (``stats.rejected``).
            connect_timeout: Bound of each connect to the service, in seconds.

        Raises:
            ConfigurationError: an argument is out of range.
            TimeoutError: the proxy did not listen within ``START_TIMEOUT``.
            OSError: no port to listen on.
        """
        proxy, ready = cls._launch(
            host, port, max_connections=max_connections, connect_timeout=connect_timeout
        )
        waiter = asyncio.wrap_future(ready)
        try:
            done, _ = await asyncio.wait((waiter,), timeout=START_TIMEOUT)
        except BaseException:
            waiter.cancel()
            proxy.close_sync()
            raise
        if not done:
            waiter.cancel()
            proxy.close_sync()
            raise TimeoutError(f"the fault proxy did not start within {START_TIMEOUT:g}s")
        return proxy._started(ready)

    @classmethod
    def start_sync(
        cls,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = 5.0,
    ) -> FaultProxy:
        """:meth:`start` for synchronous code (a sync test, a script); blocks until it listens."""
        proxy, ready = cls._launch(
            host, port, max_connections=max_connections, connect_timeout=connect_timeout
        )
        try:
            ready.exception(timeout=START_TIMEOUT)
        except TimeoutError:
            proxy.close_sync()
            raise TimeoutError(f"the fault proxy did not start within {START_TIMEOUT:g}s") from None
        return proxy._started(ready)

    def _started(self, ready: concurrent.futures.Future[None]) -> FaultProxy:
        exc = ready.exception()
        if exc is not None:
            self.close_sync()
            raise exc
        return self

    def _request_stop(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        with contextlib.suppress(RuntimeError):  # the loop already closed (startup failed)
            self._engine.loop.call_soon_threadsafe(self._engine.stop.set)
        return True

    async def close(self) -> None:
        """Stop listening, reset every open connection and stop the thread.

        Idempotent; bounded by ``CLOSE_TIMEOUT`` (after which the daemon thread
        is left to finish on its own).
        """
        self._request_stop()
        await asyncio.wait((asyncio.wrap_future(self._finished),), timeout=CLOSE_TIMEOUT)
        self._join()

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code (fixture teardown, scripts)."""
        self._request_stop()
        with contextlib.suppress(TimeoutError):
            self._finished.result(timeout=CLOSE_TIMEOUT)
        self._join()

    def _join(self) -> None:
        if self._finished.done() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)  # it has returned from its loop already

    async def __aenter__(self) -> FaultProxy:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_sync()

    # -- where it is ---------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the proxy listens on: ``"127.0.0.1"``."""
        return self._engine.listen_host

    @property
    def port(self) -> int:
        """The port the proxy listens on (chosen free at start, kept across refuse/up)."""
        return self._engine.port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the proxy."""
        return (self.host, self.port)

    @property
    def upstream(self) -> tuple[str, int]:
        """``(host, port)`` of the service behind the proxy."""
        return (self._engine.upstream_host, self._engine.upstream_port)

    @property
    def mode(self) -> Mode:
        """``"up"``, ``"refuse"`` or ``"blackhole"`` (latency and the others combine with these)."""
        return self._engine.mode

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters (read without stopping the proxy)."""
        return self._engine.stats()

    def url_for(self, dsn: str) -> str:
        """The same URL or DSN with its host and port replaced by the proxy's.

        Scheme, user, password, path, query and fragment are kept byte for
        byte. An IPv6 host (``[::1]:5432``) is replaced like any other; a URL
        without a port (or without a host) gets the proxy's.

        Raises:
            ConfigurationError: not a URL (no ``scheme://``), or several hosts
                (``postgresql://h1:5432,h2:5432/db``: one proxy stands for one
                service). The message never repeats the URL, which may hold a password.
        """
        if not isinstance(dsn, str):
            raise ConfigurationError(f"url_for() takes a URL string; got {type(dsn).__name__}")
        scheme, sep, rest = dsn.partition("://")
        if not sep or not scheme or any(c in scheme for c in "/?#@"):
            raise ConfigurationError(
                "url_for() takes a URL: scheme://[user[:password]@]host[:port][/path][?query]"
            )
        ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
        end = min(ends, default=len(rest))
        netloc, tail = rest[:end], rest[end:]
        userinfo, at, hostport = netloc.rpartition("@")
        if "," in hostport:
            raise ConfigurationError(
                "url_for() rewrites a URL with one host; this one lists several (use one proxy per host)"
            )
        return f"{scheme}://{userinfo}{at}{self.host}:{self.port}{tail}"

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode
        up_host, up_port = self.upstream
        return f"<FaultProxy {self.host}:{self.port} -> {up_host}:{up_port} {state}>"

    # -- faults ----------------------------------------------------------------

    def _control(self, action: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy setters cannot be called from the proxy's own thread")
        with self._lock:
            if self._closed or self._finished.done():
                raise RuntimeError("this FaultProxy is closed; start a new one")
            future = asyncio.run_coroutine_threadsafe(action(), self._engine.loop)
        try:
            future.result(timeout=CONTROL_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the fault proxy did not apply the fault within {CONTROL_TIMEOUT:g}s"
            ) from None

    def refuse(self) -> None:
        """Refuse new connections (ECONNREFUSED at once) and reset the open ones (RST).

        What a client sees when the service is down or restarting. Replaces
        ``blackhole()``. Refused connects never reach the proxy, so they are
        not counted in ``stats.accepted``.
        """
        self._control(self._engine.do_refuse)

    def blackhole(self) -> None:
        """Accept new connections but forward nothing, either way; open connections freeze.

        What a client sees behind a dead network path or a hung server: its
        connect succeeds (the proxy accepts) and every read hangs until the
        client's own timeout. The service is not contacted for new connections
        until ``up()``. Data sent meanwhile is held (up to ``MAX_HELD`` bytes per
        direction, then the sender is back-pressured) and delivered by ``up()``.
        Replaces ``refuse()``.
        """
        self._control(self._engine.do_blackhole)

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay every chunk of data by ``seconds`` (+/- ``jitter``), in both directions.

        A request/response round trip therefore takes ``2 * seconds`` longer.
        Order is kept (a chunk never overtakes an earlier one, whatever the
        jitter). Chunks already held keep their delay. The TCP handshake itself
        is not delayed. ``latency(0)`` switches it off.

        Raises:
            ConfigurationError: a negative or non-finite number.
        """
        s = _seconds("latency", seconds)
        j = _seconds("jitter", jitter)

        async def apply() -> None:
            await self._engine.do_latency(s, j)

        self._control(apply)

    def reset(self) -> None:
        """Reset every open connection (RST), once; new connections are served as usual.

        What a pooled client sees after a failover, a server restart or a
        load balancer dropping idle connections: its next call on an old
        connection fails with a connection error, a new connection works. Other
        faults stay as they are.
        """
        self._control(self._engine.do_reset)

    def limit_data(self, nbytes: int) -> None:
        """Cut each connection (RST) once ``nbytes`` more bytes have passed it, both ways together.

        New connections get ``nbytes`` from their start, open ones from now.
        Bytes beyond the limit are dropped (``stats.dropped_bytes``). Models a
        connection dying mid-response. ``limit_data(0)`` cuts on the first byte.

        Raises:
            ConfigurationError: not an int >= 0.
        """
        n = _count("limit_data", nbytes, minimum=0)

        async def apply() -> None:
            await self._engine.do_limit_data(n)

        self._control(apply)

    def slow_close(self, seconds: float) -> None:
        """Pass each close (FIN) on ``seconds`` late, from either side.

        Precisely: when one side closes its end (FIN), the proxy forwards all
        data sent before it as usual but shuts the other side's end only
        ``seconds`` later; data may still flow the other way meanwhile. A client
        that waits for the server to close (a graceful shutdown, a ``QUIT``) waits
        that long; the server holds a departed client's session that long.
        Resets are still passed on at once.

        Raises:
            ConfigurationError: not a number > 0.
        """
        s = _seconds("slow_close", seconds, positive=True)

        async def apply() -> None:
            await self._engine.do_slow_close(s)

        self._control(apply)

    def up(self) -> None:
        """Clear every fault: listen again, forward promptly; frozen connections resume.

        Data held by ``blackhole()`` or ``latency()`` is delivered at once, in
        order. Connections reset earlier stay gone; clients reconnect.
        """
        self._control(self._engine.do_up)

    @overload
    def outage(self, fault: Literal["refuse", "blackhole", "reset"] = "refuse", /) -> Outage: ...
    @overload
    def outage(self, fault: Literal["latency", "slow_close"], seconds: float, /) -> Outage: ...
    @overload
    def outage(self, fault: Literal["limit_data"], nbytes: int, /) -> Outage: ...

    def outage(self, fault: Fault = "refuse", amount: float | None = None, /) -> Outage:
        """A context manager (``with`` or ``async with``) that applies a fault and then ``up()``.

        ``proxy.outage("blackhole")``, ``proxy.outage("latency", 0.2)``,
        ``proxy.outage("limit_data", 1024)``. On exit the proxy is restored with
        ``up()`` (which clears every fault), unless it was closed inside the block.

        Raises:
            ConfigurationError: an unknown fault, or a missing or extra amount.
        """
        if fault not in _FAULTS:
            raise ConfigurationError(f"unknown fault {fault!r}; choose one of {', '.join(_FAULTS)}")
        needs_amount = fault in ("latency", "slow_close", "limit_data")
        if needs_amount and amount is None:
            raise ConfigurationError(f"outage({fault!r}, ...) needs an amount, e.g. outage('latency', 0.2)")
        if not needs_amount and amount is not None:
            raise ConfigurationError(f"outage({fault!r}) takes no amount")
        return Outage(self, fault, amount)

    def _apply(self, fault: Fault, amount: float | None) -> None:
        if fault == "refuse":
            self.refuse()
        elif fault == "blackhole":
            self.blackhole()
        elif fault == "reset":
            self.reset()
        elif amount is None:
            raise ConfigurationError(f"outage({fault!r}, ...) needs an amount")
        elif fault == "latency":
            self.latency(amount)
        elif fault == "slow_close":
            self.slow_close(amount)
        else:
            self.limit_data(amount)  # type: ignore[arg-type]  # limit_data validates it is an int


class Outage:
    """The context manager returned by :meth:`FaultProxy.outage`; sync or async.

    Failure mode: entering applies the fault (errors from the setter
    propagate); exiting restores the proxy with ``up()`` even when the block
    raised, and does nothing if the proxy was closed inside the block.
    """

    def __init__(self, proxy: FaultProxy, fault: Fault, amount: float | None) -> None:
        self.proxy = proxy
        self.fault = fault
        self.amount = amount

    def __enter__(self) -> FaultProxy:
        self.proxy._apply(self.fault, self.amount)
        return self.proxy

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.proxy.closed:
            self.proxy.up()

    async def __aenter__(self) -> FaultProxy:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)
