"""Which exceptions count as dependency failures."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import socket
import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from degrade._classify import (
    WRITELINES_UNGUARDED,
    default_failure_types,
    is_dependency_error,
    lost_transport_write,
)


class TestDefaultFailureTypes:
    def test_connection_and_timeout_errors_count(self) -> None:
        """OSError family errors are dependency failures; a bug is not."""
        assert is_dependency_error(ConnectionRefusedError())
        assert is_dependency_error(TimeoutError())
        assert not is_dependency_error(KeyError("x"))
        assert not is_dependency_error(ValueError("bad input"))

    def test_driver_errors_of_loaded_drivers_count(self) -> None:
        """redis and SQLAlchemy connection errors count once those drivers are loaded."""
        import redis.exceptions
        import sqlalchemy.exc

        assert redis.exceptions.ConnectionError in default_failure_types()
        assert is_dependency_error(redis.exceptions.TimeoutError())
        assert is_dependency_error(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception()))
        assert not is_dependency_error(sqlalchemy.exc.IntegrityError("INSERT", {}, Exception()))

    def test_invalidated_connection_counts(self) -> None:
        """A DBAPIError whose connection was invalidated is an outage, not a bug."""
        import sqlalchemy.exc

        err = sqlalchemy.exc.DBAPIError("SELECT 1", {}, Exception(), connection_invalidated=True)
        assert is_dependency_error(err)

    def test_classifying_imports_no_driver(self) -> None:
        """Classifying an error never imports a driver (an import would block the event loop)."""
        code = textwrap.dedent(
            """
            import sys
            from degrade._classify import is_dependency_error
            assert is_dependency_error(ConnectionError())
            loaded = [m for m in ("sqlalchemy", "asyncpg", "aiormq", "redis") if m in sys.modules]
            print(",".join(loaded))
            """
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == ""


class _Transport:
    def __init__(self, closing: bool) -> None:
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing


def _raised_in(filename: str, function: str, error: type[Exception], *, closing: bool = True) -> Exception:
    """An ``error`` raised by method ``function`` of a transport (closing or not) compiled as ``filename``."""
    namespace: dict[str, Any] = {}
    source = f"def {function}(self):\n    raise {error.__name__}('x')\n"
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - a function that looks like asyncio's
    try:
        namespace[function](_Transport(closing))
    except error as exc:
        return exc
    raise AssertionError("not raised")


class TestLostTransportWrite:
    """python/cpython#136234: writelines() on a lost connection raises AttributeError/TypeError."""

    def test_matched_by_where_it_was_raised(self) -> None:
        """Raised inside asyncio's selector transport writelines(): an outage, whatever the message."""
        selector_events = asyncio.selector_events.__file__
        for error in (AttributeError, TypeError):
            exc = _raised_in(selector_events, "writelines", error)
            assert lost_transport_write(exc)
            assert is_dependency_error(exc)

    def test_the_same_errors_elsewhere_are_bugs(self) -> None:
        """The same types raised anywhere else (or another function of that file) stay bugs."""
        selector_events = asyncio.selector_events.__file__
        assert not is_dependency_error(_raised_in("app.py", "writelines", AttributeError))
        assert not is_dependency_error(_raised_in(selector_events, "write", AttributeError))
        assert not is_dependency_error(_raised_in(selector_events, "writelines", ValueError))
        assert not is_dependency_error(AttributeError("never raised: no traceback"))

    def test_an_open_transport_means_a_bug(self) -> None:
        """writelines() raising on a transport that is not closing: a wrong argument, not an outage."""
        selector_events = asyncio.selector_events.__file__
        assert not is_dependency_error(_raised_in(selector_events, "writelines", TypeError, closing=False))

    async def test_a_real_write_after_the_peer_reset(self) -> None:
        """Write to a connection the peer reset: whatever asyncio raises (if anything) is an outage."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        peer.close()
        listener.close()
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                await reader.read()
        for _ in range(3):  # let the transport's connection_lost run
            await asyncio.sleep(0)
        raised: Exception | None = None
        try:
            writer.writelines([b"PING\r\n"])  # AttributeError on 3.12.1 and 3.13.0 (#136234)
        except Exception as exc:
            raised = exc
        finally:
            writer.close()
        if raised is not None:
            assert is_dependency_error(raised), repr(raised)
            assert WRITELINES_UNGUARDED  # older Pythons write() through the guarded path
        elif sys.version_info[:3] in {(3, 12, 1), (3, 13, 0)}:  # the versions this was seen on
            pytest.fail("expected the #136234 error on this Python")


class TestErrorChain:
    """error_chain: the class chain of a failure, for logs and health details (never a message)."""

    def test_driver_error_wrapped_by_sqlalchemy(self) -> None:
        from degrade._classify import error_chain

        class InvalidCatalogNameError(Exception):
            pass

        class DBAPIError(Exception):
            def __init__(self, orig: BaseException) -> None:
                super().__init__("(InvalidCatalogNameError) database 'x' does not exist: password=secret")
                self.orig = orig

        chain = error_chain(DBAPIError(InvalidCatalogNameError("database 'x' does not exist")))
        assert chain == "DBAPIError <- InvalidCatalogNameError"
        assert "secret" not in chain

    def test_causes_and_context(self) -> None:
        from degrade._classify import error_chain

        caused = TimeoutError("gave up")
        caused.__cause__ = ConnectionRefusedError("refused")
        assert error_chain(caused) == "TimeoutError <- ConnectionRefusedError"
        during = OSError("while handling")
        during.__context__ = KeyError("k")
        assert error_chain(during) == "OSError <- KeyError"
        suppressed = OSError("no context")
        suppressed.__context__ = KeyError("k")
        suppressed.__suppress_context__ = True  # `raise ... from None`
        assert error_chain(suppressed) is None  # nothing beyond the class itself

    def test_single_class_and_none(self) -> None:
        from degrade._classify import error_chain

        assert error_chain(TimeoutError()) is None
        assert error_chain(None) is None

    def test_bounded_and_cycle_safe(self) -> None:
        from degrade._classify import error_chain

        a, b = ValueError("a"), KeyError("b")
        a.__cause__, b.__cause__ = b, a  # a loop
        assert error_chain(a) == "ValueError <- KeyError"
        deep = OSError("0")
        for i in range(10):
            outer = OSError(str(i + 1))
            outer.__cause__ = deep
            deep = outer
        assert error_chain(deep, limit=4) == " <- ".join(["OSError"] * 4)
