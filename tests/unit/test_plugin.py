"""The pytest plugin: fixtures used from a throwaway test project (pytester), and their helpers."""

from __future__ import annotations

import sys
import textwrap

import pytest

from degrade import Registry, Severity
from degrade.testing.plugin import FaultProxyFactory, ForcedOutageFactory

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error
"""

# A throwaway project: async (pytest-asyncio) and sync tests using both fixtures.
# Later tests check what earlier tests' teardown did, so they run in file order.
PROJECT = """
import asyncio
import socket

import pytest

from degrade import Registry, Severity, fail_soft

REGISTRY = Registry(version="t")
CACHE = REGISTRY.dependency("cache", severity=Severity.SEV2)
STARTED = []


@fail_soft(CACHE, fallback="fallback", reason="served without the cache")
def read():
    return "live"


async def echo(reader, writer):
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_async_proxy_faults(fault_proxy):
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        proxy = await fault_proxy("127.0.0.1", server.sockets[0].getsockname()[1])
        STARTED.append(proxy)
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 2) == b"hi"
        async with proxy.outage("refuse"):
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*proxy.address)
        writer.close()
        assert proxy.stats().accepted == 1
    finally:
        server.close()
        await server.wait_closed()


def test_the_proxy_was_closed_at_teardown():
    assert len(STARTED) == 1 and STARTED[0].closed


def test_sync_proxy(fault_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = fault_proxy.start_sync("127.0.0.1", port)
    STARTED.append(proxy)
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=2)


def test_sync_proxy_closed_too():
    assert STARTED[1].closed


def test_sync_outage(simulate_outage):
    assert read() == "live"
    with simulate_outage(CACHE):
        assert CACHE.is_down
        assert read() == "fallback"
    assert CACHE.state == "ok"
    assert read() == "live"


async def test_async_outage(simulate_outage):
    with simulate_outage(CACHE):
        await asyncio.sleep(0)
        assert read() == "fallback"
    assert not CACHE.is_down


def test_kept_outage_fails_the_test(simulate_outage):
    simulate_outage(CACHE)
    assert read() == "live"  # fails: the cache is held down


def test_teardown_restored_it():
    assert CACHE.state == "ok"
    assert read() == "live"
"""


ANYIO_PROJECT = """
import socket

import anyio
import pytest

pytestmark = pytest.mark.anyio


async def test_anyio_proxy(fault_proxy, simulate_outage):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await fault_proxy("127.0.0.1", port)
    with proxy.outage("refuse"):
        with pytest.raises(OSError):
            await anyio.connect_tcp(*proxy.address)
    assert proxy.stats().accepted == 0
"""


class TestFixturesInAProject:
    def test_both_fixtures_from_sync_and_async_tests(self, pytester: pytest.Pytester) -> None:
        """A project gets both fixtures by installing degrade; teardown closes and restores."""
        pytester.makeini(INI)
        pytester.makepyfile(test_project=PROJECT)
        result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
        result.assert_outcomes(passed=7, failed=1)
        result.stdout.fnmatch_lines(["*test_kept_outage_fails_the_test*"])

    def test_async_factory_under_anyio(self, pytester: pytest.Pytester) -> None:
        """An anyio test (asyncio backend, pytest-asyncio off) awaits the factory too."""
        pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
        pytester.makepyfile(test_anyio_project=ANYIO_PROJECT)
        result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
        result.assert_outcomes(passed=1)

    def test_the_entry_point_registers_the_plugin(self, pytester: pytest.Pytester) -> None:
        """A fresh pytest process lists the fixtures; ``-p no:degrade`` removes them."""
        pytester.makeini(INI)
        pytester.makepyfile(test_one="def test_uses(fault_proxy, simulate_outage):\n    pass\n")
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        disabled = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:degrade")
        disabled.assert_outcomes(errors=1)
        disabled.stdout.fnmatch_lines(["*fixture 'fault_proxy' not found*"])

    def test_imports_without_optional_extras(self, pytester: pytest.Pytester) -> None:
        """The plugin needs only the standard library, pytest and degrade's core."""
        code = textwrap.dedent(
            """
            import sys
            BLOCKED = {"redis", "sqlalchemy", "asyncpg", "aio_pika", "aiormq", "tenacity",
                       "sentry_sdk", "prometheus_client", "httpx", "pytest_asyncio"}

            class Block:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in BLOCKED:
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None

            sys.meta_path.insert(0, Block())
            import degrade.testing.plugin
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
            print("LOADED", loaded)
            """
        )
        result = pytester.run(sys.executable, "-c", code)
        assert result.ret == 0, result.stderr.str()
        result.stdout.fnmatch_lines(["LOADED []"])


class TestForcedOutageFactory:
    def test_nested_outages_release_in_turn(self) -> None:
        """Two outages on one dependency: it recovers only when both ended."""
        dep = Registry().dependency("db", severity=Severity.SEV1)
        simulator = ForcedOutageFactory()
        first = simulator(dep)
        with simulator(dep):
            assert dep.is_down
        assert dep.is_down
        first.restore()
        first.restore()
        assert not first.active
        assert dep.state == "ok"

    def test_restore_all_releases_every_dependency(self) -> None:
        """Teardown restores what the test kept down, several dependencies at once."""
        registry = Registry()
        db = registry.dependency("db", severity=Severity.SEV1)
        cache = registry.dependency("cache", severity=Severity.SEV3)
        simulator = ForcedOutageFactory()
        outage = simulator(db, cache)
        assert outage.active
        assert (db.state, cache.state) == ("down", "down")
        simulator.restore_all()
        assert (db.state, cache.state) == ("ok", "ok")

    @pytest.mark.parametrize("args", [(), ("db",), (object(),)])
    def test_rejects_what_is_not_a_dependency(self, args: tuple[object, ...]) -> None:
        """Nothing, a name or another object raises TypeError."""
        with pytest.raises(TypeError, match="simulate_outage"):
            ForcedOutageFactory()(*args)  # type: ignore[arg-type]

    def test_old_names_warn_and_still_work(self) -> None:
        """The names before 0.2.0 resolve to the new classes, with a DeprecationWarning naming them."""
        from degrade import testing
        from degrade.testing import ProxyOutage, plugin

        with pytest.warns(DeprecationWarning, match="ForcedOutageFactory"):
            assert plugin.OutageSimulator is ForcedOutageFactory
        with pytest.warns(DeprecationWarning, match="ForcedOutage$"):
            assert plugin.SimulatedOutage is plugin.ForcedOutage
        with pytest.warns(DeprecationWarning, match="ProxyOutage"):
            assert testing.Outage is ProxyOutage
        with pytest.raises(AttributeError):
            _ = plugin.NoSuchName  # type: ignore[attr-defined]


class TestFaultProxyFactory:
    def test_caps_proxies_per_test(self) -> None:
        """A test that starts too many proxies fails loudly; close_all stops them all."""
        factory = FaultProxyFactory(max_proxies=2)
        try:
            first = factory.start_sync("127.0.0.1", 9)
            second = factory.start_sync("127.0.0.1", 9)
            with pytest.raises(RuntimeError, match="already started 2"):
                factory.start_sync("127.0.0.1", 9)
            assert factory.proxies == (first, second)
        finally:
            factory.close_all()
        assert first.closed
        assert second.closed
        assert not factory.proxies

    async def test_async_call_starts_a_proxy(self) -> None:
        """``await fault_proxy(host, port)`` gives a running proxy."""
        factory = FaultProxyFactory()
        try:
            proxy = await factory("127.0.0.1", 9, connect_timeout=1.0)
            assert proxy.upstream == ("127.0.0.1", 9)
            assert not proxy.closed
        finally:
            factory.close_all()
        assert proxy.closed
