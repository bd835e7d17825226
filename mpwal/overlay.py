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
     14  heap_used     bytes allocated in the heap
     15  ndrops        pending table drops, pairs at word 64: (table, record id)
    slots, nslots × 4 words, open addressing with linear probing, no tombstones (deletion
    shifts later entries back):
      index        the value index, or the index chunk number
      tag          table id + 1; 0 marks an empty slot
      record_id    record that wrote this data
      loc          (heap offset / 16) << 32 | stored;  stored = length + 1, 0 = value removed
    heap, heap_bytes: data blocks (values; whole 512-byte chunks for index tables), allocated by
    the writer in power-of-two size classes from 16 bytes.

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

import hashlib
import mmap
import os

import posix_ipc

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
MIN_CLASS = 16
MAX_LOAD = 0.5  # entries per slot before the writer wants a bigger generation


def segment_prefix(realpath: str) -> str:
    return "/mpwal-" + hashlib.blake2b(realpath.encode(), digest_size=6).hexdigest() + "-"


def segment_name(realpath: str, generation: int) -> str:
    return segment_prefix(realpath) + format(generation, "x")


def size_class(n: int) -> int:
    """Bytes allocated for ``n`` bytes of data: 0 for none, else a power of two >= 16."""
    if n <= 0:
        return 0
    return max(MIN_CLASS, 1 << (n - 1).bit_length())


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
                off = (loc >> 32) << 4
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
                off = (loc >> 32) << 4
                yield t - 1, q[w], q[w + 2], (self.m[off:off + stored - 1] if stored else None)


class OverlayWriter(_Segment):
    """The writer's read-write mapping of a generation it created, and its private bookkeeping.

    The writer keeps, in its own memory, where each key's slot is (``where``) and the heap's free
    lists, so publishing never probes or scans shared memory. Every mutating method must be
    called between ``begin()`` and ``end()``.
    """

    def __init__(self, realpath: str, generation: int, nslots: int, heap_bytes: int):
        assert nslots & (nslots - 1) == 0 and nslots >= 16
        heap_bytes = (heap_bytes + 4095) & ~4095
        name = segment_name(realpath, generation)
        size = HEADER_BYTES + nslots * SLOT_WORDS * 8 + heap_bytes
        unlink_segment(name)  # a leftover of a killed writer with the same generation
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        except (posix_ipc.Error, OSError) as e:
            raise StorageError(28, f"cannot create shared memory {name} of {size} bytes ({e}): "
                                   "free space in /dev/shm or lower overlay_bytes") from None
        try:
            m = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
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
        self.free: dict[int, list[int]] = {}  # size class -> heap offsets (bytes, absolute)
        self.bump = self.heap_start  # next never-used heap byte
        self.used = 0

    # -- the sequence lock -------------------------------------------------------------------
    def begin(self) -> None:
        self.q[SEQ] += 1

    def end(self) -> None:
        q = self.q
        q[ENTRIES] = len(self.where)
        q[HEAP_USED] = self.used
        q[SEQ] += 1

    # -- capacity ----------------------------------------------------------------------------
    def room_for(self, new_entries: int, sizes) -> bool:
        """Whether ``new_entries`` more keys and blocks of these data sizes fit now."""
        if len(self.where) + new_entries > self.nslots * MAX_LOAD:
            return False
        sizes = list(sizes)
        # fast path: a block never takes more than twice its size plus the smallest class
        if self.bump + 2 * sum(sizes) + MIN_CLASS * len(sizes) <= self.heap_start + self.heap_bytes:
            return True
        need = 0
        by_class: dict[int, int] = {}
        for n in sizes:
            c = size_class(n)
            if c:
                by_class[c] = by_class.get(c, 0) + 1
        for c, k in by_class.items():
            spare = len(self.free.get(c, ()))
            if k > spare:
                need += (k - spare) * c
        return self.bump + need <= self.heap_start + self.heap_bytes

    # -- entries -----------------------------------------------------------------------------
    def put(self, table: int, index: int, record_id: int, data) -> None:
        """Make (table, index) hold ``data`` (bytes, or None for a removal) from ``record_id``."""
        self.put_many((((table, index), data),), record_id)

    def put_many(self, items, record_id: int) -> None:
        """``put`` for many ((table, index), data) pairs of one record: the publish hot path."""
        q = self.q
        m = self.m
        where = self.where
        free = self.free
        shift = self.shift
        end = self.slots_end
        used = self.used
        for key, data in items:
            w = where.get(key)
            if w is None:
                if len(where) >= self.nslots - 1:
                    self.used = used
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
                old = old_c = 0
            else:
                old = q[w + 3]
                n_old = (old & 0xFFFFFFFF) - 1
                old_c = 0 if n_old <= 0 else (MIN_CLASS if n_old <= MIN_CLASS else 1 << (n_old - 1).bit_length())
            if data is None:
                loc = 0
                c = 0
            else:
                n = len(data)
                c = 0 if not n else (MIN_CLASS if n <= MIN_CLASS else 1 << (n - 1).bit_length())
                if c and c == old_c:
                    off = (old >> 32) << 4  # same class: overwrite in place
                    old_c = 0
                elif c:
                    lst = free.get(c)
                    if lst:
                        off = lst.pop()
                    else:
                        off = self.bump
                        if off + c > self.heap_start + self.heap_bytes:
                            self.used = used
                            raise MemoryError("overlay heap full")  # callers check room_for() first
                        self.bump = off + c
                    used += c
                else:
                    off = 0
                if n:
                    m[off:off + n] = data
                loc = ((off >> 4) << 32) | (n + 1)
            if old_c:
                used -= old_c
                free.setdefault(old_c, []).append((old >> 32) << 4)
            q[w + 2] = record_id
            q[w + 3] = loc
        self.used = used

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
        off = (loc >> 32) << 4
        return q[w + 2], self.m[off:off + stored - 1]

    def remove_if(self, table: int, index: int, record_id: int) -> bool:
        """Remove the entry if it still holds ``record_id``'s data (the record-id rule)."""
        return self.remove_record(((table, index),), record_id) == 1

    def remove_record(self, keys, record_id: int) -> int:
        """``remove_if`` for every key a record wrote: the enactment hot path. Returns how many
        entries went (a key rewritten by a newer record stays)."""
        q = self.q
        where = self.where
        free = self.free
        end = self.slots_end
        shift = self.shift
        removed = 0
        for key in keys:
            w = where.get(key)
            if w is None or q[w + 2] != record_id:
                continue
            removed += 1
            loc = q[w + 3]
            n = (loc & 0xFFFFFFFF) - 1
            if n > 0:
                c = MIN_CLASS if n <= MIN_CLASS else 1 << (n - 1).bit_length()
                self.used -= c
                lst = free.get(c)
                if lst is None:
                    free[c] = [(loc >> 32) << 4]
                else:
                    lst.append((loc >> 32) << 4)
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
    def drops(self) -> dict[int, int]:
        return super().drops()

    def set_drops(self, drops: dict[int, int]) -> None:
        q = self.q
        items = sorted(drops.items())
        if len(items) > MAX_DROPS:
            raise MemoryError(f"more than {MAX_DROPS} pending drops")  # the writer waits first
        for i, (t, r) in enumerate(items):
            q[DROP_BASE + 2 * i] = t
            q[DROP_BASE + 2 * i + 1] = r
        q[NDROPS] = len(items)

    # -- memory ------------------------------------------------------------------------------
    def reclaim(self) -> None:
        """Give memory back once the overlay is small (parity-db reclaims below 1/10 use)."""
        span = self.bump - self.heap_start
        if span < (1 << 20) or self.used * 10 > span:
            return
        if not self.where:
            self.free.clear()
            self.bump = self.heap_start
            self._release(self.heap_start, span)
            return
        # compact: slide live blocks down in address order, then release the tail
        live = []
        q = self.q
        for key, w in self.where.items():
            loc = q[w + 3]
            stored = loc & 0xFFFFFFFF
            if stored > 1:
                live.append(((loc >> 32) << 4, w, stored))
        live.sort()
        dest = self.heap_start
        m = self.m
        for off, w, stored in live:
            c = size_class(stored - 1)
            if off != dest:
                m.move(dest, off, c)
                q[w + 3] = ((dest >> 4) << 32) | stored
            dest += c
        self.free.clear()
        self.bump = dest
        self._release(dest, self.heap_start + span - dest)

    def _release(self, start: int, length: int) -> None:
        page = mmap.PAGESIZE
        a = (start + page - 1) // page * page
        b = (start + length) // page * page
        if b > a and hasattr(mmap, "MADV_REMOVE"):
            try:
                self.m.madvise(mmap.MADV_REMOVE, a, b - a)
            except OSError:
                pass

    def copy_from(self, other: "OverlayWriter") -> None:
        """Fill this (new, bigger) generation with every entry and counter of ``other``."""
        for (table, index), w in other.where.items():
            rid, data = other.get(table, index)
            self.put(table, index, rid, data)
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
