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

This module is the public API. The proxy proper runs in its own thread: its
event loop, sockets and fault state are in :mod:`degrade.testing._engine`
(why a thread, why setters block, how ``refuse()`` keeps the port), one proxied
connection and its delay lines in :mod:`degrade.testing._conn` (how held data
is bounded and resumed).

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

import math
import warnings
from types import TracebackType
from typing import Literal, overload

from .._validate import count
from ..exceptions import ConfigurationError

# The ``X as X`` imports keep MAX_HELD and the *_TIMEOUT bounds (named in the docstrings
# below) importable from here, as before the split; mypy --strict reads that form as a re-export.
from ._conn import MAX_HELD as MAX_HELD  # noqa: PLC0414
from ._conn import Mode
from ._engine import CLOSE_TIMEOUT as CLOSE_TIMEOUT  # noqa: PLC0414
from ._engine import CONTROL_TIMEOUT as CONTROL_TIMEOUT  # noqa: PLC0414
from ._engine import START_TIMEOUT as START_TIMEOUT  # noqa: PLC0414
from ._engine import Engine, ProxyStats, Runner, StatsView

__all__ = ["Fault", "FaultProxy", "ProxyOutage", "ProxyStats"]

#: A fault name accepted by :meth:`FaultProxy.outage`.
Fault = Literal["refuse", "blackhole", "reset", "latency", "limit_data", "slow_close"]

#: Default cap of connections open at once; beyond it new ones are reset.
MAX_CONNECTIONS = 256

_FAULTS = ("refuse", "blackhole", "reset", "latency", "limit_data", "slow_close")


def _seconds(label: str, value: object, *, positive: bool = False) -> float:
    # Accepts what _validate.seconds accepts; kept for the wording of its messages.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{label} must be a finite number of seconds; got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigurationError(f"{label} must be {'>' if positive else '>='} 0 seconds; got {value!r}")
    return float(value)


class FaultProxy:
    """A TCP proxy in front of one service, with faults switched on demand.

    Start it with ``await FaultProxy.start(host, port)`` (or
    :meth:`start_sync`), point the client at :meth:`url_for`, then call the
    fault setters. It runs in its own daemon thread (see :mod:`degrade.testing._engine`).

    Failure mode: it *is* the failure. Misuse fails loudly: bad arguments raise
    :class:`~degrade.ConfigurationError`, a setter on a closed proxy raises
    ``RuntimeError``, a setter the proxy's thread does not confirm within
    ``CONTROL_TIMEOUT`` raises ``TimeoutError``. Closing is idempotent and
    bounded; it resets every connection still open.
    """

    def __init__(self, runner: Runner):
        # Internal: use FaultProxy.start() or FaultProxy.start_sync().
        self._runner = runner
        self._engine = runner.engine

    # -- starting and stopping -----------------------------------------------

    @classmethod
    def _launch(cls, host: str, port: int, *, max_connections: int, connect_timeout: float) -> FaultProxy:
        if not isinstance(host, str) or not host:
            raise ConfigurationError(f"host must be a non-empty string such as '127.0.0.1'; got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be an int in 1..65535; got {port!r}")
        engine = Engine(
            host,
            port,
            listen_host="127.0.0.1",
            max_connections=count("max_connections", max_connections, minimum=1),
            connect_timeout=_seconds("connect_timeout", connect_timeout, positive=True),
        )
        return cls(Runner(engine, name=f"degrade-fault-proxy[{host}:{port}]"))

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
        in ``stats().upstream_failures``.

        Args:
            host: The service's host (name, IPv4 or IPv6 address).
            port: The service's port.
            max_connections: Connections open at once; more are reset (``stats().rejected``).
            connect_timeout: Bound of each connect to the service, in seconds.

        Raises:
            ConfigurationError: an argument is out of range.
            TimeoutError: the proxy did not listen within ``START_TIMEOUT``.
            OSError: no port to listen on.
        """
        proxy = cls._launch(host, port, max_connections=max_connections, connect_timeout=connect_timeout)
        await proxy._runner.wait_ready()
        return proxy

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
        proxy = cls._launch(host, port, max_connections=max_connections, connect_timeout=connect_timeout)
        proxy._runner.wait_ready_sync()
        return proxy

    async def close(self) -> None:
        """Stop listening, reset every open connection and stop the thread.

        Idempotent; bounded by ``CLOSE_TIMEOUT`` (after which the daemon thread
        is left to finish on its own).
        """
        await self._runner.stop()

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code (fixture teardown, scripts)."""
        self._runner.stop_sync()

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
        return self._runner.closed

    @property
    def stats(self) -> StatsView:
        """The counters: ``proxy.stats()`` is a frozen :class:`ProxyStats` snapshot, made on each call.

        Read without stopping the proxy; later traffic does not change a
        snapshot you kept. (Before 0.2.0 ``proxy.stats`` was the snapshot
        itself. Reading a field off it, ``proxy.stats.accepted``, still works
        for one minor version with a ``DeprecationWarning``; use
        ``proxy.stats().accepted``.)
        """
        return StatsView(self._engine.stats)

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
        state = "closed" if self.closed else self.mode
        up_host, up_port = self.upstream
        return f"<FaultProxy {self.host}:{self.port} -> {up_host}:{up_port} {state}>"

    # -- faults ----------------------------------------------------------------

    def refuse(self) -> None:
        """Refuse new connections (ECONNREFUSED at once) and reset the open ones (RST).

        What a client sees when the service is down or restarting. Replaces
        ``blackhole()``. Refused connects never reach the proxy, so they are
        not counted in ``stats().accepted``.
        """
        self._runner.control(self._engine.do_refuse)

    def blackhole(self) -> None:
        """Accept new connections but forward nothing, either way; open connections freeze.

        What a client sees behind a dead network path or a hung server: its
        connect succeeds (the proxy accepts) and every read hangs until the
        client's own timeout. The service is not contacted for new connections
        until ``up()``. Data sent meanwhile is held (up to ``MAX_HELD`` bytes per
        direction, then the sender is back-pressured) and delivered by ``up()``.
        Replaces ``refuse()``.
        """
        self._runner.control(self._engine.do_blackhole)

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

        self._runner.control(apply)

    def reset(self) -> None:
        """Reset every open connection (RST), once; new connections are served as usual.

        What a pooled client sees after a failover, a server restart or a
        load balancer dropping idle connections: its next call on an old
        connection fails with a connection error, a new connection works. Other
        faults stay as they are.
        """
        self._runner.control(self._engine.do_reset)

    def limit_data(self, nbytes: int) -> None:
        """Cut each connection (RST) once ``nbytes`` more bytes have passed it, both ways together.

        New connections get ``nbytes`` from their start, open ones from now.
        Bytes beyond the limit are dropped (``stats().dropped_bytes``). Models a
        connection dying mid-response. ``limit_data(0)`` cuts on the first byte.

        Raises:
            ConfigurationError: not an int >= 0.
        """
        n = count("limit_data", nbytes, minimum=0)

        async def apply() -> None:
            await self._engine.do_limit_data(n)

        self._runner.control(apply)

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

        self._runner.control(apply)

    def up(self) -> None:
        """Clear every fault: listen again, forward promptly; frozen connections resume.

        Data held by ``blackhole()`` or ``latency()`` is delivered at once, in
        order. Connections reset earlier stay gone; clients reconnect.
        """
        self._runner.control(self._engine.do_up)

    @overload
    def outage(self, fault: Literal["refuse", "blackhole", "reset"] = "refuse", /) -> ProxyOutage: ...
    @overload
    def outage(self, fault: Literal["latency", "slow_close"], seconds: float, /) -> ProxyOutage: ...
    @overload
    def outage(self, fault: Literal["limit_data"], nbytes: int, /) -> ProxyOutage: ...

    def outage(self, fault: Fault = "refuse", amount: float | None = None, /) -> ProxyOutage:
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
        return ProxyOutage(self, fault, amount)

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


class ProxyOutage:
    """The context manager returned by :meth:`FaultProxy.outage`; sync or async.

    (Named ``Outage`` before 0.2.0; that name still works, with a ``DeprecationWarning``.)

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


def __getattr__(name: str) -> object:
    if name == "Outage":
        warnings.warn(
            "degrade.testing.Outage is deprecated; use degrade.testing.ProxyOutage",
            DeprecationWarning,
            stacklevel=2,
        )
        return ProxyOutage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
