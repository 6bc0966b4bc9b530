"""One event on its way to the broker, and what ``publish()`` checks before queueing it.

Everything here runs on the request path, so it is plain Python with no I/O:
the payload is serialised once (JSON for a mapping, bytes as given) and the
message id is generated without a system call.

Bad arguments raise :class:`~degrade.ConfigurationError`, as everywhere in
degrade. One of the wrong *kind* (a payload that is not a mapping or bytes, a
routing key that is not a ``str``) raises :class:`ArgumentTypeError`, a
``ConfigurationError`` that is also a ``TypeError``: ``publish()`` raised a bare
``TypeError`` for those before, and ``except TypeError`` keeps working.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from typing import Any

from ..exceptions import ConfigurationError

__all__ = [
    "JSON",
    "OCTETS",
    "ArgumentTypeError",
    "Batch",
    "Event",
    "check_headers",
    "check_message_id",
    "check_routing_key",
    "encode_json",
    "encode_payload",
    "new_id",
]

JSON = "application/json"
OCTETS = "application/octet-stream"

#: AMQP's limit on a routing key or message id (a short string), in UTF-8 bytes.
MAX_ROUTING_KEY = 255


class ArgumentTypeError(ConfigurationError, TypeError):
    """An argument of the wrong kind: a :class:`~degrade.ConfigurationError` that is also a ``TypeError``.

    ``publish()`` raised a bare ``TypeError`` for these before the library
    settled on ``ConfigurationError``; both ``except`` clauses catch it.
    """


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_encode_json_slow = _ENCODER.encode


def _make_fast_encoder() -> Callable[[object], str] | None:
    """The C encoder ``JSONEncoder.encode`` builds on every call, built once.

    ``JSONEncoder.encode`` constructs its C iterator per call: 1.3 of the 3 us
    it takes for a small event (a quarter of the ``publish()`` budget). The
    markers dict (circular-reference check) is emptied by the C code after each
    success and cleared here after a failure. Falls back to ``encode`` when the
    C accelerator is missing or behaves differently (checked once, at import).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has _json
        return None
    markers: dict[int, object] = {}
    iterencode = make(
        markers,
        _ENCODER.default,
        json.encoder.encode_basestring,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,
        False,
        False,
    )
    join = "".join

    def encode(payload: object) -> str:
        try:
            return join(iterencode(payload, 0))
        except BaseException:
            markers.clear()
            raise

    sample = {"a": [1, 2.5, None, True], "é": {"b": 'x"y'}}
    try:
        if encode(sample) != _encode_json_slow(sample):  # pragma: no cover - a Python that changed the C API
            return None
    except TypeError:  # pragma: no cover - c_make_encoder took other arguments on this Python
        return None
    return encode


_encode_json: Callable[[object], str] = _make_fast_encoder() or _encode_json_slow
#: Compact UTF-8 JSON text of a JSON-able value (the spool encodes its records' metadata with it).
encode_json = _encode_json

# A version-4 UUID from the Mersenne Twister: ids need to be unique, not secret,
# and uuid.uuid4() costs a getrandom() system call (5 us here, a quarter of the
# publish() budget). The random module reseeds itself in a forked child.
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)
_getrandbits = random.getrandbits


def new_id() -> str:
    """A fresh message id: a version-4 UUID as 32 hex digits (as aiormq makes them)."""
    return f"{_getrandbits(128) & _UUID_CLEAR | _UUID_SET:032x}"


class Batch:
    """Events read from the spool together; the spool's cursor moves past them once all are settled."""

    __slots__ = ("end", "left")

    def __init__(self, end: tuple[int, int], left: int) -> None:
        self.end = end
        self.left = left


class Event:
    """An event accepted by ``publish()``.

    ``seq`` orders it among the others of this process once the sender has
    taken it (0 while it waits in the buffer); requeued events keep theirs.
    """

    __slots__ = (
        "_message_id",
        "batch",
        "body",
        "content_type",
        "headers",
        "resend",
        "routing_key",
        "sent_at",
        "seq",
        "timestamp",
    )

    def __init__(  # noqa: PLR0917 - built on the hot path, where positional arguments are cheaper
        self,
        routing_key: str,
        body: bytes,
        message_id: str | None,
        headers: dict[str, Any] | None,
        content_type: str,
        timestamp: float,
        seq: int,
        batch: Batch | None = None,
    ) -> None:
        self.routing_key = routing_key
        self.body = body
        # None: made on first read, by the sender, off the request path (publish()
        # then allocates one string less, which keeps its tail latency down).
        self._message_id = message_id
        self.headers = headers
        self.content_type = content_type
        self.timestamp = timestamp
        self.seq = seq
        #: Set on an event replayed from the spool: the read batch it belongs to.
        self.batch = batch
        #: Sent before, on a connection that failed before its confirm.
        self.resend = False
        #: Loop time when its current publish began (the confirm watchdog reads it).
        self.sent_at = 0.0

    @property
    def message_id(self) -> str:
        """The caller's id, or a version-4 UUID made once, on first read."""
        message_id = self._message_id
        if message_id is None:
            message_id = self._message_id = new_id()
        return message_id

    def __repr__(self) -> str:
        return f"<Event {self.routing_key!r} id={self.message_id} {len(self.body)}B>"


def encode_payload(payload: object) -> tuple[bytes, str]:
    """Serialise a payload once: a JSON-able mapping, or bytes sent as they are.

    Raises:
        ArgumentTypeError: anything else, or a mapping that JSON cannot encode.
    """
    if type(payload) is dict:
        return _json(payload), JSON
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), OCTETS
    if isinstance(payload, Mapping):
        return _json(dict(payload)), JSON
    raise ArgumentTypeError(
        f"publish() takes a JSON-able mapping or bytes as payload; got {type(payload).__name__}"
    )


def _json(payload: dict[Any, Any]) -> bytes:
    try:
        return _encode_json(payload).encode()
    except (TypeError, ValueError) as exc:  # ValueError: a circular reference, NaN or infinity
        raise ArgumentTypeError(f"the payload is not JSON-serialisable: {exc}") from None


def check_routing_key(routing_key: object) -> str:
    """Return ``routing_key`` if AMQP accepts it.

    Raises:
        ArgumentTypeError: not a ``str``.
        ConfigurationError: longer than 255 UTF-8 bytes.
    """
    if type(routing_key) is not str:
        raise ArgumentTypeError(f"routing_key must be a str; got {type(routing_key).__name__}")
    # 63 characters never exceed 255 UTF-8 bytes, so most keys skip the encode.
    if len(routing_key) > 63 and len(routing_key.encode()) > MAX_ROUTING_KEY:
        raise ConfigurationError(f"routing_key is longer than AMQP's {MAX_ROUTING_KEY} bytes")
    return routing_key


def check_message_id(message_id: object) -> None:
    """Accept None (the sender makes one) or a non-empty ``str`` of at most 255 UTF-8 bytes.

    Raises:
        ArgumentTypeError: neither None nor a ``str``.
        ConfigurationError: empty, or longer than 255 UTF-8 bytes.
    """
    if message_id is None:
        return
    if type(message_id) is not str:
        raise ArgumentTypeError(f"message_id must be a str or None; got {type(message_id).__name__}")
    if not message_id or (len(message_id) > 63 and len(message_id.encode()) > MAX_ROUTING_KEY):
        raise ConfigurationError("message_id must be a non-empty string of at most 255 UTF-8 bytes")


def check_headers(headers: object) -> dict[str, Any]:
    """Copy the headers after checking they are a mapping of str to JSON-able values.

    JSON-able keeps them encodable both as AMQP headers and in a :class:`DiskSpool` record.

    Raises:
        ArgumentTypeError: not a mapping, a key that is not a str, or a value JSON cannot encode.
    """
    if not isinstance(headers, Mapping):
        raise ArgumentTypeError(f"headers must be a mapping; got {type(headers).__name__}")
    copied = dict(headers)
    for key in copied:
        if type(key) is not str:
            raise ArgumentTypeError(f"header names must be str; got {type(key).__name__}")
    try:
        _encode_json(copied)
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(
            f"header values must be JSON-able (str, int, float, bool, None, lists, dicts): {exc}"
        ) from None
    return copied
