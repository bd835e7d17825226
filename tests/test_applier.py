"""Unit tests of mpwal._applier: batching records and applying them to the table files."""

from __future__ import annotations

import mpwal
from mpwal._applier import BATCH_RECORDS, Applier, batches
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
