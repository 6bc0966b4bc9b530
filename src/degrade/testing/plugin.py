"""pytest fixtures for outage tests: ``fault_proxy`` and ``simulate_outage``.

pytest loads this module by itself once degrade is installed (entry point
``pytest11``, name ``degrade``; ``-p no:degrade`` turns it off). It needs only
the standard library, pytest and degrade's core, so it imports cleanly without
any optional extra.

``fault_proxy`` starts :class:`~degrade.testing.FaultProxy` instances and closes
them at teardown::

    async def test_cache_survives_a_redis_blackhole(fault_proxy):
        proxy = await fault_proxy("127.0.0.1", 6379)
        client = redis.asyncio.Redis.from_url(proxy.url_for(REDIS_URL), socket_timeout=0.2)
        with proxy.outage("blackhole"):
            ...

``simulate_outage`` holds a :class:`~degrade.Dependency` down in-process (no
network; its probe cannot close it) and restores it at the end of the ``with``
block, or at teardown at the latest::

    def test_login_answers_503_without_redis(simulate_outage, client):
        with simulate_outage(redis_dep):
            assert client.post("/login").status_code == 503

Both fixtures are plain (sync) fixtures: the proxy runs in its own thread, so
they work in sync tests, pytest-asyncio and anyio tests alike, whatever loop
scope those use.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

import pytest

from .proxy import MAX_CONNECTIONS, FaultProxy

if TYPE_CHECKING:
    from ..dependency import Dependency

__all__ = ["FaultProxyFactory", "ForcedOutage", "ForcedOutageFactory", "fault_proxy", "simulate_outage"]

#: Most proxies one test may start through the ``fault_proxy`` fixture.
MAX_PROXIES_PER_TEST = 32


class FaultProxyFactory:
    """What the ``fault_proxy`` fixture gives: ``proxy = await fault_proxy(host, port)``.

    Every proxy it started is closed at teardown (open connections are reset).

    Failure mode: starting more than ``MAX_PROXIES_PER_TEST`` proxies in one
    test raises ``RuntimeError`` (a loop that forgot to reuse its proxy);
    a proxy that cannot start raises from the call, as ``FaultProxy.start`` does.
    """

    def __init__(self, *, max_proxies: int = MAX_PROXIES_PER_TEST) -> None:
        self._max = max_proxies
        self._proxies: list[FaultProxy] = []

    def _check_room(self) -> None:
        if len(self._proxies) >= self._max:
            raise RuntimeError(
                f"this test already started {self._max} fault proxies; "
                "reuse one (proxy.up() clears its faults)"
            )

    async def __call__(
        self, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS, connect_timeout: float = 5.0
    ) -> FaultProxy:
        """Start a proxy in front of ``host:port`` (see :meth:`FaultProxy.start`)."""
        self._check_room()
        proxy = await FaultProxy.start(
            host, port, max_connections=max_connections, connect_timeout=connect_timeout
        )
        self._proxies.append(proxy)
        return proxy

    def start_sync(
        self, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS, connect_timeout: float = 5.0
    ) -> FaultProxy:
        """The same, for a sync test: blocks until the proxy listens."""
        self._check_room()
        proxy = FaultProxy.start_sync(
            host, port, max_connections=max_connections, connect_timeout=connect_timeout
        )
        self._proxies.append(proxy)
        return proxy

    @property
    def proxies(self) -> tuple[FaultProxy, ...]:
        """The proxies started so far, oldest first."""
        return tuple(self._proxies)

    def close_all(self) -> None:
        """Close every proxy started here (each bounded; idempotent)."""
        proxies, self._proxies = self._proxies, []
        for proxy in reversed(proxies):
            proxy.close_sync()


class ForcedOutage:
    """Dependencies held down by ``simulate_outage(...)`` until :meth:`restore`.

    (Named ``SimulatedOutage`` before 0.2.0; that name still works, with a ``DeprecationWarning``.)

    Usable as a context manager (``with simulate_outage(dep):``) or kept as a
    value (down until ``restore()`` or teardown).

    Failure mode: none of its own; restoring twice is harmless, and a
    dependency forced down by someone else as well stays down until they let go
    too (``Dependency.forced_down`` nests).
    """

    def __init__(self, dependencies: tuple[Dependency, ...]) -> None:
        self.dependencies = dependencies
        self._restored = False
        self._stack = contextlib.ExitStack()
        try:
            for dep in dependencies:
                self._stack.enter_context(dep.forced_down())
        except BaseException:
            self._stack.close()
            raise

    @property
    def active(self) -> bool:
        """True until :meth:`restore` ran."""
        return not self._restored

    def restore(self) -> None:
        """Let the dependencies recover (each goes back to ``ok`` unless held by another outage)."""
        if self._restored:
            return
        self._restored = True
        self._stack.close()

    def __enter__(self) -> ForcedOutage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


class ForcedOutageFactory:
    """What the ``simulate_outage`` fixture gives: ``with simulate_outage(dep, ...):``.

    (Named ``OutageSimulator`` before 0.2.0; that name still works, with a ``DeprecationWarning``.)

    Calling it forces every given dependency down at once, in-process: safety
    nets see ``is_down`` and take their degraded path, and no probe or success
    closes it. It comes back up at the end of the ``with`` block, or at
    teardown at the latest.

    Failure mode: passing something that is not a degrade Dependency raises
    ``TypeError`` before anything is forced down.
    """

    def __init__(self) -> None:
        self._outages: list[ForcedOutage] = []

    def __call__(self, *dependencies: Dependency) -> ForcedOutage:
        """Force ``dependencies`` down now; restore them on exit or at teardown."""
        if not dependencies:
            raise TypeError("simulate_outage() needs at least one Dependency")
        for dep in dependencies:
            if not callable(getattr(dep, "forced_down", None)):
                raise TypeError(
                    "simulate_outage() takes degrade Dependency objects (from registry.dependency()); "
                    f"got {type(dep).__name__}"
                )
        outage = ForcedOutage(dependencies)
        self._outages.append(outage)
        return outage

    def restore_all(self) -> None:
        """Restore every outage still active, newest first."""
        outages, self._outages = self._outages, []
        for outage in reversed(outages):
            outage.restore()


@pytest.fixture
def fault_proxy() -> Iterator[FaultProxyFactory]:
    """A factory of fault proxies, closed at teardown.

    Use ``proxy = await fault_proxy(host, port)``; in a sync test,
    ``proxy = fault_proxy.start_sync(host, port)``.
    """
    factory = FaultProxyFactory()
    try:
        yield factory
    finally:
        factory.close_all()


@pytest.fixture
def simulate_outage() -> Iterator[ForcedOutageFactory]:
    """Hold Dependencies down in-process, restored at teardown at the latest.

    Use ``with simulate_outage(dep, ...):``; they come back up when the block
    ends, or at teardown if the returned outage was kept instead.
    """
    simulator = ForcedOutageFactory()
    try:
        yield simulator
    finally:
        simulator.restore_all()


_RENAMED = {"OutageSimulator": "ForcedOutageFactory", "SimulatedOutage": "ForcedOutage"}


def __getattr__(name: str) -> object:
    new = _RENAMED.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"degrade.testing.plugin.{name} is deprecated; use degrade.testing.plugin.{new}",
        DeprecationWarning,
        stacklevel=2,
    )
    return globals()[new]
