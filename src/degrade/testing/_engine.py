"""The fault proxy's engine: its own event loop in a daemon thread, its sockets, its faults.

:class:`~degrade.testing.FaultProxy` (in :mod:`degrade.testing.proxy`) is the
public face; this module is what runs behind it. :class:`Engine` lives in the
proxy's thread (the loop, the listening socket, the fault state, the open
connections of :mod:`degrade.testing._conn`); :class:`Runner` is that thread
seen from the caller's side (start it, run a fault in it, stop it). Design
decisions:

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
* **Everything is bounded**: at most ``max_connections`` open connections
  (more are reset and counted as ``rejected``), at most ``MAX_HELD`` bytes
  held per direction of a connection (see :mod:`degrade.testing._conn`), every
  connect to the upstream bounded by ``connect_timeout``, every control call
  and the shutdown bounded.
* **``proxy.stats()`` returns a frozen :class:`ProxyStats`**, made on each
  call, the library's one stats shape (as ``limiter.stats()``,
  ``cache.stats()`` and ``bus.stats()``). Before 0.2.0 ``proxy.stats`` was a
  property returning that snapshot, so ``proxy.stats.accepted`` was the
  spelling; :class:`StatsView` keeps it working for one minor version with a
  ``DeprecationWarning`` naming ``FaultProxy.stats().accepted``. The property
  makes a view on each read, holding the snapshot made then, which is what a
  field read off it returns: a view kept in a variable (``before =
  proxy.stats``) still does not change, as the old snapshot did not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import socket
import threading
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ._conn import Conn, Half, State, rst

__all__ = [
    "CLOSE_TIMEOUT",
    "CONTROL_TIMEOUT",
    "START_TIMEOUT",
    "Engine",
    "ProxyStats",
    "Runner",
    "StatsView",
    "settle",
]

#: Seconds a control call (a setter) may wait for the proxy's thread.
CONTROL_TIMEOUT = 5.0
#: Seconds ``start()`` may wait for the proxy to listen.
START_TIMEOUT = 5.0
#: Seconds ``close()`` may wait for the proxy's thread to finish.
CLOSE_TIMEOUT = 5.0


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

    Failure mode: none; it is a plain value. The counters are read while the
    proxy's thread keeps running, so the fields of a snapshot taken while data
    flows need not agree exactly with one another.
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


_FIELDS = frozenset(f.name for f in dataclasses.fields(ProxyStats))


def _deprecated(name: str) -> None:
    # stacklevel 3: this function, StatsView.__getattr__, then the caller's line.
    warnings.warn(
        f"FaultProxy.stats.{name} is deprecated; use FaultProxy.stats().{name} "
        "(FaultProxy.stats() returns a frozen ProxyStats snapshot)",
        DeprecationWarning,
        stacklevel=3,
    )


class StatsView:
    """What ``proxy.stats`` is: call it for a :class:`ProxyStats` snapshot.

    A field read off it (``proxy.stats.accepted``, the spelling before 0.2.0)
    still works for one minor version with a ``DeprecationWarning`` naming
    ``FaultProxy.stats().accepted``; it returns the field of the snapshot made
    when ``proxy.stats`` was read, as before (a view kept in a variable does not
    change). Setting a field raises ``FrozenInstanceError``, as it did.

    Failure mode: none; an unknown attribute raises ``AttributeError``.
    """

    __slots__ = ("_kept", "_read")
    _read: Callable[[], ProxyStats]
    _kept: ProxyStats

    def __init__(self, read: Callable[[], ProxyStats]) -> None:
        object.__setattr__(self, "_read", read)
        object.__setattr__(self, "_kept", read())

    def __call__(self) -> ProxyStats:
        return self._read()

    def __getattr__(self, name: str) -> int:
        if name not in _FIELDS:
            raise AttributeError(f"FaultProxy.stats has no attribute {name!r}; call it: FaultProxy.stats()")
        _deprecated(name)
        value: int = getattr(self._kept, name)
        return value

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FIELDS:
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r}: FaultProxy.stats() is a frozen snapshot"
            )
        raise AttributeError(f"FaultProxy.stats has no attribute {name!r}")

    def __repr__(self) -> str:
        return repr(self._kept)


class Engine(State):
    """The proxy proper: its loop, its listening socket, the faults. Runs in the proxy's own thread.

    The fault settings and counters it shares with its connections are
    :class:`~degrade.testing._conn.State`'s.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str,
        max_connections: int,
        connect_timeout: float,
    ) -> None:
        super().__init__(
            upstream_host, upstream_port, max_connections=max_connections, connect_timeout=connect_timeout
        )
        self.listen_host = listen_host
        self.port = 0
        self.server: asyncio.Server | None = None
        self.holder: socket.socket | None = None
        self.stop = asyncio.Event()

    # -- life cycle ----------------------------------------------------------

    def run(self, ready: concurrent.futures.Future[None], finished: concurrent.futures.Future[None]) -> None:
        """The thread's body: listen, report ready, serve until stopped, clean up."""
        try:
            self.loop.run_until_complete(self._main(ready))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        except Exception as exc:  # reported to start(); the thread must not die silently
            settle(ready, exc)
        finally:
            self.loop.close()
            settle(ready, RuntimeError("the fault proxy's thread stopped before listening"))
            finished.set_result(None)

    async def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._reserve_port()
            await self.listen()
        except Exception as exc:
            self._release_port()
            settle(ready, exc)
            return
        settle(ready, None)
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

    def _accept(self) -> Half:
        return Conn(self).client

    def stop_listening(self) -> None:
        """Close the listening socket: connects are refused by the kernel."""
        server, self.server = self.server, None
        if server is not None:
            server.close()

    async def _shutdown(self) -> None:
        self.closing = True
        self.stop_listening()
        self.reset_all(count=False)
        for half in list(self.live):  # connections closing gracefully, too
            if half.transport is not None:
                rst(half.transport)
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


def settle(future: concurrent.futures.Future[None], exc: BaseException | None) -> None:
    """Resolve ``future`` unless it is resolved or cancelled already (start() gave up)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


class Runner:
    """The proxy's thread seen from the caller's side: start it, run a fault in it, stop it.

    Its methods run in the caller's thread (any thread but the proxy's own).
    Starting the thread is :meth:`__init__`; waiting until it listens is
    :meth:`wait_ready` (or :meth:`wait_ready_sync`), which stops it again on
    any failure.
    """

    def __init__(self, engine: Engine, *, name: str) -> None:
        self.engine = engine
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.closed = False  # close() was called (set once, under the lock)
        self._lock = threading.Lock()
        self.thread = threading.Thread(
            target=engine.run, args=(self.ready, self.finished), name=name, daemon=True
        )
        self.thread.start()

    async def wait_ready(self) -> None:
        """Wait until the engine listens, at most ``START_TIMEOUT``; else stop it and raise."""
        waiter = asyncio.wrap_future(self.ready)
        try:
            done, _ = await asyncio.wait((waiter,), timeout=START_TIMEOUT)
        except BaseException:
            waiter.cancel()
            self.stop_sync()
            raise
        if not done:
            waiter.cancel()
            self.stop_sync()
            raise TimeoutError(f"the fault proxy did not start within {START_TIMEOUT:g}s")
        self._check_ready()

    def wait_ready_sync(self) -> None:
        """:meth:`wait_ready` for synchronous code; blocks."""
        try:
            self.ready.exception(timeout=START_TIMEOUT)
        except TimeoutError:
            self.stop_sync()
            raise TimeoutError(f"the fault proxy did not start within {START_TIMEOUT:g}s") from None
        self._check_ready()

    def _check_ready(self) -> None:
        exc = self.ready.exception()
        if exc is not None:
            self.stop_sync()
            raise exc

    def control(self, action: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``action()`` in the proxy's loop and wait for it, at most ``CONTROL_TIMEOUT``."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("FaultProxy setters cannot be called from the proxy's own thread")
        with self._lock:
            if self.closed or self.finished.done():
                raise RuntimeError("this FaultProxy is closed; start a new one")
            future = asyncio.run_coroutine_threadsafe(action(), self.engine.loop)
        try:
            future.result(timeout=CONTROL_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the fault proxy did not apply the fault within {CONTROL_TIMEOUT:g}s"
            ) from None

    def _request_stop(self) -> bool:
        with self._lock:
            if self.closed:
                return False
            self.closed = True
        with contextlib.suppress(RuntimeError):  # the loop already closed (startup failed)
            self.engine.loop.call_soon_threadsafe(self.engine.stop.set)
        return True

    async def stop(self) -> None:
        """Ask the engine to shut down and wait for its thread, at most ``CLOSE_TIMEOUT``; idempotent."""
        self._request_stop()
        await asyncio.wait((asyncio.wrap_future(self.finished),), timeout=CLOSE_TIMEOUT)
        self._join()

    def stop_sync(self) -> None:
        """:meth:`stop` for synchronous code; blocks."""
        self._request_stop()
        with contextlib.suppress(TimeoutError):
            self.finished.result(timeout=CLOSE_TIMEOUT)
        self._join()

    def _join(self) -> None:
        if self.finished.done() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=1.0)  # it has returned from its loop already
