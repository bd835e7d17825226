"""Unit tests of mpwal._applier: batching records, packing slots (both backends) and applying
them to the table files."""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest
from native_checks import native, needs_native
from hypothesis import given
from hypothesis import strategies as st

import mpwal
from mpwal._applier import BATCH_CHANGES, BATCH_RECORDS, Applier, batches, slot_runs
from mpwal._format import LogScan, encode_record


TABLES = [mpwal.IndexTable(1), mpwal.ValueTable(3, slot_size=16)]


def records(specs):
    """Decoded records from (drops, values) pairs, ids from 1."""
    buf = b"".join(encode_record(i, drops, {}, values) for i, (drops, values) in enumerate(specs, 1))
    return list(LogScan(buf).records())


def test_a_record_that_drops_starts_a_new_batch():
    recs = records([([], {(3, 1): b"a"}), ([], {(3, 2): b"b"}), ([3], {(3, 3): b"c"}),
                    ([], {(3, 4): b"d"}), ([3], {}), ([3], {})])
    assert [[r.record_id for r in b] for b in batches(recs)] == [[1, 2], [3, 4], [5], [6]]


def test_batches_are_bounded_in_records():
    recs = records([([], {(3, i % 7): b"x"}) for i in range(BATCH_RECORDS + 5)])
    assert [len(b) for b in batches(recs)] == [BATCH_RECORDS, 5]


def test_apply_writes_newest_values_and_drops_first(db):
    mpwal.Writer(db, TABLES, enactor="none").close()
    a = Applier(db)
    try:
        recs = records([([], {(3, 1): b"old", (3, 2): b"two"}), ([], {(3, 1): b"new"}),
                        ([3], {(3, 5): b"after"}), ([], {(3, 6): None})])
        for batch in batches(recs):
            a.apply(batch)
        a.sync()
    finally:
        a.close()
    with mpwal.Reader(db) as r:
        assert r.values(3, [1, 2, 5, 6]) == [None, None, b"after", None]  # record 3 dropped 1, 2


# -- the slot packing, and its native twin (DESIGN invariant 9) --------------------------------

slot_values = st.dictionaries(
    st.tuples(st.sampled_from([3, 4, 9]), st.one_of(st.integers(0, 40), st.integers(2**40, 2**40 + 3))),
    st.one_of(st.none(), st.binary(max_size=16)), max_size=30)


@given(values=slot_values)
def test_slot_runs_join_consecutive_slots_in_table_order(values):
    """The reference: one run per stretch of consecutive indices of a table, in (table, index)
    order, each slot its stored length + 1 (0: empty) and its data padded to the slot."""
    sizes = {3: 16, 4: 1 + 15, 9: 20}
    runs = slot_runs(values, sizes)
    assert [(t, f) for t, f, _ in runs] == sorted((t, f) for t, f, _ in runs)
    back = {}
    for tid, first, buf in runs:
        size = 4 + sizes[tid]
        assert len(buf) % size == 0 and buf
        for n in range(len(buf) // size):
            stored = int.from_bytes(buf[n * size:n * size + 4], "little")
            data = buf[n * size + 4:(n + 1) * size]
            back[(tid, first + n)] = None if stored == 0 else data[:stored - 1]
            assert not data[stored - 1 if stored else 0:].strip(b"\0")  # zero padding
    assert back == values
    assert sum(len(b) for _, _, b in runs) == sum(4 + sizes[t] for t, _ in values)


@needs_native
@given(values=slot_values)
def test_native_slot_runs_are_the_reference_byte_for_byte(values):
    sizes = {3: 16, 4: 16, 9: 20}
    assert native.slot_runs(values, sizes) == slot_runs(values, sizes)


@needs_native
def test_native_slot_runs_refuse_what_the_reference_refuses():
    for bad in ({(5, 1): b"x"}, {(3, 1): b"x" * 17}):
        with pytest.raises((KeyError, ValueError)) as ref:
            slot_runs(bad, {3: 16})
        with pytest.raises(ref.type):
            native.slot_runs(bad, {3: 16})
    with pytest.raises(TypeError):
        native.slot_runs({(3, 1): "text"}, {3: 16})


@needs_native
def test_native_slot_runs_keep_reference_counts():
    values = {(3, i): bytes([i]) * (i % 17) for i in range(0, 60, 1)}
    values[(3, 100)] = None
    sizes = {3: 16}
    watched = (values, sizes, values[(3, 5)])
    for _ in range(100):
        native.slot_runs(values, sizes)
    gc.collect()
    before = [sys.getrefcount(o) for o in watched]
    tracemalloc.start()
    snap1 = tracemalloc.take_snapshot()
    for _ in range(3000):
        native.slot_runs(values, sizes)
        try:
            native.slot_runs({(5, 1): b"x"}, sizes)
        except KeyError:
            pass
    gc.collect()
    snap2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert [sys.getrefcount(o) for o in watched] == before
    assert sum(s.size_diff for s in snap2.compare_to(snap1, "filename")) < 64 << 10


def test_batches_are_bounded_in_changes_and_never_split_a_record():
    recs = records([([], {(3, i * 1000 + j): b"x" for j in range(1000)}) for i in range(20)])
    sizes = [len(b) for b in batches(recs)]
    assert sum(sizes) == 20 and max(sizes) == BATCH_CHANGES // 1000 + 1 and len(sizes) > 1
