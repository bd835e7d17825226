"""The overlay in POSIX shared memory: every committed, not yet enacted version of each key.

One segment per *generation*, created only by the writer (mode 0600) and named
``/mpwal-<12 hex of the directory's real path>-<generation>`` (at most 31 characters, as macOS
allows). Readers map it read-only; the enactor maps the header to write ``enacting`` and
``enacted``. Layout 3, in little-endian u64 words::

    header, 512 words (4096 bytes)
      0  struct        even when stable, odd while the writer makes a structural change
                       (freeing versions, removing drops); SUPERSEDED (2**64-1) forever once
                       this generation is dead
      1  magic         MAGIC
      2  layout        LAYOUT_VERSION
      3  generation
      4  state         LIVE, SUPERSEDED (see next_gen) or CLOSED
      5  next_gen      generation that replaced this one
      6  writer_pid
      7  committed     the watermark: newest record id published; readers see ids <= it
      8  durable       newest record id known to be on disk
      9  enacted       newest record id whose data is in the table files (written by the enactor)
     10  enactor_pid   (written by the enactor)
     11  nslots        hash slots, a power of two
     12  heap_bytes
     13  entries       keys in the hash
     14  heap_used     bytes of live record blobs in the heap
     15  ndrops        pending table drops, pairs at word 64: (table, record id); several may
                       name one table
     16  enacting      newest record id the enactor may be writing into the table files now
                       (written by the enactor; enacted <= enacting <= committed)
    slots, nslots × 4 words, open addressing with linear probing, no tombstones (deletion
    shifts later entries back):
      index        the value index, or the index chunk number
      tag          table id + 1; 0 marks an empty slot
      head         word offset of the key's newest version node
      (reserved)
    version node, 4 words, in its record's blob, followed by its data:
      record_id    record that wrote this version
      loc          byte offset of the data's end << 32 | of its start;  0 = removed
      older        word offset of the next older version node, 0 if none (the table file is
                   below it); record ids fall strictly along a chain
      newer        word offset of the next newer version node, 0 if none: the writer's own
                   bookkeeping (freeing a key's oldest version cuts the chain there), which
                   readers never read
    heap, heap_bytes: a ring of record blobs. A record's blob is, for each key it changed (its
    values, then the whole 512-byte after-image of each index chunk it changed), that key's
    version node and right after it the data, padded to 8 bytes: a lookup touches one place
    of the heap. Versions are freed in record order once their record is
    enacted, so blobs leave from the ring's head, and the pages they used are given back to the
    system (MADV_REMOVE) as the head passes them. Segments stay below 4 GiB so an offset fits
    in 32 bits.

Publishing record r (the writer; never makes a reader wait or retry):

1. write each version into free ring space, where no pointer leads yet: its data, then its
   node, whose ``older`` is the key's current head (whose ``newer`` it becomes);
2. link it: for a key already in the hash (the writer probes for it, as a reader does), one
   8-byte store of ``head``; for a new key, an empty slot of its probe run gets ``index`` and
   ``head``, then ``tag`` last;
3. append r's drops (pair, then ``ndrops``);
4. store ``committed = r``: the release that makes all of r visible at once.

A reader at watermark W (one ``committed`` load per call, or the snapshot's pin) probes the
key's slot and walks its chain to the first version with record id <= W; none, or no slot: the
table file, unless a drop of the table at a record id <= W is newer than that version. A
reader meeting a node of r > W in step 2 just walks past it.

Structural changes (the writer, rare and short): ``struct`` is made odd, versions of records
<= ``enacted`` are unlinked (a key's chain is cut below its newest surviving version, or its
slot removed by backward shift when none survives), drops <= ``enacted`` removed, and
``struct`` made even again; the freed ring space is reused only after that. A reader loads
``struct`` (acquire) before its lookups and again after (acquire): an odd or changed value
means retry. A structural window held open for long (a stopped or dead writer) makes the
reader answer from the logs and tables instead (``_reader.py``). A reader may read freed, reused
bytes before it notices; it never trusts them: chains must fall strictly, offsets are bounded,
and the ``struct`` check rejects the answer.

Table files (``enacting``): the enactor stores ``enacting`` (release) before it writes a batch
and ``enacted`` (release) after. A reader that read a table file loads ``enacting`` (acquire)
after that read: above W, the file may hold data newer than W, and the read is retried (or, in
a snapshot whose pin the enactor no longer honours, refused).

Memory ordering: the writer's and enactor's stores above are releases, and the reader's loads
of ``struct``, ``committed``, ``head``, node words and ``enacting`` acquires, in that program
order; the stores that open and close a window (``struct`` odd, then even) and ``enacting``
before a batch are followed by a release fence (no later store passes them: not a window's
own stores, nor the reuse of the ring space a window freed), and the reader's rechecks of
``enacting`` and ``struct`` follow an acquire fence (the data it copied and the table file it
read are read before them: a seqlock reader's fence). Words are written as single aligned
8-byte stores through ``memoryview.cast('Q')`` (``struct.pack_into`` would zero its target
first). The Python backend relies on x86-64 (TSO), which keeps stores in order and loads in
order, and refuses other machines (``_platform.py``). The native backend makes each of these a
C11 atomic: its lookups and publish loop in C, and the header words the Python code stores and
loads through ``store_release``, ``store_fenced`` and ``load_acquire`` below.

The hash is Fibonacci hashing of ``index ^ (table << 47)``: the top ``log2(nslots)`` bits of the
64-bit product with 0x9E3779B97F4A7C15, so strided indices spread.
"""

from __future__ import annotations

import collections
import hashlib
import mmap
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from types import TracebackType
from typing import Any

import posix_ipc

from . import _backend, _fileio as fileio
from ._errors import StorageError

MAGIC = 0x4C41_5750_4D00_0001  # "\x01\0MPWAL" little-endian
LAYOUT_VERSION = 3  # 3: a version node's fourth word, newer
HEADER_WORDS = 512
HEADER_BYTES = HEADER_WORDS * 8
SLOT_WORDS = 4
NODE_WORDS = 4
NODE_BYTES = NODE_WORDS * 8
IMAGE_BYTES = NODE_BYTES + 512  # ring bytes of an index chunk's version
SUPERSEDED = (1 << 64) - 1
M64 = (1 << 64) - 1
K = 0x9E3779B97F4A7C15

STRUCT, MAGIC_W, LAYOUT, GENERATION, STATE, NEXT_GEN, WRITER_PID, COMMITTED, DURABLE, ENACTED, \
    ENACTOR_PID, NSLOTS, HEAP_BYTES, ENTRIES, HEAP_USED, NDROPS, ENACTING = range(17)
DROP_BASE = 64
MAX_DROPS = 128
LIVE, SUPERSEDED_STATE, CLOSED = 1, 2, 3
MAX_LOAD = 0.5  # keys per slot before the writer wants a bigger generation
MAX_SEGMENT = (1 << 32) - 1  # offsets in ``loc`` are 32 bits
RELEASE_BYTES = 1 << 20  # give freed heap pages back once this many have accumulated
FREE_KEYS_PER_WINDOW = 512  # versions unlinked per structural window


class _Miss:
    """``find``'s answer when the overlay holds nothing for a key at a watermark: read the
    table file."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()


class _Retry:
    """``find``'s one-try answer when a check failed: look again through the slow path."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "RETRY"


RETRY: Any = _Retry()


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
            if load_acquire(m, q, MAGIC_W) == MAGIC:
                q[NEXT_GEN] = next_gen
                store_release(m, q, STATE, SUPERSEDED_STATE)
                store_release(m, q, STRUCT, SUPERSEDED)
            q.release()
            m.close()
    finally:
        shm.close_fd()
        unlink_segment(name)


class Torn(Exception):
    """A lookup met bytes a structural change freed under it; the ``struct`` check rejects the
    answer anyway, this only stops the walk early."""


def _make_lookups(seg: _Segment, read_value: Callable[[int, int], bytes | None] | None = None,
                  limits: dict[int, int] | None = None,
                  slow: Callable[[int, int], Any] | None = None,
                  tables: tuple[dict, dict] | None = None,
                  ) -> tuple[Callable[..., list[Any]], Callable[[int, int], Any],
                             Callable[..., Any] | None]:
    """``seg``'s (find_many, value_now, kv_get): the native backend's (``mpwal._native.Lookups``,
    the C twin), or the Python reference's (``_python_lookups``, which says what they do; its
    kv_get is None: the key-value reader's own path, ``Column.get`` under ``read_with``, is the
    reference of the native one). ``tables``: the reader's (maps, strides) of its table files
    (``TableFiles.maps``, kept current in place), from which the native lookups read slots and
    chunks themselves where a file is mapped, as ``read_value`` and ``read_chunk`` would."""
    if _backend.native is not None:
        lk = _backend.native.Lookups(seg.m, seg.shift, seg.slots_end, Torn, MISS, RETRY,
                                     read_value, limits, slow, tables)
        return lk.find_many, lk.value_now, lk.kv_get
    return (*_python_lookups(seg, read_value, limits, slow), None)


def _python_lookups(seg: _Segment, read_value: Callable[[int, int], bytes | None] | None = None,
                  limits: dict[int, int] | None = None,
                  slow: Callable[[int, int], Any] | None = None,
                  ) -> tuple[Callable[..., list[Any]], Callable[[int, int], Any]]:
    """The overlay lookup, as two closures over the segment's layout (``find_many`` and
    ``value_now``): the readers' hot paths, so the layout sits in locals and the header words
    are written by number (0 struct, 7 committed, 15 ndrops, 16 enacting; HEADER_WORDS 512,
    SLOT_WORDS 4, K and M64 written out).

    Each runs the same probe: hash to the key's home slot, walk the probe run to its slot, walk
    its chain of versions (newest first, ``older_at`` past the head) to the newest at or below
    the watermark W, and let a
    pending drop of the table at an id <= W that is newer hide it. Nothing at or below W: the
    table file. The probe is written twice, once per closure, on purpose: a Python call costs
    a third of a lookup. (The native backend replaces both with one C function.) Both raise
    Torn, or IndexError, when they walk bytes a structural change freed: readers retry then.

    ``find_many(table, indices, w_mark, read)``: the data of each index at W (None: removed or
    dropped), the table file's through ``read(table, index)`` where the overlay has nothing, or
    MISS when ``read`` is None. Call between two ``struct`` loads and check them.

    ``value_now(table, index)``: a reader's whole ``value()`` as one call: the argument check
    (``limits``: value table -> number of slots), ``struct``, ``committed``, the probe, the
    table file (``read_value``), then ``enacting`` and ``struct`` again; when the argument needs
    a closer look or any check fails, the reader's slow path ``slow(table, index)``."""
    q = seg.q
    m = seg.m
    shift = seg.shift
    end = seg.slots_end
    dropped_at = seg.dropped_at
    limit_of = (limits if limits is not None else {}).get

    def older_at(n: int, rid: int, w_mark: int) -> tuple[int, int]:
        """From node word ``n`` (record ``rid`` > W), walk down to the newest version at or
        below W: (its node word, its record id), or (0, 0) if there is none."""
        while True:
            n = q[n + 2]
            if not n:
                return 0, 0
            below = rid
            rid = q[n]
            if rid <= w_mark:
                return n, rid
            if rid >= below:
                raise Torn()  # record ids fall strictly along a chain

    def find_many(table: int, indices: Iterable[int], w_mark: int,
                  read: Callable[[int, int], Any] | None) -> list[Any]:
        out: list[Any] = []
        append = out.append
        tag = table + 1
        tbits = table << 47
        drops = q[15]
        dropped = drops and dropped_at(table, w_mark)
        for index in indices:
            w = ((((index ^ tbits) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> shift) * 4 + 512
            while True:
                t = q[w + 1]
                if t == tag and q[w] == index:
                    n = q[w + 2]
                    rid = q[n]
                    if rid > w_mark:
                        n, rid = older_at(n, rid, w_mark)
                    if n:
                        if dropped > rid:
                            append(None)
                        else:
                            loc = q[n + 1]
                            append(m[loc & 0xFFFFFFFF:loc >> 32] if loc else None)
                        break
                    t = 0  # only newer versions: as if no slot
                if not t:
                    if dropped:
                        append(None)
                    else:
                        append(MISS if read is None else read(table, index))
                    break
                w += 4
                if w == end:
                    w = 512
        return out

    def value_now(table: int, index: int) -> Any:
        limit = limit_of(table)
        if limit is None or type(index) is not int or not 0 <= index < limit or type(table) is not int:
            return slow(table, index) if slow is not None else RETRY
        s = q[0]
        if s & 1:
            return slow(table, index) if slow is not None else RETRY
        w_mark = q[7]
        w = ((((index ^ (table << 47)) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> shift) * 4 + 512
        tag = table + 1
        try:
            while True:
                t = q[w + 1]
                if t == tag and q[w] == index:
                    n = q[w + 2]
                    rid = q[n]
                    if rid > w_mark:
                        n, rid = older_at(n, rid, w_mark)
                    if n:
                        if q[15] and dropped_at(table, w_mark) > rid:
                            data = None
                        else:
                            loc = q[n + 1]
                            data = m[loc & 0xFFFFFFFF:loc >> 32] if loc else None
                        break
                    t = 0  # only newer versions: as if no slot
                if not t:
                    if q[15] and dropped_at(table, w_mark):
                        data = None
                    else:
                        assert read_value is not None  # bound by the reader (bind_reader)
                        data = read_value(table, index)
                        if q[16] > w_mark:  # the enactor may be writing past W into that file
                            s = -1
                    break
                w += 4
                if w == end:
                    w = 512
        except (Torn, IndexError):  # bytes freed under a structural change: the slow path
            s = -1
        if q[0] == s:
            return data
        return slow(table, index) if slow is not None else RETRY

    return find_many, value_now


def store_release(m: mmap.mmap, q: memoryview, word: int, value: int) -> None:
    """``q[word] = value`` as a release store: every load and store before it is visible
    before it (Memory ordering, above). ``m`` is the mapping ``q`` is a view of."""
    native = _backend.native
    if native is None:
        q[word] = value  # x86-64 (the Python backend's only machine) orders stores
    else:
        native.store_release(m, word, value)


def store_fenced(m: mmap.mmap, q: memoryview, word: int, value: int) -> None:
    """``q[word] = value`` as a release store, then a release fence: no store before it and no
    later store is visible on the other side of it."""
    native = _backend.native
    if native is None:
        q[word] = value
    else:
        native.store_fenced(m, word, value)


def load_acquire(m: mmap.mmap, q: memoryview, word: int) -> int:
    """``q[word]`` as an acquire load after an acquire fence: every load before it (data
    copied, a table file read) is made before it, and no later load before it."""
    native = _backend.native
    return q[word] if native is None else native.load_acquire(m, word)


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
        self.find_many, self.value_now, self.kv_get = _make_lookups(self)

    def store_release(self, word: int, value: int) -> None:
        """A header word stored with release ordering (the function ``store_release``)."""
        store_release(self.m, self.q, word, value)

    def store_fenced(self, word: int, value: int) -> None:
        """A header word stored with release ordering, then a release fence (the function
        ``store_fenced``)."""
        store_fenced(self.m, self.q, word, value)

    def load_acquire(self, word: int) -> int:
        """A header word loaded with acquire ordering (the function ``load_acquire``)."""
        return load_acquire(self.m, self.q, word)

    def bind_reader(self, read_value: Callable[[int, int], bytes | None], limits: dict[int, int],
                    slow: Callable[[int, int], Any], tables: tuple[dict, dict] | None = None) -> None:
        """Make ``value_now`` a reader's whole ``value()``: its table-file lookup, its argument
        limits (kept up to date in place), its slow path and its table files' mappings (see
        ``_make_lookups``)."""
        self.find_many, self.value_now, self.kv_get = _make_lookups(self, read_value, limits, slow,
                                                                    tables)

    def find(self, table: int, index: int, w_mark: int) -> Any:
        """The data of one key at watermark ``w_mark`` (None: removed or dropped), or MISS:
        ``find_many`` for one index (see ``_make_lookups``)."""
        return self.find_many(table, (index,), w_mark, None)[0]

    def home(self, table: int, index: int) -> int:
        """Word offset of the slot where (table, index) would sit with no collision."""
        return ((((index ^ (table << 47)) * K) & M64) >> self.shift) * SLOT_WORDS + HEADER_WORDS

    def dropped_at(self, table: int, w_mark: int) -> int:
        """The newest record id <= ``w_mark`` that dropped ``table`` and is not enacted, or 0."""
        q = self.q
        best = 0
        for i in range(min(q[NDROPS], MAX_DROPS)):
            w = DROP_BASE + 2 * i
            if q[w] == table:
                r = q[w + 1]
                if best < r <= w_mark:
                    best = r
        return best

    def drops_at(self, w_mark: int) -> dict[int, int]:
        """{table: newest dropping record id <= w_mark} of the pending drops."""
        q = self.q
        out: dict[int, int] = {}
        for i in range(min(q[NDROPS], MAX_DROPS)):
            t, r = q[DROP_BASE + 2 * i], q[DROP_BASE + 2 * i + 1]
            if r <= w_mark and r > out.get(t, 0):
                out[t] = r
        return out

    def entries(self, w_mark: int) -> Iterator[tuple[int, int, int, bytes | None]]:
        """Every key's (table, index, record_id, data) at ``w_mark``; keys with only newer
        versions are left out. Check ``struct`` around it, as around ``find``."""
        q = self.q
        for w in range(HEADER_WORDS, self.slots_end, SLOT_WORDS):
            t = q[w + 1]
            if not t:
                continue
            n = q[w + 2]
            steps = 0
            while n and steps < 1 << 20:
                if q[n] <= w_mark:
                    loc = q[n + 1]
                    yield t - 1, q[w], q[n], (self.m[loc & 0xFFFFFFFF:loc >> 32] if loc else None)
                    break
                n = q[n + 2]
                steps += 1

    def versions(self, table: int, index: int) -> list[tuple[int, bytes | None]]:
        """Every version of a key, newest first (for the writer and for tests)."""
        out: list[tuple[int, bytes | None]] = []
        q = self.q
        w = self.home(table, index)
        while q[w + 1]:
            if q[w + 1] == table + 1 and q[w] == index:
                n = q[w + 2]
                while n:
                    loc = q[n + 1]
                    out.append((q[n], self.m[loc & 0xFFFFFFFF:loc >> 32] if loc else None))
                    n = q[n + 2]
                break
            w += SLOT_WORDS
            if w == self.slots_end:
                w = HEADER_WORDS
        return out

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
            if shm.size < HEADER_BYTES or shm.size % 8:  # being created, or not ours
                raise FileNotFoundError(f"{name} is not an mpwal overlay ({shm.size} bytes)")
            m = mmap.mmap(shm.fd, shm.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            shm.close_fd()
        q = memoryview(m).cast("Q")
        ok = len(q) >= HEADER_WORDS and load_acquire(m, q, MAGIC_W) == MAGIC and q[LAYOUT] == LAYOUT_VERSION
        q.release()
        if not ok:
            m.close()
            raise FileNotFoundError(f"{name} is not an mpwal overlay of layout {LAYOUT_VERSION}")
        super().__init__(name, m)


class _Window:
    """``OverlayWriter.window()``'s context manager: a class, not a generator, because it is
    entered on the commit path (a third of the cost of ``contextlib.contextmanager``)."""

    __slots__ = ("ov",)

    def __init__(self, ov: OverlayWriter) -> None:
        self.ov = ov

    def __enter__(self) -> OverlayWriter:
        ov = self.ov
        ov.store_fenced(STRUCT, ov.q[STRUCT] + 1)  # odd before any store of the window
        return ov

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        ov = self.ov
        if exc_type is None:
            q = ov.q
            q[ENTRIES] = ov.nkeys
            q[HEAP_USED] = ov.used
            ov.store_fenced(STRUCT, q[STRUCT] + 1)  # even after every store of the window,
            # and before any later one (the reuse of what it freed)
        else:
            ov.retire(CLOSED)


class OverlayWriter(_Segment):
    """The writer's read-write mapping of a generation it created, and its private bookkeeping.

    The writer keeps, in its own memory, the pending drops, the ring's blobs (with each blob's
    keys) and the count of keys; it finds a key's slot by probing the hash as a reader does,
    and a version's newer one in the version's node, so no private map grows with the overlay.
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
        q[LAYOUT] = LAYOUT_VERSION
        q[GENERATION] = generation
        q[WRITER_PID] = os.getpid()
        q[STATE] = LIVE
        store_release(m, q, MAGIC_W, MAGIC)  # last: a reader that sees it sees the header
        q.release()
        super().__init__(name, m)
        self.generation = generation
        self.nkeys = 0  # keys in the hash (ENTRIES)
        self.pending_drops: list[tuple[int, int]] = []  # (table, record id), as in the header
        self._window = _Window(self)
        self.heap_end = self.heap_start + heap_bytes
        # the ring: live blobs are [head, tail), or when wrapped [head, wrap) + [heap_start, tail)
        # (record_id, start, end, keys): a tuple of tuples of ints, which the garbage collector
        # stops tracking, so that its full collections do not walk every key in the overlay
        self.blobs: collections.deque = collections.deque()
        self.head = self.tail = self.heap_start
        self.wrap = 0
        self.used = 0  # live blob bytes
        self.released = self.heap_start  # pages in [released, head) are freed, not yet given back
        self.hwm = self.heap_start  # the ring never went past this since it was last emptied

    def window(self) -> _Window:
        """One structural window, all or nothing: an exception inside it (a failure, or a
        KeyboardInterrupt at any point) leaves ``struct`` odd and retires the generation, so no
        reader ever trusts a change half done; readers then read the logs and tables."""
        return self._window

    # -- the ring ----------------------------------------------------------------------------
    def room_for(self, new_keys: int, nbytes: int) -> bool:
        """Whether ``new_keys`` more keys and a record blob of ``nbytes`` (see ``blob_size``)
        fit now."""
        if self.nkeys + new_keys > self.nslots * MAX_LOAD:
            return False
        if not self.blobs:
            return nbytes <= self.heap_end - self.heap_start
        if self.wrap:
            return self.tail + nbytes < self.head
        return self.tail + nbytes <= self.heap_end or self.heap_start + nbytes < self.head

    @staticmethod
    def blob_size(datas: Iterable[bytes | None]) -> int:
        """Ring bytes of a record whose versions hold ``datas`` (None: removed): each version
        is its node and its data, padded to 8 bytes."""
        native = _backend.native
        if native is not None:
            return native.blob_size(datas)
        return sum([(NODE_BYTES + 7 + len(d)) & ~7 if d else NODE_BYTES for d in datas])

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

    def _free_blobs_through(self, record_id: int) -> None:
        """Free the blobs of records up to ``record_id`` (their versions are unlinked)."""
        blobs = self.blobs
        if not blobs or blobs[0][0] > record_id:
            return
        while blobs and blobs[0][0] <= record_id:
            _, s, e, _keys = blobs.popleft()
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

    # -- publishing --------------------------------------------------------------------------
    def publish(self, record_id: int, items: Collection[tuple[tuple[int, int], bytes | None]],
                more: Collection[tuple[tuple[int, int], bytes | None]] = (),
                drops: Iterable[int] = (), size: int | None = None) -> None:
        """Publish record ``record_id``: a version of each (key, data) of ``items`` then
        ``more`` (data None: removed) and its table drops; then raise the watermark. ``size``:
        its ``blob_size``, if the caller has it already. The publish hot path."""
        self._link(record_id, items, more, drops, size)
        self.store_release(COMMITTED, record_id)  # every store of _link is visible before it

    def _link(self, record_id: int, items: Collection[tuple[tuple[int, int], bytes | None]],
              more: Collection[tuple[tuple[int, int], bytes | None]],
              drops: Iterable[int], size: int | None = None) -> None:
        """Steps 1-3 of publishing: everything but raising the watermark. Each version is its
        node followed by its data, so a lookup touches one place of the heap."""
        native = _backend.native
        if native is None:
            items, more = [*items, *more], ()
        if self.nkeys + len(items) + len(more) > self.nslots - 1:
            items, more = [*items, *more], ()
            if self.nkeys + sum(1 for key, _ in items if self.slot(*key) is None) \
                    > self.nslots - 1:
                raise MemoryError("overlay slots full")  # callers check room_for() first
        if size is None:
            size = self.blob_size([d for _, d in [*items, *more]])
        off = self._alloc(size) if size else self.tail
        if native is not None:  # the C twin of _link_versions
            keys, added = native.link(self.m, record_id, items, more, off, self.shift,
                                      self.slots_end)
        else:
            keys = tuple([key for key, _ in items])
            added = self._link_versions(record_id, items, off)
        self.nkeys += added
        if size:
            self.blobs.append((record_id, off, off + size, keys))
            self.used += size
        self._link_drops(record_id, drops)

    def _link_versions(self, record_id: int, keyed: Iterable[tuple[tuple[int, int], bytes | None]],
                       off: int) -> int:
        """Steps 1 and 2 for each (key, data), its version written from ``off`` on. Returns
        how many keys are new to the hash."""
        q = self.q
        m = self.m
        pos = off
        shift = self.shift
        end = self.slots_end
        added = 0
        for (table, index), d in keyed:
            nw = pos >> 3
            q[nw] = record_id
            q[nw + 3] = 0  # no newer version yet
            if d is None:
                q[nw + 1] = 0
                pos += NODE_BYTES
            else:
                start = pos + NODE_BYTES
                pos = start + len(d)
                m[start:pos] = d  # the data before its node links
                q[nw + 1] = (pos << 32) | start
                pos = (pos + 7) & ~7
            # the key's slot, or the empty slot that ends its probe run
            w = ((((index ^ (table << 47)) * K) & M64) >> shift) * SLOT_WORDS + HEADER_WORDS
            tag = table + 1
            while True:
                t = q[w + 1]
                if not t or (t == tag and q[w] == index):
                    break
                w += SLOT_WORDS
                if w == end:
                    w = HEADER_WORDS
            if t:  # link: one store of the head, after the node's stores
                head = q[w + 2]
                q[nw + 2] = head
                q[head + 3] = nw
                q[w + 2] = nw
            else:  # a new key: the empty slot, its tag stored last
                q[nw + 2] = 0
                q[w] = index
                q[w + 2] = nw
                q[w + 1] = tag
                added += 1
        return added

    def slot(self, table: int, index: int) -> int | None:
        """Word offset of the slot of (table, index) in the hash, or None. Writer-side: the
        writer's own stores need no ordering."""
        q = self.q
        end = self.slots_end
        w = self.home(table, index)
        tag = table + 1
        while True:
            t = q[w + 1]
            if not t:
                return None
            if t == tag and q[w] == index:
                return w
            w += SLOT_WORDS
            if w == end:
                w = HEADER_WORDS

    def _link_drops(self, record_id: int, drops: Iterable[int]) -> None:
        """Step 3 of publishing: a record's drops (pair, then ``ndrops``)."""
        q = self.q
        for t in drops:
            if len(self.pending_drops) >= MAX_DROPS:
                raise MemoryError(f"more than {MAX_DROPS} pending drops")  # the writer waits
            i = DROP_BASE + 2 * len(self.pending_drops)
            q[i] = t
            q[i + 1] = record_id
            self.pending_drops.append((t, record_id))
            q[NDROPS] = len(self.pending_drops)
        q[ENTRIES] = self.nkeys
        q[HEAP_USED] = self.used

    def get(self, table: int, index: int) -> Any:
        """The newest version's data of (table, index) (None: removed or dropped), or MISS.
        Writer-side."""
        if self.slot(table, index) is None:
            return None if self.dropped_now(table) else MISS
        return self.find(table, index, M64)

    def dropped_now(self, table: int) -> int:
        """The newest pending drop of ``table`` (writer-side), or 0."""
        best = 0
        for t, r in self.pending_drops:
            if t == table and r > best:
                best = r
        return best

    # -- structural changes ------------------------------------------------------------------
    def free_enacted(self, enacted: int, budget: int | None = None) -> bool:
        """Unlink the versions of the records up to ``enacted`` (oldest first), drop their
        pending drops and free their blobs, in structural windows of at most
        FREE_KEYS_PER_WINDOW keys (short for readers). A freed version is its key's oldest:
        the version just newer than it (its node's ``newer``) gets ``older = 0``, or, if it was
        the newest, the key leaves the hash. ``budget``: stop once about that many versions are
        freed (whole records; a commit frees a little at a time, so that no commit waits for
        a whole batch of enactment). Returns whether everything up to ``enacted`` is free."""
        blobs = self.blobs
        native = _backend.native
        freed = 0
        while blobs and blobs[0][0] <= enacted:
            if budget is not None and freed >= budget:
                return False  # later records' drops stay until their versions are gone
            limit = FREE_KEYS_PER_WINDOW if budget is None else min(FREE_KEYS_PER_WINDOW,
                                                                    budget - freed)
            with self._window:
                done = 0
                last = 0
                for rid, start, _end, keys in blobs:
                    if rid > enacted or done >= limit:
                        break
                    if native is not None:  # the C twin of _unlink
                        removed = native.unlink(self.m, start, keys, self.shift, self.slots_end)
                    else:
                        removed = self._unlink(start, keys)
                    self.nkeys -= removed
                    done += len(keys) + 1
                    last = rid
                self._free_blobs_through(last)
                if self.pending_drops and any(r <= last for _, r in self.pending_drops):
                    self._set_drops([(t, r) for t, r in self.pending_drops if r > last])
            freed += done
        if self.pending_drops and any(r <= enacted for _, r in self.pending_drops):
            with self._window:  # drops of records with no versions
                self._set_drops([(t, r) for t, r in self.pending_drops if r > enacted])
        return True

    def _unlink(self, start: int, keys: tuple[tuple[int, int], ...]) -> int:
        """Unlink the versions of one enacted record's blob (at ``start``, one per key of
        ``keys``) inside a structural window: each is its key's oldest. Returns how many keys
        left the hash."""
        q = self.q
        nw = start >> 3
        removed = 0
        for key in keys:
            nn = q[nw + 3]
            if nn:
                q[nn + 2] = 0  # the table file is below the newer version now
            else:
                w = self.slot(*key)
                if w is None:
                    raise KeyError(key)
                self._remove_slot(w)
                removed += 1
            loc = q[nw + 1]  # the next node follows the data
            nw = ((loc >> 32) + 7) >> 3 if loc else nw + NODE_WORDS
        return removed

    def _remove_slot(self, w: int) -> None:
        """Remove a slot and backward-shift its probe run (inside a structural window): pull
        later entries into the hole when their home does not lie cyclically in (hole, j]; no
        tombstones, so lookups stay short."""
        q = self.q
        end = self.slots_end
        shift = self.shift
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
            q[hole + 1] = t
            hole = j
        q[hole + 1] = 0  # an empty slot is one whose tag is 0

    def _set_drops(self, drops: list[tuple[int, int]]) -> None:
        q = self.q
        for i, (t, r) in enumerate(drops):
            q[DROP_BASE + 2 * i] = t
            q[DROP_BASE + 2 * i + 1] = r
        q[NDROPS] = len(drops)
        self.pending_drops = list(drops)

    # -- growth ------------------------------------------------------------------------------
    def copy_from(self, other: OverlayWriter) -> None:
        """Fill this (new, bigger) generation, before any reader knows it, with every version,
        drop and counter of ``other``: each live blob of ``other`` (every version in it is
        live: versions are freed a whole record at a time) is published again here, its keys
        in the same order, and the records in record order, so chains keep their order."""
        drops_by: dict[int, list[int]] = {}
        for t, r in other.pending_drops:
            drops_by.setdefault(r, []).append(t)
        blobless = sorted(set(drops_by) - {rid for rid, _, _, _ in other.blobs})
        om, oq = other.m, other.q
        for rid, start, _end, keys in other.blobs:
            while blobless and blobless[0] < rid:  # a record of drops only, in its turn
                r = blobless.pop(0)
                self.publish(r, (), drops=drops_by[r])
            items: list[tuple[tuple[int, int], bytes | None]] = []
            nw = start >> 3
            for key in keys:  # the blob's nodes, in order: each followed by its data
                loc = oq[nw + 1]
                if loc:
                    items.append((key, om[loc & 0xFFFFFFFF:loc >> 32]))
                    nw = ((loc >> 32) + 7) >> 3
                else:
                    items.append((key, None))
                    nw += NODE_WORDS
            self.publish(rid, items, drops=drops_by.get(rid, ()))
        for r in blobless:
            self.publish(r, (), drops=drops_by[r])
        for word in (COMMITTED, DURABLE, ENACTED, ENACTOR_PID, ENACTING):
            self.q[word] = other.q[word]

    def retire(self, state: int, next_gen: int = 0) -> None:
        """Mark this generation dead for readers and remove its name; the mapping stays valid."""
        self.q[NEXT_GEN] = next_gen
        self.store_release(STATE, state)
        self.store_release(STRUCT, SUPERSEDED)
        unlink_segment(self.name)
