"""aiormq's and aio-pika's reconnect noise: one line per record, the error's class chain, no traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiormq.exceptions import AMQPConnectionError

import degrade.eventbus
from degrade._compat.aiormq import AMQP_LOGGERS, QuietReconnects, quiet_amqp_logs


def _reset_error() -> AMQPConnectionError:
    """An AMQPConnectionError caused by a reset, raised so it carries a traceback."""
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer amqp://guest:secret@broker")
        except ConnectionResetError as exc:
            raise AMQPConnectionError("Server connection reset: secret text") from exc
    except AMQPConnectionError as exc:
        return exc


@pytest.fixture
def quiet() -> Iterator[None]:
    """The default: the filter is on (whatever a test did before)."""
    quiet_amqp_logs()
    yield
    quiet_amqp_logs()


@pytest.mark.usefixtures("quiet")
class TestQuietReconnects:
    def test_traceback_becomes_one_line_with_the_class_chain(self, caplog: pytest.LogCaptureFixture) -> None:
        """aiormq's 'reader exited abnormally' with exc_info logs one line naming the chain, level kept."""
        caplog.set_level(logging.DEBUG)
        logging.getLogger("aiormq.connection").warning(
            "Cancelling cause reader exited abnormally", exc_info=_reset_error()
        )
        (record,) = [r for r in caplog.records if r.name == "aiormq.connection"]
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
        assert record.getMessage() == (
            "Cancelling cause reader exited abnormally (AMQPConnectionError <- ConnectionResetError)"
        )
        assert "Traceback" not in caplog.text
        assert "secret" not in caplog.text
        assert len(caplog.text.strip().splitlines()) == 1

    def test_exception_arguments_format_as_their_class(self, caplog: pytest.LogCaptureFixture) -> None:
        """'error when creating transport: %r' shows the class chain, never the exception's text."""
        caplog.set_level(logging.DEBUG)
        logging.getLogger("aiormq.connection").error("error when creating transport: %r", _reset_error())
        assert caplog.records[-1].getMessage() == (
            "error when creating transport: AMQPConnectionError <- ConnectionResetError"
        )
        assert "secret" not in caplog.text

    def test_aio_pika_loggers_are_covered(self, caplog: pytest.LogCaptureFixture) -> None:
        """aio-pika's robust connection logs (exception with traceback) are one line too."""
        caplog.set_level(logging.DEBUG)
        try:
            raise _reset_error()
        except AMQPConnectionError:
            logging.getLogger("aio_pika.robust_connection").exception("Connection attempt failed")
        assert "Traceback" not in caplog.text
        assert "AMQPConnectionError <- ConnectionResetError" in caplog.text

    def test_other_loggers_and_the_host_configuration_are_untouched(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Only the AMQP loggers carry the filter: the root logger and the app's loggers keep tracebacks."""
        caplog.set_level(logging.DEBUG)
        assert not any(isinstance(f, QuietReconnects) for f in logging.getLogger().filters)
        assert not any(
            isinstance(f, QuietReconnects) for h in logging.getLogger().handlers for f in h.filters
        )
        logging.getLogger("myapp").warning("boom", exc_info=_reset_error())
        assert "Traceback" in caplog.text

    def test_opt_out_restores_aiormq_output(self, caplog: pytest.LogCaptureFixture) -> None:
        """quiet_amqp_logs(False) removes the filter (tracebacks again); turned on twice, it is one filter."""
        caplog.set_level(logging.DEBUG)
        degrade.eventbus.quiet_amqp_logs(False)
        assert all(not logging.getLogger(name).filters for name in AMQP_LOGGERS)
        logging.getLogger("aiormq.connection").warning("reader exited", exc_info=_reset_error())
        assert "Traceback" in caplog.text
        quiet_amqp_logs()
        quiet_amqp_logs()
        assert len(logging.getLogger("aiormq.connection").filters) == 1

    def test_a_record_it_cannot_rewrite_goes_through(self) -> None:
        """A record whose message does not format is passed on unchanged, never raised on."""
        record = logging.LogRecord("aiormq.connection", logging.ERROR, __file__, 1, "%d", ("x",), None)
        record.exc_info = (AMQPConnectionError, _reset_error(), None)
        assert QuietReconnects().filter(record) is True
