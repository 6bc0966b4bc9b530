"""Which exceptions count as dependency failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from degrade._classify import default_failure_types, is_dependency_error


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
