"""The change feed: every committed record in id order, read from the log files, then waiting
for new ones; and named cursors, durable positions in it that hold the logs it needs.

Where record N is found: in a retained log of ``feed/`` whose range holds it
(``_retention.py``), else in the ``log{K}`` file whose records reach it (invariant 1: a record
is in a log before any reader can see it). A feed remembers the file it reads (by name and
inode) and the offset past the last record it took, and reads only what was appended since; a
log cleaned, kept or reused meanwhile shows as another inode, damage or a gap in the ids, and
the record is looked for again. A record that is committed but in no file any more was cleaned:
``CursorLostError`` (a cursor holds retention; a bare feed does not).

How far a feed goes: the newest committed record (``durable=False``), or the newest one known to
be on disk (``durable=True``, the default): the live writer's ``durable`` word, and with no live
writer the last record the tables hold (replay made them durable; records a dead writer left
in its logs wait for the next writer's replay).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import _retention as retention
from ._errors import ArgumentRangeError, ClosedError, CursorLostError, storage_error
from ._format import (DROP_TABLE, INSERT_INDEX, LOG_PREFIX, LogScan, Record, decode_log_header,
                      entries_of, first_record_id)
from ._overlay import DURABLE
from ._queues import file_lock, QUEUE_LOCK, load_queues, log_ids, log_path
from ._tables import replayed_through

POLL_FIRST, POLL_MOST = 0.0005, 0.02  # seconds between polls of a waiting feed
BATCH = 1024  # records a poll takes at most
READ_BYTES = 1 << 20  # bytes of a log a poll reads at first


class Change:
    """One committed record as the feed yields it: its id, the epoch (writer open) that wrote
    it, its bytes as the log holds them (``data``), and its changes, decoded when first asked
    for: ``values`` ({(table, index): bytes or None}), ``index`` ({(table, chunk): {entry:
    u64}}) and ``drops`` (the tables emptied first)."""

    __slots__ = ("record_id", "epoch", "data", "_ops", "_decoded")

    def __init__(self, record_id: int, epoch: int, data: bytes, ops: list) -> None:
        self.record_id = record_id
        self.epoch = epoch
        self.data = data
        self._ops = ops
        self._decoded: tuple[dict, dict, tuple[int, ...]] | None = None

    def _decode(self) -> tuple[dict, dict, tuple[int, ...]]:
        if self._decoded is None:
            values: dict[tuple[int, int], bytes | None] = {}
            index: dict[tuple[int, int], dict[int, int]] = {}
            drops = []
            for op in self._ops:
                if op.kind == DROP_TABLE:
                    drops.append(op.table)
                elif op.kind == INSERT_INDEX:
                    index.setdefault((op.table, op.key), {}).update(entries_of(op.mask, op.data or b""))
                else:
                    values[(op.table, op.key)] = op.data
            self._decoded = (values, index, tuple(drops))
        return self._decoded

    @property
    def values(self) -> dict[tuple[int, int], bytes | None]:
        """{(table, index): the value it set, or None for a removal}."""
        return self._decode()[0]

    @property
    def index(self) -> dict[tuple[int, int], dict[int, int]]:
        """{(table, chunk): {entry: the u64 it set}}."""
        return self._decode()[1]

    @property
    def drops(self) -> tuple[int, ...]:
        """The tables the record emptied (before its other changes)."""
        return self._decode()[2]

    def __repr__(self) -> str:
        return f"<mpwal.Change record {self.record_id} epoch {self.epoch}, {len(self.data)} bytes>"


def change_of(rec: Record, buf: bytes, epoch: int) -> Change:
    return Change(rec.record_id, epoch, buf[rec.start:rec.end], rec.ops)


@dataclass
class _Source:
    """The file a feed reads: its name, inode, the offset past the last record taken, the epoch
    its header names, and (a retained log) its last record."""

    path: str
    inode: int
    offset: int
    epoch: int
    last: int | None


class Feed:
    """The records after ``after`` (see the module comment); ``poll`` takes what is there."""

    def __init__(self, reader: Any, after: int, durable: bool, cursor: str | None = None) -> None:
        if type(after) is not int or after < 0:
            raise ArgumentRangeError(f"after must be a record id >= 0, not {after!r}")
        self.reader = reader
        self.path: str = reader.path
        self.next = after + 1
        self.durable = durable
        self.cursor = cursor
        self._src: _Source | None = None

    def limit(self) -> int:
        """The newest record id this feed may yield now."""
        r = self.reader
        committed = r.last_record_id
        if not self.durable:
            return committed
        seg = r._seg
        if seg is not None:
            return min(committed, seg.load_acquire(DURABLE))
        st = load_queues(self.path)
        return min(committed, max(st.last_cleaned_record if st else 0, replayed_through(self.path)))

    def poll(self) -> list[Change]:
        limit = self.limit()
        out: list[Change] = []
        misses = 0
        while self.next <= limit and len(out) < BATCH:
            src = self._src or self._locate(self.next)
            if src is None:
                misses += 1
                if misses < 3:  # a log moved into feed/ between two looks: look again
                    continue
                raise self._lost()
            self._src = src
            taken = self._read(src, limit, out)
            if taken:
                misses = 0
            else:
                self._src = None  # the record is in another file (a rotation) or this one changed
                misses += 1
                if misses >= 3:
                    raise self._lost()
        return out

    def follow(self, timeout: float | None) -> Iterator[Change]:
        """Yield records as they come; return after ``timeout`` seconds with nothing new."""
        delay = POLL_FIRST
        quiet_since = time.monotonic()
        while True:
            got = self.poll()
            if got:
                yield from got
                delay = POLL_FIRST
                quiet_since = time.monotonic()
                continue
            if timeout is not None and time.monotonic() - quiet_since >= timeout:
                return
            time.sleep(delay if timeout is None else min(delay, max(0.0, timeout)))
            delay = min(2 * delay, POLL_MOST)

    def _lost(self) -> CursorLostError:
        if self.cursor is not None:
            got = retention.load_cursors(self.path).get(self.cursor)
            if got is not None and got["lost"]:
                return CursorLostError(f"cursor {self.cursor!r} was {got['lost']}; it got to "
                                       f"record {got['position']}: delete it and make a new one",
                                       got["position"])
        return CursorLostError(
            f"record {self.next} of {self.path} is committed but no longer retained (its log was "
            "cleaned): read the feed through a cursor (reader.cursor(name)) to hold its logs",
            self.next - 1)

    def _read(self, src: _Source, limit: int, out: list[Change]) -> int:
        """Take the records of ``src`` from its offset; how many."""
        try:
            fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise storage_error(e, f"reading {src.path}") from None
        try:
            st = os.fstat(fd)
            if st.st_ino != src.inode or st.st_size <= src.offset:
                return 0
            want = READ_BYTES
            while True:  # a chunk at a time (a log may be far longer than what is taken now)
                buf = os.pread(fd, min(want, st.st_size - src.offset), src.offset)
                n, torn = self._take(buf, src, limit, out)
                if n or not torn or len(buf) < want:
                    return n
                want *= 4  # the next record is longer than the chunk
        except OSError as e:
            raise storage_error(e, f"reading {src.path}") from None
        finally:
            os.close(fd)

    def _take(self, buf: bytes, src: _Source, limit: int, out: list[Change]) -> tuple[int, bool]:
        """Take the whole records at the start of ``buf`` (read at ``src.offset``): how many,
        and whether the first record was cut off by the end of ``buf``."""
        scan = LogScan(buf, self.next)
        n = 0
        end = 0
        whole = False  # a whole record was found (taken, or past the limit)
        for rec in scan.records():
            whole = True
            if rec.record_id > limit or (src.last is not None and rec.record_id > src.last):
                break
            out.append(change_of(rec, buf, src.epoch))
            self.next += 1
            end = rec.end
            n += 1
            if len(out) >= BATCH:
                break
        src.offset += end
        return n, not whole and scan.problem == "torn"

    def _locate(self, rid: int) -> _Source | None:
        """The file that holds record ``rid``, at that record's offset; None if none does."""
        for seg in retention.segments(self.path):
            if seg.first <= rid <= seg.last:
                return self._find_in(seg.path, rid, seg.last)
        best: tuple[int, str] | None = None
        for lid in log_ids(self.path):
            p = log_path(self.path, lid)
            try:
                with open(p, "rb") as f:
                    head = f.read(LOG_PREFIX)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise storage_error(e, f"reading {p}") from None
            first = first_record_id(head)
            if first is not None and first <= rid and (best is None or first > best[0]):
                best = (first, p)
        return None if best is None else self._find_in(best[1], rid, None)

    def _find_in(self, p: str, rid: int, last: int | None) -> _Source | None:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            data = os.pread(fd, st.st_size, 0)
        except OSError as e:
            raise storage_error(e, f"reading {p}") from None
        finally:
            os.close(fd)
        header = decode_log_header(data) if data[:1] == b"\x06" else None
        epoch = header[1] if header else 0
        for rec in LogScan(data).records():
            if rec.record_id == rid:
                return _Source(p, st.st_ino, rec.start, epoch, last)
            if rec.record_id > rid:
                break
        return None


class Cursor:
    """A named, durable position in a directory's change feed (``Reader.cursor``): the logs
    holding records after it are kept (``_retention.py``) until it passes them, up to the
    writer's ``max_retained_bytes``. ``position`` is the last record it has passed; ``changes()``
    yields what comes after it, and ``advance(record_id)`` moves it on."""

    def __init__(self, reader: Any, name: str, start: int | None = None) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ArgumentRangeError(f"a cursor name is a non-empty str of at most 200 "
                                     f"characters, not {name!r}")
        if start is not None and (type(start) is not int or start < 0):
            raise ArgumentRangeError(f"start must be a record id >= 0, not {start!r}")
        self._reader = reader
        self.name = name
        self.path: str = reader.path
        with file_lock(self.path, QUEUE_LOCK):
            cursors = retention.load_cursors(self.path)
            if name not in cursors:  # a new cursor starts at what is committed now, or ``start``
                at = reader.last_record_id if start is None else start
                cursors[name] = {"position": at, "lost": None}
                retention.save_cursors(self.path, cursors)

    def _state(self) -> dict:
        got = retention.load_cursors(self.path).get(self.name)
        if got is None:
            raise ClosedError(f"cursor {self.name!r} was deleted; make it again")
        if got["lost"]:
            raise CursorLostError(f"cursor {self.name!r} was {got['lost']}; it got to record "
                                  f"{got['position']}: delete it and make a new one", got["position"])
        return got

    @property
    def position(self) -> int:
        """The last record id this cursor has passed."""
        return int(self._state()["position"])

    def changes(self, timeout: float | None = None, durable: bool = True) -> Iterator[Change]:
        """The records after ``position``, in id order, waiting for new ones (see
        ``Reader.changes``); the cursor moves only by ``advance``."""
        feed = Feed(self._reader, self.position, durable, self.name)
        return feed.follow(timeout)

    def advance(self, record_id: int) -> None:
        """Move the cursor on to ``record_id`` (it has passed every record up to it); durable
        when it returns. It never moves back."""
        if type(record_id) is not int or record_id < 0:
            raise ArgumentRangeError(f"record_id must be an int >= 0, not {record_id!r}")
        with file_lock(self.path, QUEUE_LOCK):
            cursors = retention.load_cursors(self.path)
            self._state()
            if record_id > cursors[self.name]["position"]:
                cursors[self.name]["position"] = record_id
                retention.save_cursors(self.path, cursors)

    def delete(self) -> None:
        """Remove the cursor: the logs it held may go."""
        with file_lock(self.path, QUEUE_LOCK):
            cursors = retention.load_cursors(self.path)
            if cursors.pop(self.name, None) is not None:
                retention.save_cursors(self.path, cursors)

    def __repr__(self) -> str:
        return f"<mpwal.Cursor {self.name!r} of {self.path}>"
