"""Unit tests of mpwal._overlay (layout 2): the versioned shared-memory overlay, its writer and its
readers, and a hypothesis state-machine test of it against a model of versions, drops and the
table files.

Every segment a test creates is retired (or unlinked) by the ``ov`` fixture's teardown or by the
state machine's ``teardown``, before conftest's ``db`` fixture checks that none is left in
/dev/shm.
"""

from __future__ import annotations

import collections
import mmap
import os
import random
import stat
import struct

import posix_ipc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mpwal import _backend, _overlay as overlay
from mpwal._errors import StorageError
from mpwal._overlay import (
    CLOSED,
    COMMITTED,
    DROP_BASE,
    DURABLE,
    ENACTED,
    ENACTING,
    ENACTOR_PID,
    ENTRIES,
    GENERATION,
    HEADER_BYTES,
    HEADER_WORDS,
    HEAP_BYTES,
    HEAP_USED,
    LAYOUT,
    LAYOUT_VERSION,
    LIVE,
    M64,
    MAGIC,
    MAGIC_W,
    MAX_LOAD,
    MISS,
    NDROPS,
    NEXT_GEN,
    NODE_BYTES,
    NSLOTS,
    SLOT_WORDS,
    STATE,
    STRUCT,
    SUPERSEDED,
    SUPERSEDED_STATE,
    WRITER_PID,
    OverlayReader,
    OverlayWriter,
    Torn,
    segment_name,
    segment_prefix,
    stale_segments,
    supersede_segment,
    unlink_segment,
)

blob_size = OverlayWriter.blob_size


@pytest.fixture
def ov(db):
    """Factory of OverlayWriters for the test's directory; retires every one at teardown."""
    os.makedirs(db)
    real = os.path.realpath(db)
    made = []

    def make(generation=1, nslots=64, heap_bytes=1 << 16):
        w = OverlayWriter(real, generation, nslots, heap_bytes)
        made.append(w)
        return w

    make.realpath = real
    yield make
    for w in made:
        w.retire(CLOSED)
    for name in stale_segments(real):
        unlink_segment(name)


def pub(w, rid, *kv, drops=(), link_only=False):
    """Publish record ``rid`` writing ((table, index), data) pairs (data None: removed)."""
    if link_only:
        w._link(rid, kv, (), drops)
    else:
        w.publish(rid, kv, drops=drops)


def resolve(got, table_file, key):
    """A lookup's answer with MISS read from a dict standing for the table files."""
    return table_file.get(key) if got is MISS else got


def slot_of(seg, table, index):
    """Word offset of (table, index)'s slot, found by probing from its home."""
    q = seg.q
    w = seg.home(table, index)
    while q[w + 1]:
        if q[w + 1] == table + 1 and q[w] == index:
            return w
        w += SLOT_WORDS
        if w == seg.slots_end:
            w = HEADER_WORDS
    return None


def occupied(seg):
    """{(table, index): slot word offset} of every occupied slot."""
    q = seg.q
    return {(q[w + 1] - 1, q[w]): w for w in range(HEADER_WORDS, seg.slots_end, SLOT_WORDS) if q[w + 1]}


def check_probe_invariant(seg):
    """Every occupied slot is reachable from its home without crossing an empty slot, and at
    least one slot is empty (so a probe for an absent key ends)."""
    slots = occupied(seg)
    assert len(slots) < seg.nslots
    for (t, i), w in slots.items():
        assert slot_of(seg, t, i) == w


def check_writer(w):
    """The writer's private bookkeeping agrees with the segment (outside a window)."""
    q = w.q
    assert q[STRUCT] % 2 == 0 and q[STRUCT] != SUPERSEDED
    assert q[ENTRIES] == w.nkeys
    slots = occupied(w)
    assert len(slots) == w.nkeys
    check_probe_invariant(w)
    assert w.used == sum(e - s for _, s, e, _ in w.blobs) == q[HEAP_USED]
    assert q[NDROPS] == len(w.pending_drops)
    assert [(q[DROP_BASE + 2 * i], q[DROP_BASE + 2 * i + 1]) for i in range(q[NDROPS])] == w.pending_drops
    rids = [b[0] for b in w.blobs]
    assert rids == sorted(set(rids))
    spans = sorted((s, e) for _, s, e, _ in w.blobs)
    for s, e in spans:
        assert w.heap_start <= s < e <= w.heap_end
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 <= s1
    # each blob is its record's versions, one per key, in order: a node, then its data padded
    # to 8 bytes; each node's ``newer`` inverts its chain's ``older`` links (so freeing a key's
    # oldest version finds the version above it)
    nodes = {}  # node word -> key
    for rid, s, e, keys in w.blobs:
        assert len(keys) > 0
        node = s  # bytes
        for key in keys:
            assert q[node >> 3] == rid
            nodes[node >> 3] = key
            loc = q[(node >> 3) + 1]
            if loc:
                assert loc & 0xFFFFFFFF == node + NODE_BYTES  # the data right after its node
                assert loc >> 32 >= loc & 0xFFFFFFFF
            node = ((loc >> 32) + 7) & ~7 if loc else node + NODE_BYTES
        assert node == e
    linked = 0
    for key, slot in slots.items():
        chain = [q[slot + 2]]
        while q[chain[-1] + 2]:
            chain.append(q[chain[-1] + 2])
        assert all(nodes[n] == key for n in chain)
        assert q[chain[0] + 3] == 0, "the newest version has a newer one"
        for above, below in zip(chain, chain[1:]):
            assert q[below + 3] == above, "a version node's newer word is not its newer version"
        linked += len(chain)
    assert linked == len(nodes)  # no live node is unlinked


def colliding_keys(seg, homes, count, table=1, start=0):
    """``count`` indices of ``table`` whose home slot is one of ``homes`` (slot numbers)."""
    targets = {HEADER_WORDS + h * SLOT_WORDS for h in homes}
    out = []
    i = start
    while len(out) < count:
        if seg.home(table, i) in targets:
            out.append(i)
        i += 1
    return out


class WatchedStores:
    """Stands in for a writer's word view: calls ``after(i)`` after each store to word ``i``."""

    def __init__(self, q, after):
        self.q = q
        self.after = after
        self.stores = []

    def __getitem__(self, i):
        return self.q[i]

    def __setitem__(self, i, v):
        self.q[i] = v
        self.stores.append(i)
        self.after(i)

    def __len__(self):
        return len(self.q)


class StaleLoads:
    """Stands in for a reader's word view: runs ``hook()`` once, right after the load of word
    ``at`` (a slot's ``head``), as if the reader were descheduled there; counts loads and fails
    past ``limit`` (a walk that would never end)."""

    def __init__(self, q, at, hook, limit=100_000):
        self.q = q
        self.at = at
        self.hook = hook
        self.loads = 0
        self.limit = limit

    def __getitem__(self, i):
        self.loads += 1
        assert self.loads < self.limit, "the lookup does not end"
        v = self.q[i]
        if i == self.at and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return v

    def __len__(self):
        return len(self.q)


# -- naming, creation, permissions ------------------------------------------------------------

def test_segment_name_short_and_derived_from_path():
    """Names are /mpwal-<12 hex>-<gen hex>, at most 31 characters, distinct per path."""
    name = segment_name("/some/dir", 0xFFFFFFFF)
    assert name.startswith(segment_prefix("/some/dir")) and name.endswith("-ffffffff")
    assert len(segment_prefix("/some/dir")) == len("/mpwal-") + 12 + 1
    assert len(segment_name("/a/very/long/path" * 20, (1 << 32) - 1)) <= 31
    assert segment_prefix("/some/dir") != segment_prefix("/some/dir2")
    assert segment_name("/some/dir", 10) == segment_prefix("/some/dir") + "a"


def test_header_after_creation(ov):
    """A new segment's header: struct 0, magic, layout 2, generation, pid, state, sizes, and
    every counter 0."""
    w = ov(generation=7, nslots=32, heap_bytes=5000)
    r = OverlayReader(w.name)
    q = r.q
    assert q[STRUCT] == 0 and q[MAGIC_W] == MAGIC and q[LAYOUT] == LAYOUT_VERSION == 3
    assert q[GENERATION] == 7 and q[STATE] == LIVE and q[WRITER_PID] == os.getpid()
    assert q[NSLOTS] == 32 and q[HEAP_BYTES] == 8192  # rounded up to whole pages
    for word in (COMMITTED, DURABLE, ENACTED, ENACTOR_PID, ENTRIES, HEAP_USED, NDROPS, ENACTING, NEXT_GEN):
        assert q[word] == 0
    assert r.heap_start == (HEADER_WORDS + 32 * SLOT_WORDS) * 8 == w.heap_start
    assert len(r.m) == r.heap_start + 8192 == w.heap_end
    assert w.name in stale_segments(ov.realpath)
    assert w.room_for(16, 8192) and not w.room_for(17, 0) and not w.room_for(0, 8193)
    r.release()


def test_segment_mode_is_0600(ov):
    """The segment is created with mode 0600."""
    w = ov()
    assert stat.S_IMODE(os.stat("/dev/shm" + w.name).st_mode) == 0o600


def test_segment_over_4gib_refused(ov):
    """A segment whose offsets would not fit in 32 bits is refused, and nothing is created."""
    with pytest.raises(StorageError):
        ov(nslots=16, heap_bytes=1 << 32)
    assert stale_segments(ov.realpath) == []


def test_reader_mapping_is_read_only(ov):
    """A reader's mapping and its word view refuse writes with TypeError."""
    w = ov()
    r = OverlayReader(w.name)
    with pytest.raises(TypeError):
        r.m[0:1] = b"x"
    with pytest.raises(TypeError):
        r.m[HEADER_WORDS * 8] = 1
    with pytest.raises(TypeError):
        r.q[STRUCT] = 2
    assert r.q.readonly
    assert not hasattr(r, "publish")


def test_reader_of_missing_segment():
    """OverlayReader of a name that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        OverlayReader("/mpwal-000000000000-dead")


def _foreign(ov, size, words=()):
    name = segment_name(ov.realpath, 99)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    if words:
        m = mmap.mmap(shm.fd, size)
        q = memoryview(m).cast("Q")
        for i, v in words:
            q[i] = v
        q.release()
        m.close()
    shm.close_fd()
    return name


@pytest.mark.parametrize("size, words", [
    (8192, ()),  # no magic
    (8192, ((MAGIC_W, MAGIC), (LAYOUT, 1))),  # a layout-1 segment: an old version's
    (8192, ((MAGIC_W, MAGIC), (LAYOUT, 2))),  # layout 2: three-word version nodes
    (8192, ((MAGIC_W, MAGIC), (LAYOUT, 4))),
    (HEADER_BYTES - 8, ((MAGIC_W, MAGIC), (LAYOUT, LAYOUT_VERSION))),  # shorter than a header
])
def test_reader_refuses_foreign_segment(ov, size, words):
    """A segment without the mpwal magic and layout 3, or too short, is refused with
    FileNotFoundError."""
    name = _foreign(ov, size, words)
    try:
        with pytest.raises(FileNotFoundError):
            OverlayReader(name)
    finally:
        unlink_segment(name)


@pytest.mark.parametrize("size", [0, 100])
def test_reader_refuses_empty_or_odd_sized_segment(ov, size):
    name = _foreign(ov, size)
    try:
        with pytest.raises(FileNotFoundError):
            OverlayReader(name)
    finally:
        unlink_segment(name)


def test_new_writer_replaces_leftover_of_same_generation(ov):
    """Creating a generation whose name is left over replaces it with an empty segment."""
    old = ov(generation=3)
    pub(old, 1, ((1, 1), b"old"))
    new = ov(generation=3)
    r = OverlayReader(new.name)
    assert r.find(1, 1, M64) is MISS and r.q[ENTRIES] == 0 and r.q[COMMITTED] == 0
    assert old.get(1, 1) == b"old"  # the old mapping stays valid
    r.release()


# -- publish / find / get ---------------------------------------------------------------------

def test_publish_find_get(ov):
    """Writer get and reader find return each key's data; MISS for keys the overlay lacks."""
    w = ov()
    r = OverlayReader(w.name)
    pub(w, 5, ((1, 10), b"ten"), ((2, 10), b"other table"), ((1, 11), bytes(512)))
    assert r.q[COMMITTED] == 5 and r.q[ENTRIES] == 3
    for look in (w.get, lambda t, i: r.find(t, i, r.q[COMMITTED])):
        assert look(1, 10) == b"ten"
        assert look(2, 10) == b"other table"
        assert look(1, 11) == bytes(512)
        assert look(1, 12) is MISS
        assert look(3, 10) is MISS
    assert r.find(1, 10, 4) is MISS  # below the record: the table file
    assert type(r.find(1, 10, 5)) is bytes


def test_removal_and_empty_value(ov):
    """None is a removal (data None); b'' is a stored empty value; both cost a node."""
    w = ov()
    r = OverlayReader(w.name)
    pub(w, 1, ((1, 1), None), ((1, 2), b""))
    assert w.get(1, 1) is None and r.find(1, 1, 1) is None
    assert w.get(1, 2) == r.find(1, 2, 1) == b""
    assert w.used == blob_size([None, b""]) == 2 * NODE_BYTES
    assert w.versions(1, 1) == [(1, None)] and w.versions(1, 2) == [(1, b"")]


def test_blob_size():
    """A record's blob: per version its node, then its data padded to 8 bytes."""
    assert blob_size([]) == 0
    assert blob_size([None]) == blob_size([b""]) == NODE_BYTES == 32
    assert blob_size([b"abcde", None]) == 40 + 32
    assert blob_size([bytes(512)] * 3) == 3 * (32 + 512)
    assert blob_size([b"x"]) == 40 and blob_size([bytes(8)]) == 40 and blob_size([bytes(9)]) == 48


def test_publish_writes_each_node_then_its_data(ov):
    """A record's blob holds, per key (items, then more), its node and right after it its data,
    padded to 8 bytes; each node is record_id, loc (data end << 32 | data start, 0 = removed),
    older and newer (a node's word offset)."""
    w = ov()
    r = OverlayReader(w.name)
    values = [((1, 0), b"aa"), ((1, 1), None), ((1, 2), b""), ((1, 3), b"cccc")]
    images = [((2, 7), bytes(range(256)) * 2)]
    w.publish(9, values, images, ())
    start = w.heap_start
    size = blob_size([d for _, d in values + images])
    assert size == 40 + 32 + 32 + 40 + 544
    assert list(w.blobs) == [(9, start, start + size, tuple(k for k, _ in values + images))]
    assert w.used == size == r.q[HEAP_USED]
    nodes = [start, start + 40, start + 72, start + 104, start + 144]
    words = [struct.unpack_from("<4Q", r.m, n) for n in nodes]
    assert words == [(9, (start + 34) << 32 | (start + 32), 0, 0),
                     (9, 0, 0, 0),
                     (9, (start + 104) << 32 | (start + 104), 0, 0),
                     (9, (start + 140) << 32 | (start + 136), 0, 0),
                     (9, (start + 688) << 32 | (start + 176), 0, 0)]
    assert r.m[start + 32:start + 34] == b"aa" and r.m[start + 136:start + 140] == b"cccc"
    assert r.m[start + 176:start + 176 + 512] == images[0][1]
    for n, (key, _) in zip(nodes, values + images):
        assert r.q[slot_of(r, *key) + 2] == n >> 3  # head: the node's word
    assert [r.find(1, i, 9) for i in range(4)] == [b"aa", None, b"", b"cccc"]
    assert r.find(2, 7, 9) == bytes(range(256)) * 2
    # a second version of (1, 0) points at the first
    pub(w, 10, ((1, 0), b"new"))
    node = w.q[slot_of(w, 1, 0) + 2]
    assert w.q[node + 2] == start >> 3 and w.q[node] == 10
    assert w.q[(start >> 3) + 3] == node and w.q[node + 3] == 0  # newer: the inverse of older


def test_versions_and_watermarks(ov):
    """Each publish adds a version; a lookup at W sees the newest version <= W, or the table
    file below every version."""
    w = ov()
    r = OverlayReader(w.name)
    pub(w, 1, ((1, 1), b"one"))
    pub(w, 3, ((1, 1), b"three"), ((1, 2), b"x"))
    pub(w, 5, ((1, 1), None))
    pub(w, 6, ((1, 1), b"six"))
    assert r.versions(1, 1) == [(6, b"six"), (5, None), (3, b"three"), (1, b"one")]
    assert w.versions(1, 2) == [(3, b"x")] and w.versions(1, 3) == []
    want = {0: MISS, 1: b"one", 2: b"one", 3: b"three", 4: b"three", 5: None, 6: b"six", M64: b"six"}
    for mark, data in want.items():
        got = r.find(1, 1, mark)
        assert got is data if data is MISS or data is None else got == data, mark
    assert r.find(1, 2, 2) is MISS and r.find(1, 2, 3) == b"x"
    assert r.q[ENTRIES] == 2 and w.get(1, 1) == b"six"


def test_entries_at_watermark(ov):
    """entries(W) yields every key's newest version <= W; keys with only newer versions are
    left out."""
    w = ov()
    puts = [((1, i), 100 + i, b"v%d" % i) for i in range(10)] + [((2, 0), 107, None)]
    for key, rid, data in sorted(puts, key=lambda p: p[1]):
        pub(w, rid, (key, data))
    pub(w, 120, ((1, 3), b"newer"))
    r = OverlayReader(w.name)
    at = {M64: [(t, i, rid, d) for (t, i), rid, d in puts if (t, i) != (1, 3)] + [(1, 3, 120, b"newer")],
          105: [(t, i, rid, d) for (t, i), rid, d in puts if rid <= 105],
          99: []}
    for mark, want in at.items():
        assert sorted(r.entries(mark)) == sorted(want)
        assert sorted(w.entries(mark)) == sorted(want)


def test_heap_full_raises_memory_error_and_changes_nothing(ov):
    """Publishing past the heap raises MemoryError (callers check room_for first) before any
    store a reader could see."""
    w = ov(heap_bytes=4096)
    pub(w, 1, ((1, 1), b"x" * (4096 - NODE_BYTES)))
    assert not w.room_for(1, blob_size([b"x"]))
    before = bytes(w.m)
    with pytest.raises(MemoryError):
        pub(w, 2, ((1, 2), b"y"))
    assert bytes(w.m) == before and w.q[COMMITTED] == 1 and w.slot(1, 2) is None
    check_writer(w)


# -- capacity ---------------------------------------------------------------------------------

def test_room_for_slots(ov):
    """room_for refuses more keys than half the slots."""
    w = ov(nslots=16)
    assert MAX_LOAD == 0.5
    assert w.room_for(8, 0) and not w.room_for(9, 0)
    pub(w, 1, *[((1, i), None) for i in range(5)])
    assert w.room_for(3, 0) and not w.room_for(4, 0)
    pub(w, 2, *[((1, i), b"again") for i in range(5)])  # more versions, no more keys
    assert w.room_for(3, 0) and not w.room_for(4, 0)


def test_room_for_heap_ring(ov):
    """room_for checks the ring's contiguous free space, wrapping past the end when the
    head has moved on (a wrapped blob must stay strictly below the head)."""
    w = ov(heap_bytes=4096)
    half = 2048 - NODE_BYTES  # a one-key record of 2048 ring bytes
    assert w.room_for(1, 4096) and not w.room_for(1, 4097) and w.room_for(3, 0)
    pub(w, 1, ((1, 1), b"a" * half))
    pub(w, 2, ((1, 2), b"b" * half))
    assert not w.room_for(1, 8) and w.room_for(1, 0)
    w.free_enacted(1)  # frees the first 2048 bytes
    assert w.room_for(1, 2040) and not w.room_for(1, 2048)
    before = bytes(w.m)
    with pytest.raises(MemoryError):  # the tail would meet the head: a full ring, not an empty one
        pub(w, 3, ((1, 3), b"c" * (2048 - NODE_BYTES)))
    assert bytes(w.m) == before and not w.wrap and w.tail == w.heap_end and w.q[COMMITTED] == 2
    pub(w, 3, ((1, 3), b"c" * (1000 - NODE_BYTES)))
    assert w.wrap and w.tail == w.heap_start + 1000
    r = OverlayReader(w.name)
    assert r.find(1, 3, 3) == b"c" * (1000 - NODE_BYTES) and r.find(1, 2, 3) == b"b" * half
    assert w.room_for(1, 1040) and not w.room_for(1, 1048)
    check_writer(w)
    w.free_enacted(2)  # the head follows the tail around: unwrapped
    assert not w.wrap and w.head == w.heap_start and r.find(1, 3, 3) == b"c" * (1000 - NODE_BYTES)
    assert w.room_for(1, 3096) and not w.room_for(1, 3104)
    check_writer(w)


@pytest.mark.parametrize("seed, release", [(s, r) for s in range(3) for r in (1 << 20, 4096)])
def test_ring_keeps_data_through_wraps(ov, seed, release, monkeypatch):
    """Records of random sizes published and enacted in order, a few at a time, for many laps
    around a small ring, its pages given back late or as soon as possible: every key always
    reads its version at watermarks from ``enacted`` to ``committed`` (a model comparison)."""
    monkeypatch.setattr(overlay, "RELEASE_BYTES", release)
    rng = random.Random(seed)
    w = ov(nslots=256, heap_bytes=4 * 8192)
    r = OverlayReader(w.name)
    versions: dict = collections.defaultdict(list)  # key -> [(rid, data)], oldest first
    table: dict = {}
    pending: collections.deque = collections.deque()  # (rid, [(key, data)])
    rid = enacted = wrapped = 0
    for step in range(400):
        keys = rng.sample(range(60), rng.randint(1, 4))
        kv = [((1, k), None if rng.random() < 0.1 else bytes([rid % 256]) * rng.randint(0, 3000))
              for k in keys]
        need = blob_size([d for _, d in kv])
        while not w.room_for(len(kv), need):  # enact the oldest records
            batch = [pending.popleft() for _ in range(min(len(pending), rng.randint(1, 3)))]
            enacted = batch[-1][0]
            w.free_enacted(enacted)
            for _, bkv in batch:
                table.update(bkv)
            for k in list(versions):
                versions[k] = [v for v in versions[k] if v[0] > enacted]
                if not versions[k]:
                    del versions[k]
        rid += 1
        pub(w, rid, *kv)
        pending.append((rid, kv))
        for k, d in kv:
            versions[k].append((rid, d))
        wrapped += bool(w.wrap)
        if release == 4096:  # pages are given back as soon as the head passes them: the
            # segment holds about the live part of the ring (plus its last lap's end, wrapped)
            live = (w.tail - w.heap_start) + (w.hwm - w.head) if w.wrap else w.tail - w.head
            assert _blocks(w) <= -(-w.heap_start // 4096) * 4096 + live + 4 * 4096, step
        for mark in (rid, rng.randint(enacted, rid)):
            for k in range(60):
                older = [d for v, d in versions.get((1, k), ()) if v <= mark]
                want = older[-1] if older else table.get((1, k))
                assert resolve(r.find(1, k, mark), table, (1, k)) == want, (step, k, mark)
    check_writer(w)
    assert wrapped > 10  # the test did go around


def _blocks(w):
    return os.stat("/dev/shm" + w.name).st_blocks * 512


def test_ring_gives_pages_back(ov):
    """Enacted blobs' pages return to the system (MADV_REMOVE) as the head passes them, and an
    empty ring starts over at the heap's start, giving every page back."""
    w = ov(nslots=1024, heap_bytes=8 << 20)
    base = _blocks(w)
    for i in range(512):
        pub(w, i + 1, ((1, i), b"\x01" * 4096))  # ~2 MiB, one blob each
    full = _blocks(w)
    assert full - base >= 512 * 4096
    w.free_enacted(400)
    assert w.head == w.heap_start + 400 * blob_size([bytes(4096)])
    # pages go back once RELEASE_BYTES (1 MiB) of them are free below the head, never above it
    assert overlay.RELEASE_BYTES <= w.released - w.heap_start <= w.head - w.heap_start
    assert w.released % mmap.PAGESIZE == 0
    assert w.released - w.heap_start - 4096 <= full - _blocks(w) <= w.head - w.heap_start
    r = OverlayReader(w.name)
    assert all(r.find(1, i, 512) == b"\x01" * 4096 for i in range(400, 512))
    assert r.find(1, 0, 512) is MISS and r.q[ENTRIES] == 112
    w.free_enacted(512)
    assert w.used == 0 and w.head == w.tail == w.hwm == w.released == w.heap_start
    assert _blocks(w) <= w.heap_start + 4096  # the header and slots only
    pub(w, 600, ((1, 5), b"again"))
    assert r.find(1, 5, 600) == b"again" and w.blobs[0][1] == w.heap_start
    check_writer(w)


# -- structural changes: freeing enacted versions ---------------------------------------------

def test_struct_odd_inside_window_even_after(ov):
    """window() makes struct odd and even again, publishing entries and heap_used at its end;
    free_enacted is one window."""
    w = ov()
    r = OverlayReader(w.name)
    with w.window():
        assert r.q[STRUCT] == 1
    assert r.q[STRUCT] == 2
    pub(w, 1, ((1, 1), b"x"))
    assert r.q[STRUCT] == 2  # publishing never touches it
    w.free_enacted(1)
    assert r.q[STRUCT] == 4 and r.q[ENTRIES] == 0 and r.q[HEAP_USED] == 0


def test_window_exception_retires_generation(ov):
    """An exception inside a structural window leaves no reader trusting it: the generation is
    retired (struct SUPERSEDED, state CLOSED, name unlinked)."""
    w = ov()
    r = OverlayReader(w.name)
    with pytest.raises(KeyError):
        with w.window():
            raise KeyError("boom")
    assert r.q[STRUCT] == SUPERSEDED and r.q[STATE] == CLOSED
    assert w.name not in stale_segments(ov.realpath)


def test_free_enacted_cuts_chains_and_removes_keys(ov):
    """Freeing through ``enacted`` unlinks every version <= it: a chain is cut below its newest
    surviving version (the table file holds the rest), a key with none left loses its slot."""
    w = ov()
    r = OverlayReader(w.name)
    pub(w, 1, ((1, 1), b"a1"), ((1, 2), b"b1"))
    pub(w, 2, ((1, 1), b"a2"))
    pub(w, 3, ((1, 1), b"a3"), ((1, 3), b"c3"))
    s = r.q[STRUCT]
    w.free_enacted(2)
    assert r.q[STRUCT] == s + 2
    assert r.versions(1, 1) == [(3, b"a3")] and r.versions(1, 2) == []
    assert w.slot(1, 2) is None and r.q[ENTRIES] == 2
    assert r.find(1, 1, 2) is MISS and r.find(1, 1, 3) == b"a3" and r.find(1, 2, 3) is MISS
    assert [b[0] for b in w.blobs] == [3] and w.used == blob_size([b"a3", b"c3"]) == r.q[HEAP_USED]
    w.free_enacted(3)
    assert r.q[ENTRIES] == 0 and w.used == 0 and not w.blobs and not w.nkeys
    check_writer(w)


def free_watching(w, enacted, at_window_end):
    """``w.free_enacted(enacted)``, calling ``at_window_end()`` each time a structural window
    closes (``struct`` made even); returns the number of windows."""
    ends = []

    def after(i):
        if i == STRUCT and w.q[STRUCT] % 2 == 0:
            ends.append(i)
            at_window_end()

    w.q = WatchedStores(w.q, after)
    try:
        with _backend.python_backend():  # the reference's stores, each through w.q (the native
            w.free_enacted(enacted)  # backend stores struct in C: the differential tests)
    finally:
        w.q = w.q.q
    return len(ends)


def test_free_enacted_in_windows(ov, monkeypatch):
    """free_enacted unlinks at most about FREE_KEYS_PER_WINDOW keys per structural window, the
    oldest records first; between two windows every read at W >= enacted is already right (the
    table files hold everything through ``enacted``)."""
    monkeypatch.setattr(overlay, "FREE_KEYS_PER_WINDOW", 3)  # a record of 2 keys counts 3
    w = ov()
    history = collections.defaultdict(list)  # key -> [(rid, data)]
    for rid in range(1, 9):
        kv = (((1, rid % 3), b"%d" % rid), ((2, rid), b"t2"))
        pub(w, rid, *kv)
        for k, d in kv:
            history[k].append((rid, d))
    table = {k: [d for r, d in vs if r <= 6][-1] for k, vs in history.items() if vs[0][0] <= 6}
    keys = [(1, i) for i in range(3)] + [(2, i) for i in range(10)]

    def check():
        check_writer(w)
        for mark in (6, 7, 8):
            for k in keys:
                want = [d for r, d in history.get(k, ()) if r <= mark]
                assert resolve(w.find(*k, mark), table, k) == (want[-1] if want else None), (mark, k)

    s = w.q[STRUCT]
    assert free_watching(w, 6, check) == 6  # one record per window
    assert w.q[STRUCT] == s + 12
    # (1, 0)'s newest version (6) is enacted: its slot went; (1, 1) and (1, 2) keep one each
    assert sorted(w.entries(8)) == [(1, 1, 7, b"7"), (1, 2, 8, b"8"), (2, 7, 7, b"t2"), (2, 8, 8, b"t2")]
    assert [b[0] for b in w.blobs] == [7, 8]
    monkeypatch.setattr(overlay, "FREE_KEYS_PER_WINDOW", 512)
    assert free_watching(w, 8, lambda: check_writer(w)) == 1
    assert not w.nkeys and w.used == 0


def test_free_enacted_between_windows_keeps_later_drops(ov, monkeypatch):
    """A drop of a record not freed yet stays while versions of the table it drops are still
    linked: else a reader at W >= enacted would see them, not the drop, between two windows.
    (Layout 2 as first committed, b9bb368, removed every drop <= enacted in the first of the
    writer's batches, and showed b"b" here.)"""
    monkeypatch.setattr(overlay, "FREE_KEYS_PER_WINDOW", 1)
    w = ov()
    pub(w, 1, ((1, 0), b"a"))
    pub(w, 2, ((2, 0), b"b"))
    pub(w, 3, drops=[2])
    table = {(1, 0): b"a"}  # the table files through record 3: table 2 dropped
    seen = []

    def check():
        seen.append((resolve(w.find(1, 0, 3), table, (1, 0)), resolve(w.find(2, 0, 3), table, (2, 0))))
        check_writer(w)

    assert free_watching(w, 3, check) == 3  # records 1 and 2, then the drop of record 3
    assert seen == [(b"a", None)] * 3
    assert not w.pending_drops and not w.nkeys and w.q[NDROPS] == 0


def test_free_enacted_between_windows_keeps_later_versions(ov, monkeypatch):
    """A key's oldest version freed in one window, its newest in a later one, a drop between
    them: the newer version stays visible in between (a fix that removed only the freed
    records' drops, but every version <= enacted, would show the drop)."""
    monkeypatch.setattr(overlay, "FREE_KEYS_PER_WINDOW", 1)
    w = ov()
    pub(w, 1, ((1, 0), b"old"))
    pub(w, 2, drops=[1])
    pub(w, 3, ((1, 0), b"new"), ((1, 1), b"x"))
    table = {(1, 0): b"new", (1, 1): b"x"}  # enacted through 3
    seen = []

    def check():
        seen.append(resolve(w.find(1, 0, 3), table, (1, 0)))
        check_writer(w)

    assert free_watching(w, 3, check) == 2
    assert seen == [b"new", b"new"] and not w.pending_drops and not w.nkeys


def test_freeing_on_a_budget_frees_whole_records_oldest_first_and_keeps_their_drops(ov):
    """A budget stops freeing after about that many versions, at a record's end: the rest stay
    linked and visible, and a drop stays until every version before it is gone (else readers
    would see the dropped table's older versions again); the next call goes on."""
    w = ov()
    for rid in range(1, 6):
        pub(w, rid, *(((1, rid * 10 + i), b"r%d" % rid) for i in range(4)),
            drops=[2] if rid == 4 else ())
    pub(w, 6, ((2, 1), b"after the drop"))
    assert w.free_enacted(5, budget=6) is False  # two records of 4 versions (one window)
    assert [b[0] for b in w.blobs] == [3, 4, 5, 6]
    assert w.get(1, 11) is MISS and w.get(1, 31) == b"r3" and w.pending_drops == [(2, 4)]
    check_writer(w)
    assert w.free_enacted(5, budget=4) is False  # record 3 only: the drop of 4 stays
    assert w.pending_drops == [(2, 4)] and [b[0] for b in w.blobs] == [4, 5, 6]
    assert w.free_enacted(5) is True
    assert [b[0] for b in w.blobs] == [6] and w.pending_drops == []
    assert w.get(2, 1) == b"after the drop"
    check_writer(w)


def test_stores_of_a_window_are_all_inside_it(ov):
    """Every store of free_enacted (slots shifted, chains cut, drops removed, counters) is made
    while struct is odd, between the store that makes it odd and the one that makes it even."""
    w = ov(nslots=16)
    keys = colliding_keys(w, [15], 4) + colliding_keys(w, [0], 2)
    for rid, k in enumerate(keys, 1):
        pub(w, rid, ((1, k), b"%d" % rid), drops=[2] if rid == 3 else ())
    pub(w, 7, ((1, keys[2]), b"kept"))
    seen = []
    w.q = WatchedStores(w.q, lambda i: seen.append((i, w.q[STRUCT])))
    try:
        with _backend.python_backend():  # the reference's stores, one by one (the native
            w.free_enacted(6)  # unlink makes the same stores: the differential tests compare)
    finally:
        w.q = w.q.q
    assert seen[0] == (STRUCT, 1) and seen[-1] == (STRUCT, 2)
    assert len(seen) > 10 and all(s % 2 for _, s in seen[:-1])
    assert w.get(1, keys[2]) == b"kept" and w.nkeys == 1 and not w.pending_drops
    check_writer(w)


# -- the hash: backward-shift deletion --------------------------------------------------------

def test_hash_spreads_strided_indices(ov):
    """Fibonacci hashing: strided indices and the two tables' same indices spread."""
    w = ov(nslots=128)
    assert len({w.home(1, i * 4096) for i in range(64)}) >= 40
    assert len({w.home(1, i * 64) for i in range(64)}) >= 40
    assert sum(w.home(1, i) == w.home(2, i) for i in range(64)) < 8


@pytest.mark.parametrize("seed", range(6))
def test_backward_shift_under_heavy_collisions(ov, seed):
    """Random publishes and frees on clustered keys whose probe runs wrap around the end keep
    every key findable (a model comparison) and every slot reachable from its home."""
    rng = random.Random(seed)
    nslots = 32
    w = ov(nslots=nslots, heap_bytes=1 << 16)
    r = OverlayReader(w.name)
    # keys crowding the last two and the first two slots, so probe runs wrap around the end
    pool = [(1, i) for i in colliding_keys(w, [nslots - 2, nslots - 1, 0, 1], 30)]
    pool += [(2, i) for i in colliding_keys(w, [nslots - 1, 0], 10, table=2)]
    pool += [(1, i) for i in range(10_000, 10_010)]
    versions: dict = {}  # key -> [(rid, data)], oldest first
    pending: list = []  # (rid, keys)
    rid = enacted = wrapped = 0
    for step in range(400):
        if rng.random() < 0.6:
            keys = rng.sample(pool, rng.randint(1, 2))
            # up to 3/4 of the slots, fuller than room_for's load limit allows
            if len(set(versions) | set(keys)) <= nslots * 3 // 4 and w.room_for(0, blob_size([bytes(40)] * 2)):
                rid += 1
                kv = [(k, None if rng.random() < 0.1 else rng.randbytes(rng.randrange(0, 40))) for k in keys]
                pub(w, rid, *kv)
                pending.append((rid, keys))
                for k, d in kv:
                    versions.setdefault(k, []).append((rid, d))
        elif pending:
            cut = rng.randint(1, len(pending))
            enacted = pending[cut - 1][0]
            w.free_enacted(enacted)
            del pending[:cut]
            for k in list(versions):
                versions[k] = [v for v in versions[k] if v[0] > enacted]
                if not versions[k]:
                    del versions[k]
        for k in pool:
            got = r.find(*k, rid)
            if k in versions:
                assert got is not MISS and got == versions[k][-1][1], (step, k)
            else:
                assert got is MISS, (step, k)
        assert r.q[ENTRIES] == len(versions) == w.nkeys
        check_writer(w)
        assert sorted((t, i) for t, i, _, _ in r.entries(rid)) == sorted(versions)
        wrapped += any(slot_of(r, *k) < r.home(*k) for k in versions)
    assert wrapped > 50


def test_remove_from_full_cluster_every_position(ov):
    """Removing each key of a wrapping cluster in turn leaves all the others findable."""
    nslots = 16
    w0 = ov(nslots=nslots)
    keys = colliding_keys(w0, [nslots - 1], 7) + colliding_keys(w0, [0], 3)
    for victim in keys:
        w = ov(generation=2, nslots=nslots)
        n = len(keys)
        for rid, k in enumerate(keys, 1):  # the cluster, in one order
            pub(w, rid, ((1, k), b"%d" % k))
        for rid, k in enumerate([k for k in keys if k != victim], n + 1):  # newer versions
            pub(w, rid, ((1, k), b"new %d" % k))
        w.free_enacted(n)
        r = OverlayReader(w.name)
        for k in keys:
            got = r.find(1, k, M64)
            assert got is MISS if k == victim else got == b"new %d" % k, (victim, k)
        check_writer(w)
        r.release()
        w.retire(CLOSED)


# -- drops ------------------------------------------------------------------------------------

def test_drop_hides_older_versions_and_table_file(ov):
    """A drop of a table at record d hides, at W >= d, its versions older than d and the table
    file; versions from d on (the dropping record's own writes too) stay visible."""
    w = ov()
    r = OverlayReader(w.name)
    pub(w, 1, ((1, 1), b"v1"), ((2, 1), b"other"))
    pub(w, 2, ((1, 2), b"w2"), drops=[1])  # a record drops a table, then writes in it
    pub(w, 3, ((1, 1), b"v3"))
    assert r.q[NDROPS] == 1 and w.pending_drops == [(1, 2)]
    assert r.drops_at(1) == {} and r.drops_at(2) == r.drops_at(M64) == {1: 2}
    assert r.dropped_at(1, 1) == 0 and r.dropped_at(1, 2) == 2 and r.dropped_at(2, M64) == 0
    assert r.find(1, 1, 1) == b"v1" and r.find(1, 1, 2) is None and r.find(1, 1, 3) == b"v3"
    assert r.find(1, 2, 1) is MISS and r.find(1, 2, 2) == b"w2"
    assert r.find(1, 9, 1) is MISS and r.find(1, 9, 2) is None  # the table file is dropped
    assert r.find(2, 1, 3) == b"other" and r.find(2, 9, 3) is MISS
    assert w.get(1, 9) is None and w.get(1, 1) == b"v3" and w.get(2, 9) is MISS
    pub(w, 4, drops=[1, 2])  # a record of drops only: no blob
    assert r.find(1, 1, 4) is None and r.find(2, 1, 4) is None and r.find(1, 1, 3) == b"v3"
    assert [b[0] for b in w.blobs] == [1, 2, 3] and r.drops_at(4) == {1: 4, 2: 4}
    w.free_enacted(2)
    assert w.pending_drops == [(1, 4), (2, 4)] and r.q[NDROPS] == 2
    assert r.find(1, 1, 3) == b"v3" and r.find(1, 2, 3) is MISS
    w.free_enacted(4)
    assert r.q[NDROPS] == 0 and r.q[ENTRIES] == 0 and r.drops_at(M64) == {}
    check_writer(w)


# -- publishing is invisible until the watermark rises ----------------------------------------

def test_reader_never_sees_half_a_record(ov):
    """After every single store of a publish but the last (``committed``), a reader at the old
    watermark sees exactly what it saw before: new keys, new versions of old keys, a drop, all
    of them only once the watermark rises; then all at once."""
    w = ov(nslots=64)
    r = OverlayReader(w.name)
    pub(w, 1, ((1, 1), b"one"), ((1, 2), b"two"), ((2, 5), b"t2"))
    pub(w, 2, ((1, 1), b"one again"))
    keys = [(1, i) for i in range(8)] + [(2, i) for i in range(8)]

    def view(mark):
        return ([r.find(t, i, mark) for t, i in keys], sorted(r.entries(mark)), r.drops_at(mark))

    before = {mark: view(mark) for mark in (0, 1, 2)}
    final = {(1, 1): {(1, b"one"), (2, b"one again"), (3, b"three")}, (1, 2): {(1, b"two")},
             (1, 3): {(3, b"new key")}, (1, 4): {(3, None)}, (2, 5): {(1, b"t2")}, (2, 6): {(3, b"i" * 512)}}
    checks = []

    def after(i):
        if w.q[COMMITTED] == 2:
            assert all(view(mark) == seen for mark, seen in before.items()), i
            # and whatever a pointer leads to is whole already: a node's data is copied
            # before the node is linked
            for k in keys:
                assert set(r.versions(*k)) <= final.get(k, set()), (i, k)
            checks.append(i)

    w.q = WatchedStores(w.q, after)
    try:
        with _backend.python_backend():  # the reference's stores, one by one (the native
            # loop makes the same stores, in the same order, with release stores for links)
            w.publish(3, [((1, 1), b"three"), ((1, 3), b"new key"), ((1, 4), None)],
                      [((2, 6), b"i" * 512)], [2])
    finally:
        stores, w.q = w.q.stores, w.q.q
    assert stores[-1] == COMMITTED and STRUCT not in stores and len(checks) == len(stores) - 1
    assert len(checks) >= 8
    assert view(2) == before[2]
    now = dict(zip(keys, view(3)[0]))
    assert now[(1, 1)] == b"three" and now[(1, 3)] == b"new key" and now[(1, 4)] is None
    assert now[(1, 2)] == b"two" and now[(2, 5)] is None and now[(2, 0)] is None  # dropped
    assert r.find(2, 6, 3) == b"i" * 512


def test_link_then_raise_watermark(ov):
    """_link is publish without its last store: nothing changes at the old watermark, the
    writer's get already sees the record, readers see it once ``committed`` is raised."""
    w = ov()
    r = OverlayReader(w.name)
    pub(w, 1, ((1, 1), b"a"))
    pub(w, 2, ((1, 1), b"b"), ((1, 2), b"c"), link_only=True)
    assert r.q[COMMITTED] == 1 and r.q[ENTRIES] == 2
    assert r.find(1, 1, r.q[COMMITTED]) == b"a" and r.find(1, 2, r.q[COMMITTED]) is MISS
    assert sorted(r.entries(r.q[COMMITTED])) == [(1, 1, 1, b"a")]
    assert w.get(1, 1) == b"b" and w.get(1, 2) == b"c"
    w.q[COMMITTED] = 2
    assert r.find(1, 1, r.q[COMMITTED]) == b"b" and r.find(1, 2, r.q[COMMITTED]) == b"c"


# -- stale readers over freed and reused bytes ------------------------------------------------

def _stale_setup(ov):
    """A key with versions at records 1 and 2 (32-byte blobs), and a reader at watermark 1."""
    w = ov(nslots=16, heap_bytes=4096)
    key = (1, 1)
    pub(w, 1, (key, b"x" * 8))
    pub(w, 2, (key, b"y" * 8))
    r = OverlayReader(w.name)
    head = w.q[w.slot(*key) + 2] * 8  # (in bytes; the slot holds the node's word)
    assert head == w.heap_start + blob_size([bytes(8)])
    return w, r, key, head


def _free_and_reuse(w, key, garbage):
    """Enact and free records 1 and 2, then publish record 3 whose data lies over the node the
    stale reader is about to read (a reused blob: its bytes are anything a record holds)."""
    w.free_enacted(2)
    assert not w.blobs and w.tail == w.heap_start  # the ring starts over
    data = b"\0" * (blob_size([bytes(8)]) - NODE_BYTES) + garbage
    pub(w, 3, ((1, 2), data))


def test_stale_reader_sees_struct_move(ov):
    """A reader that loaded ``struct`` before a free and a publish over the same ring space sees
    it changed afterwards (it retries), and the bytes it pointed at are really reused."""
    w, r, key, head = _stale_setup(ov)
    s = r.q[STRUCT]
    old = bytes(r.m[head:head + NODE_BYTES])
    _free_and_reuse(w, key, struct.pack("<3Q", 7, 0, 0))
    assert r.q[STRUCT] != s and r.q[STRUCT] % 2 == 0
    assert bytes(r.m[head:head + NODE_BYTES]) != old
    assert r.find(*key, 1) is MISS and r.find(1, 2, 3) is not MISS


def stale_find(r, w, key, mark, garbage):
    """``r.find(key, mark)`` by a reader descheduled right after it loaded the key's head, while
    the writer frees records 1 and 2 and reuses their bytes (``garbage`` over the node it is
    about to read): (the answer, or the exception class it raised; the words it loaded)."""
    real = r.q
    r.q = StaleLoads(real, w.slot(*key) + 2, lambda: _free_and_reuse(w, key, garbage))
    r.find_many, r.value_now = overlay._python_lookups(r)  # closures over the word view
    try:
        try:
            got = r.find(*key, mark)
        except (Torn, IndexError) as e:
            got = type(e)
        return got, r.q.loads
    finally:
        r.q = real
        r.find_many, r.value_now = overlay._python_lookups(r)


@pytest.mark.parametrize("case", ["self-loop", "two-cycle", "rising", "falling-chain", "random"])
def test_stale_lookup_over_reused_bytes_ends(ov, case):
    """A lookup that read a key's head and then meets reused bytes in place of its node ends
    (Torn, or some answer), within a bounded number of loads, and the struct check rejects
    what it found."""
    w, r, key, head = _stale_setup(ov)
    hw = head >> 3  # the node's word: what ``older`` holds
    lo, hi = w.heap_start, w.heap_end - NODE_BYTES
    if case == "self-loop":
        garbage = struct.pack("<3Q", 5, 0, hw)
    elif case == "two-cycle":
        garbage = struct.pack("<6Q", 5, 0, hw + 3, 4, 0, hw)
    elif case == "rising":
        garbage = struct.pack("<6Q", 5, 0, hw + 3, 9, 0, hw)
    elif case == "falling-chain":
        garbage = b"".join(struct.pack("<3Q", 90 - k, 0, hw + (k + 1) * 3) for k in range(40))
        garbage += struct.pack("<3Q", 50, 0, 0)
    else:
        # words that are 0 or word offsets inside the heap (past the segment: the next test)
        rng = random.Random(7)
        garbage = b"".join(struct.pack("<Q", rng.choice([rng.randrange(lo, hi) >> 3, 0]))
                           for _ in range(120))
    s = r.q[STRUCT]
    got, loads = stale_find(r, w, key, 1, garbage)
    assert r.q[STRUCT] != s  # whatever it found, the reader retries
    assert loads < 3 * len(r.q)
    if case in ("self-loop", "two-cycle", "rising"):
        assert got is Torn
    elif case == "falling-chain":
        assert got is MISS and loads > 40 * 2
    assert got is not IndexError


@pytest.mark.parametrize("older", ["far", "last word", "past the end"])
def test_stale_lookup_over_offset_past_the_segment(ov, older):
    """A reused node whose ``older`` lies (partly) past the segment ends the walk with
    IndexError, which readers treat as Torn (a retry: the struct word moved)."""
    w, r, key, head = _stale_setup(ov)
    off = {"far": 1 << 40, "last word": len(w.m) // 8 - 1, "past the end": len(w.m) // 8}[older]
    s = r.q[STRUCT]
    got, _ = stale_find(r, w, key, 1, struct.pack("<3Q", 5, 0, off))
    assert got in (Torn, IndexError) and r.q[STRUCT] != s


# -- generations ------------------------------------------------------------------------------

def test_copy_from(ov):
    """copy_from fills a bigger generation with every version (chains in order), drop and
    counter of the old one; its blobs are per record, so freeing goes on as before."""
    old = ov(generation=1, nslots=16, heap_bytes=4096)
    pub(old, 10, *[((1, i), b"v" * i) for i in range(5)], ((2, 3), None))
    pub(old, 11, ((1, 1), b"eleven"), ((2, 4), b""))
    pub(old, 12, ((1, 1), None), drops=[2])
    pub(old, 13, drops=[9])
    for word, v in ((DURABLE, 12), (ENACTED, 9), (ENACTING, 9), (ENACTOR_PID, 4242)):
        old.q[word] = v
    new = ov(generation=2, nslots=64, heap_bytes=1 << 16)
    new.copy_from(old)
    r = OverlayReader(new.name)
    keys = [(1, i) for i in range(6)] + [(2, i) for i in range(6)]
    for k in keys:
        assert r.versions(*k) == old.versions(*k)
        for mark in range(9, 15):
            assert r.find(*k, mark) == old.find(*k, mark)  # MISS == MISS: one object
    assert r.versions(1, 1) == [(12, None), (11, b"eleven"), (10, b"v")]
    assert [r.q[w] for w in (COMMITTED, DURABLE, ENACTED, ENACTING, ENACTOR_PID)] == [13, 12, 9, 9, 4242]
    assert r.drops_at(M64) == {2: 12, 9: 13} and new.pending_drops == old.pending_drops
    assert r.q[ENTRIES] == old.nkeys == 7 and r.q[GENERATION] == 2 and r.q[STRUCT] == 0
    assert [b[0] for b in new.blobs] == [10, 11, 12] and new.used <= old.used
    check_writer(new)
    new.free_enacted(11)
    assert r.versions(1, 1) == [(12, None)] and r.q[ENTRIES] == 1 and [b[0] for b in new.blobs] == [12]
    check_writer(new)


def test_retire(ov):
    """retire marks struct SUPERSEDED, records state and next_gen, and unlinks the name;
    existing mappings stay valid."""
    w = ov(generation=4)
    pub(w, 1, ((1, 1), b"still here"))
    r = OverlayReader(w.name)
    w.retire(SUPERSEDED_STATE, next_gen=5)
    assert r.q[STRUCT] == SUPERSEDED and r.q[STATE] == SUPERSEDED_STATE and r.q[NEXT_GEN] == 5
    assert not os.path.exists("/dev/shm" + w.name)
    assert w.name not in stale_segments(ov.realpath)
    with pytest.raises(FileNotFoundError):
        OverlayReader(w.name)
    assert r.find(1, 1, 1) == b"still here"
    assert w.get(1, 1) == b"still here"


def test_supersede_segment(ov):
    """supersede_segment marks a dead writer's segment superseded by the next generation and
    unlinks it; a missing name is no error."""
    w = ov(generation=4)
    r = OverlayReader(w.name)
    supersede_segment(w.name, 5)
    assert r.q[STRUCT] == SUPERSEDED and r.q[STATE] == SUPERSEDED_STATE and r.q[NEXT_GEN] == 5
    assert w.name not in stale_segments(ov.realpath)
    supersede_segment(w.name, 6)
    assert r.q[NEXT_GEN] == 5
    name = _foreign(ov, HEADER_BYTES - 8, ((MAGIC_W, MAGIC),))  # too short to be one: unlinked only
    supersede_segment(name, 7)
    assert name not in stale_segments(ov.realpath)


# -- the state machine ------------------------------------------------------------------------

def crowding(table, homes, count):
    """``count`` indices of ``table`` whose home in 16 slots is one of ``homes``; their homes
    in 32, 64, 128 slots stay at the same end (the top bits of one product)."""
    out = []
    i = 0
    while len(out) < count:
        if (((i ^ (table << 47)) * overlay.K) & M64) >> 60 in homes:
            out.append(i)
        i += 1
    return out


TABLES = (1, 2)
# 12 keys, most crowding the last and first slots, so probe runs wrap around the end and
# removals shift entries back across it
KEYS = ([(1, i) for i in crowding(1, {15}, 3) + crowding(1, {0}, 2)] + [(1, 1000)]
        + [(2, i) for i in crowding(2, {14, 15}, 3) + crowding(2, {0}, 1)] + [(2, 0), (2, 77)])
DROP_CHOICES = [(), (), (), (), (), (1,), (2,), (1, 2)]
SIZES = [None, 0, 1, 7, 100, 333, 600, 900, 1500]  # sampled, not drawn: hypothesis favours small
                                                   # integers, and the ring must go around


def version_data(rid, key, size):
    """Data unique to a version, so a mix-up of versions shows."""
    if size is None:
        return None
    return (bytes([rid & 255, rid >> 8 & 255, key[0], key[1] & 255]) * (size // 4 + 1))[:size]


class OverlayMachine(RuleBasedStateMachine):
    """The overlay against a model: ``versions`` {key: [(rid, data)], oldest first} of records
    not yet enacted, ``drops`` {table: [rid]} pending, ``table`` {key: data} the table files
    through ``enacted``, ``records`` [(rid, [(key, data)], drops)] not yet freed."""

    def __init__(self, realpath):
        super().__init__()
        self.realpath = realpath
        self.w = None
        self.live = []  # writers not retired
        self.mapped = []  # every writer and reader, to release at teardown
        self.reader = None
        self.generation = 1
        self.committed = self.enacted = 0
        self.versions: dict = {}
        self.drops: dict = {}
        self.table: dict = {}
        self.records: list = []
        self.full = False  # a record found no room: the writer may grow

    def teardown(self):
        for w in self.live:
            w.retire(CLOSED)
        for seg in self.mapped:
            seg.release()
        for name in stale_segments(self.realpath):
            unlink_segment(name)

    # -- the model ---------------------------------------------------------------------------
    def answer(self, key, mark):
        """(data, from_table_file) at watermark ``mark``."""
        older = [v for v in self.versions.get(key, ()) if v[0] <= mark]
        drop = max((d for d in self.drops.get(key[0], ()) if d <= mark), default=0)
        if older:
            rid, data = older[-1]
            return (None if drop > rid else data), False
        if drop:
            return None, False
        return self.table.get(key), True

    def check_find(self, seg, key, mark):
        got = seg.find(*key, mark)
        want, miss = self.answer(key, mark)
        assert (got is MISS) == miss, (key, mark, got)
        assert resolve(got, self.table, key) == want, (key, mark, got, want)
        return got

    def marks(self, data, n=2):
        """Watermarks a reader may hold: from ``enacted`` to ``committed``."""
        got = {self.enacted, self.committed}
        for _ in range(n):
            got.add(data.draw(st.integers(self.enacted, self.committed), label="W"))
        return sorted(got)

    def snapshot(self, seg, marks):
        return {m: ([seg.find(*k, m) for k in KEYS], sorted(seg.entries(m)), seg.drops_at(m)) for m in marks}

    # -- rules -------------------------------------------------------------------------------
    @initialize(nslots=st.sampled_from([16, 32]), heap=st.sampled_from([4096, 8192]))
    def start(self, nslots, heap):
        self.w = OverlayWriter(self.realpath, self.generation, nslots, heap)
        self.live.append(self.w)
        self.mapped.append(self.w)

    @rule(data=st.data(), keys=st.lists(st.sampled_from(KEYS), unique=True, max_size=4),
          sizes=st.lists(st.sampled_from(SIZES), min_size=4, max_size=4),
          split=st.integers(0, 4), drops=st.sampled_from(DROP_CHOICES), gap=st.sampled_from([1, 1, 1, 2]),
          fine=st.booleans())
    def publish(self, data, keys, sizes, split, drops, gap, fine):
        """A record of 0-4 keys (data None, empty or not) and maybe drops; with ``fine``, its
        _link first, checked at every watermark readers may hold, then its watermark."""
        self._publish(data, keys, sizes, split, drops, gap, fine)

    @rule(data=st.data(), keys=st.lists(st.sampled_from(KEYS), unique=True, min_size=1, max_size=2),
          sizes=st.lists(st.sampled_from(SIZES[1:]), min_size=2, max_size=2), fine=st.booleans())
    def publish_small(self, data, keys, sizes, fine):
        """A record of a key or two of modest size: most records, so the ring goes around."""
        self._publish(data, keys, sizes, 1, (), 1, fine)

    def _publish(self, data, keys, sizes, split, drops, gap, fine):
        w = self.w
        rid = self.committed + gap
        kv = [(k, version_data(rid, k, s)) for k, s in zip(keys, sizes)]
        if not w.room_for(len(kv), blob_size([d for _, d in kv])):
            self.full = True
            return  # the writer would free, grow or wait
        items, more = kv[:split], kv[split:]
        if fine:
            marks = self.marks(data)
            before = self.snapshot(w, marks)
            w._link(rid, items, more, drops)
            assert w.q[COMMITTED] == self.committed
            assert self.snapshot(w, marks) == before
            if self.reader is not None and self.reader.name == w.name:
                assert self.snapshot(self.reader, marks) == before
            for k, d in kv:
                assert w.get(*k) == d
            w.q[COMMITTED] = rid
        else:
            w.publish(rid, items, more, drops)
        for k, d in kv:
            self.versions.setdefault(k, []).append((rid, d))
        for t in drops:
            self.drops.setdefault(t, []).append(rid)
        self.records.append((rid, kv, drops))
        self.committed = rid
        w.q[DURABLE] = rid

    @precondition(lambda self: self.committed > self.enacted)
    @rule(data=st.data(), per_window=st.sampled_from([512, 512, 1, 3, 5]), oldest=st.integers(0, 3))
    def free(self, data, per_window, oldest):
        """The enactor applied records through some committed id (often just the oldest
        records): the writer frees them, in windows of about ``per_window`` keys; at the end of
        each window every read at a W a reader may hold (>= the new ``enacted``) is already the
        model's."""
        if oldest and self.records:  # the oldest records: the ring's head moves on a little
            target = self.records[min(oldest, len(self.records)) - 1][0]
        else:
            target = data.draw(st.integers(self.enacted + 1, self.committed), label="enacted")
        marks = sorted({target, self.committed, data.draw(st.integers(target, self.committed), label="W")})
        self._free(target, per_window, marks)

    @rule(data=st.data(), keys=st.lists(st.sampled_from(KEYS), unique=True, min_size=1, max_size=3),
          sizes=st.lists(st.sampled_from(SIZES), min_size=3, max_size=3))
    def publish_absorbing(self, data, keys, sizes):
        """As the writer makes room: free the oldest record until the new one fits, publish."""
        kv = [(k, version_data(self.committed + 1, k, s)) for k, s in zip(keys, sizes)]
        need = blob_size([d for _, d in kv])
        while not self.w.room_for(len(kv), need) and self.records:
            rid = self.records[0][0]
            self._free(rid, 512, [rid, self.committed])
        self._publish(data, keys, sizes, 3, (), 1, False)

    def _free(self, target, per_window, marks):
        w = self.w
        # the windows free_enacted opens: records with versions, oldest first, about
        # per_window keys each; then one for the drops of later records without versions
        windows = done = last = 0
        for rid, kv, _ in self.records:
            if rid > target or not kv:
                continue
            if not windows or done >= per_window:
                windows += 1
                done = 0
            done += len(kv) + 1
            last = rid
        windows += any(last < d <= target for ds in self.drops.values() for d in ds)
        # the model after: the table files through target, record by record
        for _rid, kv, drops in [r for r in self.records if r[0] <= target]:
            for t in drops:
                self.table = {k: v for k, v in self.table.items() if k[0] != t}
            for k, d in kv:
                if d is None:
                    self.table.pop(k, None)
                else:
                    self.table[k] = d
        self.records = [r for r in self.records if r[0] > target]
        for k in list(self.versions):
            self.versions[k] = [v for v in self.versions[k] if v[0] > target]
            if not self.versions[k]:
                del self.versions[k]
        for t in list(self.drops):
            self.drops[t] = [d for d in self.drops[t] if d > target]
        self.enacted = target

        def between_windows():
            check_writer(w)
            for mark in marks:
                for k in KEYS:
                    assert resolve(w.find(*k, mark), self.table, k) == self.answer(k, mark)[0], (k, mark)

        w.q[ENACTING] = w.q[ENACTED] = target
        s = w.q[STRUCT]
        saved = overlay.FREE_KEYS_PER_WINDOW
        overlay.FREE_KEYS_PER_WINDOW = per_window
        try:
            assert free_watching(w, target, between_windows) == windows
        finally:
            overlay.FREE_KEYS_PER_WINDOW = saved
        assert w.q[STRUCT] == s + 2 * windows

    @precondition(lambda self: self.full and self.w.nslots < 128)
    @rule(data=st.data())
    def grow(self, data):
        """A generation twice the size, filled by copy_from, once a record found no room (as
        the writer grows it); the old one is retired."""
        self.full = False
        old = self.w
        old.q[ENACTOR_PID] = 4242
        new = OverlayWriter(self.realpath, self.generation + 1, old.nslots * 2, old.heap_bytes * 2)
        self.live.append(new)
        self.mapped.append(new)
        new.copy_from(old)
        for k in KEYS:
            assert new.versions(*k) == old.versions(*k)
        assert new.drops_at(M64) == old.drops_at(M64) and new.pending_drops == old.pending_drops
        for word in (COMMITTED, DURABLE, ENACTED, ENACTOR_PID, ENACTING, ENTRIES):
            assert new.q[word] == old.q[word]
        assert new.q[GENERATION] == self.generation + 1 and new.q[STRUCT] == 0
        old.retire(SUPERSEDED_STATE, self.generation + 1)
        self.live.remove(old)
        stale = self.reader
        if stale is not None and stale.name == old.name:
            assert stale.q[STRUCT] == SUPERSEDED and stale.q[STATE] == SUPERSEDED_STATE
            assert stale.q[NEXT_GEN] == self.generation + 1
            marks = self.marks(data, 1)
            assert self.snapshot(stale, marks) == self.snapshot(new, marks)
        self.generation += 1
        self.w = new

    @rule(data=st.data())
    def pin(self, data):
        """A reader pinned at some W in [enacted, committed] sees the model's answer for every
        key, with the table file below the overlay; entries and drops agree too."""
        w = self.w
        for mark in self.marks(data, 1):
            for k in KEYS:
                self.check_find(w, k, mark)
            want = []
            for k, vs in self.versions.items():
                older = [v for v in vs if v[0] <= mark]
                if older:
                    want.append((k[0], k[1], older[-1][0], older[-1][1]))
            assert sorted(w.entries(mark)) == sorted(want)
            drops = {t: max(d for d in ds if d <= mark) for t, ds in self.drops.items() if any(d <= mark for d in ds)}
            assert w.drops_at(mark) == drops
            for t in TABLES:
                assert w.dropped_at(t, mark) == drops.get(t, 0)

    @rule(data=st.data())
    def read_only_mapping(self, data):
        """An OverlayReader of the live segment sees exactly what the writer sees."""
        w = self.w
        if self.reader is None or self.reader.name != w.name:
            self.reader = OverlayReader(w.name)
            self.mapped.append(self.reader)
        r = self.reader
        assert list(r.q[:HEADER_WORDS]) == list(w.q[:HEADER_WORDS])
        assert (r.nslots, r.heap_start, r.heap_bytes, r.slots_end) == (w.nslots, w.heap_start, w.heap_bytes,
                                                                        w.slots_end)
        marks = self.marks(data)
        assert self.snapshot(r, marks) == self.snapshot(w, marks)
        for k in KEYS:
            assert r.versions(*k) == w.versions(*k)

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def consistent(self):
        w = self.w
        if w is None:
            return
        check_writer(w)
        q = w.q
        assert q[COMMITTED] == self.committed and q[ENTRIES] == len(self.versions)
        assert set(occupied(w)) == set(self.versions)
        assert w.used == sum(blob_size([d for _, d in kv]) for _, kv, _ in self.records)
        assert sorted(w.pending_drops, key=lambda p: (p[1], p[0])) == sorted(
            ((t, d) for t, ds in self.drops.items() for d in ds), key=lambda p: (p[1], p[0]))
        for k in KEYS:
            assert w.versions(*k) == list(reversed(self.versions.get(k, [])))
            self.check_find(w, k, self.committed)
            want, miss = self.answer(k, M64)
            got = w.get(*k)
            assert got is MISS if miss else got == want


@pytest.mark.parametrize("release", [1 << 20, 4096])
def test_overlay_state_machine(db, monkeypatch, release):
    """The model test; with RELEASE_BYTES a page, freed pages are given back as soon as can be."""
    monkeypatch.setattr(overlay, "RELEASE_BYTES", release)
    os.makedirs(db)
    real = os.path.realpath(db)
    run_state_machine_as_test(lambda: OverlayMachine(real),
                              settings=settings(max_examples=200, stateful_step_count=50, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow]))
