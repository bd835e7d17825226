"""The log format: how one record is laid out in a log file, and how it is read back.

A log file (``log{N}`` in the database directory) is a log header, then records. An empty
file is an empty log (the pool keeps such files for reuse, and the writer writes the header
with a log's first record). Every integer is little-endian. The header is::

    LOG_HEADER    u8 = 6   database_id [16]  epoch u64  crc32 u32

``database_id`` is the random id the database got at creation (``mpwal.meta``), ``epoch`` the
writer open that wrote the log (the queue state's epoch), and ``crc32`` covers the 25 bytes
before it. Replay and readers never take a log whose header names another database, or an
epoch older than the queue state's ``log_epoch_floor`` (every log of an older epoch was
replayed and truncated; one that reappears, say after a power loss undid a truncation, is
stale), nor a log without a header in a database that has an id. (Logs of format 1, written
before databases had ids, have no header; a directory of format 1 is upgraded by its first
writer open, which replays and empties them.) One record is::

    BEGIN_RECORD  u8 = 1   record_id u64
    entries, in this order:
      DROP_TABLE   u8 = 5   table u16
      INSERT_INDEX u8 = 2   table u16  chunk u64  mask u64  entry u64 × popcount(mask)
      INSERT_VALUE u8 = 3   table u16  index u64  length u32  data[length]
    END_RECORD    u8 = 4   crc32 u32

``crc32`` is the CRC-32 (IEEE 802.3, the one ``zlib.crc32`` computes) of every byte from the
BEGIN_RECORD type byte up to and including the END_RECORD type byte. ``mask`` has bit i set
when entry i (0..63) of the 64-entry index chunk changed; only those entries follow, lowest bit
first. Record ids are contiguous: each record's id is the previous one's plus one, across log
files too.

Changes from parity-db's log (``reference/parity-db-log.rs``), each with its reason:

* INSERT_VALUE carries ``length`` (u32). parity-db leaves the length to the value table, which
  knows its entry format; ours is stated so that a log can be read, verified and dumped with no
  table at hand. ``length == 0xFFFFFFFF`` (``REMOVED``) is a removal and has no data.
* DROP_TABLE entries come first in a record, not last. The writer discards a record's earlier
  changes to a table it drops, so every insert left in the record happens after the drop, and
  applying the entries in file order is applying them in the order they were made.
* A record's first byte must be BEGIN_RECORD and its id must follow the previous record's;
  anything else ends replay just as a CRC mismatch does (parity-db stops on a bad type byte too).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from types import ModuleType
from typing import NamedTuple

from . import _backend

BEGIN_RECORD = 1
INSERT_INDEX = 2
INSERT_VALUE = 3
END_RECORD = 4
DROP_TABLE = 5
LOG_HEADER = 6

REMOVED = 0xFFFFFFFF  # INSERT_VALUE length that marks a removal
CHUNK_ENTRIES = 64
ENTRY_BYTES = 8
CHUNK_BYTES = CHUNK_ENTRIES * ENTRY_BYTES
MAX_VALUE_LEN = REMOVED - 1

_BEGIN = struct.Struct("<BQ")
_DROP = struct.Struct("<BH")
_INDEX = struct.Struct("<BHQQ")
_VALUE = struct.Struct("<BHQI")
_U32 = struct.Struct("<I")
_END = b"\x04"

BEGIN_SIZE = _BEGIN.size
END_SIZE = 1 + 4
_LOG_HEADER = struct.Struct("<B16sQ")
LOG_HEADER_SIZE = _LOG_HEADER.size + 4
LOG_PREFIX = LOG_HEADER_SIZE + BEGIN_SIZE  # bytes that hold a log's header and first record id
DATABASE_ID_BYTES = 16


def encode_log_header(database_id: bytes, epoch: int) -> bytes:
    """The header a log of ``database_id`` written in ``epoch`` starts with."""
    body = _LOG_HEADER.pack(LOG_HEADER, database_id, epoch)
    return body + _U32.pack(zlib.crc32(body))


def decode_log_header(buf) -> tuple[bytes, int] | None:
    """(database_id, epoch) of the header ``buf`` starts with; None if it starts with none that
    verifies."""
    if len(buf) < LOG_HEADER_SIZE or buf[0] != LOG_HEADER:
        return None
    body = bytes(buf[:_LOG_HEADER.size])
    if zlib.crc32(body) != _U32.unpack_from(buf, _LOG_HEADER.size)[0]:
        return None
    _, database_id, epoch = _LOG_HEADER.unpack(body)
    return database_id, epoch


class Op(NamedTuple):
    """One decoded entry. ``kind`` is DROP_TABLE, INSERT_INDEX or INSERT_VALUE.

    INSERT_INDEX: ``key`` is the chunk, ``mask`` the changed entries, ``data`` their 8-byte
    values in mask order. INSERT_VALUE: ``key`` is the index, ``data`` the bytes or None for a
    removal. DROP_TABLE: only ``table``.
    """

    kind: int
    table: int
    key: int = 0
    mask: int = 0
    data: bytes | None = None


class Record(NamedTuple):
    record_id: int
    ops: list
    start: int  # offset of the BEGIN_RECORD byte in the file
    end: int  # offset just past the CRC


def encode_record(record_id: int, drops, chunks: dict, values: dict) -> bytes:
    """Lay out one record.

    ``drops``: table ids; ``chunks``: {(table, chunk): (mask, {entry: u64})};
    ``values``: {(table, index): bytes or None}.
    """
    parts = [_BEGIN.pack(BEGIN_RECORD, record_id)]
    append = parts.append
    for table in drops:
        append(_DROP.pack(DROP_TABLE, table))
    for (table, chunk), (mask, entries) in chunks.items():
        append(_INDEX.pack(INSERT_INDEX, table, chunk, mask))
        append(struct.pack(f"<{len(entries)}Q", *(entries[e] for e in sorted(entries))))
    vpack = _VALUE.pack
    for (table, index), data in values.items():
        if data is None:
            append(vpack(INSERT_VALUE, table, index, REMOVED))
        else:
            append(vpack(INSERT_VALUE, table, index, len(data)))
            append(data)
    append(_END)
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def first_record_id(head: bytes) -> int | None:
    """The id in a log's first BEGIN_RECORD (after its header, if it has one), or None if the
    log does not start with one. ``head``: the first LOG_PREFIX bytes, or more."""
    if head[:1] == bytes((LOG_HEADER,)):
        head = head[LOG_HEADER_SIZE:]
    if len(head) < BEGIN_SIZE or head[0] != BEGIN_RECORD:
        return None
    return _BEGIN.unpack_from(head)[1]


# the native scan's batches: (records, bytes) of the first, doubling up to _NATIVE_BATCH
_NATIVE_FIRST = (8, 64 << 10)
_NATIVE_BATCH = (1024, 1 << 20)


class LogScan:
    """Reads the records of one log held in memory, stopping at the first one that is not whole.

    Iterate ``records()``; afterwards ``end`` is the offset just past the last good record and
    ``problem`` is None when the log ended cleanly at a record boundary, or says why it stopped
    ("torn", "crc", "bad type", "out of sequence", "bad header"). ``start`` is where to begin
    in ``buf``; every offset (``end``, a record's ``start`` and ``end``) counts from the start of
    ``buf``. A scan from 0 reads the log header first, if there is one: ``header`` is then its
    (database_id, epoch), and a header that does not verify ends the scan before any record.
    With the native backend ``records()`` decodes in C (``_native_records``); ``_one`` and the
    loop of ``records()`` are the reference it must match.
    """

    def __init__(self, buf, expect_id: int | None = None, start: int = 0):
        self.buf = buf if isinstance(buf, bytes) else bytes(buf)  # bytes slice fastest
        self.expect_id = expect_id
        self.end = start
        self.problem: str | None = None
        self.problem_record: int | None = None
        self.header: tuple[bytes, int] | None = None
        if start == 0 and self.buf[:1] == bytes((LOG_HEADER,)):
            self.header = decode_log_header(self.buf)
            if self.header is None:
                self.problem = "bad header"
                self.end = len(self.buf)  # nothing to scan
            else:
                self.end = LOG_HEADER_SIZE

    def records(self) -> Iterator[Record]:
        buf = self.buf
        n = len(buf)
        pos = self.end
        if self.problem == "bad header":
            self.end = 0
            return
        native = _backend.native  # (looked up now: _backend.python_backend() switches it)
        if native is not None and pos >= 0 and (self.expect_id is None or type(self.expect_id) is int):
            yield from self._native_records(native)
            return
        # the reference: one record at a time
        while pos < n:
            rec = self._one(buf, pos, n)
            if rec is None:
                return
            if self.expect_id is not None and rec.record_id != self.expect_id:
                self.problem = "out of sequence"
                self.problem_record = rec.record_id
                return
            self.expect_id = rec.record_id + 1
            self.end = pos = rec.end
            yield rec

    def _native_records(self, native: ModuleType) -> Iterator[Record]:
        """records() in C (``_native.scan_log``, the twin of the loop above and of ``_one``): the
        records come a batch per call, batches growing from a few records to _NATIVE_BATCH, so a
        consumer that takes one record (or one applier batch) has not had the whole log decoded,
        and ``end``, ``expect_id`` and ``problem`` move as the reference moves them: the problem
        is noted once every good record before it was yielded."""
        buf = self.buf
        n = len(buf)
        pos = self.end
        most, size = _NATIVE_FIRST
        while pos < n:
            recs, pos, problem, problem_record = native.scan_log(buf, pos, self.expect_id, most, size,
                                                                 Op, Record)
            for rec in recs:
                self.expect_id = rec.record_id + 1
                self.end = rec.end
                yield rec
            if problem is not None:
                self.problem = problem
                self.problem_record = problem_record
                return
            most, size = min(2 * most, _NATIVE_BATCH[0]), min(2 * size, _NATIVE_BATCH[1])

    def _stop(self, why: str, rid: int | None = None) -> Record | None:
        """Note why the scan stops; returns None, the ``_one`` of a record that is not whole."""
        self.problem = why
        self.problem_record = rid
        return None

    def _one(self, buf: bytes, start: int, n: int) -> Record | None:
        """Decode the record at ``start``: the hot path of enactment and replay."""
        if buf[start] != BEGIN_RECORD:
            return self._stop("bad type")
        if start + BEGIN_SIZE > n:
            return self._stop("torn")
        rid = _BEGIN.unpack_from(buf, start)[1]
        pos = start + BEGIN_SIZE
        ops: list[Op] = []
        append = ops.append
        new = tuple.__new__
        vunpack = _VALUE.unpack_from
        try:
            while True:
                kind = buf[pos]
                if kind == INSERT_VALUE:
                    _, table, index, length = vunpack(buf, pos)
                    pos += 15
                    if length == REMOVED:
                        append(new(Op, (INSERT_VALUE, table, index, 0, None)))
                    else:
                        end = pos + length
                        if end > n:
                            return self._stop("torn", rid)
                        append(new(Op, (INSERT_VALUE, table, index, 0, buf[pos:end])))
                        pos = end
                elif kind == INSERT_INDEX:
                    _, table, chunk, mask = _INDEX.unpack_from(buf, pos)
                    pos += _INDEX.size
                    end = pos + mask.bit_count() * ENTRY_BYTES
                    if end > n:
                        return self._stop("torn", rid)
                    append(new(Op, (INSERT_INDEX, table, chunk, mask, buf[pos:end])))
                    pos = end
                elif kind == DROP_TABLE:
                    append(new(Op, (DROP_TABLE, _DROP.unpack_from(buf, pos)[1], 0, 0, None)))
                    pos += _DROP.size
                elif kind == END_RECORD:
                    if pos + END_SIZE > n:
                        return self._stop("torn", rid)
                    crc = _U32.unpack_from(buf, pos + 1)[0]
                    if zlib.crc32(memoryview(buf)[start:pos + 1]) != crc:
                        return self._stop("crc", rid)
                    return Record(rid, ops, start, pos + END_SIZE)
                else:
                    return self._stop("bad type", rid)
        except (struct.error, IndexError):
            return self._stop("torn", rid)


def entries_of(mask: int, data: bytes) -> Iterator[tuple[int, int]]:
    """(entry number, u64 value) pairs of an INSERT_INDEX, lowest entry first."""
    values = struct.unpack(f"<{len(data) // 8}Q", data)
    i = 0
    e = 0
    while mask:
        if mask & 1:
            yield e, values[i]
            i += 1
        mask >>= 1
        e += 1
