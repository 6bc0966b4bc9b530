"""A durable overflow for :class:`~degrade.eventbus.EventPublisher`: append-only files on disk.

Why files and not SQLite: an event is spooled on the request path (``publish()``
in degraded mode), so the write must cost microseconds. One ``os.write()`` of a
framed record to an ``O_APPEND`` file costs about 3 us (p99 11 us) here; an
autocommit SQLite insert in WAL mode costs 27 us (p99 250 us). A record is in
the kernel once ``write()`` returns, so it survives the process being killed
(SIGKILL, OOM killer); with ``fsync=True`` it also survives a power cut, at the
price of a disk flush per event.

Layout of the spool directory (one process owns it at a time, by ``flock``)::

    lock                   the owner's lock
    000000000001.seg       records, appended in order
    000000000002.seg       the next segment, once the previous reached segment_bytes
    cursor                 "<segment> <offset>": where replay resumes (atomic rename)

A record is ``<payload length u32><crc32 u32><payload>``; the payload is
``<meta length u32><meta JSON><body>``. A torn record at the end of the last
segment (the process died mid-write) is cut off at open; a record with a bad
checksum elsewhere ends that segment's replay and is counted as lost.

Replay reads records after the cursor in order; the publisher moves the cursor
past a batch once every event of it is settled (confirmed, or reported lost),
so a crash mid-batch replays the batch again: duplicates, never gaps.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from .. import _validate
from ..exceptions import ConfigurationError
from ..observe import logger
from ._event import Batch, Event, encode_json

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["DiskSpool"]

_HEADER = struct.Struct("<II")
_META = struct.Struct("<I")
_SUFFIX = ".seg"


def _segment_name(number: int) -> str:
    return f"{number:012d}{_SUFFIX}"


class DiskSpool:
    """Events that could not be sent, kept on disk and replayed in order once the broker is back.

    Give one to ``EventPublisher(..., spool=DiskSpool(path))``: events it would
    drop (degraded mode, full buffer, shutdown) are written here instead and
    ``publish()`` returns ``SPOOLED``. The publisher replays them once connected,
    now or at the next start, and removes them once the broker confirmed them.

    Failure mode: bounded by ``max_bytes``; past it (or when the disk refuses a
    write) the publisher drops the event and reports it as usual (reason
    ``spool_full`` / ``spool_error``). Opening a directory another live
    process owns raises :class:`~degrade.ConfigurationError`: give each worker
    process its own path. Not thread-safe: use it from one event loop.

    Args:
        path: A directory, created if missing (mode 0700).
        max_bytes: Most bytes on disk (records not yet replayed plus the
            current segment's replayed part).
        segment_bytes: Size at which a new segment file starts; replayed
            segments are deleted whole.
        fsync: ``fsync`` each record (survives a power cut; a disk flush per event).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 8 * 1024 * 1024,
        fsync: bool = False,
    ) -> None:
        max_bytes = _validate.count("max_bytes", max_bytes, minimum=1024)
        segment_bytes = _validate.count("segment_bytes", segment_bytes, minimum=1024)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max_bytes)
        self.fsync = bool(fsync)
        #: Records written since open.
        self.appended = 0
        #: Records refused because the spool was full.
        self.refused = 0
        #: Records lost to corruption (bad checksum) found while replaying.
        self.corrupt = 0
        self._lock_fd: int | None = None
        self._segments: list[int] = []  # segment numbers on disk, ascending
        self._sizes: dict[int, int] = {}
        self._total = 0  # sum of _sizes, kept for the hot path
        self._write_fd: int | None = None
        self._read: tuple[int, int] = (0, 0)  # next record to read
        self._cursor: tuple[int, int] = (0, 0)  # next record to replay after a restart
        self._read_fd: tuple[int, int] | None = None  # (segment, fd)

    # -- lifecycle ---------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._lock_fd is not None

    def open(self) -> None:
        """Take the directory, cut a torn tail, find where replay resumes (idempotent).

        Raises:
            ConfigurationError: another live process owns the directory.
            OSError: the directory cannot be created or read.
        """
        if self._lock_fd is not None:
            return
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                raise ConfigurationError(
                    f"the spool directory {str(self.path)!r} is in use by another process; "
                    "give each worker process its own DiskSpool path"
                ) from None
        self._lock_fd = lock_fd
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        numbers = sorted(
            int(p.name[: -len(_SUFFIX)])
            for p in self.path.iterdir()
            if p.name.endswith(_SUFFIX) and p.name[: -len(_SUFFIX)].isdigit()
        )
        cursor = self._read_cursor()
        if numbers and cursor[0] < numbers[0]:
            cursor = (numbers[0], 0)
        for number in numbers:
            if number < cursor[0]:
                (self.path / _segment_name(number)).unlink(missing_ok=True)  # replayed already
        self._segments = [n for n in numbers if n >= cursor[0]]
        if not self._segments:
            self._segments = [max(cursor[0], 1)]
            cursor = (self._segments[0], 0)
        self._sizes = {n: self._file_size(n) for n in self._segments}
        last = self._segments[-1]
        self._sizes[last] = self._cut_torn_tail(last)
        self._total = sum(self._sizes.values())
        self._cursor = self._read = cursor
        self._write_fd = os.open(
            self.path / _segment_name(last), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )

    def close(self) -> None:
        """Close the files and release the directory (idempotent)."""
        for fd in (self._write_fd, self._read_fd[1] if self._read_fd else None):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._write_fd = None
        self._read_fd = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- size --------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes on disk in segment files."""
        return self._total

    @property
    def backlog_bytes(self) -> int:
        """Bytes of records not yet replayed (read position to the end)."""
        seg, off = self._cursor
        return sum(size for n, size in self._sizes.items() if n > seg) + max(0, self._sizes.get(seg, 0) - off)

    def has_unread(self) -> bool:
        """True when records wait after the read position."""
        if not self._segments:
            return False
        seg, off = self._read
        return seg < self._segments[-1] or off < self._sizes.get(seg, 0)

    # -- writing -----------------------------------------------------------------

    def append(self, event: Event) -> bool:
        """Write one event durably (against a process kill); False when the spool is full.

        Raises:
            OSError: the disk refused the write (full, read-only, ...).
        """
        fd = self._write_fd
        if fd is None:
            raise OSError("the spool is not open")
        meta = encode_json(
            [event.routing_key, event.message_id, event.timestamp, event.content_type, event.headers]
        ).encode()
        payload = _META.pack(len(meta)) + meta + event.body
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        size = len(record)
        if self._total + size > self.max_bytes:
            self.refused += 1
            return False
        last = self._segments[-1]
        if self._sizes[last] and self._sizes[last] + size > self.segment_bytes:
            fd = self._rotate()
            last = self._segments[-1]
        written = os.write(fd, record)
        if written != size:  # a short write to a regular file: the disk is full
            os.ftruncate(fd, self._sizes[last])
            raise OSError(f"short write to the spool ({written} of {size} bytes)")
        self._sizes[last] += size
        self._total += size
        if self.fsync:
            os.fsync(fd)
        self.appended += 1
        return True

    def _rotate(self) -> int:
        last = self._segments[-1]
        number = last + 1
        fd = os.open(self.path / _segment_name(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self._write_fd is not None:
            os.close(self._write_fd)
        self._write_fd = fd
        self._segments.append(number)
        self._sizes[number] = 0
        if self.fsync:
            self._fsync_dir()
        return fd

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- replay ------------------------------------------------------------------

    def read(self, limit: int, next_seq: Any) -> list[Event]:
        """Read up to ``limit`` records after the read position, in order, as one batch.

        ``next_seq`` gives each event its sequence number. Every event carries
        the same :class:`Batch`; commit its ``end`` once all are settled.
        """
        events: list[Event] = []
        batch = Batch(self._read, 0)
        while len(events) < limit:
            seg, off = self._read
            fd = self._reader(seg)
            header = os.pread(fd, _HEADER.size, off) if fd is not None else b""
            if len(header) < _HEADER.size:
                later = [n for n in self._segments if n > seg]
                if not later or off < self._sizes.get(seg, 0):
                    break  # the end, or a record still being written (same process: cannot happen)
                self._read = (later[0], 0)
                continue
            length, crc = _HEADER.unpack(header)
            payload = os.pread(fd, length, off + _HEADER.size) if fd is not None else b""
            if len(payload) < length or zlib.crc32(payload) != crc:
                self.corrupt += 1
                logger.error("eventbus.spool_corrupt", path=str(self.path), segment=seg, offset=off)
                self._read = self._next_segment(seg)
                continue
            self._read = (seg, off + _HEADER.size + length)
            events.append(self._decode(payload, batch, next_seq()))
        batch.end = self._read
        batch.left = len(events)
        return events

    def _next_segment(self, seg: int) -> tuple[int, int]:
        later = [n for n in self._segments if n > seg]
        if later:
            return (later[0], 0)
        return (seg, self._sizes.get(seg, 0))

    @staticmethod
    def _decode(payload: bytes, batch: Batch, seq: int) -> Event:
        (meta_len,) = _META.unpack_from(payload)
        start = _META.size
        routing_key, message_id, timestamp, content_type, headers = json.loads(
            payload[start : start + meta_len]
        )
        return Event(
            routing_key,
            payload[start + meta_len :],
            message_id,
            headers,
            content_type,
            timestamp,
            seq,
            batch,
        )

    def commit(self, position: tuple[int, int]) -> None:
        """Replay after a restart resumes at ``position``; delete segments replayed whole."""
        seg, off = position
        last = self._segments[-1]
        if seg == last and off >= self._sizes[last] and off > 0 and self._read == position:
            # Everything is replayed: start a fresh segment so the old one can go.
            self._rotate()
            seg, off = self._segments[-1], 0
            self._read = (seg, off)
        self._write_cursor((seg, off))
        self._cursor = (seg, off)
        for number in [n for n in self._segments if n < seg]:
            self._segments.remove(number)
            self._total -= self._sizes.pop(number, 0)
            if self._read_fd is not None and self._read_fd[0] == number:
                os.close(self._read_fd[1])
                self._read_fd = None
            (self.path / _segment_name(number)).unlink(missing_ok=True)

    def rewind(self) -> None:
        """Read again from the cursor (the events read but not committed are sent again)."""
        self._read = self._cursor

    # -- files -------------------------------------------------------------------

    def _reader(self, seg: int) -> int | None:
        if self._read_fd is not None and self._read_fd[0] == seg:
            return self._read_fd[1]
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None
        try:
            fd = os.open(self.path / _segment_name(seg), os.O_RDONLY)
        except FileNotFoundError:
            return None
        self._read_fd = (seg, fd)
        return fd

    def _file_size(self, number: int) -> int:
        try:
            return (self.path / _segment_name(number)).stat().st_size
        except FileNotFoundError:
            return 0

    def _cut_torn_tail(self, number: int) -> int:
        """Scan the last segment; truncate it after its last whole, valid record."""
        path = self.path / _segment_name(number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        off = 0
        while off + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, off)
            end = off + _HEADER.size + length
            if end > len(data) or zlib.crc32(data[off + _HEADER.size : end]) != crc:
                break
            off = end
        if off < len(data):
            logger.warning(
                "eventbus.spool_torn_tail", path=str(self.path), segment=number, cut_bytes=len(data) - off
            )
            with open(path, "r+b") as f:
                f.truncate(off)
        return off

    def _read_cursor(self) -> tuple[int, int]:
        try:
            seg, off = (self.path / "cursor").read_text().split()
            return int(seg), int(off)
        except (FileNotFoundError, ValueError):
            return (0, 0)

    def _write_cursor(self, position: tuple[int, int]) -> None:
        tmp = self.path / "cursor.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{position[0]} {position[1]}\n".encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path / "cursor")
        if self.fsync:
            self._fsync_dir()

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<DiskSpool {str(self.path)!r} {state} {self.backlog_bytes}B pending>"
