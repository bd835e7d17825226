"""Workers for the multi-process tests, importable by spawned processes.

Values are self-describing so a reader can check, alone, that what it read is whole and was
committed: ``value(key, rid)`` is key u64, record id u64, then filler derived from both, with a
CRC-32 of everything before it at the end.
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib

import mpwal
from mpwal._format import encode_log_header
from mpwal._queues import load_queues, log_path
from mpwal._tables import database_id

VALUE_TABLE = 3
INDEX_TABLE = 1
SLOT = 64
TABLES = [mpwal.IndexTable(INDEX_TABLE), mpwal.ValueTable(VALUE_TABLE, slot_size=SLOT)]
_HEAD = struct.Struct("<QQ")


def log_header_for(path: str, epoch: int | None = None) -> bytes:
    """The log header a writer of ``path`` writes: the database id of its ``mpwal.meta``, and
    ``epoch`` (default: the queue state's epoch, 0 without a queue file, which is never below the
    state's ``log_epoch_floor``). Empty for a directory of format 1 (no id: logs without a header)."""
    ident = database_id(path)
    if ident is None:
        return b""
    if epoch is None:
        st = load_queues(path)
        epoch = st.epoch if st is not None else 0
    return encode_log_header(ident, epoch)


def write_log(path: str, log_id: int, records: bytes, epoch: int | None = None) -> int:
    """Write ``log{log_id}`` of ``path`` by hand as a writer would: ``log_header_for(path,
    epoch)``, then ``records`` (encoded records, or any bytes). Returns the header's size (the
    offset of the first record)."""
    header = log_header_for(path, epoch)
    with open(log_path(path, log_id), "wb") as f:
        f.write(header + records)
    return len(header)


def make_value(key: int, rid: int, size: int = 40) -> bytes:
    """A value that names its key and record and carries a CRC of itself."""
    body = _HEAD.pack(key, rid)
    body += bytes((key * 31 + rid * 7 + i) & 0xFF for i in range(size - 20))
    return body + struct.pack("<I", zlib.crc32(body))


def check_value(key: int, data: bytes) -> int:
    """The record id a value came from; raises AssertionError if it is torn or misplaced."""
    body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
    assert zlib.crc32(body) == crc, f"torn value for key {key}: {data!r}"
    k, rid = _HEAD.unpack_from(body)
    assert k == key, f"key {key} holds the value of key {k}"
    return rid


def writes_of(rid: int, keys: int, per_record: int, seed: int = 0) -> list[int]:
    """Keys written by record ``rid`` of the deterministic workload (the same in every process)."""
    rng = random.Random(seed * 1_000_003 + rid)
    return rng.sample(range(keys), per_record)


def commit_workload(w: mpwal.Writer, first: int, last: int, keys: int, per_record: int,
                    seed: int = 0, on_commit=None) -> None:
    """Commit records ``first..last`` of the workload: each writes its keys' values and one index
    entry per key (chunk key // 64, entry key % 64) holding the record id."""
    for rid in range(first, last + 1):
        with w.record() as rec:
            for k in writes_of(rid, keys, per_record, seed):
                rec.insert_value(VALUE_TABLE, k, make_value(k, rid))
                rec.insert_index(INDEX_TABLE, k // 64, k % 64, rid)
        assert rec.record_id == rid, (rec.record_id, rid)
        if on_commit:
            on_commit(rid)


def expected_state(last: int, keys: int, per_record: int, seed: int = 0) -> dict[int, int]:
    """key -> record id of its newest write among records 1..last."""
    state = {}
    for rid in range(1, last + 1):
        for k in writes_of(rid, keys, per_record, seed):
            state[k] = rid
    return state


def read_state(r, keys: int) -> dict[int, int]:
    """key -> record id as a Reader (or Writer) sees it, checking both tables agree."""
    state = {}
    for k in range(keys):
        data = r.value(VALUE_TABLE, k)
        entry = r.index_entry(INDEX_TABLE, k // 64, k % 64)
        if data is None:
            assert entry == 0, f"key {k}: index says record {entry}, value is missing"
            continue
        rid = check_value(k, data)
        assert entry == rid, f"key {k}: value from record {rid}, index from record {entry}"
        state[k] = rid
    return state


def reader_loop(path: str, keys: int, seconds: float, out, stop=None) -> None:
    """Read random keys until ``seconds`` pass; put (reads, errors) on ``out``.

    Checks each value is whole, from a record no newer than last_record_id read after it, and
    never older than what this reader saw before for that key (invariant 5)."""
    errors = []
    reads = 0
    seen: dict[int, int] = {}
    rng = random.Random(os.getpid())
    try:
        r = mpwal.Reader(path)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(errors) < 5 and not (stop and stop.is_set()):
            batch = [rng.randrange(keys) for _ in range(32)]
            before = r.last_record_id
            vals = r.values(VALUE_TABLE, batch)
            entries = [r.index_entry(INDEX_TABLE, k // 64, k % 64) for k in batch[:4]]
            after = r.last_record_id
            if after < before:
                errors.append(f"last_record_id went back from {before} to {after}")
            for k, v in zip(batch, vals):
                reads += 1
                if v is None:
                    if k in seen:
                        errors.append(f"key {k} vanished after record {seen[k]}")
                    continue
                try:
                    rid = check_value(k, v)
                except AssertionError as e:
                    errors.append(str(e))
                    continue
                if rid > after:
                    errors.append(f"key {k} from record {rid} > last_record_id {after}")
                if rid < seen.get(k, 0):
                    errors.append(f"key {k} went back from record {seen[k]} to {rid}")
                seen[k] = max(rid, seen.get(k, 0))
            for k, e in zip(batch[:4], entries):
                if e > after:
                    errors.append(f"index entry of key {k} from record {e} > {after}")
        r.close()
    except Exception as e:  # reported to the test, which fails on it
        errors.append(f"{type(e).__name__}: {e}")
    out.put((reads, errors))


def writer_process(path: str, first: int, last: int, keys: int, per_record: int, acks,
                   durability: str = "commit", enactor: str = "thread", log_size: int = 4096,
                   seed: int = 0) -> None:
    """Commit records and report each durable one's id on ``acks`` (a multiprocessing queue)."""
    w = mpwal.Writer(path, TABLES, durability=durability, enactor=enactor, log_size=log_size,
                     log_age=0.05)
    acks.put(("open", w.last_record_id, w.stats()["enactor_pid"]))

    def ack(rid):
        if durability == "commit":
            acks.put(("durable", rid))
        elif rid % 5 == 0:
            acks.put(("durable", w.sync()))

    commit_workload(w, first, last, keys, per_record, seed, ack)
    w.close()
    acks.put(("closed", last))
