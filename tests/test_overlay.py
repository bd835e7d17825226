"""Unit tests of mpwal.overlay: the shared-memory overlay segment, its writer and its readers.

Every segment a test creates is retired (or unlinked) by the ``ov`` fixture's teardown, before
conftest's ``db`` fixture checks that none is left in /dev/shm.
"""

from __future__ import annotations

import os
import random
import stat

import posix_ipc
import pytest

from mpwal.overlay import (
    CLOSED,
    COMMITTED,
    DURABLE,
    ENACTED,
    ENACTOR_PID,
    ENTRIES,
    GENERATION,
    HEADER_WORDS,
    HEAP_BYTES,
    HEAP_USED,
    LAYOUT,
    LAYOUT_VERSION,
    LIVE,
    MAGIC,
    MAGIC_W,
    NDROPS,
    NEXT_GEN,
    NSLOTS,
    SEQ,
    SLOT_WORDS,
    STATE,
    SUPERSEDED,
    SUPERSEDED_STATE,
    WRITER_PID,
    OverlayReader,
    OverlayWriter,
    segment_name,
    segment_prefix,
    stale_segments,
    unlink_segment,
)


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


def publish(w, *puts):
    """Put (table, index, record_id, data) tuples inside one seq window."""
    w.begin()
    for p in puts:
        w.put(*p)
    w.end()


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


def check_probe_invariant(seg):
    """Every occupied slot is reachable from its home without crossing an empty slot."""
    q = seg.q
    for w in range(HEADER_WORDS, seg.slots_end, SLOT_WORDS):
        t = q[w + 1]
        if t:
            assert slot_of(seg, t - 1, q[w]) == w


# -- naming, creation, permissions ------------------------------------------------------------

def test_segment_name_short_and_derived_from_path():
    """Names are /mpwal-<12 hex>-<gen hex>, at most 31 characters, distinct per path."""
    name = segment_name("/some/dir", 0xFFFFFFFF)
    assert name.startswith(segment_prefix("/some/dir")) and name.endswith("-ffffffff")
    assert len(segment_name("/a/very/long/path" * 20, (1 << 32) - 1)) <= 31
    assert segment_prefix("/some/dir") != segment_prefix("/some/dir2")


def test_header_after_creation(ov):
    """A new segment's header holds magic, layout, generation, pid, state, sizes; seq is 0."""
    w = ov(generation=7, nslots=32, heap_bytes=5000)
    r = OverlayReader(w.name)
    q = r.q
    assert q[SEQ] == 0 and q[MAGIC_W] == MAGIC and q[LAYOUT] == LAYOUT_VERSION
    assert q[GENERATION] == 7 and q[STATE] == LIVE and q[WRITER_PID] == os.getpid()
    assert q[NSLOTS] == 32 and q[HEAP_BYTES] == 8192  # rounded up to whole pages
    assert r.heap_start == (HEADER_WORDS + 32 * SLOT_WORDS) * 8
    assert len(r.m) == r.heap_start + 8192
    assert w.name in stale_segments(ov.realpath)


def test_segment_mode_is_0600(ov):
    """The segment is created with mode 0600."""
    w = ov()
    assert stat.S_IMODE(os.stat("/dev/shm" + w.name).st_mode) == 0o600


def test_reader_mapping_is_read_only(ov):
    """A reader's mapping and its word view refuse writes with TypeError."""
    w = ov()
    r = OverlayReader(w.name)
    with pytest.raises(TypeError):
        r.m[0:1] = b"x"
    with pytest.raises(TypeError):
        r.m[HEADER_WORDS * 8] = 1
    with pytest.raises(TypeError):
        r.q[SEQ] = 2
    assert r.q.readonly


def test_reader_of_missing_segment():
    """OverlayReader of a name that does not exist raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError):
        OverlayReader("/mpwal-000000000000-dead")


def test_reader_refuses_foreign_segment(ov):
    """A segment without the mpwal magic is refused with FileNotFoundError."""
    name = segment_name(ov.realpath, 99)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=8192)
    shm.close_fd()
    try:
        with pytest.raises(FileNotFoundError):
            OverlayReader(name)
    finally:
        unlink_segment(name)


def test_new_writer_replaces_leftover_of_same_generation(ov):
    """Creating a generation whose name is left over replaces it with an empty segment."""
    old = ov(generation=3)
    publish(old, (1, 1, 1, b"old"))
    new = ov(generation=3)
    r = OverlayReader(new.name)
    assert r.find(1, 1) is None and r.q[ENTRIES] == 0
    assert old.get(1, 1) == (1, b"old")  # the old mapping stays valid


# -- the sequence lock ------------------------------------------------------------------------

def test_seq_odd_inside_window_even_after(ov):
    """begin() makes seq odd, end() even again; entries and heap_used publish at end()."""
    w = ov()
    r = OverlayReader(w.name)
    w.begin()
    assert r.q[SEQ] == 1
    w.put(1, 1, 1, b"x" * 20)
    w.put(1, 2, 1, None)
    assert r.q[ENTRIES] == 0
    w.end()
    assert r.q[SEQ] == 2 and r.q[ENTRIES] == 2 and r.q[HEAP_USED] == 20


# -- put / get / find -------------------------------------------------------------------------

def test_put_get_find(ov):
    """Writer get and reader find return the record id and data of each key."""
    w = ov()
    r = OverlayReader(w.name)
    publish(w, (1, 10, 5, b"ten"), (2, 10, 6, b"other table"), (1, 11, 7, bytes(512)))
    for seg_get in (w.get, r.find):
        assert seg_get(1, 10) == (5, b"ten")
        assert seg_get(2, 10) == (6, b"other table")
        assert seg_get(1, 11) == (7, bytes(512))
        assert seg_get(1, 12) is None
        assert seg_get(3, 10) is None


def test_removal_and_empty_value(ov):
    """None is a removal entry (data None); b'' is a stored empty value."""
    w = ov()
    r = OverlayReader(w.name)
    publish(w, (1, 1, 1, None), (1, 2, 2, b""))
    assert w.get(1, 1) == r.find(1, 1) == (1, None)
    assert w.get(1, 2) == r.find(1, 2) == (2, b"")
    assert w.used == 0


def test_overwrite_updates_record_and_data(ov):
    """Overwriting a key changes its data and record id; each record's data is a new blob."""
    w = ov()
    r = OverlayReader(w.name)
    publish(w, (1, 1, 1, b"a" * 10))
    assert w.used == 10
    publish(w, (1, 1, 2, b"b" * 16))
    assert r.find(1, 1) == (2, b"b" * 16) and w.used == 26
    publish(w, (1, 1, 4, None))
    assert r.find(1, 1) == (4, None)
    w.begin()
    w.release_through(2)  # records 1 and 2 enacted: their blobs go
    w.end()
    assert w.used == 0 and r.find(1, 1) == (4, None)
    publish(w, (1, 1, 5, b"d"))
    assert r.find(1, 1) == (5, b"d") and w.used == 1
    assert r.q[ENTRIES] == 1 and r.q[HEAP_USED] == 1


def test_put_record_points_into_one_blob(ov):
    """A record's values and chunk images are copied once; each entry points at its part."""
    w = ov()
    r = OverlayReader(w.name)
    values = {(1, 0): b"aa", (1, 1): None, (1, 2): b"", (1, 3): b"cccc"}
    images = [((2, 7), bytes(range(256)) * 2)]
    blob = b"".join(v for v in values.values() if v) + images[0][1]
    off = w.stage(9, blob)  # outside the seq window
    w.begin()
    w.put_record(9, values.items(), off, images)
    w.end()
    assert [r.find(1, i) for i in range(4)] == [(9, b"aa"), (9, None), (9, b""), (9, b"cccc")]
    assert r.find(2, 7) == (9, bytes(range(256)) * 2)
    assert list(w.blobs) == [(9, w.heap_start, w.heap_start + len(blob))]


def test_entries_lists_everything(ov):
    """Reader.entries() yields every (table, index, record_id, data)."""
    w = ov()
    puts = [(1, i, 100 + i, b"v%d" % i) for i in range(10)] + [(2, 0, 7, None)]
    publish(w, *puts)
    r = OverlayReader(w.name)
    assert sorted(r.entries(), key=lambda e: (e[0], e[1])) == sorted(puts)


def test_heap_full_raises_memory_error(ov):
    """Allocating past the heap raises MemoryError (callers check room_for first)."""
    w = ov(heap_bytes=4096)
    publish(w, (1, 1, 1, b"x" * 4096))
    w.begin()
    try:
        with pytest.raises(MemoryError):
            w.put(1, 2, 2, b"y")
    finally:
        w.end()


# -- capacity ---------------------------------------------------------------------------------

def test_room_for_slots(ov):
    """room_for refuses more keys than half the slots."""
    w = ov(nslots=16)
    assert w.room_for(8, 0) and not w.room_for(9, 0)
    publish(w, *[(1, i, 1, None) for i in range(5)])
    assert w.room_for(3, 0) and not w.room_for(4, 0)


def test_room_for_heap_ring(ov):
    """room_for checks the ring's contiguous free space, wrapping past the end when the
    head has moved on."""
    w = ov(heap_bytes=4096)
    assert w.room_for(1, 4096) and not w.room_for(1, 4097) and w.room_for(3, 0)
    publish(w, (1, 1, 1, b"a" * 2048), (1, 2, 2, b"b" * 2048))
    assert not w.room_for(1, 1) and w.room_for(1, 0)
    w.begin()
    w.release_through(1)  # frees [0, 2048): a wrapped blob must stay below the head
    w.end()
    assert w.room_for(1, 2047) and not w.room_for(1, 2048)
    publish(w, (1, 3, 3, b"c" * 1000))
    assert w.wrap and w.tail == w.heap_start + 1000
    assert OverlayReader(w.name).find(1, 3) == (3, b"c" * 1000)
    assert w.room_for(1, 1047) and not w.room_for(1, 1048)


@pytest.mark.parametrize("seed, release", [(s, r) for s in range(3) for r in (1 << 20, 4096)])
def test_ring_keeps_data_through_wraps(ov, seed, release, monkeypatch):
    """Records of random sizes published and enacted in order for many laps around a small
    ring, its pages given back late or as soon as possible: every live entry always reads its
    own record's data (a model comparison)."""
    import mpwal.overlay
    monkeypatch.setattr(mpwal.overlay, "RELEASE_BYTES", release)
    rng = random.Random(seed)
    w = ov(nslots=256, heap_bytes=4 * 8192)
    r = OverlayReader(w.name)
    model: dict = {}
    pending = []  # (rid, keys)
    rid = 0
    wrapped = 0
    for step in range(400):
        keys = rng.sample(range(60), rng.randint(1, 4))
        datas = [bytes([rid % 256]) * rng.randint(0, 3000) for _ in keys]
        need = sum(len(d) for d in datas)
        while not w.room_for(len(keys), need):  # enact the oldest records
            old, okeys = pending.pop(0)
            w.begin()
            w.remove_record([(1, k) for k in okeys], old)
            w.release_through(old)
            w.end()
            for k in okeys:
                if model.get(k, (0,))[0] == old:
                    del model[k]
        rid += 1
        off = w.stage(rid, b"".join(datas))
        w.begin()
        w.put_record(rid, [((1, k), d) for k, d in zip(keys, datas)], off)
        w.end()
        pending.append((rid, keys))
        wrapped += bool(w.wrap)
        for k, d in zip(keys, datas):
            model[k] = (rid, d)
        for k in range(60):
            assert r.find(1, k) == model.get(k), (step, k)
    assert wrapped > 10  # the test did go around


def test_ring_gives_pages_back(ov):
    """Enacted blobs' pages return to the system as the head passes them, and an empty ring
    starts over at the heap's start."""
    w = ov(nslots=1024, heap_bytes=8 << 20)
    publish(w, *[(1, i, i + 1, bytes(4096)) for i in range(512)])  # 2 MiB, one blob each
    w.begin()
    w.remove_record([(1, i) for i in range(400)], 0)  # no-op: wrong record ids
    for i in range(400):
        w.remove_if(1, i, i + 1)
    w.release_through(400)
    w.end()
    assert w.head == w.heap_start + 400 * 4096 and w.released > w.heap_start
    w.begin()
    for i in range(400, 512):
        w.remove_if(1, i, i + 1)
    w.release_through(512)
    w.end()
    assert w.used == 0 and w.head == w.tail == w.hwm == w.released == w.heap_start
    publish(w, (1, 5, 600, b"again"))
    assert OverlayReader(w.name).find(1, 5) == (600, b"again")


def test_remove_if_record_id_rule(ov):
    """remove_if removes only when the entry still holds that record; a newer write stays."""
    w = ov()
    r = OverlayReader(w.name)
    publish(w, (1, 1, 5, b"five"))
    publish(w, (1, 1, 6, b"six"))
    w.begin()
    assert w.remove_if(1, 1, 5) is False
    w.end()
    assert r.find(1, 1) == (6, b"six")
    w.begin()
    assert w.remove_if(1, 1, 6) is True
    assert w.remove_if(1, 1, 6) is False
    assert w.remove_if(1, 99, 1) is False
    w.end()
    assert r.find(1, 1) is None and w.get(1, 1) is None
    assert r.q[ENTRIES] == 0
    w.begin()
    w.release_through(6)  # blobs go with enactment, not with their entries
    w.end()
    assert w.used == 0


def test_remove_table(ov):
    """remove_table removes every key of one table; the other table's keys stay."""
    w = ov(nslots=128)
    publish(w, *[(t, i, i, b"%d-%d" % (t, i)) for t in (1, 2) for i in range(20)])
    w.begin()
    w.remove_table(1)
    w.end()
    r = OverlayReader(w.name)
    for i in range(20):
        assert r.find(1, i) is None
        assert r.find(2, i) == (i, b"2-%d" % i)
    assert r.q[ENTRIES] == 20
    check_probe_invariant(r)


def colliding_keys(seg, homes, count, table=1):
    """``count`` indices of ``table`` whose home slot is one of ``homes``."""
    targets = {HEADER_WORDS + h * SLOT_WORDS for h in homes}
    out = []
    i = 0
    while len(out) < count:
        if seg.home(table, i) in targets:
            out.append(i)
        i += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_backward_shift_under_heavy_collisions(ov, seed):
    """Random puts/removes on clustered, wrapping keys keep every key findable (dict model)."""
    rng = random.Random(seed)
    nslots = 32
    w = ov(nslots=nslots, heap_bytes=1 << 16)
    r = OverlayReader(w.name)
    # keys crowding the last two and the first two slots, so probe runs wrap around the end
    pool = [(1, i) for i in colliding_keys(w, [nslots - 2, nslots - 1, 0, 1], 30)]
    pool += [(2, i) for i in colliding_keys(w, [nslots - 1, 0], 10, table=2)]
    pool += [(1, i) for i in range(10_000, 10_010)]
    model: dict[tuple[int, int], tuple[int, bytes | None]] = {}
    rid = 0
    wrapped = 0  # steps where some probe run wrapped past the last slot
    for step in range(400):
        w.begin()
        op = rng.random()
        key = rng.choice(pool)
        if op < 0.55 and (key in model or len(model) < nslots * 3 // 4):
            rid += 1
            data = None if rng.random() < 0.1 else rng.randbytes(rng.randrange(0, 40))
            w.put(key[0], key[1], rid, data)
            model[key] = (rid, data)
        elif op < 0.97:
            if key in model:
                old = model[key][0]
                stale = rng.random() < 0.2
                assert w.remove_if(key[0], key[1], old - 1 if stale else old) is (not stale)
                if not stale:
                    del model[key]
            else:
                assert w.remove_if(key[0], key[1], rid) is False
        else:
            table = rng.choice([1, 2])
            w.remove_table(table)
            model = {k: v for k, v in model.items() if k[0] != table}
        w.end()
        for k in pool:
            want = model.get(k)
            assert r.find(*k) == want, (step, k)
            assert w.get(*k) == want
        assert r.q[ENTRIES] == len(model)
        check_probe_invariant(r)
        assert sorted((t, i) for t, i, _, _ in r.entries()) == sorted(model)
        wrapped += any(slot_of(r, *k) < r.home(*k) for k in model)
    assert wrapped > 50


def test_remove_from_full_cluster_every_position(ov):
    """Removing each key of a wrapping cluster in turn leaves all the others findable."""
    nslots = 16
    w0 = ov(nslots=nslots)
    keys = colliding_keys(w0, [nslots - 1], 7) + colliding_keys(w0, [0], 3)
    for victim in keys:
        w = ov(generation=2, nslots=nslots)
        publish(w, *[(1, k, k + 1, b"%d" % k) for k in keys])
        w.begin()
        assert w.remove_if(1, victim, victim + 1)
        w.end()
        r = OverlayReader(w.name)
        for k in keys:
            assert r.find(1, k) == (None if k == victim else (k + 1, b"%d" % k))
        check_probe_invariant(r)
        w.retire(CLOSED)


# -- drops ------------------------------------------------------------------------------------

def test_drops_round_trip(ov):
    """set_drops publishes (table, record id) pairs that writer and reader read back."""
    w = ov()
    r = OverlayReader(w.name)
    assert w.drops() == r.drops() == {}
    w.begin()
    w.set_drops({7: 30, 2: 31})
    w.end()
    assert w.drops() == r.drops() == {2: 31, 7: 30} and r.q[NDROPS] == 2
    w.begin()
    w.set_drops({7: 30})
    w.end()
    assert r.drops() == {7: 30}
    w.begin()
    w.set_drops({})
    w.end()
    assert r.drops() == {}


# -- generations ------------------------------------------------------------------------------

def test_copy_from(ov):
    """copy_from fills a bigger generation with every entry, counter and drop of the old one."""
    old = ov(generation=1, nslots=16, heap_bytes=4096)
    puts = [(1, i, 10 + i, b"v" * i) for i in range(5)] + [(2, 3, 20, None), (2, 4, 21, b"")]
    publish(old, *puts)
    old.begin()
    old.set_drops({9: 22})
    for word, v in ((COMMITTED, 22), (DURABLE, 21), (ENACTED, 9), (ENACTOR_PID, 4242)):
        old.q[word] = v
    old.end()
    new = ov(generation=2, nslots=64, heap_bytes=1 << 16)
    new.begin()
    new.copy_from(old)
    new.end()
    r = OverlayReader(new.name)
    for t, i, rid, data in puts:
        assert r.find(t, i) == (rid, data)
    assert [r.q[w] for w in (COMMITTED, DURABLE, ENACTED, ENACTOR_PID)] == [22, 21, 9, 4242]
    assert r.drops() == {9: 22} and r.q[ENTRIES] == len(puts) and r.q[GENERATION] == 2


def test_retire(ov):
    """retire marks seq SUPERSEDED, records state and next_gen, and unlinks the name."""
    w = ov(generation=4)
    publish(w, (1, 1, 1, b"still here"))
    r = OverlayReader(w.name)
    w.retire(SUPERSEDED_STATE, next_gen=5)
    assert r.q[SEQ] == SUPERSEDED and r.q[STATE] == SUPERSEDED_STATE and r.q[NEXT_GEN] == 5
    assert not os.path.exists("/dev/shm" + w.name)
    assert w.name not in stale_segments(ov.realpath)
    with pytest.raises(FileNotFoundError):
        OverlayReader(w.name)
    assert r.find(1, 1) == (1, b"still here")  # existing mappings stay valid
    assert w.get(1, 1) == (1, b"still here")
