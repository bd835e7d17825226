"""The overlays in POSIX shared memory: the newest committed, not yet enacted data of each key.

One segment per *generation*, created only by the writer (mode 0600) and named
``/mpwal-<12 hex of the directory's real path>-<generation>`` (at most 31 characters, as macOS
allows). Readers map it read-only. Layout, in little-endian u64 words::

    header, 512 words (4096 bytes)
      0  seq           even when stable, odd while the writer changes anything below;
                       SUPERSEDED (2**64-1) forever once this generation is dead
      1  magic         MAGIC
      2  layout        LAYOUT_VERSION
      3  generation
      4  state         LIVE, SUPERSEDED (see next_gen) or CLOSED
      5  next_gen      generation that replaced this one
      6  writer_pid
      7  committed     newest record id published
      8  durable       newest record id known to be on disk
      9  enacted       newest record id applied to the table files (written by the enactor)
     10  enactor_pid   (written by the enactor)
     11  nslots        hash slots, a power of two
     12  heap_bytes
     13  entries       live hash entries
     14  heap_used     bytes of live record data in the heap
     15  ndrops        pending table drops, pairs at word 64: (table, record id)
    slots, nslots × 4 words, open addressing with linear probing, no tombstones (deletion
    shifts later entries back):
      index        the value index, or the index chunk number
      tag          table id + 1; 0 marks an empty slot
      record_id    record that wrote this data
      loc          byte offset in the segment << 32 | stored;  stored = length + 1, 0 = removed
    heap, heap_bytes: a ring of record blobs. Publishing a record copies all its data (its
    values, then the whole 512-byte after-image of each index chunk it changed) into the heap
    with one copy, at the ring's tail; its entries point into that blob. Records are enacted in
    id order, and an entry leaves when its own record is enacted (the record-id rule), so once
    record r is enacted nothing points into r's blob: blobs are freed from the ring's head in
    allocation order, and the pages they used are given back to the system (MADV_REMOVE) as the
    head passes them. (parity-db reclaims its overlay below 1/10 use; a ring needs no
    compaction.) Segments stay below 4 GiB so an offset fits in 32 bits.

Consistency is one sequence lock over the whole segment (the words and the heap): the writer
makes ``seq`` odd, changes entries, makes it even again; a reader reads ``seq``, looks up, copies
the bytes and re-reads ``seq``, retrying when it moved. A whole record is published inside one
odd window, so a lookup sees all of a record or none of it. Counters are written as single
aligned 8-byte stores through ``memoryview.cast('Q')`` (``struct.pack_into`` would zero its
target first, and a reader could take the transient 0 for an even, stable counter). The
protocol relies on stores and loads not being reordered between processes, which holds on
x86-64 (TSO); other architectures would need fences that pure Python cannot emit.

The hash is Fibonacci hashing of ``index ^ (table << 47)``: the top ``log2(nslots)`` bits of the
64-bit product with 0x9E3779B97F4A7C15, so strided indices spread.
"""

from __future__ import annotations

import collections
import hashlib
import mmap
import os
from types import TracebackType

import posix_ipc

from . import fileio
from .errors import StorageError

MAGIC = 0x4C41_5750_4D00_0001  # "\x01\0MPWAL" little-endian
LAYOUT_VERSION = 1
HEADER_WORDS = 512
HEADER_BYTES = HEADER_WORDS * 8
SLOT_WORDS = 4
SUPERSEDED = (1 << 64) - 1
M64 = (1 << 64) - 1
K = 0x9E3779B97F4A7C15

SEQ, MAGIC_W, LAYOUT, GENERATION, STATE, NEXT_GEN, WRITER_PID, COMMITTED, DURABLE, ENACTED, \
    ENACTOR_PID, NSLOTS, HEAP_BYTES, ENTRIES, HEAP_USED, NDROPS = range(16)
DROP_BASE = 64
MAX_DROPS = 128
LIVE, SUPERSEDED_STATE, CLOSED = 1, 2, 3
MAX_LOAD = 0.5  # entries per slot before the writer wants a bigger generation
MAX_SEGMENT = (1 << 32) - 1  # offsets in ``loc`` are 32 bits
RELEASE_BYTES = 1 << 20  # give freed heap pages back once this many have accumulated


def segment_prefix(realpath: str) -> str:
    return "/mpwal-" + hashlib.blake2b(realpath.encode(), digest_size=6).hexdigest() + "-"


def segment_name(realpath: str, generation: int) -> str:
    return segment_prefix(realpath) + format(generation, "x")


def unlink_segment(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def stale_segments(realpath: str) -> list[str]:
    """Names of this directory's segments present in /dev/shm (Linux), for cleanup."""
    prefix = segment_prefix(realpath)[1:]
    try:
        return ["/" + n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return []


def supersede_segment(name: str, next_gen: int) -> None:
    """Mark a dead writer's segment superseded by ``next_gen`` (readers that still map it move
    on at their next lookup instead of waiting for a writer that is gone), then unlink it."""
    try:
        shm = posix_ipc.SharedMemory(name, 0)
    except posix_ipc.ExistentialError:
        return
    try:
        if shm.size >= HEADER_BYTES:
            m = mmap.mmap(shm.fd, HEADER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            q = memoryview(m).cast("Q")
            if q[MAGIC_W] == MAGIC:
                q[NEXT_GEN] = next_gen
                q[STATE] = SUPERSEDED_STATE
                q[SEQ] = SUPERSEDED
            q.release()
            m.close()
    finally:
        shm.close_fd()
        unlink_segment(name)


class _Segment:
    """A mapped segment and the layout numbers derived from its header."""

    def __init__(self, name: str, m: mmap.mmap):
        self.name = name
        self.m = m
        self.q = memoryview(m).cast("Q")
        self.nslots = self.q[NSLOTS]
        self.shift = 64 - (self.nslots.bit_length() - 1)
        self.slots_end = HEADER_WORDS + self.nslots * SLOT_WORDS
        self.heap_start = self.slots_end * 8
        self.heap_bytes = self.q[HEAP_BYTES]

    def home(self, table: int, index: int) -> int:
        """Word offset of the slot where (table, index) would sit with no collision."""
        return ((((index ^ (table << 47)) * K) & M64) >> self.shift) * SLOT_WORDS + HEADER_WORDS

    def drops(self) -> dict[int, int]:
        q = self.q
        return {q[DROP_BASE + 2 * i]: q[DROP_BASE + 2 * i + 1] for i in range(q[NDROPS])}

    def release(self) -> None:
        try:
            self.q.release()
            self.m.close()
        except (BufferError, ValueError):
            pass  # a view handed out is still alive; the mapping goes with the process


class OverlayReader(_Segment):
    """A read-only mapping of one generation. Raises FileNotFoundError if it is gone."""

    def __init__(self, name: str):
        try:
            shm = posix_ipc.SharedMemory(name, 0, read_only=True)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(name) from None
        try:
            m = mmap.mmap(shm.fd, shm.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            shm.close_fd()
        q = memoryview(m).cast("Q")
        ok = len(q) >= HEADER_WORDS and q[MAGIC_W] == MAGIC and q[LAYOUT] == LAYOUT_VERSION
        q.release()
        if not ok:
            m.close()
            raise FileNotFoundError(f"{name} is not an mpwal overlay of layout {LAYOUT_VERSION}")
        super().__init__(name, m)

    def find(self, table: int, index: int):
        """(record_id, data) of an entry, or None; call inside a seq window and re-check."""
        q = self.q
        w = self.home(table, index)
        tag = table + 1
        end = self.slots_end
        while True:
            t = q[w + 1]
            if t == tag and q[w] == index:
                loc = q[w + 3]
                stored = loc & 0xFFFFFFFF
                if not stored:
                    return q[w + 2], None
                off = loc >> 32
                return q[w + 2], self.m[off:off + stored - 1]
            if not t:
                return None
            w += SLOT_WORDS
            if w == end:
                w = HEADER_WORDS

    def entries(self):
        """Every (table, index, record_id, data) entry; call inside a seq window and re-check."""
        q = self.q
        for w in range(HEADER_WORDS, self.slots_end, SLOT_WORDS):
            t = q[w + 1]
            if t:
                loc = q[w + 3]
                stored = loc & 0xFFFFFFFF
                off = loc >> 32
                yield t - 1, q[w], q[w + 2], (self.m[off:off + stored - 1] if stored else None)


class _Window:
    """``OverlayWriter.window()``'s context manager: a class, not a generator, because it runs
    once or twice per commit (a third of the cost of ``contextlib.contextmanager``)."""

    __slots__ = ("ov",)

    def __init__(self, ov: OverlayWriter) -> None:
        self.ov = ov

    def __enter__(self) -> OverlayWriter:
        self.ov.begin()
        return self.ov

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.ov.end()
        else:
            self.ov.retire(CLOSED)


class OverlayWriter(_Segment):
    """The writer's read-write mapping of a generation it created, and its private bookkeeping.

    The writer keeps, in its own memory, where each key's slot is (``where``) and the ring's
    blobs, so publishing never probes or scans shared memory. Every mutating method must be
    called between ``begin()`` and ``end()``.
    """

    def __init__(self, realpath: str, generation: int, nslots: int, heap_bytes: int):
        assert nslots & (nslots - 1) == 0 and nslots >= 16
        heap_bytes = (heap_bytes + 4095) & ~4095
        name = segment_name(realpath, generation)
        size = HEADER_BYTES + nslots * SLOT_WORDS * 8 + heap_bytes
        if size > MAX_SEGMENT:
            raise StorageError(27, f"an overlay of {size} bytes is over 4 GiB: lower overlay_slots "
                                   "or overlay_bytes")
        unlink_segment(name)  # a leftover of a killed writer with the same generation
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except (posix_ipc.Error, OSError) as e:
            raise StorageError(28, f"cannot create shared memory {name} of {size} bytes ({e}): "
                                   "free space in /dev/shm or lower overlay_bytes") from None
        try:
            fileio.give_to_dir_owner(shm.fd, realpath)  # the owner's readers must map it
            m = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            shm.close_fd()
            unlink_segment(name)
            raise
        shm.close_fd()
        q = memoryview(m).cast("Q")
        q[NSLOTS] = nslots
        q[HEAP_BYTES] = heap_bytes
        q[MAGIC_W] = MAGIC
        q[LAYOUT] = LAYOUT_VERSION
        q[GENERATION] = generation
        q[WRITER_PID] = os.getpid()
        q[STATE] = LIVE
        q.release()
        super().__init__(name, m)
        self.generation = generation
        self.where: dict[tuple[int, int], int] = {}  # (table, index) -> slot word offset
        self._window = _Window(self)
        self.heap_end = self.heap_start + heap_bytes
        # the ring: live blobs are [head, tail), or when wrapped [head, wrap) + [heap_start, tail)
        self.blobs: collections.deque = collections.deque()  # (record_id, start, end)
        self.head = self.tail = self.heap_start
        self.wrap = 0
        self.used = 0  # live blob bytes
        self.released = self.heap_start  # pages in [released, head) are freed, not yet given back
        self.hwm = self.heap_start  # the ring never went past this since it was last emptied

    # -- the sequence lock -------------------------------------------------------------------
    def begin(self) -> None:
        self.q[SEQ] += 1

    def end(self) -> None:
        q = self.q
        q[ENTRIES] = len(self.where)
        q[HEAP_USED] = self.used
        q[SEQ] += 1

    def window(self) -> _Window:
        """One sequence-lock window, all or nothing: an exception inside it (a failure, or a
        KeyboardInterrupt at any point) leaves the counter odd and retires the generation, so
        no reader ever sees a window half done; readers then read the logs and tables."""
        return self._window

    # -- the ring ----------------------------------------------------------------------------
    def room_for(self, new_entries: int, nbytes: int) -> bool:
        """Whether ``new_entries`` more keys and a blob of ``nbytes`` fit now."""
        if len(self.where) + new_entries > self.nslots * MAX_LOAD:
            return False
        if not nbytes or not self.blobs:
            return nbytes <= self.heap_end - self.heap_start
        if self.wrap:
            return self.tail + nbytes < self.head
        return self.tail + nbytes <= self.heap_end or self.heap_start + nbytes < self.head

    def _alloc(self, n: int) -> int:
        if not self.blobs:
            self._reset()
        if self.wrap:
            if self.tail + n >= self.head:
                raise MemoryError("overlay heap full")  # callers check room_for() first
            start = self.tail
        elif self.tail + n <= self.heap_end:
            start = self.tail
        elif self.heap_start + n < self.head:
            self.wrap, start = self.tail, self.heap_start
        else:
            raise MemoryError("overlay heap full")
        self.tail = start + n
        if self.tail > self.hwm:
            self.hwm = self.tail
        return start

    def _reset(self) -> None:
        """The ring is empty: start again at the heap's start, giving every page back."""
        if self.hwm > self.heap_start:
            self._release(self.heap_start, self.hwm - self.heap_start)
        self.head = self.tail = self.released = self.hwm = self.heap_start
        self.wrap = 0

    def release_through(self, record_id: int) -> None:
        """Free the blobs of records up to ``record_id`` (all enacted: nothing points there)."""
        blobs = self.blobs
        if not blobs or blobs[0][0] > record_id:
            return
        while blobs and blobs[0][0] <= record_id:
            _, s, e = blobs.popleft()
            self.used -= e - s
        if not blobs:
            self._reset()
            return
        head = blobs[0][1]
        if self.wrap and head < self.head:
            # the head followed the tail around: the live bytes are [head, tail) again, and
            # everything the last lap used past the tail is free
            self._release(self.tail, self.hwm - self.tail)
            self.wrap = 0
            self.released = self.heap_start
        self.head = head
        # free below the head: [heap_start, head), or [tail, head) while the ring is wrapped
        lo = max(self.released, self.tail) if self.wrap else self.released
        if head - lo >= RELEASE_BYTES:
            page = head // mmap.PAGESIZE * mmap.PAGESIZE
            self._release(lo, page - lo)
            self.released = page

    def _release(self, start: int, length: int) -> None:
        page = mmap.PAGESIZE
        a = (start + page - 1) // page * page
        b = (start + length) // page * page
        if b > a and hasattr(mmap, "MADV_REMOVE"):
            try:
                self.m.madvise(mmap.MADV_REMOVE, a, b - a)
            except OSError:
                pass

    # -- entries -----------------------------------------------------------------------------
    def put(self, table: int, index: int, record_id: int, data) -> None:
        """Make (table, index) hold ``data`` (bytes, or None for a removal) from ``record_id``."""
        self.put_record(record_id, (((table, index), data),), self.stage(record_id, data or b""))

    def stage(self, record_id: int, blob: bytes) -> int:
        """Copy a record's data into free ring space; returns its offset. This needs no seq
        window (nothing points there yet), which keeps the window short for readers."""
        n = len(blob)
        if not n:
            return self.tail
        off = self._alloc(n)
        self.m[off:off + n] = blob
        self.blobs.append((record_id, off, off + n))
        self.used += n
        return off

    def put_record(self, record_id: int, items, off: int, more=()) -> None:
        """Publish a record whose data was staged at ``off`` (the concatenation, in order, of
        every non-empty data of ``items`` and then of ``more``): point each (key, data) at its
        part (None: removed). The publish hot path, run inside the seq window."""
        q = self.q
        where = self.where
        shift = self.shift
        end = self.slots_end
        for part in (items, more):
            for key, data in part:
                w = where.get(key)
                if w is None:
                    if len(where) >= self.nslots - 1:
                        raise MemoryError("overlay slots full")  # callers check room_for() first
                    table, index = key
                    w = ((((index ^ (table << 47)) * K) & M64) >> shift) * SLOT_WORDS + HEADER_WORDS
                    while q[w + 1]:
                        w += SLOT_WORDS
                        if w == end:
                            w = HEADER_WORDS
                    where[key] = w
                    q[w] = index
                    q[w + 1] = table + 1
                q[w + 2] = record_id
                if data is None:
                    q[w + 3] = 0
                else:
                    k = len(data)
                    q[w + 3] = (off << 32) | (k + 1)
                    off += k

    def get(self, table: int, index: int):
        """(record_id, data) of an entry, or None. Writer-side, no seq check needed."""
        w = self.where.get((table, index))
        if w is None:
            return None
        q = self.q
        loc = q[w + 3]
        stored = loc & 0xFFFFFFFF
        if not stored:
            return q[w + 2], None
        off = loc >> 32
        return q[w + 2], self.m[off:off + stored - 1]

    def remove_if(self, table: int, index: int, record_id: int) -> bool:
        """Remove the entry if it still holds ``record_id``'s data (the record-id rule)."""
        return self.remove_record(((table, index),), record_id) == 1

    def remove_record(self, keys, record_id: int) -> int:
        """``remove_if`` for every key a record wrote: the enactment hot path. Returns how many
        entries went (a key rewritten by a newer record stays). The record's blob is freed
        separately, by ``release_through``."""
        q = self.q
        where = self.where
        end = self.slots_end
        shift = self.shift
        removed = 0
        for key in keys:
            w = where.get(key)
            if w is None or q[w + 2] != record_id:
                continue
            removed += 1
            del where[key]
            # backward shift: pull later entries of the probe run into the hole when their home
            # does not lie cyclically in (hole, j]; no tombstones, so lookups stay short
            hole = j = w
            while True:
                j += SLOT_WORDS
                if j == end:
                    j = HEADER_WORDS
                t = q[j + 1]
                if not t:
                    break
                idx = q[j]
                h = ((((idx ^ ((t - 1) << 47)) * K) & M64) >> shift) * SLOT_WORDS + HEADER_WORDS
                if (hole < j and hole < h <= j) or (hole > j and (h > hole or h <= j)):
                    continue
                q[hole] = idx
                q[hole + 2] = q[j + 2]
                q[hole + 3] = q[j + 3]
                q[hole + 1] = t
                where[(t - 1, idx)] = hole
                hole = j
            q[hole + 1] = 0  # an empty slot is one whose tag is 0
        return removed

    def remove_table(self, table: int) -> None:
        for key in [k for k in self.where if k[0] == table]:
            self.remove_record((key,), self.q[self.where[key] + 2])

    # -- drops -------------------------------------------------------------------------------
    def set_drops(self, drops: dict[int, int]) -> None:
        q = self.q
        items = sorted(drops.items())
        if len(items) > MAX_DROPS:
            raise MemoryError(f"more than {MAX_DROPS} pending drops")  # the writer waits first
        for i, (t, r) in enumerate(items):
            q[DROP_BASE + 2 * i] = t
            q[DROP_BASE + 2 * i + 1] = r
        q[NDROPS] = len(items)

    # -- growth ------------------------------------------------------------------------------
    def copy_from(self, other: OverlayWriter) -> None:
        """Fill this (new, bigger) generation with every entry and counter of ``other``: each
        record's surviving entries become one blob here, in record order."""
        by_record: dict[int, list] = {}
        for (table, index), _w in other.where.items():
            rid, data = other.get(table, index)
            by_record.setdefault(rid, []).append(((table, index), data))
        for rid in sorted(by_record):
            items = by_record[rid]
            self.put_record(rid, items, self.stage(rid, b"".join(d for _, d in items if d)))
        for word in (COMMITTED, DURABLE, ENACTED, ENACTOR_PID):
            self.q[word] = other.q[word]
        self.set_drops(other.drops())

    def retire(self, state: int, next_gen: int = 0) -> None:
        """Mark this generation dead for readers and remove its name; the mapping stays valid."""
        q = self.q
        q[NEXT_GEN] = next_gen
        q[STATE] = state
        q[SEQ] = SUPERSEDED
        unlink_segment(self.name)
