"""Readers: any number, in any process, that see every committed record without asking anyone.

A reader never waits for the writer and never makes it wait (invariant 6): it maps the overlay
read-only and takes no lock; it writes only its own slot of the reader table, and only while it
holds a snapshot. Every read happens at a *watermark* W (invariant 5): a plain call loads the
overlay's ``committed`` word once, a snapshot uses its pin. The lookup order is the overlay's
newest version at or below W, then the table's pending drop, then the table file (``_overlay.py``
gives the protocol). A publish never disturbs a read; a structural change (``struct`` odd or
moved) or the enactor passing W while the call read a table file (``enacting`` > W) makes the
call look again, at a new watermark for a plain call. A reader's watermark never goes back.

Two modes:

* **shared memory** while a writer is alive: the segment named by the queue file's generation.
  A segment marked superseded names its successor (the overlay grew, or a new writer replaced a
  killed one). A structural window that stays open for more than ``STUCK_SECONDS`` (a writer
  stopped or killed inside one) makes the reader ask whether the writer is alive (its
  ``writer.lock``), and if it is stopped (``SIGSTOP``) or the window stays open past
  ``GIVE_UP_SECONDS``, answer that call from the logs and tables as private mode does, instead
  of waiting for it: every record the writer published is in the log already (invariant 1).
* **private** when there is no live writer: the reader reads the logs' longest valid prefix into
  its own memory (as replay would apply it) over the table files. It checks the queue file's
  identity on each lookup, so it moves to shared memory as soon as a writer publishes one.

Snapshots (``Reader.snapshot()``) pin a watermark in the reader table (``_pins.py``) so that the
enactor keeps every version they need; one held past the writer's ``max_snapshot_age`` raises
``SnapshotExpiredError`` at its next read rather than answer with newer data.
"""

from __future__ import annotations

import errno
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Literal, TypeVar

from ._errors import (ArgumentRangeError, ArgumentTypeError, ClosedError, CorruptionError,
                     DatabaseError, SnapshotExpiredError)
from ._format import CHUNK_BYTES, DROP_TABLE, INSERT_INDEX, entries_of
from ._logs import LogSet, read_logs
from ._overlay import (COMMITTED, DURABLE, ENACTED, ENACTING, ENTRIES, GENERATION, HEAP_BYTES,
                      HEAP_USED, LIVE, MISS, NEXT_GEN, NSLOTS, STATE, STRUCT, SUPERSEDED,
                      WRITER_PID, OverlayReader, Torn, segment_name)
from ._pins import DEFAULT_MAX_AGE, ReaderTable
from ._platform import check_machine
from ._queues import QUEUE_FILE, load_queues, writer_alive
from ._feed import Change, Cursor, Feed
from ._tables import TableFiles, ValueTable, check_key, check_layer, load_catalog, record_problem

ZERO_CHUNK = bytes(CHUNK_BYTES)
STUCK_SECONDS = 0.02  # a structural window open this long: is the writer alive, is it stopped?
GIVE_UP_SECONDS = 0.5  # a window open this long while the writer runs: answer from the logs


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger): ``T`` or ``t`` in /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


Stamp = tuple[int, int, int] | None  # the queue file's (inode, mtime, size), None if it is missing
_T = TypeVar("_T")


class _Again(Exception):
    """A read at watermark W met a table file the enactor was writing past W: look again."""


class _LogView:
    """The committed records of the logs' longest valid prefix (up to ``upto``), as replay
    would apply them over the table files: private mode's whole state, a stuck reader's answer,
    and a snapshot's when its structural window stays open."""

    def __init__(self, files: TableFiles, logs: LogSet, done: int, stamp: Stamp,
                 upto: int | None = None) -> None:
        self.files = files
        self.stamp = stamp  # the queue file's identity when the logs were read
        self.epoch = 0  # (a snapshot's view: the queue epoch before the logs were read)
        self.last = done
        data: dict[tuple[int, int], bytes | None] = {}
        drops: set[int] = set()
        for rec in logs.records():
            if (upto is not None and rec.record_id > upto) or record_problem(files.catalog, rec.ops):
                break  # replay ends the prefix at a problem too
            self.last = rec.record_id
            for op in rec.ops:
                if op.kind == DROP_TABLE:
                    drops.add(op.table)
                    for key in [k for k in data if k[0] == op.table]:
                        del data[key]
                elif op.kind == INSERT_INDEX:
                    key = (op.table, op.key)
                    base = data.get(key)
                    if base is None:
                        base = ZERO_CHUNK if op.table in drops else files.read_chunk(*key)
                    chunk = bytearray(base)
                    for e, v in entries_of(op.mask, op.data):
                        chunk[e * 8:e * 8 + 8] = v.to_bytes(8, "little")
                    data[key] = bytes(chunk)
                else:
                    data[(op.table, op.key)] = op.data
        self.data = data
        self.drops = drops

    def value(self, table: int, index: int) -> bytes | None:
        key = (table, index)
        if key in self.data:
            return self.data[key]
        if table in self.drops:
            return None
        return self.files.read_value(table, index)

    def chunk(self, table: int, chunk: int) -> bytes:
        data = self.data.get((table, chunk))
        if data is not None:
            return data
        if table in self.drops:
            return ZERO_CHUNK
        return self.files.read_chunk(table, chunk)

    def values(self, table: int, indices: Iterable[int]) -> list[bytes | None]:
        return [self.value(table, i) for i in indices]


class _AtMark:
    """Reads of one segment at one watermark, with the methods of a ``_LogView`` (value,
    values, chunk): what ``Reader.read_with``'s function reads through. Unchecked: the caller
    (a layer on the engine) names only tables and keys that exist."""

    __slots__ = ("reader", "seg", "w")

    def __init__(self, reader: Reader, seg: OverlayReader, w: int) -> None:
        self.reader, self.seg, self.w = reader, seg, w

    def value(self, table: int, index: int) -> bytes | None:
        return self.seg.find_many(table, (index,), self.w, self.reader._files.read_value)[0]

    def values(self, table: int, indices: Iterable[int]) -> list[bytes | None]:
        return self.seg.find_many(table, list(indices), self.w, self.reader._files.read_value)

    def chunk(self, table: int, chunk: int) -> bytes:
        return self.reader._chunk_at(self.seg, self.w, table, chunk)


class Reader:
    """Read-only view of a database directory, in any process. A context manager."""

    def __init__(self, path: str | os.PathLike[str], *, layer: str | None = None) -> None:
        check_machine()
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        self.path = os.path.realpath(os.fspath(path))
        if not os.path.isdir(self.path):
            if os.path.exists(self.path):
                raise DatabaseError(f"{self.path} is not a directory; give a database directory")
            raise DatabaseError(f"{self.path} does not exist; open a Writer on it first")
        self._catalog = load_catalog(self.path)
        check_layer(self.path, layer)  # a key-value directory opens only as one
        self._limits: dict[int, int] = {}  # value table -> max index, for the hot path's check
        self._strides: dict[int, int] = {}  # value table -> bytes per slot, for its file reads
        self._refresh_catalog()
        self._files = TableFiles(self.path, self._catalog, writable=False, mapped=True)
        self._queue_file = os.path.join(self.path, QUEUE_FILE)
        self._seg: OverlayReader | None = None
        self._fast: OverlayReader | None = None  # _seg, when value() may take its one-try path
        self._private: _LogView | None = None  # in private mode
        self._stuck: tuple[OverlayReader, int, _LogView] | None = None  # of a stuck window
        self._floor = 0  # the newest watermark this reader answered at: it never goes back
        self._pins: ReaderTable | None = None
        self._snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        self._closed = False
        self.recoveries = 0  # times this reader moved segment or mode
        self._attach()

    # -- modes -------------------------------------------------------------------------------
    def _attach(self) -> None:
        """Map the live writer's segment, or else read the logs privately."""
        for _ in range(100):
            stamp = self._stamp()
            st = load_queues(self.path)
            if st is not None and writer_alive(self.path):
                try:
                    seg = OverlayReader(segment_name(self.path, st.generation))
                except FileNotFoundError:
                    seg = None
                if seg is not None:
                    if seg.load_acquire(STATE) == LIVE:
                        self._use_segment(seg)
                        return
                    seg.release()
            if self._build_private(stamp):
                return
        raise DatabaseError(f"{self.path} kept changing while the reader opened; try again")

    def _use_segment(self, seg: OverlayReader) -> None:
        if self._seg is not None:
            self._seg.release()
        seg.bind_reader(self._files.read_value, self._limits, self._value_slow,
                        (self._files.maps, self._strides))
        self._seg = seg
        self._set_fast(seg if seg.load_acquire(COMMITTED) >= self._floor else None)
        self._private = None
        self._refresh_catalog()

    def _refresh_catalog(self) -> None:
        """Tables added by a writer since we opened become readable."""
        self._catalog.update(load_catalog(self.path))
        limits = {tid: t.max_key for tid, t in self._catalog.items() if t.kind == "value"}
        self._limits.clear()  # in place: the segment's value_now holds these dicts
        self._limits.update(limits)
        self._strides.update({tid: t.stride for tid, t in self._catalog.items()
                              if isinstance(t, ValueTable)})

    def _check_key(self, table: int, key: int, kind: Literal["value", "index"]) -> None:
        """The slow path of argument checking (a value slot or an index chunk): raise the
        precise error, after looking for tables defined since this reader opened."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        if table not in self._catalog and isinstance(table, int):
            self._refresh_catalog()
        check_key(self._catalog, table, key, kind)

    def _stamp(self) -> Stamp:
        try:
            s = os.stat(self._queue_file)
            return (s.st_ino, s.st_mtime_ns, s.st_size)
        except FileNotFoundError:
            return None

    def _read_view(self, stamp: Stamp, upto: int | None = None) -> _LogView | None:
        """The logs' valid prefix over the tables; None if the queues changed meanwhile."""
        self._refresh_catalog()
        st = load_queues(self.path)
        done = st.last_cleaned_record if st else 0  # records the tables already hold
        logs = read_logs(self.path, start=done + 1 if st else None)
        if self._stamp() != stamp:
            return None
        return _LogView(self._files, logs, done, stamp, upto)

    def _build_private(self, stamp: Stamp) -> bool:
        """Enter private mode; False if the queues changed while the logs were read."""
        view = self._read_view(stamp)
        if view is None:
            return False
        if self._seg is not None:
            self._seg.release()
            self._seg = None
            self._set_fast(None)
        self._private = view
        return True

    def _stuck_view(self, seg: OverlayReader, s: int, at: int | None) -> _LogView | None:
        """The logs and tables, for a call that found ``seg``'s structural window open (``s``)
        for long while its writer lives. Kept while ``struct`` stays at ``s`` (the writer did
        not move on); None if the queues kept changing. A snapshot's view stops at its pin."""
        got = self._stuck
        if (at is None and got is not None and got[0] is seg and got[1] == s
                and got[2].stamp == self._stamp()):
            return got[2]
        for _ in range(10):
            view = self._read_view(self._stamp(), at)
            if view is not None:
                if at is None:
                    self._stuck = (seg, s, view)
                return view
        return None

    def _snapshot_view(self, snap: Snapshot) -> _LogView:
        """The logs up to a snapshot's pin over the tables, for a snapshot with no live segment
        to read (its writer closed or died) whose pin is not the logs' last record. Valid while
        no table holds a record past the pin: enactors honour pins, so only a new writer's
        replay could have put one there, and replay cleans what it applies."""
        for _ in range(10):
            stamp = self._stamp()
            view = snap._view
            if view is None or view.stamp != stamp:
                epoch = self._epoch()  # before the logs and tables are read (see below)
                view = self._read_view(stamp, snap.record_id)
                if view is None:
                    continue
                view.epoch = epoch
            st = load_queues(self.path)
            if st is not None and st.last_cleaned_record > snap.record_id:
                raise snap._expired("a new writer replayed the logs past it")
            if writer_alive(self.path):  # a writer that is opening: its replay writes the
                raise snap._expired("a new writer is replaying the logs")  # tables now
            if view.last != snap.record_id:
                raise snap._expired("the logs no longer hold the records it saw (they never "
                                    "reached the disk)")
            snap._view = view
            return view
        raise DatabaseError(f"{self.path} kept changing while a snapshot read the logs; try again")

    def _epoch(self) -> int:
        st = load_queues(self.path)
        return st.epoch if st is not None else 0

    def _recover(self) -> None:
        """The segment was superseded, closed, or its writer died: find what to read now."""
        self.recoveries += 1
        seg = self._seg
        if seg is not None and seg.load_acquire(STRUCT) == SUPERSEDED and seg.q[STATE] != LIVE and seg.q[NEXT_GEN]:
            try:
                nxt = OverlayReader(segment_name(self.path, seg.q[NEXT_GEN]))
                if nxt.load_acquire(STATE) == LIVE:
                    self._use_segment(nxt)
                    return
                nxt.release()
            except FileNotFoundError:
                pass
        self._attach()

    def _private_fresh(self) -> None:
        if self._private is None or self._stamp() != self._private.stamp:
            self._attach()

    # -- the read loop -----------------------------------------------------------------------
    def _consistent(self, at_mark: Callable[[OverlayReader, int], _T],
                    from_logs: Callable[[_LogView], _T], snap: Snapshot | None = None) -> _T:
        """``at_mark(seg, W)`` at one watermark W of the current segment, between two loads of
        ``struct`` that must agree (even), and with ``enacting`` <= W after it; looked up again
        otherwise. ``from_logs(view)`` on a ``_LogView`` when there is no live writer (private
        mode) or a structural window stays open for long (a stopped or killed writer). For a
        snapshot W is its pin, and what can no longer answer at it raises
        SnapshotExpiredError. Superseded segments are followed; no call waits for the writer."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        if self._seg is None:
            self._private_fresh()
        if snap is not None:
            snap._check_age()
        spins = 0
        odd, since = 0, 0.0  # an odd counter seen after many spins, and since when
        while True:
            seg = self._seg
            if seg is None:
                private = self._private
                assert private is not None  # without a segment, _attach left a private view
                if snap is not None and private.last != snap.record_id:
                    pinned = self._snapshot_view(snap)
                    out = from_logs(pinned)
                    if self._epoch() != pinned.epoch:  # a writer opened meanwhile: its replay
                        self._attach()  # may have written the tables under that read
                        continue
                    if not snap._holds_enactor(0):  # an enactor may have passed it meanwhile
                        raise snap._expired("the enactor may have passed it")
                    return out
                if private.last < self._floor:  # the logs lost records we showed (power loss)
                    self._floor = private.last
                try:
                    out = from_logs(private)
                except CorruptionError:  # bytes a layer's read found damaged: real, unless a
                    if self._stamp() == private.stamp:  # writer changed the tables under it
                        raise
                    self._attach()
                    continue
                if self._stamp() != private.stamp:  # a writer came and enacted under the read
                    self._attach()
                    continue
                return out
            q = seg.q
            s = seg.load_acquire(STRUCT)
            if s == SUPERSEDED:
                self._recover()
                continue
            if not s & 1:
                w_mark = seg.load_acquire(COMMITTED)
                if snap is not None:
                    if w_mark < snap.record_id:
                        raise snap._expired("a new writer replayed the logs without records "
                                            "it saw (they never reached the disk)")
                    w_mark = snap.record_id
                elif w_mark < self._floor:  # after a stuck view's answer: until it catches up
                    stuck = self._stuck[2] if self._stuck is not None else None
                    if stuck is None:
                        stuck = self._stuck_view(seg, s, None)
                    if stuck is not None:
                        return from_logs(stuck)
                try:
                    out = at_mark(seg, w_mark)
                except (Torn, IndexError):  # freed bytes under a structural change: again
                    if seg.load_acquire(STRUCT) == s:
                        raise  # no change happened: a bug, not a race
                    continue
                except CorruptionError:  # what a layer's reads (read_with) found inconsistent:
                    # real damage only if nothing moved under them; a table file the enactor
                    # was writing past W, or a structural change, is read again
                    if seg.load_acquire(ENACTING) > w_mark:
                        if snap is not None and not snap._holds_enactor(spins):
                            raise snap._expired("the enactor passed it") from None
                        spins += 1
                        continue
                    if seg.load_acquire(STRUCT) == s:
                        raise
                    continue
                if seg.load_acquire(ENACTING) > w_mark:
                    if snap is not None and not snap._holds_enactor(spins):
                        raise snap._expired("the enactor passed it")
                    spins += 1  # a plain call looks again higher; a held pin: a transient
                    continue  # announcement the enactor lowers before it writes (_pins.py)
                if seg.load_acquire(STRUCT) == s:
                    if snap is None and w_mark >= self._floor and self._fast is not seg:
                        self._stuck = None
                        self._set_fast(seg)
                    if w_mark > self._floor:
                        self._floor = w_mark
                    return out
                continue
            spins += 1
            if spins < 64:
                continue
            now = time.monotonic()
            if s != odd:
                odd, since = s, now
            elif now - since > STUCK_SECONDS:  # the same window open all this time
                if not writer_alive(self.path):
                    self._recover()
                    spins = odd = 0
                    continue
                if now - since > GIVE_UP_SECONDS or _stopped(q[WRITER_PID]):
                    view = self._stuck_view(seg, s, None if snap is None else snap.record_id)
                    if view is not None:
                        out = from_logs(view)
                        if snap is None:
                            self._floor = max(self._floor, view.last)
                            self._set_fast(None)  # back to the segment once it catches up
                        elif (seg.load_acquire(ENACTING) > snap.record_id or seg.q[STRUCT] == SUPERSEDED) \
                                and not snap._holds_enactor(0):
                            raise snap._expired("the enactor passed it")  # (after the read)
                        return out
            time.sleep(0)

    # -- lookups -----------------------------------------------------------------------------
    def value(self, table: int, index: int) -> bytes | None:
        """The newest committed value of slot ``index`` of value table ``table``, or None."""
        # While a live segment serves this reader, ``self.value`` is that segment's
        # ``value_now`` (``_set_fast``): the whole lookup in one call, which falls back on
        # ``_value_slow``; this method is what runs otherwise.
        return self._value_slow(table, index)

    def _set_fast(self, seg: OverlayReader | None) -> None:
        """Let ``value()`` be ``seg.value_now`` (the hot path), or this class's method."""
        self._fast = seg
        if seg is None:
            self.__dict__.pop("value", None)
        else:
            self.__dict__["value"] = seg.value_now

    def _value_slow(self, table: int, index: int) -> bytes | None:
        limit = self._limits.get(table)
        if limit is None or type(index) is not int or not 0 <= index < limit:
            self._check_key(table, index, "value")
        return self._consistent(lambda seg, w: self._value_at(seg, w, table, index),
                                lambda view: view.value(table, index))

    def _value_at(self, seg: OverlayReader, w_mark: int, table: int, index: int) -> bytes | None:
        return seg.find_many(table, (index,), w_mark, self._files.read_value)[0]

    def _check_indices(self, table: int, indices: Iterable[int]) -> list[int]:
        try:
            out = list(indices)
        except TypeError:
            raise ArgumentTypeError(f"indices must be an iterable of ints, not "
                                    f"{type(indices).__name__}") from None
        limit = self._limits.get(table)
        if limit is None:
            self._check_key(table, 0, "value")
            limit = self._limits[table]
        for i in out:
            if type(i) is not int or not 0 <= i < limit:
                self._check_key(table, i, "value")
        return out

    def values(self, table: int, indices: Iterable[int]) -> list[bytes | None]:
        """``value`` for many indices of one table, all at one watermark."""
        got = self._check_indices(table, indices)
        return self._consistent(lambda seg, w: self._values_at(seg, w, table, got),
                                lambda view: [view.value(table, i) for i in got])

    def _values_at(self, seg: OverlayReader, w_mark: int, table: int,
                   indices: list[int]) -> list[bytes | None]:
        return seg.find_many(table, indices, w_mark, self._files.read_value)

    def index_chunk(self, table: int, chunk: int) -> bytes:
        """The 512 bytes of an index chunk (zeros where never written)."""
        self._check_key(table, chunk, "index")
        return self._consistent(lambda seg, w: self._chunk_at(seg, w, table, chunk),
                                lambda view: view.chunk(table, chunk))

    def _chunk_at(self, seg: OverlayReader, w_mark: int, table: int, chunk: int) -> bytes:
        data = seg.find(table, chunk, w_mark)
        if data is MISS:
            return self._files.read_chunk(table, chunk)
        return data or ZERO_CHUNK

    def index_entry(self, table: int, chunk: int, entry: int) -> int:
        """One u64 entry (0..63) of an index chunk."""
        _check_entry(entry)
        data = self.index_chunk(table, chunk)
        return int.from_bytes(data[entry * 8:entry * 8 + 8], "little")

    def read_with(self, fn: Callable[[Any], _T]) -> _T:
        """``fn(view)`` where every ``view.value(t, i)``, ``view.values(t, indices)`` and
        ``view.chunk(t, c)`` reads at one watermark: several reads, one consistent answer (a
        key-value lookup reads an index chunk, then a value). ``fn`` may run more than once (a
        structural change, or the enactor, under it) and must only read. For layers built on
        the engine: tables and keys are not checked."""
        return self._consistent(lambda seg, w: fn(_AtMark(self, seg, w)), fn)

    def snapshot(self) -> Snapshot:
        """A pinned watermark: ``with reader.snapshot() as s:`` then ``s.value``, ``s.values``,
        ``s.index_chunk``, ``s.index_entry`` all read at ``s.record_id``, across calls."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        return Snapshot(self)

    # -- the change feed ---------------------------------------------------------------------
    def changes(self, after: int = 0, timeout: float | None = None,
                durable: bool = True) -> Iterator[Change]:
        """The committed records after ``after``, in id order, as ``Change``s: from the logs
        still retained, then each new one as it commits (``durable=True``: once it is on disk).
        With ``timeout``, returns after that many seconds with nothing new. A record whose log
        was cleaned raises ``CursorLostError``: use a ``cursor`` to hold retention."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        return Feed(self, after, durable).follow(timeout)

    def cursor(self, name: str, start: int | None = None) -> Cursor:
        """The named durable cursor of this directory's feed; one that does not exist is made
        at ``start`` (default: the newest committed record). It holds the logs of the records
        after its position."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        return Cursor(self, name, start)

    # -- state -------------------------------------------------------------------------------
    @property
    def last_record_id(self) -> int:
        """The watermark a read would use now: the newest record id this reader can see."""
        return self._consistent(lambda seg, w: w, lambda view: view.last)

    @property
    def mode(self) -> str:
        """``"shared-memory"`` while following a live writer, else ``"private"``."""
        return "shared-memory" if self._seg is not None else "private"

    def stats(self) -> dict[str, Any]:
        """Record ids, queues, overlay use and generation as this reader sees them."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        st = load_queues(self.path)
        out: dict[str, Any] = {
            "mode": self.mode,
            "committed": self.last_record_id,
            "logs": ({"appending": st.appending, "read": st.read, "cleanup": st.cleanup,
                      "pool": st.pool} if st else None),
            "recoveries": self.recoveries,
        }
        seg = self._seg
        if seg is not None:
            q = seg.q
            out.update(durable=q[DURABLE], enacted=q[ENACTED], generation=q[GENERATION],
                       overlay_entries=q[ENTRIES], overlay_bytes=q[HEAP_USED],
                       overlay_capacity_entries=q[NSLOTS] // 2, overlay_capacity_bytes=q[HEAP_BYTES])
        else:
            out.update(private_entries=len(self._private.data) if self._private else 0)
        return out

    def close(self) -> None:
        """Unmap the shared memory and close the table files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._limits.clear()  # every lookup now takes the slow path, which raises ClosedError
        self._set_fast(None)
        if self._seg is not None:
            self._seg.release()
            self._seg = None
        for snap in list(self._snapshots):
            snap.close()  # their pins go before the reader table's mapping does
        if self._pins is not None:
            self._pins.close()
            self._pins = None
        self._files.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpwal.Reader {self.path} {'closed' if self._closed else self.mode}>"


def _check_entry(entry: int) -> None:
    if type(entry) is not int or not 0 <= entry < 64:
        if not isinstance(entry, int) or isinstance(entry, bool):
            raise ArgumentTypeError(f"entry must be an int, not {type(entry).__name__}")
        raise ArgumentRangeError(f"entry {entry} is outside 0..63")


class Snapshot:
    """Reads at one pinned record id (``Reader.snapshot()``); a context manager.

    The pin sits in the reader table (``_pins.py``) from the first line of ``__init__`` to
    ``close``; the enactor keeps every version the snapshot needs meanwhile, for at most the
    writer's ``max_snapshot_age``, after which every read raises ``SnapshotExpiredError``.
    """

    def __init__(self, reader: Reader) -> None:
        self._reader = reader
        self._slot = -1
        self._fd = -1
        self._pinned_at = time.monotonic_ns()
        self._max_age = DEFAULT_MAX_AGE
        self._view: _LogView | None = None  # the logs up to the pin, once no segment serves it
        pins = reader._pins
        if pins is None:
            try:
                pins = reader._pins = ReaderTable.open_or_create(reader.path)
            except OSError:  # read-only access: no pin holds the enactor back, so the
                pins = None  # snapshot expires (SnapshotExpiredError) once enactment passes it
        self._pins = pins
        if pins is not None:
            try:
                self._slot, self._fd = pins.claim()
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    raise DatabaseError(f"{e}: close snapshots you no longer need") from None
                raise
            self._max_age = pins.max_age
        try:
            self.record_id = self._pin()
        except BaseException:
            self.close()
            raise
        self._closed = False
        reader._snapshots.add(self)
        _live_snapshots.add(self)

    def _pin(self) -> int:
        """Pin the reader's current watermark: store it, pass the barrier, and check that the
        enactor has not gone past it (else pin again, higher)."""
        r = self._reader
        for _ in range(1000):
            w_mark = r.last_record_id
            if self._pins is not None:
                self._pinned_at = self._pins.pin(self._slot, self._fd, w_mark)
            seg = r._seg
            if seg is None:
                return w_mark
            if seg.load_acquire(STRUCT) == SUPERSEDED or seg.q[STATE] != LIVE:  # it grew, or its writer
                r._recover()  # went: pin again against the generation that is current
                continue
            if seg.load_acquire(ENACTING) <= w_mark:
                return w_mark
        raise DatabaseError("the enactor kept passing every watermark this snapshot tried; "
                            "try again")

    def _holds_enactor(self, spins: int) -> bool:
        """Whether this snapshot's pin still holds every enactor back (pinned, younger than
        ``max_snapshot_age`` now: an enactor that saw it expired saw it so before now), so an
        ``enacting`` above it is a transient announcement (the enactor lowers it before it
        writes), not data past the pin. A few thousand looks at most."""
        return (self._pins is not None and spins < 10_000
                and time.monotonic_ns() - self._pinned_at <= self._max_age * 1e9)

    def _check_age(self) -> None:
        if self._closed:
            raise ClosedError("this snapshot is closed; take a new one with reader.snapshot()")
        if time.monotonic_ns() - self._pinned_at > self._max_age * 1e9:
            raise self._expired(f"it is older than max_snapshot_age ({self._max_age:g} s)")

    def _expired(self, why: str) -> SnapshotExpiredError:
        return SnapshotExpiredError(f"the snapshot at record {self.record_id} expired: {why}; "
                                    "take a new snapshot (and hold it for less time)")

    def value(self, table: int, index: int) -> bytes | None:
        """The value of a slot as of ``record_id``."""
        r = self._reader
        r._check_indices(table, (index,))
        return r._consistent(lambda seg, w: r._value_at(seg, w, table, index),
                             lambda view: view.value(table, index), self)

    def values(self, table: int, indices: Iterable[int]) -> list[bytes | None]:
        """``value`` for many indices of one table, as of ``record_id``."""
        r = self._reader
        got = r._check_indices(table, indices)
        return r._consistent(lambda seg, w: r._values_at(seg, w, table, got),
                             lambda view: [view.value(table, i) for i in got], self)

    def index_chunk(self, table: int, chunk: int) -> bytes:
        """The 512 bytes of an index chunk as of ``record_id``."""
        r = self._reader
        r._check_key(table, chunk, "index")
        return r._consistent(lambda seg, w: r._chunk_at(seg, w, table, chunk),
                             lambda view: view.chunk(table, chunk), self)

    def index_entry(self, table: int, chunk: int, entry: int) -> int:
        """One u64 entry (0..63) of an index chunk as of ``record_id``."""
        _check_entry(entry)
        data = self.index_chunk(table, chunk)
        return int.from_bytes(data[entry * 8:entry * 8 + 8], "little")

    def read_with(self, fn: Callable[[Any], _T]) -> _T:
        """``Reader.read_with`` as of ``record_id``."""
        r = self._reader
        return r._consistent(lambda seg, w: fn(_AtMark(r, seg, w)), fn, self)

    def close(self) -> None:
        """Release the pin. Idempotent."""
        self._closed = True
        if self._fd >= 0 and self._pins is not None:
            self._pins.unpin(self._slot, self._fd)
            self._fd = -1

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"<mpwal.Snapshot at record {getattr(self, 'record_id', '?')}>"


_live_snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A child inherits its parent's snapshot descriptors, and with them the OFD locks that
    make their pins live: close them here (without unpinning: the parent's pins stay), so a
    pin goes when the reader that took it dies, whatever children it left. The child's copies
    of those snapshots are closed."""
    for snap in list(_live_snapshots):
        if snap._fd >= 0:
            try:
                os.close(snap._fd)
            except OSError:
                pass
            snap._fd = -1
        snap._closed = True
    _live_snapshots.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
