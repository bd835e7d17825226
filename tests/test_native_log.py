"""The native log decoder (mpwal/_native_log.c) against its Python reference, LogScan.

Logs are built with ``encode_record`` (and by hand, for what the encoder never writes), then
damaged: torn at every byte, bytes flipped, type bytes and lengths changed, ids out of sequence,
garbage. Both backends must show the same scan (``fuzz_log.agree``): every record with every
field and byte, and ``end``, ``problem``, ``problem_record``, ``expect_id`` and ``header`` after
each record, since ``records()`` is a generator that callers stop early. Reference counts and
memory must not move over many scans, and the fuzz target (tests/fuzz_log.py) runs for a while.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpwal import _backend, _format as fmt
from mpwal._format import LogScan, Op, Record, encode_log_header, encode_record

import fuzz_log
from fuzz_log import agree
from native_checks import assert_no_leaks, native, needs_native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = needs_native

U16 = 0xFFFF
U64 = (1 << 64) - 1


def mixed(rid: int) -> bytes:
    """A record with an entry of every kind (a drop, an index chunk, a value, a removal, an
    empty value)."""
    return encode_record(rid, [9], {(1, 3): ((1 << 0) | (1 << 5) | (1 << 63), {0: 11, 5: 22, 63: U64})},
                         {(2, 7): b"hello", (2, 8): None, (2, 9): b""})


def raw_record(rid: int, *entries: bytes, crc_ok: bool = True) -> bytes:
    """A record of hand-made entries (which may lie) and its CRC (correct unless not)."""
    body = struct.pack("<BQ", fmt.BEGIN_RECORD, rid) + b"".join(entries) + bytes([fmt.END_RECORD])
    return body + struct.pack("<I", zlib.crc32(body) ^ (0 if crc_ok else 1))


def value(table: int, index: int, length: int, data: bytes = b"") -> bytes:
    return struct.pack("<BHQI", fmt.INSERT_VALUE, table, index, length) + data


def index(table: int, chunk: int, mask: int, data: bytes) -> bytes:
    return struct.pack("<BHQQ", fmt.INSERT_INDEX, table, chunk, mask) + data


HEADER = encode_log_header(bytes(range(16)), 3)
LOG = HEADER + b"".join(mixed(i) for i in range(5, 9))
EXPECTS = (None, 5, 4, 6, -1, 1 << 64)
# a record longer than pymalloc's largest block (512 bytes): a buffer that starts with it is
# malloc's, whose bounds AddressSanitizer knows to the byte (in the sanitizer run)
BIG = encode_record(4, [], {}, {(1, 1): bytes(range(256)) * 3})


def exact(buf: bytes):
    """A copy of ``buf`` in a buffer of exactly its length: no trailing NUL as bytes have, so
    a read one byte past the end is outside it."""
    return (ctypes.c_char * len(buf)).from_buffer_copy(buf)


def agree_exact(buf: bytes, expect_id=None) -> None:
    """``agree``, and the native scan of an exact copy gives what the scan of bytes gives."""
    agree(buf, expect_id)
    assert len(buf) > 512
    args = (0, expect_id, 1 << 20, 1 << 30, Op, Record)
    assert native.scan_log(exact(buf), *args) == native.scan_log(buf, *args)


# -- valid logs ----------------------------------------------------------------------------

u16 = st.integers(0, U16)
u64 = st.integers(0, U64)
record_st = st.tuples(
    st.lists(u16, max_size=3),  # drops
    st.dictionaries(st.tuples(u16, u64), st.dictionaries(st.integers(0, 63), u64, max_size=64),
                    max_size=3),  # chunks: (table, chunk) -> {entry: u64}
    st.dictionaries(st.tuples(u16, u64), st.one_of(st.none(), st.binary(max_size=300)),
                    max_size=8))  # values


def encode(rid: int, drops, chunks, values) -> bytes:
    masked = {key: (sum(1 << e for e in ents), ents) for key, ents in chunks.items()}
    return encode_record(rid, drops, masked, values)


def build_log(first: int, recs, header: bool) -> tuple[bytes, list[int]]:
    """A log of ``recs`` from id ``first`` on; its bytes and each record's start."""
    out = [HEADER] if header else []
    starts = []
    pos = len(HEADER) if header else 0
    for i, rec in enumerate(recs):
        data = encode((first + i) & U64, *rec)
        starts.append(pos)
        out.append(data)
        pos += len(data)
    return b"".join(out), starts


first_st = st.one_of(st.integers(0, 1000), st.integers(U64 - 3, U64), u64)


@settings(max_examples=200, deadline=None)
@given(first=first_st, recs=st.lists(record_st, max_size=8), header=st.booleans(),
       data=st.data())
def test_valid_logs_decode_alike(first, recs, header, data):
    """Logs of valid records (with and without a header, ids up to 2**64-1 and past it): the
    same records and state from both backends, with any expected id."""
    log, starts = build_log(first, recs, header)
    expect = data.draw(st.sampled_from([None, first, first + 1, first - 1, -1, 1 << 64]))
    steps = agree(log, expect)
    if expect in (None, first) and first + len(recs) - 1 <= U64:
        assert len(steps) == len(recs) + 2 and steps[-1][1] is None  # all of them, clean
    for start in starts:
        agree(log, data.draw(st.sampled_from([None, first])), start)


# -- damaged logs ----------------------------------------------------------------------------

damage_st = st.lists(st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("set"), st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=40)),
), min_size=1, max_size=4)


def damaged(log: bytes, damage) -> bytes:
    buf = bytearray(log)
    for d in damage:
        if d[0] == "cut":
            del buf[int(d[1] * len(buf)):]
        elif d[0] == "append":
            buf += d[1]
        elif d[0] == "insert":
            at = int(d[1] * len(buf))
            buf[at:at] = d[2]
        elif buf:
            at = min(int(d[1] * len(buf)), len(buf) - 1)
            buf[at] = buf[at] ^ d[2] if d[0] == "flip" else d[2]
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(first=first_st, recs=st.lists(record_st, min_size=1, max_size=6), header=st.booleans(),
       damage=damage_st, expect=st.sampled_from([None, "first", -1]))
def test_damaged_logs_decode_alike(first, recs, header, damage, expect):
    """Valid logs torn, flipped, overwritten, with garbage inserted or appended: the same
    records and the same end, problem and problem record from both backends."""
    log, _ = build_log(first, recs, header)
    agree(damaged(log, damage), first if expect == "first" else expect)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.one_of(st.integers(0, 20), st.integers(U64 - 2, U64)), min_size=1,
                    max_size=8),
       expect=st.one_of(st.none(), st.integers(-2, 21), st.integers(U64 - 2, U64 + 2)))
def test_ids_out_of_sequence_alike(ids, expect):
    """Records with any ids (repeated, falling, jumping, at 2**64-1): where the sequence breaks
    and with which id, the same on both backends."""
    log = b"".join(mixed(i) for i in ids)
    agree(log, expect)
    agree(HEADER + log, expect)


def test_every_truncation_alike():
    """A log torn at every byte, scanned with every kind of expected id; and from an exact
    buffer."""
    for k in range(len(LOG) + 1):
        for expect in EXPECTS:
            agree(LOG[:k], expect)
        agree_exact(BIG + LOG[len(HEADER):][:k], 4)


def test_every_byte_changed_alike():
    """Every byte of a log flipped (one bit, all bits) and set to each type byte."""
    for i in range(len(LOG)):
        for change in (1, 0x80, 0xFF):
            buf = bytearray(LOG)
            buf[i] ^= change
            agree(bytes(buf))
        for kind in range(7):
            buf = bytearray(LOG)
            buf[i] = kind
            agree(bytes(buf), 5)


def test_hostile_lengths_are_torn_alike():
    """Lengths from a hostile file, CRCs correct: each value length around the end of the
    buffer and the top of u32, index masks with more entries than there are bytes, every
    truncation of those. Torn, never a read past the buffer."""
    rest = 40
    cases = []
    for length in (rest - 1, rest, rest + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFD, 0xFFFFFFFE,
                   0xFFFFFFFF):
        cases.append(raw_record(1, value(1, 2, length, bytes(rest))))
        cases.append(raw_record(1, value(1, 2, length)) + bytes(rest))
    for mask in (U64, 1 << 63, (1 << 63) | 1, 0):
        for entries in range(0, 66, 13):
            cases.append(raw_record(1, index(1, 2, mask, bytes(8 * entries))))
    cases.append(raw_record(U64, struct.pack("<BH", fmt.DROP_TABLE, 7)) + mixed(0))
    cases.append(raw_record(2, value(1, 2, 3, b"abc"), crc_ok=False))
    for kind in (0, 1, 4, 6, 0x7F, 0xFF):
        cases.append(raw_record(3, bytes([kind]) + bytes(30)))
    for buf in cases:
        for k in range(len(buf) + 1):
            agree(buf[:k], 1)
            agree_exact(BIG + buf[:k])


def test_batches_and_offsets_alike():
    """A log longer than the native scan's batches (in records and in bytes), with a problem
    after them: the same records and state at every step; scans from record boundaries and from
    inside records, past the end and before the start (the reference's negative offsets)."""
    recs = [encode_record(i, [], {}, {(1, j): bytes([j]) * (1 << 10) for j in range(i % 3)})
            for i in range(1, 3001)]
    log = b"".join(recs)
    assert len(recs) > fmt._NATIVE_BATCH[0] and len(log) > fmt._NATIVE_BATCH[1]
    steps = agree(log + b"\x01\x02", 1)
    assert len(steps) == len(recs) + 2 and steps[-1][1] == "torn"
    starts = [0]
    for r in recs:
        starts.append(starts[-1] + len(r))
    for s in starts[::250] + [5, len(log), len(log) + 7, -3, -len(recs[-1])]:
        agree(log, None, s)


def test_lazy_records_stop_where_the_consumer_stops():
    """A consumer that takes one record sees the state the reference shows then; taking the
    rest, a second records() and a scan from ``end`` all agree."""
    log = b"".join(mixed(i) for i in range(1, 40)) + b"\x07"
    for python in (True, False):
        with _backend.python_backend() if python else _Null():
            scan = LogScan(log, 1)
            it = scan.records()
            first = next(it)
            got = [(first, scan.end, scan.problem, scan.expect_id)]
            got.append((list(it), scan.end, scan.problem, scan.problem_record))
            got.append((list(scan.records()), scan.end, scan.problem))
        if python:
            want = got
    assert got == want and want[1][2] == "bad type"


def test_any_buffer_and_bad_arguments():
    """scan_log reads bytes, bytearray and memoryview alike; wrong arguments raise, and crash
    nothing."""
    ref = native.scan_log(LOG, len(HEADER), None, 100, 1 << 20, Op, Record)
    assert ref[0] and ref[2] is None
    for buf in (bytearray(LOG), memoryview(LOG), memoryview(bytearray(LOG))):
        assert native.scan_log(buf, len(HEADER), None, 100, 1 << 20, Op, Record) == ref
    # a batch ends after max_records records, or once its records reach max_bytes bytes
    assert native.scan_log(LOG, len(HEADER), None, 2, 1 << 20, Op, Record) == (
        ref[0][:2], ref[0][1].end, None, None)
    size = ref[0][0].end - ref[0][0].start
    for most, records in ((size - 1, 1), (size, 1), (size + 1, 2)):
        assert native.scan_log(LOG, len(HEADER), None, 100, most, Op, Record)[0] == ref[0][:records]
    ok = (LOG, 0, None, 10, 10, Op, Record)
    bad = [(TypeError, (1,) + ok[1:]), (TypeError, ok[:5] + (int, Record)),
           (TypeError, ok[:6] + (Op(1, 1),)), (TypeError, ok[:2] + ("1",) + ok[3:]),
           (ValueError, ok[:1] + (-1,) + ok[2:]), (ValueError, ok[:3] + (0,) + ok[4:]),
           (ValueError, ok[:4] + (0,) + ok[5:]), (OverflowError, ok[:1] + (1 << 70,) + ok[2:]),
           (TypeError, ok[:6])]
    for exc, args in bad:
        with pytest.raises(exc):
            native.scan_log(*args)


def test_native_ops_hash_and_compare_as_python_ones():
    """Ops and records built in C are the Python ones for equality, hashing, repr and field
    access. The one difference: native ops are not tracked by the garbage collector (they hold
    ints, bytes and None only, so they can be in no cycle; see new_op in _native_log.c)."""
    with _backend.python_backend():
        ref = list(LogScan(LOG).records())
    got = list(LogScan(LOG).records())
    assert got == ref and {op for r in ref for op in r.ops} == {op for r in got for op in r.ops}
    for a, b in zip(ref, got):
        assert repr(a) == repr(b) and hash(tuple(a.ops)) == hash(tuple(b.ops))
        assert gc.is_tracked(b) == gc.is_tracked(a)
        for x, y in zip(a.ops, b.ops):
            assert (x.kind, x.table, x.key, x.mask, x.data) == (y.kind, y.table, y.key, y.mask, y.data)
            assert y._asdict() == x._asdict() and not gc.is_tracked(y)
            assert all(type(v) in (int, bytes, type(None)) for v in y)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_fuzz_target_inputs_agree(data):
    """The fuzz target's check on inputs of hypothesis's."""
    fuzz_log.check(data)


def test_decoder_keeps_reference_counts():
    """Thousands of scans (good, torn, bad CRC, bad type, out of sequence, hostile lengths)
    leave the reference counts of the classes, the buffers and None as they were, and no memory
    behind."""
    bufs = [LOG, LOG[:-3], LOG[:60], LOG[:len(HEADER) + 5], LOG[len(HEADER):],
            raw_record(1, value(1, 2, 0xFFFFFFFE)), raw_record(1, index(1, 2, U64, b"x")),
            raw_record(2, value(1, 2, 3, b"abc"), crc_ok=False), raw_record(3, b"\x09"),
            mixed(1) + mixed(3), b"\x00" * 10]
    watched = (Op, Record, *bufs)

    def run(n):
        for _ in range(n):
            for buf in bufs:
                for expect in (None, 5, -1):
                    scan = LogScan(buf, expect)
                    for _rec in scan.records():
                        pass
                native.scan_log(buf, 0, 1 << 64, 2, 100, Op, Record)
                try:
                    native.scan_log(buf, 0, None, 2, 100, Op, int)
                except TypeError:
                    pass

    assert_no_leaks(run, watched, rounds=2000)


# -- the fuzz target, for a while -------------------------------------------------------------

FUZZ_SECONDS = 20


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_fuzz_log_decoder_for_a_while(tmp_path):
    """tests/fuzz_log.py under atheris for FUZZ_SECONDS, from a seeded corpus: no crash, no
    exception, no disagreement between the backends. (Skipped where atheris is not installed,
    except in CI; the sanitizer run of these tests leaves it out.)"""
    try:
        import atheris  # noqa: F401
    except ImportError:
        # where the test extra installs it (its marker in pyproject.toml), CI must have it
        wanted = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info < (3, 14)
        if os.environ.get("CI") and wanted:
            pytest.fail("CI needs atheris (the test extra) to fuzz the log decoder")
        pytest.skip("atheris is not installed")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "fuzz_log.py"), f"-max_total_time={FUZZ_SECONDS}",
         "-timeout=10", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "Done" in proc.stderr and not list(tmp_path.glob("crash-*")), tail


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
