"""The writer's intake on the native backend (mpwal/_native_record.c, and ``blob_size`` in
mpwal/_native.c) against its Python reference (DESIGN invariant 9): the same records give the
same log bytes, the same gathered changes, the same overlay sizes and the same errors, and
reference counts do not move over many calls."""

from __future__ import annotations

import os
import zlib

import crcmod
import pytest
from native_checks import assert_no_leaks, native, needs_native
from hypothesis import given, settings
from hypothesis import strategies as st

import mpwal
from mpwal import _backend
from mpwal._format import LogScan, encode_record
from mpwal._overlay import OverlayWriter
from mpwal._record import ChangeSet
from mpwal._tables import IndexTable, ValueTable

CATALOG = {1: ValueTable(1, slot_size=64), 2: ValueTable(2, slot_size=8), 3: IndexTable(3),
           65535: ValueTable(65535, slot_size=16)}
crc32_ieee = crcmod.predefined.mkCrcFun("crc-32")  # the tests' independent CRC

value_keys = st.tuples(st.sampled_from([1, 2, 65535]), st.integers(0, 2**40 // 70))
values = st.dictionaries(value_keys, st.one_of(st.none(), st.binary(max_size=16)), max_size=12)
chunks = st.dictionaries(
    st.tuples(st.just(3), st.integers(0, 2**31 - 1)),
    st.dictionaries(st.integers(0, 63), st.integers(0, 2**64 - 1), min_size=1, max_size=64),
    max_size=4)


def as_chunks(drawn: dict) -> dict:
    """{(table, chunk): [mask, {entry: u64}]}: how a ChangeSet holds index changes."""
    return {k: [sum(1 << e for e in entries), dict(entries)] for k, entries in drawn.items()}


@needs_native
@settings(max_examples=300, deadline=None)
@given(rid=st.integers(0, 2**64 - 1), drops=st.lists(st.sampled_from([1, 2, 3, 65535]),
                                                      unique=True, max_size=3),
       drawn=chunks, vals=values)
def test_native_encoding_is_the_reference_byte_for_byte(rid, drops, drawn, vals):
    """Any record (drops, index chunks, values, removals, the largest ids) encodes to the same
    bytes in both backends, its CRC is the IEEE CRC-32 of crcmod, and it decodes back."""
    ch = as_chunks(drawn)
    ref = encode_record(rid, drops, ch, vals)
    got = native.encode(rid, drops, ch, vals)
    assert got == ref
    assert int.from_bytes(got[-4:], "little") == crc32_ieee(got[:-4]) == zlib.crc32(got[:-4])
    scan = LogScan(got)
    (rec,) = list(scan.records())
    assert rec.record_id == rid and scan.problem is None and scan.end == len(got)


@needs_native
@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(
    st.one_of(st.integers(-3, 2**40), st.booleans(), st.floats(allow_nan=False), st.just("7")),
    st.one_of(st.none(), st.binary(max_size=70), st.just(bytearray(b"ab")), st.just(7))),
    max_size=8), as_tuple=st.booleans())
def test_native_gather_keeps_the_references_answers_and_errors(pairs, as_tuple):
    """insert_values with any pairs, valid or not: both backends leave the same changes in the
    record, or raise the same exception with the same message and leave it as it was."""
    def run():
        cs = ChangeSet(CATALOG)
        cs.insert_value(1, 5, b"before")
        try:
            cs.insert_values(1, tuple(pairs) if as_tuple else list(pairs))
        except mpwal.Error as e:
            return cs._values, (type(e), str(e))
        return cs._values, None

    with _backend.python_backend():
        ref = run()
    got = run()
    assert got == ref
    assert [type(v) for v in got[0].values()] == [type(v) for v in ref[0].values()]


@needs_native
def test_native_gather_takes_only_what_it_checked():
    """The fast path stores nothing until every pair passed (all or nothing), takes a generator
    once, and hands bools, int subclasses and bytearrays to the reference loop."""
    cs = ChangeSet(CATALOG)
    with pytest.raises(mpwal.ValueTooLargeError):
        cs.insert_values(2, [(1, b"ok"), (2, b"nine byte")])
    assert cs._values == {}
    cs.insert_values(2, ((i, b"%d" % i) for i in range(3)))
    assert cs._values == {(2, 0): b"0", (2, 1): b"1", (2, 2): b"2"}
    with pytest.raises(mpwal.ArgumentTypeError):
        cs.insert_values(2, [(True, b"x")])
    cs.insert_values(2, [(0, bytearray(b"ba"))])
    assert cs._values[(2, 0)] == b"ba" and type(cs._values[(2, 0)]) is bytes
    with pytest.raises(mpwal.ArgumentTypeError, match="iterable"):
        cs.insert_values(2, 5)  # type: ignore[arg-type]
    assert native.gather({}, 2, iter([]), 10, 8) is False  # not a list or tuple: the caller's


@needs_native
@given(datas=st.lists(st.one_of(st.none(), st.binary(max_size=600)), max_size=20))
def test_native_blob_size_is_the_reference(datas):
    with _backend.python_backend():
        ref = OverlayWriter.blob_size(datas)
    assert native.blob_size(datas) == ref == OverlayWriter.blob_size(iter(datas))


@needs_native
def test_native_encode_refuses_what_the_format_cannot_hold():
    """What no ChangeSet makes still gets an exception, never bytes: a table past u16, an entry
    in the mask without a value, a value that is not bytes."""
    with pytest.raises(OverflowError):
        native.encode(1, [], {}, {(70000, 1): b"x"})
    with pytest.raises(OverflowError):
        native.encode(-1, [], {}, {})
    with pytest.raises(KeyError):
        native.encode(1, [], {(3, 0): [0b11, {0: 5}]}, {})
    with pytest.raises(TypeError):
        native.encode(1, [], {}, {(1, 1): "text"})
    with pytest.raises(TypeError):
        native.encode(1, (), {}, {})


@needs_native
def test_native_intake_keeps_reference_counts():
    """Many rounds of gather, encode and blob_size: no object's count moves and memory stays."""
    data = [bytes([i]) * 10 for i in range(50)]
    pairs = [(i, d) for i, d in enumerate(data)] + [(60, None)]
    ch = {(3, 1): [0b101, {0: 1, 2: 2**64 - 1}]}
    watched = (data[0], data[-1], pairs, ch)

    def run(n):
        for _ in range(n):
            vals: dict = {}
            assert native.gather(vals, 1, pairs, 1000, 64)
            native.gather(vals, 1, [(1, 1.5)], 1000, 64)
            native.encode(7, [2], ch, vals)
            native.blob_size(vals.values())
            try:
                native.encode(1, [], {}, {(1, 1): "x"})
            except TypeError:
                pass

    assert_no_leaks(run, watched)


@needs_native
def test_native_keys_leave_the_garbage_collector_alone(tmp_path):
    """Keys the native gather makes and the blob's tuple of them are not tracked by the garbage
    collector (nothing but ints in them), and neither is the writer's dict of keys: a full
    collection walks none of the overlay's keys."""
    import gc

    cs = ChangeSet(CATALOG)
    cs.insert_values(1, [(i, b"v") for i in range(50)])
    assert not any(gc.is_tracked(k) for k in cs._values) and not gc.is_tracked(cs._values)
    w = OverlayWriter(os.path.realpath(str(tmp_path)), 1, 256, 1 << 16)
    try:
        w.publish(1, cs._values.items(), size=OverlayWriter.blob_size(cs._values.values()))
        keys = w.blobs[0][3]
        assert keys == tuple(cs._values) and not gc.is_tracked(keys)
    finally:
        w.retire(3)


# -- what a review of the native code found (each failed before its fix) ----------------------

@needs_native
def test_native_encode_holds_what_python_code_may_free_during_a_lookup():
    """An entry key whose __eq__ runs during encode's lookup and replaces the chunk's entries
    (ChangeSet now stores plain ints, so only a direct call can do this): encode holds what it
    reads, and gives bytes or an error, never reads freed memory (was a segfault)."""
    chunks: dict = {}

    class Evil(int):
        __hash__ = int.__hash__

        def __eq__(self, other):
            c = chunks.get((3, 0))
            if c is not None:
                c[1] = {}
                chunks.clear()
                junk.extend(b"\xff" * 2230 for _ in range(64))  # reuse the freed memory
            return int(self) == other

    junk: list = []
    entries = {e: e for e in range(2, 64)}
    entries[Evil(1)] = 1
    chunks[(3, 0)] = [sum(1 << e for e in range(1, 64)), entries]
    try:
        out = native.encode(7, [], chunks, {})
    except RuntimeError:
        return
    assert LogScan(out).records() is not None and len(out) == 9 + 19 + 8 * 63 + 5


@needs_native
def test_native_slot_runs_hold_the_values_a_finalizer_clears():
    """A garbage collection inside slot_runs (its allocations) runs a finalizer that empties the
    values dict: the packed bytes are still the values' (was a use-after-free)."""
    import gc

    from mpwal._applier import slot_runs
    values = {(t, 0): bytes([t]) * 4000 for t in range(1, 4)}
    sizes = {t: 4096 for t in range(1, 4)}
    expect = slot_runs(dict(values), sizes)

    class Bomb:
        def __init__(self):
            self.me = self

        def __del__(self):
            values.clear()

    keep = [(i, i, i) for i in range(3000)]  # drain the tuple free list
    gc.collect()
    gc.disable()
    Bomb()
    old = gc.get_threshold()
    gc.set_threshold(1)
    gc.enable()
    try:
        runs = native.slot_runs(values, sizes)
    finally:
        gc.set_threshold(*old)
    assert runs == expect and keep


@needs_native
def test_native_link_and_unlink_refuse_a_segment_of_another_shape():
    """A shift that does not match slots_end (the hash would land outside the slots), a
    misplaced blob offset: a ValueError, not a write or read out of bounds (was a segfault)."""
    m = bytearray(8192)
    with pytest.raises(ValueError):
        native.link(m, 1, [((0, 5), None)], (), 4096 + 64, 2, 520)
    with pytest.raises(ValueError):  # the right shape (16 slots), a blob inside the slots
        native.link(m, 1, [((0, 5), None)], (), 4096 + 64, 60, 512 + 64)
    with pytest.raises(ValueError):
        native.unlink(m, 4096, ((0, 5),), 2, 520)


@needs_native
def test_native_link_links_every_pair_of_a_one_shot_iterator(tmp_path):
    """link prefetches the home slots of a list's, tuple's or dict's pairs in a first pass; a
    generator can be iterated once only, so it gets no first pass, and all its pairs are
    linked all the same."""
    real = os.path.realpath(str(tmp_path))
    segs = [OverlayWriter(real, g, 64, 1 << 14) for g in (1, 2)]
    try:
        pairs = [((1, i), bytes([i]) * i) for i in range(10)]
        size = OverlayWriter.blob_size([d for _, d in pairs])
        got = []
        for w, items in zip(segs, (list(pairs), (p for p in pairs))):
            off = w._alloc(size)
            keys, added = native.link(w.m, 1, items, (), off, w.shift, w.slots_end)
            got.append((keys, added, bytes(w.m[w.slots_end * 8:])))
            assert [w.versions(1, i) for i in range(10)] == [[(1, d)] for _, d in pairs]
        assert got[0] == got[1] and got[0][1] == 10
    finally:
        for w in segs:
            w.retire(3)
