"""Unit tests of mpwal._logs.read_logs: the longest valid prefix across the log files of a directory."""

from __future__ import annotations

import os
import struct

import crcmod.predefined
import pytest

from mpwal._format import LogScan, encode_record
from mpwal._logs import Problem, read_logs


crc32 = crcmod.predefined.mkCrcFun("crc-32")


def rec(rid: int) -> bytes:
    """A small record with one value and, every third id, an index chunk and a drop."""
    chunks = {(1, rid): (0b101, {0: rid, 2: rid * 2})} if rid % 3 == 0 else {}
    drops = [7] if rid % 3 == 0 else []
    out = encode_record(rid, drops, chunks, {(2, rid): b"v%d" % rid})
    assert struct.unpack("<I", out[-4:])[0] == crc32(out[:-4])  # independent CRC check
    return out


def recs(first: int, last: int) -> bytes:
    return b"".join(rec(i) for i in range(first, last + 1))


@pytest.fixture
def d(tmp_path):
    return str(tmp_path)


def write_log(d: str, n: int, data: bytes) -> str:
    p = os.path.join(d, f"log{n}")
    with open(p, "wb") as f:
        f.write(data)
    return p


def ids(logset) -> list[int]:
    return [r.record_id for r in logset.records()]


def test_no_logs(d):
    """A directory with no logs: nothing valid, no problem, no last record."""
    ls = read_logs(d)
    assert (ls.valid, ls.empty, ls.discarded, ls.problem) == ([], [], [], None)
    assert ls.last_record_id is None and ids(ls) == []


def test_single_log(d):
    """One clean log: every record, its size and end, no problem."""
    data = recs(1, 5)
    write_log(d, 0, data)
    ls = read_logs(d)
    (lf,) = ls.valid
    assert (lf.log_id, lf.first_record, lf.size, lf.end) == (0, 1, len(data), len(data))
    assert ids(ls) == [1, 2, 3, 4, 5] and ls.problem is None and ls.last_record_id == 5
    assert ls.valid[0].records[2].ops == next(LogScan(rec(3)).records()).ops


def test_ordered_by_first_record_not_name(d):
    """Logs are read in first-record-id order, whatever their file names."""
    write_log(d, 7, recs(1, 3))
    write_log(d, 2, recs(4, 6))
    write_log(d, 10, recs(7, 8))
    write_log(d, 1, recs(9, 9))
    ls = read_logs(d)
    assert [lf.log_id for lf in ls.valid] == [7, 2, 10, 1]
    assert [lf.first_record for lf in ls.valid] == [1, 4, 7, 9]
    assert ids(ls) == list(range(1, 10)) and ls.problem is None and ls.last_record_id == 9


def test_prefix_may_start_after_cleaned_records(d):
    """The first log may start at any id (earlier logs were cleaned)."""
    write_log(d, 3, recs(1000, 1002))
    write_log(d, 4, recs(1003, 1003))
    ls = read_logs(d)
    assert ids(ls) == [1000, 1001, 1002, 1003] and ls.problem is None


def test_empty_files_listed_in_empty(d):
    """Empty log files (the pool) are listed in .empty and do not break the chain."""
    write_log(d, 0, b"")
    write_log(d, 5, recs(1, 2))
    write_log(d, 3, b"")
    write_log(d, 9, recs(3, 4))
    ls = read_logs(d)
    assert sorted(ls.empty) == [0, 3]
    assert ids(ls) == [1, 2, 3, 4] and ls.problem is None and ls.discarded == []


def test_only_empty_logs(d):
    """A directory whose logs are all empty has no records and no problem."""
    for n in range(3):
        write_log(d, n, b"")
    ls = read_logs(d)
    assert ls.empty == [0, 1, 2] and ls.valid == [] and ls.problem is None
    assert ls.last_record_id is None


def test_other_files_ignored(d):
    """Only files named log{digits} are logs."""
    write_log(d, 1, recs(1, 2))
    for name in ("log", "logx", "log1.tmp", "mpwal.meta", "blog3"):
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"\x00garbage")
    ls = read_logs(d)
    assert [lf.log_id for lf in ls.valid] == [1] and ls.problem is None and ls.discarded == []


def test_gap_between_logs(d):
    """A missing record between logs ends the prefix: problem "gap", later logs discarded."""
    write_log(d, 0, recs(1, 3))
    write_log(d, 1, recs(5, 6))  # record 4 is missing
    write_log(d, 2, recs(7, 8))
    ls = read_logs(d)
    assert ids(ls) == [1, 2, 3] and ls.last_record_id == 3
    assert [lf.log_id for lf in ls.valid] == [0]
    assert sorted(ls.discarded) == [1, 2]
    p = ls.problem
    assert (p.why, p.log_id, p.offset, p.record_id) == ("gap", 1, 0, 5)
    assert str(p) == "log1 at byte 0 in record 5: gap"


def test_overlapping_logs_are_a_gap(d):
    """A log that starts inside the previous one's range does not follow it: "gap"."""
    write_log(d, 0, recs(1, 4))
    write_log(d, 1, recs(3, 5))
    ls = read_logs(d)
    assert ids(ls) == [1, 2, 3, 4] and ls.problem.why == "gap" and ls.discarded == [1]


def test_torn_tail(d):
    """A torn last record ends the prefix at the end of the record before it."""
    good = recs(1, 3)
    for cut in (1, 5, 9, 12, len(rec(4)) - 1):
        write_log(d, 0, good + rec(4)[:cut])
        ls = read_logs(d)
        assert ids(ls) == [1, 2, 3] and ls.last_record_id == 3
        assert ls.valid[0].end == len(good) and ls.valid[0].size == len(good) + cut
        assert ls.problem.why == "torn" and ls.problem.offset == len(good)
        assert ls.problem.log_id == 0


def test_torn_tail_discards_later_logs(d):
    """Logs after a torn record are discarded even when they would follow it."""
    write_log(d, 0, recs(1, 2) + rec(3)[:-2])
    write_log(d, 1, recs(3, 4))
    ls = read_logs(d)
    assert ids(ls) == [1, 2] and ls.problem.why == "torn" and ls.discarded == [1]


def test_crc_error_in_middle(d):
    """A corrupt record ends the prefix before it; nothing after it is read."""
    data = bytearray(recs(1, 4))
    start2 = len(rec(1))
    data[start2 + len(rec(2)) - 7] ^= 0xFF  # a value data byte of record 2
    write_log(d, 0, bytes(data))
    write_log(d, 1, recs(5, 6))
    ls = read_logs(d)
    assert ids(ls) == [1] and ls.last_record_id == 1
    p = ls.problem
    assert (p.why, p.log_id, p.offset, p.record_id) == ("crc", 0, start2, 2)
    assert ls.discarded == [1]


def test_out_of_sequence_inside_log(d):
    """A record id that skips inside one log is "out of sequence"."""
    write_log(d, 0, recs(1, 2) + rec(4) + rec(5))
    ls = read_logs(d)
    assert ids(ls) == [1, 2]
    assert (ls.problem.why, ls.problem.record_id) == ("out of sequence", 4)


def test_no_first_record(d):
    """A log that does not start with a whole BEGIN is discarded with "no first record"."""
    write_log(d, 0, recs(1, 2))
    write_log(d, 1, b"\x00\x01\x02garbage")
    write_log(d, 2, rec(3)[:5])  # BEGIN cut short
    ls = read_logs(d)
    assert ids(ls) == [1, 2]
    assert sorted(ls.discarded) == [1, 2]
    assert ls.problem.why == "no first record" and ls.problem.record_id is None


def test_first_log_corrupt_first_record(d):
    """A first record failing its CRC leaves an empty prefix."""
    data = bytearray(recs(1, 2))
    data[len(rec(1)) - 6] ^= 1
    write_log(d, 0, bytes(data))
    ls = read_logs(d)
    assert ids(ls) == [] and ls.last_record_id is None and ls.problem.why == "crc"
    assert ls.valid == [] and ls.discarded == [0]  # not ordered by an id that does not verify


def test_keep_records_false_scans_without_keeping(d):
    """keep_records=False checks the logs (end, problem) but keeps no records."""
    write_log(d, 0, recs(1, 3))
    write_log(d, 1, recs(4, 5) + b"\x01")
    ls = read_logs(d, keep_records=False)
    assert [lf.records for lf in ls.valid] == [[], []]
    assert [lf.end for lf in ls.valid] == [len(recs(1, 3)), len(recs(4, 5))]
    assert ls.problem.why == "torn" and ls.problem.log_id == 1


def test_keep_records_false_last_record_id(d):
    """last_record_id is the newest valid record even when records are not kept."""
    write_log(d, 0, recs(1, 3))
    assert read_logs(d, keep_records=False).last_record_id == 3


def test_read_logs_only_reads(d):
    """read_logs changes nothing on disk, even for torn and discarded logs."""
    write_log(d, 0, recs(1, 2) + rec(3)[:4])
    write_log(d, 1, b"junk")
    write_log(d, 2, b"")
    before = {n: (os.stat(os.path.join(d, n)).st_size, os.stat(os.path.join(d, n)).st_mtime_ns)
              for n in os.listdir(d)}
    read_logs(d)
    after = {n: (os.stat(os.path.join(d, n)).st_size, os.stat(os.path.join(d, n)).st_mtime_ns)
             for n in os.listdir(d)}
    assert before == after


def test_problem_str_without_record():
    """Problem's str omits the record when it is unknown."""
    assert str(Problem(3, 0, "no first record", None)) == "log3 at byte 0: no first record"
