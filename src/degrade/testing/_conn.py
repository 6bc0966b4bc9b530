"""One proxied connection: the client's socket, the service's, and a delay line each way.

Part of :class:`~degrade.testing.FaultProxy`'s engine; everything here runs in
the proxy's own thread (see :mod:`degrade.testing._engine`), driven by asyncio
protocol callbacks, with no lock: the engine's loop is the only one touching it.

The connections obey, and count into, one :class:`State` (the fault settings
and the counters), which the engine extends and its fault setters change.
A :class:`Conn` has two :class:`Half` objects (the client's socket and the
service's) and two :class:`Flow` objects (client to service, service to
client). Data goes straight through while no fault holds it; otherwise it is
queued with a deadline, in order, and delivered when due. Design decisions:

* **up() after blackhole resumes frozen connections**: held data is delivered
  in order (:meth:`Flow.expedite` makes it due now), as when a network
  partition heals and TCP retransmits. A client that gave up meanwhile has
  closed its side already. To model the other outcome, ``reset()`` before
  ``up()``.
* **Held data is bounded**: at most :data:`MAX_HELD` bytes per direction of a
  connection (delayed by latency or frozen by blackhole); beyond it the flow
  stops reading from the sender, which is TCP back-pressure.
* **A reset is a real RST** (``SO_LINGER`` 0, then abort), so the peer sees
  ``ECONNRESET`` rather than a clean close (FIN).
* **A blackholed connection does not touch the service** until ``up()``; every
  connect to the service is bounded by the engine's ``connect_timeout``, and a
  connect that fails resets the client and counts ``upstream_failures``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
from collections import deque
from collections.abc import Coroutine
from typing import Any, Literal, cast

__all__ = ["MAX_HELD", "Conn", "Flow", "Half", "Mark", "Mode", "State", "rst"]

#: ``"up"``, ``"refuse"`` or ``"blackhole"``: they replace each other; the other faults combine.
Mode = Literal["up", "refuse", "blackhole"]

#: Most bytes held (delayed or frozen) per direction of one connection before
#: the proxy stops reading from the sender (TCP back-pressure takes over).
MAX_HELD = 1024 * 1024

_LINGER_RST = struct.pack("ii", 1, 0)


class Mark(enum.Enum):
    """A marker queued in a flow, in order with the data."""

    EOF = "eof"  # pass a close (FIN) on
    CUT = "cut"  # limit_data reached: reset the connection


class State:
    """What the connections obey and count: the fault settings, the counters, the loop.

    :class:`~degrade.testing._engine.Engine` extends it (life cycle, listening
    socket, the fault setters, which change these settings); every connection
    reads the settings and bumps the counters. All in the proxy's own thread.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, max_connections: int, connect_timeout: float
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.loop = asyncio.new_event_loop()
        self.mode: Mode = "up"
        self.delay = 0.0
        self.jitter = 0.0
        self.limit: int | None = None
        self.linger = 0.0
        self.closing = False
        self.conns: set[Conn] = set()
        self.live: set[Half] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.thawed = asyncio.Event()  # set unless blackholed
        self.thawed.set()
        self._rng = random.Random()  # noqa: S311 - jitter, not security
        self.accepted = self.bytes_up = self.bytes_down = self.held = 0
        self.resets = self.cut = self.rejected = self.upstream_failures = self.dropped_bytes = 0

    def sample_delay(self) -> float:
        """The delay for the next chunk: ``delay`` +/- ``jitter``, never below 0."""
        if self.jitter == 0.0:
            return self.delay
        return max(0.0, self.delay + self._rng.uniform(-self.jitter, self.jitter))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the proxy's loop, kept until it ends (cancelled at shutdown)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def rst(transport: asyncio.Transport) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees ECONNRESET."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class Half(asyncio.Protocol):
    """One socket of a proxied connection: the client's or the service's."""

    def __init__(self, conn: Conn) -> None:
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


class Flow:
    """One direction of a connection: a delay line from ``src`` to ``dst``."""

    def __init__(self, conn: Conn, src: Half, dst: Half, *, up: bool) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.up = up
        self.queue: deque[tuple[float, bytes | Mark]] = deque()
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

    def push(self, item: bytes | Mark, extra: float = 0.0) -> None:
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
                if self.dst.paused and item is not Mark.CUT:
                    break  # resume_writing() flushes again
                self.queue.popleft()
                if not self._deliver(transport, item):
                    return  # the connection ended
        # Frozen, not connected yet, or waiting: hold, up to MAX_HELD.
        self.update_reading()

    def _deliver(self, transport: asyncio.Transport, item: bytes | Mark) -> bool:
        conn = self.conn
        if isinstance(item, bytes):
            self.held -= len(item)
            conn.engine.held -= len(item)
            self.write(transport, item)
            return True
        if item is Mark.CUT:
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


class Conn:
    """One proxied connection: the client's socket, the service's, two flows."""

    def __init__(self, engine: State) -> None:
        self.engine = engine
        self.client = Half(self)
        self.upstream = Half(self)
        self.up = Flow(self, self.client, self.upstream, up=True)
        self.down = Flow(self, self.upstream, self.client, up=False)
        self.budget = engine.limit  # bytes left before limit_data cuts it
        self.cutting = False
        self.dead = False
        self.task: asyncio.Task[None] | None = None

    def flow_from(self, half: Half) -> Flow:
        return self.up if half is self.client else self.down

    def flow_to(self, half: Half) -> Flow:
        return self.down if half is self.client else self.up

    def other(self, flow: Flow) -> Flow:
        return self.down if flow is self.up else self.up

    def made(self, half: Half, transport: asyncio.Transport) -> None:
        engine = self.engine
        if half is self.upstream:
            if self.dead:
                rst(transport)  # the client left while we were connecting
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

    def received(self, half: Half, data: bytes) -> None:
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
            flow.push(Mark.CUT)

    def eof(self, half: Half) -> None:
        flow = self.flow_from(half)
        if self.dead or self.cutting or flow.eof_seen:
            return
        flow.eof_seen = True
        flow.push(Mark.EOF, extra=self.engine.linger)

    def lost(self, half: Half, exc: Exception | None) -> None:
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
                rst(half.transport)
