"""DiskSpool on its own (no broker): order, bounds, commit, torn tails, corruption, ownership."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

from degrade import ConfigurationError
from degrade.eventbus import DiskSpool
from degrade.eventbus._event import Event


def make(i: int, size: int = 10) -> Event:
    return Event(f"rk.{i}", bytes([i % 256]) * size, f"id-{i}", {"n": i}, "application/json", 1700000000.5, i)


@pytest.fixture
def seq() -> itertools.count[int]:
    return itertools.count(1)


class TestDiskSpool:
    def test_events_come_back_in_order_with_their_fields(
        self, tmp_path: Path, seq: itertools.count[int]
    ) -> None:
        """Appended events read back in order, every field intact."""
        spool = DiskSpool(tmp_path / "s")
        spool.open()
        for i in range(5):
            assert spool.append(make(i))
        events = spool.read(100, seq.__next__)
        assert [e.message_id for e in events] == [f"id-{i}" for i in range(5)]
        first = events[0]
        assert (first.routing_key, first.body, first.headers) == ("rk.0", b"\x00" * 10, {"n": 0})
        assert (first.content_type, first.timestamp) == ("application/json", 1700000000.5)
        assert first.batch is not None
        assert first.batch.left == 5
        spool.close()

    def test_uncommitted_events_replay_after_reopen(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """Events read but not committed are read again after a restart: duplicates, never gaps."""
        spool = DiskSpool(tmp_path)
        spool.open()
        for i in range(6):
            spool.append(make(i))
        batch = spool.read(3, seq.__next__)
        assert batch[0].batch is not None
        spool.commit(batch[0].batch.end)
        spool.read(2, seq.__next__)  # read, never committed
        spool.close()
        again = DiskSpool(tmp_path)
        again.open()
        assert [e.message_id for e in again.read(100, seq.__next__)] == ["id-3", "id-4", "id-5"]
        again.close()

    def test_rewind_reads_again_from_the_cursor(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """rewind() moves the read position back to the last commit."""
        spool = DiskSpool(tmp_path)
        spool.open()
        for i in range(3):
            spool.append(make(i))
        spool.read(2, seq.__next__)
        spool.rewind()
        assert [e.message_id for e in spool.read(10, seq.__next__)] == ["id-0", "id-1", "id-2"]
        spool.close()

    def test_size_bound_refuses_and_commit_frees(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """Past max_bytes append() returns False; replaying everything empties the disk."""
        spool = DiskSpool(tmp_path, max_bytes=4096, segment_bytes=1024)
        spool.open()
        accepted = 0
        while spool.append(make(accepted, size=100)):
            accepted += 1
        assert 20 < accepted < 40
        assert spool.refused == 1
        assert spool.size_bytes <= 4096
        while spool.has_unread():
            batch = spool.read(7, seq.__next__)
            assert batch[0].batch is not None
            spool.commit(batch[0].batch.end)
        assert spool.size_bytes == 0
        assert spool.backlog_bytes == 0
        assert len(list(tmp_path.glob("*.seg"))) == 1
        assert spool.append(make(0))
        spool.close()

    def test_segments_rotate_and_replay_across_them(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """Records spread over several segment files replay in one ordered stream."""
        spool = DiskSpool(tmp_path, segment_bytes=1024)
        spool.open()
        for i in range(50):
            spool.append(make(i, size=100))
        assert len(list(tmp_path.glob("*.seg"))) > 3
        ids = []
        while spool.has_unread():
            ids += [e.message_id for e in spool.read(9, seq.__next__)]
        assert ids == [f"id-{i}" for i in range(50)]
        spool.close()

    def test_torn_tail_is_cut_at_open(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """A record half-written when the process died is cut off; the whole ones survive."""
        spool = DiskSpool(tmp_path)
        spool.open()
        for i in range(3):
            spool.append(make(i))
        spool.close()
        (segment,) = tmp_path.glob("*.seg")
        with segment.open("ab") as f:
            f.write(b"\x40\x00\x00\x00\x01\x02")  # a header promising 64 bytes, then nothing
        again = DiskSpool(tmp_path)
        again.open()
        assert [e.message_id for e in again.read(10, seq.__next__)] == ["id-0", "id-1", "id-2"]
        again.append(make(3))
        assert [e.message_id for e in again.read(10, seq.__next__)] == ["id-3"]
        again.close()

    def test_corrupt_record_is_counted(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """A record with a bad checksum ends its segment's replay and is counted as corrupt."""
        spool = DiskSpool(tmp_path, segment_bytes=1024)
        spool.open()
        for i in range(20):
            spool.append(make(i, size=100))
        spool.close()
        first = sorted(tmp_path.glob("*.seg"))[0]
        data = bytearray(first.read_bytes())
        data[30] ^= 0xFF  # inside the first record's payload
        first.write_bytes(bytes(data))
        again = DiskSpool(tmp_path, segment_bytes=1024)
        again.open()
        ids = []
        while again.has_unread():
            ids += [e.message_id for e in again.read(50, seq.__next__)]
        assert again.corrupt == 1
        assert ids
        assert "id-0" not in ids
        assert ids == sorted(ids, key=lambda s: int(s.split("-")[1]))
        again.close()

    def test_one_owner_at_a_time(self, tmp_path: Path) -> None:
        """A second open of a directory someone holds raises ConfigurationError; close releases it."""
        first = DiskSpool(tmp_path)
        first.open()
        second = DiskSpool(tmp_path)
        with pytest.raises(ConfigurationError, match="another process"):
            second.open()
        first.close()
        second.open()
        assert second.is_open
        second.close()

    def test_files_are_private(self, tmp_path: Path) -> None:
        """The directory and its files are readable by the owner only."""
        spool = DiskSpool(tmp_path / "private")
        spool.open()
        spool.append(make(1))
        assert (tmp_path / "private").stat().st_mode & 0o077 == 0
        for path in (tmp_path / "private").glob("*.seg"):
            assert path.stat().st_mode & 0o077 == 0
        spool.close()

    def test_append_before_open_is_an_os_error(self, tmp_path: Path) -> None:
        """Appending to a closed spool raises OSError (the publisher then drops and reports)."""
        with pytest.raises(OSError, match="not open"):
            DiskSpool(tmp_path).append(make(1))

    @pytest.mark.parametrize("kwargs", [{"max_bytes": 10}, {"segment_bytes": True}])
    def test_bad_sizes_raise(self, tmp_path: Path, kwargs: dict[str, Any]) -> None:
        """Tiny or non-int sizes raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            DiskSpool(tmp_path, **kwargs)

    def test_fsync_mode_writes_too(self, tmp_path: Path, seq: itertools.count[int]) -> None:
        """With fsync=True records and the cursor are flushed; behaviour is otherwise the same."""
        spool = DiskSpool(tmp_path, fsync=True)
        spool.open()
        spool.append(make(1))
        (only,) = spool.read(5, seq.__next__)
        assert only.batch is not None
        spool.commit(only.batch.end)
        assert (tmp_path / "cursor").exists()
        assert os.listdir(tmp_path)
        spool.close()
