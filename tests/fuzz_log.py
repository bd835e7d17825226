"""A fuzz target for the log decoder: ``_format.LogScan`` on both backends, which must agree.

    python tests/fuzz_log.py [libFuzzer options] [corpus directories]
    python tests/fuzz_log.py -max_total_time=60 -artifact_prefix=/tmp/

Needs atheris (the ``test`` extra) and the native backend. Each input is turned into a log, an
expected record id and a start offset (``case``), and scanned by the Python reference and by
``mpwal._native.scan_log``: every record (every field, every byte, the types), and ``end``,
``problem``, ``problem_record``, ``expect_id`` and ``header`` after each record, must be the same
(``outcome``). A crash of the C code, an exception or a disagreement stops the fuzzer, which
saves the input (``crash-*``); ``python tests/fuzz_log.py crash-...`` runs it again.

Half of the inputs are raw bytes, the other half a description of records that ``case`` lays out
with lying lengths, masks, types and ids but (mostly) correct CRCs, so the decoder's structural
checks are reached. tests/test_native_log.py runs this for a bounded time, and feeds
``check`` inputs of its own.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
import zlib

if __name__ == "__main__":  # the checkout's mpwal, installed or not
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpwal import _backend, _format as fmt  # noqa: E402

U64 = (1 << 64) - 1


def _op_shape(op) -> tuple:
    assert type(op) is fmt.Op and len(op) == 5, op
    return (tuple((type(x).__name__, x) for x in op), hash(op))


def _record_shape(rec) -> tuple:
    """A record as comparable data: every field with its type, every op."""
    assert type(rec) is fmt.Record and type(rec.ops) is list, rec
    head = tuple((type(x).__name__, x) for x in (rec.record_id, rec.start, rec.end))
    return head, [_op_shape(op) for op in rec.ops]


def _state(scan: fmt.LogScan) -> tuple:
    return scan.end, scan.problem, scan.problem_record, scan.expect_id, scan.header


def outcome(buf, expect_id=None, start: int = 0, python: bool = False) -> list:
    """What a LogScan of ``buf`` shows, on the Python backend or the current one: its state
    before the first record, each record with the state after it was yielded, and the state
    at the end."""
    with _backend.python_backend() if python else contextlib.nullcontext():
        scan = fmt.LogScan(buf, expect_id, start)
        steps: list = [_state(scan)]
        for rec in scan.records():
            steps.append((_record_shape(rec), _state(scan)))
        steps.append(_state(scan))
    return steps


def agree(buf, expect_id=None, start: int = 0) -> list:
    """``outcome`` of both backends, which must be the same; that outcome."""
    ref = outcome(buf, expect_id, start, python=True)
    got = outcome(buf, expect_id, start)
    if got != ref:
        for i, (a, b) in enumerate(zip(ref, got)):
            if a != b:
                raise AssertionError(f"backends disagree at step {i} of {len(ref)} "
                                     f"(expect_id={expect_id}, start={start}, {len(buf)} bytes):"
                                     f"\n  python: {a!r}\n  native: {b!r}")
        raise AssertionError(f"backends disagree on the number of steps: {len(ref)} != {len(got)}")
    return ref


class _Bytes:
    """Reads fields off a fuzzer's input; zeros once it is used up."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def _entry(r: _Bytes) -> bytes:
    """One entry, fields from the input; lengths and masks may lie about what follows."""
    kind = r.int(1)
    which = kind % 8
    if which == 0:  # an entry of any type byte, then some bytes
        return bytes([r.int(1)]) + r.take(r.int(1) % 32)
    if which == 1:
        return struct.pack("<BH", fmt.DROP_TABLE, r.int(2))
    if which in (2, 3):
        mask = r.int(8) if kind & 0x80 else r.int(1) * 0x0101010101010101 & r.int(8)
        count = mask.bit_count()
        if kind & 0x40:  # fewer or more entries than the mask says
            count = max(0, count + (r.int(1) % 5) - 2)
        return struct.pack("<BHQQ", fmt.INSERT_INDEX, r.int(2), r.int(8), mask) + r.take(8 * count)
    data = r.take(r.int(1) % 64)
    length = len(data)
    if which == 4:
        length = fmt.REMOVED
    elif which == 5 and kind & 0x80:  # a length that lies
        length = r.int(4) if kind & 0x40 else max(0, length + (r.int(1) % 9) - 4)
    elif which == 5 and kind & 0x40:
        length = 0xFFFFFFFF - r.int(1)  # near the top (REMOVED, the largest lengths)
    if length == fmt.REMOVED and which != 5:
        data = b""
    return struct.pack("<BHQI", fmt.INSERT_VALUE, r.int(2), r.int(8), length) + data


def case(data: bytes) -> tuple[bytes, int | None, int]:
    """(log, expect_id, start) of one fuzzer input."""
    r = _Bytes(data)
    mode = r.int(1)
    parts = []
    if mode & 2:  # a log header, maybe broken
        header = bytearray(fmt.encode_log_header(r.take(16), r.int(8)))
        if mode & 4:
            header[r.int(1) % len(header)] ^= 1 << (r.int(1) % 8)
        parts.append(bytes(header))
    if mode & 1 == 0:  # raw bytes
        parts.append(r.rest())
        rid = None
    else:  # records laid out from a description
        rid = (r.int(8) if mode & 128 else U64 - r.int(1) % 4) if mode & 8 else r.int(1)
        first = rid
        for _ in range(r.int(1) % 8):
            flags = r.int(1)
            body = struct.pack("<BQ", fmt.BEGIN_RECORD, rid & U64)
            body += b"".join(_entry(r) for _ in range(r.int(1) % 6)) + bytes([fmt.END_RECORD])
            crc = zlib.crc32(body)
            if flags & 1 and flags & 2:
                crc ^= 1 << (r.int(1) % 32)
            parts.append(body + struct.pack("<I", crc))
            step = flags >> 4  # the next id: mostly this one's plus one (wrapping past 2**64-1)
            rid = (rid + 1 if step < 12 else rid if step == 12 else rid - 1 if step == 13 else
                   rid + 2 if step == 14 else r.int(8)) & U64
        if mode & 16:
            parts.append(r.take(r.int(1) % 16))  # a tail: zeros, garbage
        rid = first
    log = b"".join(parts)
    if mode & 32:  # torn
        log = log[:r.int(2) % (len(log) + 1)]
    choice = r.int(1) % 8
    expect = {0: None, 1: None, 2: None, 3: rid, 4: r.int(8), 5: -1, 6: 1 << 64}.get(choice)
    if choice == 7:
        expect = None if rid is None else rid + (r.int(1) % 3) - 1
    start = 0 if mode & 64 == 0 else r.int(2) % (len(log) + 2)
    return log, expect, start


def check(data: bytes) -> None:
    """The fuzz target: one input's log scanned by both backends, which must agree."""
    agree(*case(data))


def _seeds() -> list[bytes]:
    """Inputs that lay out whole logs (the fuzzer would take long to find a CRC)."""
    seeds = []
    for mode in (1, 3, 9, 17, 35, 65, 137):
        seeds.append(bytes([mode]) + bytes(range(1, 200)))
        seeds.append(bytes([mode]) + os.urandom(300))
    seeds.append(fmt.encode_record(1, [3], {(1, 2): (5, {0: 7, 2: 9})}, {(2, 4): b"v", (2, 5): None}))
    return seeds


def main(argv: list[str]) -> None:
    import atheris

    if _backend.native is None:
        sys.exit(f"fuzz_log.py needs the native backend ({_backend.why_python})")
    for f in (fmt.LogScan.__init__, fmt.LogScan.records, fmt.LogScan._native_records,
              fmt.LogScan._one, fmt.decode_log_header, _entry, case, agree):
        atheris.instrument_func(f)
    paths = [a for a in argv[1:] if not a.startswith("-")]
    if not paths:  # no corpus given: a new one (left in the temporary directory)
        paths = [tempfile.mkdtemp(prefix="fuzz_log_")]
        argv = [*argv, *paths]
    if os.path.isdir(paths[0]) and not os.listdir(paths[0]):  # an empty corpus: seeded
        for i, seed in enumerate(_seeds()):
            with open(os.path.join(paths[0], f"seed{i}"), "wb") as f:
                f.write(seed)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
