"""Unit tests of mpwal._format: the log record layout, its CRC, and LogScan's stopping rules.

Expected bytes are built here field by field from the layout in _format.py's top comment, and every
CRC is checked against crcmod's CRC-32, an implementation independent of zlib.
"""

from __future__ import annotations

import os
import struct

import crcmod.predefined
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpwal import _format as fmt
from mpwal._format import (
    BEGIN_RECORD,
    DROP_TABLE,
    END_RECORD,
    INSERT_INDEX,
    INSERT_VALUE,
    REMOVED,
    LogScan,
    Op,
    encode_record,
    entries_of,
    first_record_id,
)

crc32 = crcmod.predefined.mkCrcFun("crc-32")

U16 = 0xFFFF
U64 = (1 << 64) - 1


# -- hand-built bytes, one field at a time ------------------------------------------------------

def b_begin(rid: int) -> bytes:
    return struct.pack("<B", 1) + struct.pack("<Q", rid)


def b_drop(table: int) -> bytes:
    return struct.pack("<B", 5) + struct.pack("<H", table)


def b_index(table: int, chunk: int, mask: int, entries: list[int]) -> bytes:
    out = struct.pack("<B", 2) + struct.pack("<H", table) + struct.pack("<Q", chunk) + struct.pack("<Q", mask)
    for e in entries:
        out += struct.pack("<Q", e)
    return out


def b_value(table: int, index: int, data: bytes | None) -> bytes:
    out = struct.pack("<B", 3) + struct.pack("<H", table) + struct.pack("<Q", index)
    if data is None:
        return out + struct.pack("<I", 0xFFFFFFFF)
    return out + struct.pack("<I", len(data)) + data


def b_end(body_with_end_byte: bytes) -> bytes:
    """The END byte's 4-byte CRC trailer, computed by crcmod over BEGIN type byte .. END type byte."""
    return struct.pack("<I", crc32(body_with_end_byte))


def b_record(rid: int, *entries: bytes) -> bytes:
    body = b_begin(rid) + b"".join(entries) + struct.pack("<B", 4)
    return body + b_end(body)


def scan_all(buf, expect_id=None):
    scan = LogScan(buf, expect_id)
    return scan, list(scan.records())


def assert_crc_ok(rec: bytes) -> None:
    assert rec[-5] == END_RECORD
    assert struct.unpack("<I", rec[-4:])[0] == crc32(rec[:-4])


# Entries of every kind, used by the truncation and corruption tests.
MIXED_ENTRIES = (
    b_drop(9),
    b_index(1, 3, (1 << 0) | (1 << 5) | (1 << 63), [11, 22, U64]),
    b_value(2, 7, b"hello"),
    b_value(2, 8, None),
    b_value(2, 9, b""),
)
MIXED = b_record(42, *MIXED_ENTRIES)


# -- constants and the CRC --------------------------------------------------------------------

def test_constants_match_documented_layout():
    """Type bytes and REMOVED have the values the format comment documents."""
    assert (BEGIN_RECORD, INSERT_INDEX, INSERT_VALUE, END_RECORD, DROP_TABLE) == (1, 2, 3, 4, 5)
    assert REMOVED == 0xFFFFFFFF
    assert fmt.BEGIN_SIZE == 9 and fmt.END_SIZE == 5 and fmt.CHUNK_BYTES == 512


def test_crcmod_is_the_ieee_crc32():
    """The independent CRC used as an oracle is CRC-32/IEEE (check value of '123456789')."""
    assert crc32(b"123456789") == 0xCBF43926


def test_encode_matches_hand_built_bytes():
    """encode_record lays out exactly the bytes the documented layout gives, CRC included."""
    rec = encode_record(
        42,
        [9],
        {(1, 3): ((1 << 0) | (1 << 5) | (1 << 63), {63: U64, 0: 11, 5: 22})},
        {(2, 7): b"hello", (2, 8): None, (2, 9): b""},
    )
    assert rec == MIXED
    assert_crc_ok(rec)


def test_empty_record_layout():
    """A record with no entries is BEGIN, id, END, crc: 14 bytes."""
    rec = encode_record(1, [], {}, {})
    assert rec == (b"\x01" + b"\x01\0\0\0\0\0\0\0" + b"\x04"
                   + struct.pack("<I", crc32(b"\x01" + b"\x01" + bytes(7) + b"\x04")))
    assert len(rec) == 14
    assert_crc_ok(rec)


# -- decoding hand-written bytes, one entry kind at a time ---------------------------------------

def test_decode_begin_end_only():
    """A bare BEGIN/END record decodes to its id, no ops, start 0 and end past the CRC."""
    rec = b_record(7)
    scan, recs = scan_all(rec)
    assert [(r.record_id, r.ops, r.start, r.end) for r in recs] == [(7, [], 0, len(rec))]
    assert scan.problem is None and scan.end == len(rec)


def test_decode_max_record_id():
    """The record id is a full little-endian u64."""
    _, recs = scan_all(b_record(U64 - 1))
    assert recs[0].record_id == U64 - 1


def test_decode_drop_table():
    """DROP_TABLE decodes to Op(DROP_TABLE, table)."""
    _, recs = scan_all(b_record(1, b_drop(0x1234), b_drop(U16)))
    assert recs[0].ops == [Op(DROP_TABLE, 0x1234), Op(DROP_TABLE, U16)]


def test_decode_insert_index_with_mask():
    """INSERT_INDEX carries popcount(mask) u64 entries, lowest bit first."""
    mask = (1 << 2) | (1 << 40) | (1 << 63)
    entries = [0x0102030405060708, 0, U64]
    _, recs = scan_all(b_record(5, b_index(3, 1 << 53, mask, entries)))
    (op,) = recs[0].ops
    assert op == Op(INSERT_INDEX, 3, 1 << 53, mask, struct.pack("<3Q", *entries))
    assert list(entries_of(op.mask, op.data)) == [(2, entries[0]), (40, 0), (63, U64)]


def test_decode_insert_index_full_and_empty_mask():
    """A full mask carries 64 entries; a zero mask carries none."""
    full = list(range(100, 164))
    _, recs = scan_all(b_record(1, b_index(1, 0, U64, full), b_index(1, 1, 0, [])))
    a, b = recs[0].ops
    assert len(a.data) == 512 and list(entries_of(a.mask, a.data)) == list(enumerate(full))
    assert b == Op(INSERT_INDEX, 1, 1, 0, b"") and list(entries_of(0, b"")) == []


def test_decode_insert_value_with_length():
    """INSERT_VALUE with a u32 length carries that many data bytes, including zero."""
    _, recs = scan_all(b_record(1, b_value(4, 99, b"abc\x00\xff"), b_value(4, 100, b"")))
    assert recs[0].ops == [Op(INSERT_VALUE, 4, 99, 0, b"abc\x00\xff"), Op(INSERT_VALUE, 4, 100, 0, b"")]


def test_decode_insert_value_removed():
    """INSERT_VALUE with length 0xFFFFFFFF is a removal: data None, no data bytes follow."""
    rec = b_record(1, b_value(4, 5, None), b_value(4, 6, b"x"))
    _, recs = scan_all(rec)
    assert recs[0].ops == [Op(INSERT_VALUE, 4, 5, 0, None), Op(INSERT_VALUE, 4, 6, 0, b"x")]
    assert len(rec) == 9 + 15 + 15 + 1 + 5


def test_decode_mixed_record_in_file_order():
    """All entry kinds in one record decode in file order."""
    scan, recs = scan_all(MIXED)
    assert recs[0].ops == [
        Op(DROP_TABLE, 9),
        Op(INSERT_INDEX, 1, 3, (1 << 0) | (1 << 5) | (1 << 63), struct.pack("<3Q", 11, 22, U64)),
        Op(INSERT_VALUE, 2, 7, 0, b"hello"),
        Op(INSERT_VALUE, 2, 8, 0, None),
        Op(INSERT_VALUE, 2, 9, 0, b""),
    ]
    assert scan.problem is None


def test_decode_consecutive_records_offsets():
    """Several records in one buffer decode with contiguous start/end offsets."""
    a, b, c = b_record(10), b_record(11, b_drop(1)), b_record(12, b_value(1, 1, b"z"))
    scan, recs = scan_all(a + b + c)
    assert [(r.record_id, r.start, r.end) for r in recs] == [
        (10, 0, len(a)), (11, len(a), len(a) + len(b)), (12, len(a) + len(b), len(a + b + c))]
    assert scan.end == len(a + b + c) and scan.problem is None and scan.expect_id == 13


def test_logscan_accepts_bytearray_and_memoryview():
    """LogScan reads from any buffer, and returned data are bytes, not views."""
    for buf in (bytearray(MIXED), memoryview(MIXED)):
        _, recs = scan_all(buf)
        assert all(type(op.data) in (bytes, type(None)) for op in recs[0].ops)


def test_empty_buffer_is_clean():
    """An empty log has no records and no problem."""
    scan, recs = scan_all(b"")
    assert recs == [] and scan.problem is None and scan.end == 0


def test_first_record_id():
    """first_record_id reads the first BEGIN's id, else None (short, empty, or wrong type)."""
    assert first_record_id(b_record(77) + b"junk") == 77
    assert first_record_id(b_begin(5)) == 5
    assert first_record_id(b_begin(5)[:8]) is None
    assert first_record_id(b"") is None
    assert first_record_id(b"\x04" + bytes(8)) is None


def test_entries_of_sparse_mask():
    """entries_of pairs each set mask bit with the next value."""
    data = struct.pack("<4Q", 1, 2, 3, 4)
    assert list(entries_of(0b1010_0101, data)) == [(0, 1), (2, 2), (5, 3), (7, 4)]


# -- round trip ------------------------------------------------------------------------------

u16 = st.integers(0, U16)
u64 = st.integers(0, U64)
chunk_entries = st.dictionaries(st.integers(0, 63), u64, max_size=64)
chunks_st = st.dictionaries(st.tuples(u16, st.integers(0, 1 << 53)), chunk_entries, max_size=4)
values_st = st.dictionaries(
    st.tuples(u16, u64), st.one_of(st.none(), st.binary(max_size=64)), max_size=6)
drops_st = st.lists(u16, unique=True, max_size=3)


def expected_ops(drops, chunks, values):
    ops = [Op(DROP_TABLE, t) for t in drops]
    for (t, c), (mask, ents) in chunks.items():
        ops.append(Op(INSERT_INDEX, t, c, mask, struct.pack(f"<{len(ents)}Q", *(ents[e] for e in sorted(ents)))))
    for (t, i), d in values.items():
        ops.append(Op(INSERT_VALUE, t, i, 0, d))
    return ops


def mask_of(ents: dict) -> int:
    m = 0
    for e in ents:
        m |= 1 << e
    return m


@settings(max_examples=100, deadline=None)
@given(rid=u64, drops=drops_st, chunks=chunks_st, values=values_st)
def test_roundtrip_one_record(rid, drops, chunks, values):
    """encode_record then LogScan gives back the same id and ops; the CRC agrees with crcmod."""
    chunks = {k: (mask_of(v), v) for k, v in chunks.items()}
    rec = encode_record(rid, drops, chunks, values)
    assert_crc_ok(rec)
    scan, recs = scan_all(rec)
    assert scan.problem is None and scan.end == len(rec)
    assert len(recs) == 1 and recs[0].record_id == rid
    assert recs[0].ops == expected_ops(drops, chunks, values)
    for op in recs[0].ops:
        if op.kind == INSERT_INDEX:
            assert dict(entries_of(op.mask, op.data)) == chunks[(op.table, op.key)][1]


@settings(max_examples=30, deadline=None)
@given(first=st.integers(0, 1 << 40),
       bodies=st.lists(st.tuples(drops_st, chunks_st, values_st), min_size=1, max_size=5))
def test_roundtrip_sequence(first, bodies):
    """A run of consecutive records decodes whole, in order, with expect_id checked."""
    recs_in = []
    buf = b""
    for n, (drops, chunks, values) in enumerate(bodies):
        chunks = {k: (mask_of(v), v) for k, v in chunks.items()}
        rec = encode_record(first + n, drops, chunks, values)
        assert_crc_ok(rec)
        recs_in.append(expected_ops(drops, chunks, values))
        buf += rec
    scan, recs = scan_all(buf, first)
    assert scan.problem is None and scan.end == len(buf)
    assert [r.record_id for r in recs] == list(range(first, first + len(bodies)))
    assert [r.ops for r in recs] == recs_in


# -- where scanning stops ---------------------------------------------------------------------

@pytest.mark.parametrize("rec", [MIXED, b_record(3), b_record(3, b_index(1, 0, U64, list(range(64))))],
                         ids=["mixed", "empty", "full-chunk"])
def test_torn_at_every_truncation_offset(rec):
    """Cutting a record at any byte stops the scan with "torn" and yields no part of it."""
    for k in range(1, len(rec)):
        scan, recs = scan_all(rec[:k])
        assert recs == [], k
        assert scan.problem == "torn", (k, scan.problem)
        assert scan.end == 0


def test_torn_tail_after_good_records_keeps_prefix():
    """A torn last record leaves every whole record before it, and end at its start."""
    good = b_record(1) + b_record(2, b_value(1, 1, b"a"))
    third = b_record(3, *MIXED_ENTRIES)
    for k in range(1, len(third)):
        scan, recs = scan_all(good + third[:k])
        assert [r.record_id for r in recs] == [1, 2]
        assert scan.problem == "torn" and scan.end == len(good)


def test_torn_problem_record_known_once_begin_is_whole():
    """Once the BEGIN is whole, a torn record reports its id."""
    scan, _ = scan_all(MIXED[:-1])
    assert scan.problem == "torn" and scan.problem_record == 42


def test_torn_by_oversized_value_length():
    """A value length running past the buffer is torn, not an over-read."""
    rec = b_begin(1) + struct.pack("<BHQI", 3, 1, 1, 1000) + b"short"
    scan, recs = scan_all(rec)
    assert recs == [] and scan.problem == "torn" and scan.problem_record == 1


@pytest.mark.parametrize("offset", [5, 13, 20, 40, 60, -4, -3, -1])
def test_crc_on_flipped_covered_byte(offset):
    """A flipped byte in the id, a table id, a key, an index entry or the CRC gives "crc"."""
    # offsets in MIXED: record id, index table id, index chunk, index entry value,
    # value index, the crc bytes (first, second, last)
    buf = bytearray(MIXED)
    pos = offset % len(buf)
    buf[pos] ^= 0x40
    scan, recs = scan_all(bytes(buf))
    assert recs == [] and scan.problem == "crc" and scan.end == 0
    assert scan.problem_record == struct.unpack_from("<Q", buf, 1)[0]


def test_crc_on_flipped_value_byte():
    """Flipping any data byte of a value gives "crc" with the record's id."""
    rec = b_record(8, b_value(1, 2, b"payload"))
    start = len(rec) - 5 - 7
    for i in range(start, start + 7):
        buf = bytearray(rec)
        buf[i] ^= 0x01
        scan, recs = scan_all(bytes(buf))
        assert (recs, scan.problem, scan.problem_record) == ([], "crc", 8)


def test_every_single_bit_flip_is_rejected():
    """No single-bit flip anywhere in a record lets it through; the prefix before it stays."""
    good = b_record(41)
    for i in range(len(MIXED)):
        for bit in range(8):
            buf = bytearray(good + MIXED)
            buf[len(good) + i] ^= 1 << bit
            scan, recs = scan_all(bytes(buf))
            assert [r.record_id for r in recs] == [41], (i, bit)
            assert scan.problem in ("crc", "torn", "bad type", "out of sequence"), (i, bit)
            assert scan.end == len(good)


def test_bad_type_at_record_start():
    """A first byte that is not BEGIN_RECORD is "bad type" with no record id."""
    for first in (0, 2, 3, 4, 5, 0xFF):
        scan, recs = scan_all(bytes([first]) + MIXED[1:])
        assert (recs, scan.problem, scan.problem_record, scan.end) == ([], "bad type", None, 0)


def test_bad_type_after_good_record():
    """Zero bytes after a good record (a preallocated tail) stop with "bad type" after it."""
    good = b_record(1)
    scan, recs = scan_all(good + bytes(16))
    assert [r.record_id for r in recs] == [1]
    assert scan.problem == "bad type" and scan.end == len(good)


@pytest.mark.parametrize("kind", [0, 1, 6, 0x7F, 0xFF])
def test_bad_type_for_entry(kind):
    """An unknown entry type byte inside a record is "bad type" with the record's id."""
    body = b_begin(9) + bytes([kind]) + bytes(20)
    scan, recs = scan_all(body)
    assert recs == [] and scan.problem == "bad type" and scan.problem_record == 9


def test_out_of_sequence_with_expect_id():
    """With expect_id, a first record with another id is "out of sequence" and nothing is read."""
    scan, recs = scan_all(b_record(5) + b_record(6), expect_id=4)
    assert recs == [] and scan.problem == "out of sequence"
    assert scan.problem_record == 5 and scan.end == 0


def test_expect_id_matching_reads_all():
    """With a matching expect_id every record is read and expect_id moves past the last."""
    scan, recs = scan_all(b_record(5) + b_record(6), expect_id=5)
    assert [r.record_id for r in recs] == [5, 6] and scan.problem is None and scan.expect_id == 7


@pytest.mark.parametrize("second", [3, 4, 6, 4 + (1 << 40)])
def test_out_of_sequence_inside_buffer(second):
    """A record whose id is not the previous one plus one stops the scan after the previous."""
    first = b_record(4)
    scan, recs = scan_all(first + b_record(second) + b_record(second + 1))
    assert [r.record_id for r in recs] == [4]
    assert scan.problem == "out of sequence" and scan.problem_record == second
    assert scan.end == len(first)


def test_records_iterator_is_lazy_and_stops_for_good():
    """records() yields good records before seeing a later problem, and ends at it."""
    buf = b_record(1) + b_record(2) + b"\x01\x03"
    scan = LogScan(buf)
    it = scan.records()
    assert next(it).record_id == 1
    assert scan.problem is None
    assert next(it).record_id == 2
    with pytest.raises(StopIteration):
        next(it)
    assert scan.problem == "torn" and scan.end == len(buf) - 2


def test_a_change_set_needs_no_writer_and_encodes_what_the_writer_logs(tmp_path):
    """A ChangeSet built from the catalog alone (as a producer process would) validates like a
    Record and encodes the very bytes the writer appends for the same changes."""
    import mpwal
    from mpwal._logs import read_logs
    from mpwal._record import ChangeSet
    from mpwal._tables import load_catalog

    path = str(tmp_path / "db")
    tables = [mpwal.IndexTable(1), mpwal.ValueTable(3, slot_size=8)]
    mpwal.Writer(path, tables, enactor="none").close()
    cs = ChangeSet(load_catalog(path))
    cs.insert_value(3, 4, b"four")
    cs.insert_index(1, 2, 7, 0xABC)
    cs.drop_table(3)
    cs.insert_value(3, 5, None)
    with pytest.raises(mpwal.ValueTooLargeError):
        cs.insert_value(3, 1, b"too long!")
    with pytest.raises(mpwal.TableError):
        cs.insert_index(3, 0, 0, 1)
    with mpwal.Writer(path, tables, enactor="none", log_age=1000) as w:
        with w.record() as rec:
            rec.insert_value(3, 4, b"four")
            rec.insert_index(1, 2, 7, 0xABC)
            rec.drop_table(3)
            rec.insert_value(3, 5, None)
        logged = [r for r in read_logs(path).records() if r.record_id == rec.record_id][0]
        with open(os.path.join(path, f"log{read_logs(path).valid[-1].log_id}"), "rb") as f:
            raw = f.read()[logged.start:logged.end]
    assert cs.encode(rec.record_id) == raw
