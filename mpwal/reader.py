"""Readers: any number, in any process, that see every committed record without asking anyone.

A reader never writes: not to disk, not to shared memory (it maps the overlay read-only), and
it takes no lock, so it can never make the writer wait (invariant 6). Lookup order is the
overlay, then the table's pending drop, then the table file, all inside one sequence-lock
window (see ``overlay.py``): when the window's counter moved, the reader looks again. The table
file is read inside the window too, so a slot that the enactor applies and the writer drops from
the overlay meanwhile is simply looked up again, never read half-written.

Two modes:

* **shared memory** while a writer is alive: the segment named by the queue file's generation.
  A segment marked superseded names its successor (the overlay grew, or a new writer replaced a
  killed one). A counter that stays odd for more than ``STUCK_SECONDS`` (a writer stopped or
  killed inside a window) makes the reader ask whether the writer is alive (its
  ``writer.lock``), and if it is stopped (``SIGSTOP``) or the window stays open past
  ``GIVE_UP_SECONDS``, answer that call from the logs and tables as private mode does, instead
  of waiting for it: every record the writer is publishing is in the log already
  (invariant 1), so that answer is at least as new as anything the segment showed.
* **private** when there is no live writer: the reader reads the logs' longest valid prefix into
  its own memory (as replay would apply it) over the table files. It checks the queue file's
  identity on each lookup, so it moves to shared memory as soon as a writer publishes one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import ArgumentRangeError, ArgumentTypeError, ClosedError, DatabaseError
from .format import CHUNK_BYTES, DROP_TABLE, INSERT_INDEX, entries_of
from .logs import LogSet, read_logs
from .overlay import (COMMITTED, DURABLE, ENACTED, ENTRIES, GENERATION, HEAP_BYTES, HEAP_USED,
                      HEADER_WORDS, K, LIVE, M64, NDROPS, NEXT_GEN, NSLOTS, SLOT_WORDS, STATE,
                      SUPERSEDED, WRITER_PID, OverlayReader, segment_name)
from .platform import check_machine
from .queues import QUEUE_FILE, load_queues, writer_alive
from .tables import TableFiles, check_key, load_catalog, record_problem

ZERO_CHUNK = bytes(CHUNK_BYTES)
STUCK_SECONDS = 0.02  # a window open this long: is the writer alive, is it stopped?
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


class _LogView:
    """The committed records of the logs' longest valid prefix, as replay would apply them over
    the table files: private mode's whole state, and a stuck reader's answer."""

    def __init__(self, files: TableFiles, logs: LogSet, done: int, stamp: Stamp) -> None:
        self.files = files
        self.stamp = stamp  # the queue file's identity when the logs were read
        self.last = done
        data: dict[tuple[int, int], bytes | None] = {}
        drops: set[int] = set()
        for rec in logs.records():
            if record_problem(files.catalog, rec.ops):
                break  # replay ends the prefix here too
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


class Reader:
    """Read-only view of a database directory, in any process. A context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        check_machine()
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        self.path = os.path.realpath(os.fspath(path))
        if not os.path.isdir(self.path):
            if os.path.exists(self.path):
                raise DatabaseError(f"{self.path} is not a directory; give a database directory")
            raise DatabaseError(f"{self.path} does not exist; open a Writer on it first")
        self._catalog = load_catalog(self.path)
        self._limits: dict[int, int] = {}  # value table -> max index, for the hot path's check
        self._refresh_catalog()
        self._files = TableFiles(self.path, self._catalog, writable=False, mapped=True)
        self._queue_file = os.path.join(self.path, QUEUE_FILE)
        self._seg: OverlayReader | None = None
        self._private: _LogView | None = None  # in private mode
        self._stuck: tuple[OverlayReader, int, _LogView] | None = None  # of a stuck window
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
                    if seg.q[STATE] == LIVE:
                        self._use_segment(seg)
                        return
                    seg.release()
            if self._build_private(stamp):
                return
        raise DatabaseError(f"{self.path} kept changing while the reader opened; try again")

    def _use_segment(self, seg: OverlayReader) -> None:
        if self._seg is not None:
            self._seg.release()
        self._seg = seg
        self._private = None
        self._refresh_catalog()

    def _refresh_catalog(self) -> None:
        """Tables added by a writer since we opened become readable."""
        self._catalog.update(load_catalog(self.path))
        self._limits = {tid: t.max_key for tid, t in self._catalog.items() if t.kind == "value"}

    def _check_value_key(self, table: int, index: int) -> None:
        """The slow path of argument checking: raise the precise error."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        if table not in self._catalog and isinstance(table, int):
            self._refresh_catalog()
        check_key(self._catalog, table, index, "value")

    def _stamp(self) -> Stamp:
        try:
            s = os.stat(self._queue_file)
            return (s.st_ino, s.st_mtime_ns, s.st_size)
        except FileNotFoundError:
            return None

    def _read_view(self, stamp: Stamp) -> _LogView | None:
        """The logs' valid prefix over the tables; None if the queues changed meanwhile."""
        self._refresh_catalog()
        st = load_queues(self.path)
        done = st.last_cleaned_record if st else 0  # records the tables already hold
        logs = read_logs(self.path, start=done + 1 if st else None)
        if self._stamp() != stamp:
            return None
        return _LogView(self._files, logs, done, stamp)

    def _build_private(self, stamp: Stamp) -> bool:
        """Enter private mode; False if the queues changed while the logs were read."""
        view = self._read_view(stamp)
        if view is None:
            return False
        if self._seg is not None:
            self._seg.release()
            self._seg = None
        self._private = view
        return True

    def _stuck_view(self, seg: OverlayReader, s: int) -> _LogView | None:
        """The logs and tables, for a call that found ``seg``'s counter odd (``s``) for long
        while its writer lives. Kept while the counter stays at ``s`` (the writer did not move
        on, so neither did the logs it publishes); None if the queues kept changing."""
        got = self._stuck
        if got is not None and got[0] is seg and got[1] == s and got[2].stamp == self._stamp():
            return got[2]
        for _ in range(10):
            view = self._read_view(self._stamp())
            if view is not None:
                self._stuck = (seg, s, view)
                return view
        return None

    def _recover(self) -> None:
        """The segment was superseded, closed, or its writer died: find what to read now."""
        self.recoveries += 1
        seg = self._seg
        if seg is not None and seg.q[0] == SUPERSEDED and seg.q[STATE] != LIVE and seg.q[NEXT_GEN]:
            try:
                nxt = OverlayReader(segment_name(self.path, seg.q[NEXT_GEN]))
                if nxt.q[STATE] == LIVE:
                    self._use_segment(nxt)
                    return
                nxt.release()
            except FileNotFoundError:
                pass
        self._attach()

    def _private_fresh(self) -> None:
        if self._private is None or self._stamp() != self._private.stamp:
            self._attach()

    # -- lookups -----------------------------------------------------------------------------
    def value(self, table: int, index: int) -> bytes | None:
        """The newest committed value of slot ``index`` of value table ``table``, or None."""
        limit = self._limits.get(table)
        if limit is None or type(index) is not int or not 0 <= index < limit:
            self._check_value_key(table, index)
        seg = self._seg
        if seg is not None:  # the hot path: _lookup with find() inlined, one try; else retry
            q = seg.q
            s = q[0]
            if not s & 1:
                w = ((((index ^ (table << 47)) * K) & M64) >> seg.shift) * SLOT_WORDS + HEADER_WORDS
                tag = table + 1
                while True:
                    t = q[w + 1]
                    if t == tag and q[w] == index:
                        loc = q[w + 3]
                        stored = loc & 0xFFFFFFFF
                        if stored:
                            off = loc >> 32
                            data = seg.m[off:off + stored - 1]
                        else:
                            data = None
                        break
                    if not t:
                        if q[NDROPS] and table in seg.drops():
                            data = None
                        else:
                            data = self._files.read_value(table, index)
                        break
                    w += SLOT_WORDS
                    if w == seg.slots_end:
                        w = HEADER_WORDS
                if q[0] == s:
                    return data
        return self._value_retry(table, index)

    def _lookup(self, seg: OverlayReader, q: memoryview, table: int, index: int) -> bytes | None:
        """Overlay, then a pending drop, then the table file; call inside a seq window."""
        got = seg.find(table, index)
        if got is not None:
            return got[1]
        if q[NDROPS] and table in seg.drops():
            return None
        return self._files.read_value(table, index)

    def _consistent(self, in_window: Callable[[OverlayReader, memoryview], _T],
                    from_logs: Callable[[_LogView], _T]) -> _T:
        """``in_window(seg, q)`` inside one sequence-lock window of the current segment, looked
        up again until the counter did not move; ``from_logs(view)`` on a ``_LogView`` when
        there is no live writer (private mode) or the counter stays odd for long (a stopped or
        killed writer). Every read but ``value()``'s first try comes here: superseded segments
        are followed, and no call waits for the writer."""
        if self._seg is None:
            self._private_fresh()
        spins = 0
        odd, since = 0, 0.0  # an odd counter seen after many spins, and since when
        while True:
            seg = self._seg
            if seg is None:
                private = self._private
                assert private is not None  # without a segment, _attach left a private view
                return from_logs(private)
            q = seg.q
            s = q[0]
            if s == SUPERSEDED:
                self._recover()
                continue
            if not s & 1:
                out = in_window(seg, q)
                if q[0] == s:
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
                    view = self._stuck_view(seg, s)
                    if view is not None:
                        return from_logs(view)
            time.sleep(0)

    def _value_retry(self, table: int, index: int) -> bytes | None:
        return self._consistent(lambda seg, q: self._lookup(seg, q, table, index),
                                lambda view: view.value(table, index))

    def values(self, table: int, indices: Iterable[int]) -> list[bytes | None]:
        """``value`` for many indices of one table, in one consistent snapshot."""
        try:
            indices = list(indices)
        except TypeError:
            raise ArgumentTypeError(f"indices must be an iterable of ints, not "
                                    f"{type(indices).__name__}") from None
        limit = self._limits.get(table)
        if limit is None:
            self._check_value_key(table, 0)
            limit = self._limits[table]
        for i in indices:
            if type(i) is not int or not 0 <= i < limit:
                self._check_value_key(table, i)
        return self._consistent(lambda seg, q: self._lookup_many(seg, q, table, indices),
                                lambda view: [view.value(table, i) for i in indices])

    def _lookup_many(self, seg: OverlayReader, q: memoryview, table: int,
                     indices: list[int]) -> list[bytes | None]:
        """``_lookup`` of many indices, with find() inlined: the batch hot path."""
        tag = table + 1
        tbits = table << 47
        read_value = self._files.read_value
        m = seg.m
        shift = seg.shift
        end = seg.slots_end
        dropped = bool(q[NDROPS]) and table in seg.drops()
        out: list[bytes | None] = []
        append = out.append
        for index in indices:
            w = ((((index ^ tbits) * K) & M64) >> shift) * SLOT_WORDS + HEADER_WORDS
            while True:
                tg = q[w + 1]
                if tg == tag and q[w] == index:
                    loc = q[w + 3]
                    stored = loc & 0xFFFFFFFF
                    if stored:
                        off = loc >> 32
                        append(m[off:off + stored - 1])
                    else:
                        append(None)
                    break
                if not tg:
                    append(None if dropped else read_value(table, index))
                    break
                w += SLOT_WORDS
                if w == end:
                    w = HEADER_WORDS
        return out

    def index_chunk(self, table: int, chunk: int) -> bytes:
        """The 512 bytes of an index chunk (zeros where never written)."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        check_key(self._catalog, table, chunk, "index")
        return self._consistent(lambda seg, q: self._chunk_in(seg, q, table, chunk),
                                lambda view: view.chunk(table, chunk))

    def _chunk_in(self, seg: OverlayReader, q: memoryview, table: int, chunk: int) -> bytes:
        got = seg.find(table, chunk)
        if got is not None:
            return got[1] or ZERO_CHUNK
        if q[NDROPS] and table in seg.drops():
            return ZERO_CHUNK
        return self._files.read_chunk(table, chunk)

    def index_entry(self, table: int, chunk: int, entry: int) -> int:
        """One u64 entry (0..63) of an index chunk."""
        if type(entry) is not int or not 0 <= entry < 64:
            if not isinstance(entry, int) or isinstance(entry, bool):
                raise ArgumentTypeError(f"entry must be an int, not {type(entry).__name__}")
            raise ArgumentRangeError(f"entry {entry} is outside 0..63")
        data = self.index_chunk(table, chunk)
        return int.from_bytes(data[entry * 8:entry * 8 + 8], "little")

    # -- state -------------------------------------------------------------------------------
    @property
    def last_record_id(self) -> int:
        """The newest record id this reader can see."""
        if self._closed:
            raise ClosedError("this Reader is closed; open a new mpwal.Reader")
        return self._consistent(lambda seg, q: q[COMMITTED], lambda view: view.last)

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
        self._limits = {}  # every lookup now takes the slow path, which raises ClosedError
        if self._seg is not None:
            self._seg.release()
            self._seg = None
        self._files.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpwal.Reader {self.path} {'closed' if self._closed else self.mode}>"
