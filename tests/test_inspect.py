"""mpwal.tools.inspect: verify, dump and inspect on databases built by hand (no Writer), and that none
of them changes a byte on disk or in shared memory (invariant 8)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from procs import write_log

from mpwal.tools import inspect as mi
from mpwal import _overlay as ov
from mpwal._format import BEGIN_SIZE, LOG_HEADER_SIZE, encode_log_header, encode_record
from mpwal._queues import QueueState, WriterLock, save_queues
from mpwal._tables import IndexTable, ValueTable, database_id, merge_catalog


# -- building databases by hand ----------------------------------------------------------------

def rec(rid: int, drop: bool = False) -> bytes:
    """Record ``rid``: an index change, a value, a removal, and optionally a table drop."""
    return encode_record(
        rid, [1] if drop else [],
        {(1, rid): (0b100001, {0: rid, 5: 0xABCDEF})},
        {(3, rid): f"value {rid}".encode(), (3, 1000 + rid): None})


def make_db(tmp_path, logs=((1, 2, 3), (4, 5, 6), (7, 8, 9)),
            queues: bool = True) -> tuple[str, dict]:
    """A database whose ``log{i}`` holds the log header, then the records ``logs[i]``; returns
    (path, offsets) where offsets[rid] = (log id, byte offset of the record in the file)."""
    path = str(tmp_path / "db")
    os.makedirs(path)
    merge_catalog(path, [IndexTable(1), ValueTable(3, 64)])
    if queues:
        n = len(logs)
        save_queues(path, QueueState(epoch=1, generation=1, appending=n - 1 if n else None,
                                     read=list(range(n - 1)), next_log=n))
    offsets = {}
    for lid, rids in enumerate(logs):
        blob = b""
        for r in rids:
            offsets[r] = (lid, LOG_HEADER_SIZE + len(blob))
            blob += rec(r)
        if blob:
            write_log(path, lid, blob)
        else:  # a pool log: empty, no header (the writer writes it with a first record)
            open(os.path.join(path, f"log{lid}"), "wb").close()
    return path, offsets


def flip(path: str, log_id: int, offset: int) -> None:
    p = os.path.join(path, f"log{log_id}")
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def snapshot(path: str) -> dict:
    """Names, sizes, mtimes and content hashes of the directory's files, and its own mtime."""
    snap = {".": os.stat(path).st_mtime_ns}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        st = os.stat(p)
        with open(p, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        snap[name] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return snap


def run(fn, path, **kw) -> tuple[int, str]:
    out = io.StringIO()
    rc = fn(path, out, **kw)
    return rc, out.getvalue()


ALL = [mi.inspect_db, mi.verify, mi.dump]


# -- verify ------------------------------------------------------------------------------------

def test_verify_clean(tmp_path):
    path, _ = make_db(tmp_path)
    rc, text = run(mi.verify, path)
    assert rc == 0, text
    assert "result: ok" in text
    assert "valid prefix: 9 records, 1..9, in 3 logs" in text
    assert "problem" not in text and "ignored" not in text
    ident = database_id(path).hex()
    assert f"database id: {ident}\n" in text
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] in (["log0"], ["log2"])]
    assert [r[4:] for r in rows] == [["1", ident, "ok"]] * 2  # each log's epoch and database


def test_verify_clean_without_queue_file_and_empty_pool_log(tmp_path):
    path, _ = make_db(tmp_path, queues=False)
    open(os.path.join(path, "log3"), "wb").close()
    rc, text = run(mi.verify, path)
    assert rc == 0, text
    assert "empty" in text


@pytest.mark.parametrize("k", [2, 4, 6, 9])
def test_verify_names_the_record_with_a_flipped_byte(tmp_path, k):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[k]
    flip(path, lid, off + len(rec(k)) - 22)  # inside the value bytes of record k
    rc, text = run(mi.verify, path)
    assert rc == 1, text
    line = next(ln for ln in text.splitlines() if ln.startswith("problem:"))
    assert f"log{lid} at byte {off}, record {k}: crc" in line
    assert "result: PROBLEM" in text
    # every whole record after k is counted as discarded by replay
    assert f"replay discards {9 - k} whole record" in text


def test_verify_flipped_begin_byte_names_the_record_by_sequence(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[5]
    flip(path, lid, off)
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert f"log{lid} at byte {off}, record 5 by sequence: bad type" in text
    assert "replay discards 4 whole records" in text  # 6, 7, 8, 9


def test_verify_flipped_record_id_says_which_was_expected(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[5]
    flip(path, lid, off + 1)  # low byte of the id: 5 ^ 0x5A
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert f"log{lid} at byte {off}, record {5 ^ 0x5A} (expected 5): crc" in text


def test_verify_torn_tail(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[9]
    p = os.path.join(path, f"log{lid}")
    os.truncate(p, off + len(rec(9)) - 3)
    rc, text = run(mi.verify, path)
    assert rc == 1, text
    assert f"log{lid} at byte {off}, record 9: torn" in text
    assert "valid prefix: 8 records, 1..8" in text
    assert "replay discards 0 whole records" in text


def test_verify_torn_inside_begin(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[9]
    os.truncate(os.path.join(path, f"log{lid}"), off + BEGIN_SIZE - 2)
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert f"log{lid} at byte {off}, record 9 by sequence: torn" in text


def test_verify_missing_middle_log_is_a_gap(tmp_path):
    path, _ = make_db(tmp_path)
    os.unlink(os.path.join(path, "log1"))
    rc, text = run(mi.verify, path)
    assert rc == 1, text
    assert "log2 at byte 0: gap: expected record 4, but the next log starts at record 7" in text
    assert "valid prefix: 3 records, 1..3" in text
    assert "replay discards 3 whole records" in text
    assert "discarded: gap before it" in text


def test_verify_out_of_sequence_inside_a_log(tmp_path):
    path, _ = make_db(tmp_path, logs=((1, 2, 3), (4, 6, 7)))
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert "log1 at byte" in text and "record 6 (expected 5): out of sequence" in text
    assert "replay discards 2 whole records" in text


def test_verify_log_without_first_record(tmp_path):
    path, _ = make_db(tmp_path, logs=((1, 2, 3),))
    write_log(path, 7, b"\x00garbage")  # a log header, then no record
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert f"log7 at byte {LOG_HEADER_SIZE}: no first record" in text
    assert "does not start with a record" in text


def test_verify_discarded_logs_are_counted(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[2]
    flip(path, lid, off + len(rec(2)) - 22)
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert "replay discards 7 whole records" in text  # 3, then 4..9 in two later logs
    assert "log1 (" in text and "log2 (" in text


def test_verify_records_that_do_not_fit_the_tables(tmp_path):
    path, _ = make_db(tmp_path, logs=())
    write_log(path, 0, encode_record(1, [], {}, {(3, 0): b"x" * 65})
              + encode_record(2, [], {}, {(9, 0): b"x"})
              + encode_record(3, [], {(3, 0): (1, {0: 1})}, {})
              + encode_record(4, [], {}, {(1, 0): b"x"}))
    rc, text = run(mi.verify, path)
    assert rc == 1, text
    assert "4 changes in the valid prefix do not fit" in text
    assert "a 65-byte value in table 3, whose slot_size is 64" in text
    assert "table 9 is not defined" in text
    assert "insert_index into table 3, which is a value table" in text
    assert "insert_value into table 1, which is an index table" in text


def test_verify_missing_table_file(tmp_path):
    path, _ = make_db(tmp_path)
    os.unlink(os.path.join(path, "value3.tbl"))
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert "table file value3.tbl is missing" in text


# -- dump --------------------------------------------------------------------------------------

def test_dump_text_has_every_record_and_op(tmp_path):
    path, offsets = make_db(tmp_path)
    rc, text = run(mi.dump, path)
    assert rc == 0, text
    for rid, (lid, off) in offsets.items():
        assert f"record {rid} log{lid} byte {off}\n" in text
        assert f"insert_index table 1 chunk {rid} {{0: 0x{rid:x}, 5: 0xabcdef}}" in text
        assert f"insert_value table 3 index {rid} {len(f'value {rid}')} bytes " in text
        assert f"|value {rid}|" in text
        assert f"insert_value table 3 index {1000 + rid} removed" in text
    assert "problem" not in text


def test_dump_drop_and_long_value_preview(tmp_path):
    path, _ = make_db(tmp_path, logs=())
    write_log(path, 0, encode_record(1, [1], {}, {(3, 2): bytes(range(40))}))
    rc, text = run(mi.dump, path)
    assert rc == 0
    assert "drop_table table 1" in text
    assert f"40 bytes {bytes(range(16)).hex()}... |" in text


def test_dump_json_lines_parse(tmp_path):
    path, offsets = make_db(tmp_path)
    rc, text = run(mi.dump, path, json_lines=True)
    assert rc == 0
    objs = [json.loads(line) for line in text.splitlines()]
    assert [o["record_id"] for o in objs] == list(range(1, 10))
    o = objs[3]
    assert o["log"] == "log1" and o["offset"] == offsets[4][1]
    assert o["ops"] == [
        {"op": "insert_index", "table": 1, "chunk": 4, "entries": {"0": 4, "5": 0xABCDEF}},
        {"op": "insert_value", "table": 3, "index": 4, "value_hex": b"value 4".hex()},
        {"op": "insert_value", "table": 3, "index": 1004, "value_hex": None},
    ]


def test_dump_json_drop(tmp_path):
    path, _ = make_db(tmp_path, logs=())
    write_log(path, 0, rec(1, drop=True))
    rc, text = run(mi.dump, path, json_lines=True)
    assert rc == 0
    assert json.loads(text)["ops"][0] == {"op": "drop_table", "table": 1}


def test_dump_stops_at_the_problem(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[6]
    flip(path, lid, off + len(rec(6)) - 22)
    rc, text = run(mi.dump, path)
    assert rc == 1
    assert "record 5 log1" in text and "record 6 log1" not in text and "record 7" not in text
    assert text.splitlines()[-1].startswith(f"problem: log{lid} at byte {off}, record 6: crc")
    rc, text = run(mi.dump, path, json_lines=True)
    assert rc == 1
    objs = [json.loads(line) for line in text.splitlines()]
    assert [o["record_id"] for o in objs[:-1]] == [1, 2, 3, 4, 5]
    assert objs[-1]["problem"]["why"] == "crc"
    assert objs[-1]["problem"]["log"] == f"log{lid}"
    assert objs[-1]["problem"]["offset"] == off
    assert objs[-1]["problem"]["record_id"] == 6


def test_dump_empty_database(tmp_path):
    path, _ = make_db(tmp_path, logs=(), queues=False)
    rc, text = run(mi.dump, path)
    assert rc == 0 and text.startswith("no log records") and "no queue file" in text
    assert run(mi.dump, path, json_lines=True) == (0, "")  # JSON lines hold records only


def _closed_db(tmp_path, last: int = 42) -> str:
    """What a cleanly closed database looks like: every log cleaned into the pool, the queue
    state naming the last record enacted into the tables."""
    path, _ = make_db(tmp_path, logs=((),))
    save_queues(path, QueueState(epoch=1, generation=1, pool=[0], next_log=1,
                                 last_cleaned_record=last))
    return path


CLOSED_NOTE = ("no log records: every committed record has been enacted into the tables "
               "(last record 42)")


def test_dump_and_verify_say_why_a_closed_database_has_no_records(tmp_path):
    path = _closed_db(tmp_path)
    assert run(mi.dump, path) == (0, CLOSED_NOTE + "\n")
    rc, text = run(mi.verify, path)
    assert rc == 0 and "valid prefix: no records\n" + CLOSED_NOTE + "\nresult: ok\n" in text
    rc, text = run(mi.verify, path, as_json=True)
    doc = json.loads(text)
    assert doc["ok"] is True and doc["records_checked"] == 0 and doc["notes"] == [CLOSED_NOTE]
    assert doc["last_cleaned_record"] == 42


def test_no_records_note_only_when_nothing_is_wrong(tmp_path):
    path, offsets = make_db(tmp_path, logs=((1, 2),))
    flip(path, 0, offsets[1][1] + 20)  # the first record is bad: no valid prefix
    for fn in (mi.dump, mi.verify):
        rc, text = run(fn, path)
        assert rc == 1 and "no log records" not in text


# -- inspect -----------------------------------------------------------------------------------

def test_inspect_with_queue_file(tmp_path):
    path, _ = make_db(tmp_path)
    open(os.path.join(path, "log3"), "wb").close()
    save_queues(path, QueueState(version=4, epoch=2, generation=3, appending=2, read=[1],
                                 cleanup=[0], pool=[3], next_log=4, last_cleaned_record=0))
    rc, text = run(mi.inspect_db, path)
    assert rc == 0, text
    lines = text.splitlines()

    def row(name):
        return next(ln.split() for ln in lines if ln.split()[:1] == [name])

    assert row("log0")[1:5] == [str(LOG_HEADER_SIZE + len(rec(1)) * 3), "3", "1..3", "cleanup"]
    assert row("log0")[5:7] == ["1", database_id(path).hex()]  # the log header's epoch and id
    assert row("log1")[3:5] == ["4..6", "read"]
    assert row("log2")[3:5] == ["7..9", "appending"]
    assert row("log3")[1:5] == ["0", "0", "-", "pool"]
    assert "index1.tbl" in text and "value3.tbl" in text
    assert row("3")[:3] == ["3", "value", "64"]
    assert "record ids on disk: 1..9" in text
    assert "valid prefix: records 1..9" in text
    assert "last cleaned record: 0" in text
    assert "queue state: version 5, epoch 2, generation 3" in text
    assert "writer: not alive" in text
    assert "shared memory: no segments" in text


def test_inspect_json(tmp_path):
    path, offsets = make_db(tmp_path)
    flip(path, 2, offsets[8][1] + len(rec(8)) - 22)  # inside record 8's value
    rc, text = run(mi.inspect_db, path, as_json=True)
    assert rc == 0
    doc = json.loads(text)  # one document
    assert doc["database"] == os.path.realpath(path)
    assert doc["tables"] == [
        {"id": 1, "kind": "index", "slot_size": None, "file": "index1.tbl", "bytes": 0},
        {"id": 3, "kind": "value", "slot_size": 64, "file": "value3.tbl", "bytes": 0}]
    logs = {lg["log"]: lg for lg in doc["logs"]}
    assert logs["log0"] == {"log": "log0", "bytes": LOG_HEADER_SIZE + len(rec(1)) * 3,
                            "records": 3, "first_record": 1, "last_record": 3, "queue": "read",
                            "database_id": database_id(path).hex(), "epoch": 1,
                            "state": "valid"}
    assert doc["database_id"] == database_id(path).hex() and doc["ignored"] == []
    assert logs["log2"]["queue"] == "appending"
    assert (logs["log2"]["first_record"], logs["log2"]["last_record"]) == (7, 7)
    assert logs["log2"]["state"].startswith(f"valid up to byte {offsets[8][1]}, then crc")
    assert doc["record_ids_on_disk"] == {"first": 1, "last": 9}
    assert doc["valid_prefix"] == {"first": 1, "last": 7}
    assert doc["problem"]["why"] == "crc" and doc["problem"]["record_id"] == 8
    assert doc["queue_state"]["appending"] == 2 and doc["queue_state"]["read"] == [0, 1]
    assert doc["queue_state"]["last_cleaned_record"] == 0
    assert doc["writer"] == {"alive": False}
    assert doc["segments"] == [] and doc["changed"] is False


def test_verify_json(tmp_path):
    path, offsets = make_db(tmp_path)
    rc, text = run(mi.verify, path, as_json=True)
    doc = json.loads(text)
    assert rc == 0 and doc["ok"] is True and doc["result"] == "ok"
    assert doc["records_checked"] == 9 and doc["problem"] is None
    assert doc["valid_prefix"] == {"first": 1, "last": 9}
    assert [lg["state"] for lg in doc["logs"]] == ["ok", "ok", "ok"]
    lid, off = offsets[5]
    flip(path, lid, off + len(rec(5)) - 22)  # inside record 5's value
    os.unlink(os.path.join(path, "index1.tbl"))
    rc, text = run(mi.verify, path, as_json=True)
    doc = json.loads(text)
    assert rc == 1 and doc["ok"] is False and doc["result"] == "problem"
    assert doc["records_checked"] == 4
    p = doc["problem"]  # the first: the bad record, which ends what replay applies
    assert (p["log"], p["offset"], p["record_id"], p["why"]) == (f"log{lid}", off, 5, "crc")
    assert p["message"].startswith(f"log{lid} at byte {off}, record 5: crc")
    assert doc["missing_table_files"] == ["index1.tbl"]


def test_inspect_without_queue_file(tmp_path):
    path, _ = make_db(tmp_path, queues=False)
    rc, text = run(mi.inspect_db, path)
    assert rc == 0, text
    assert "queue state: none" in text
    assert "unknown" in text
    assert "record ids on disk: 1..9" in text


def test_inspect_damaged_database(tmp_path):
    path, offsets = make_db(tmp_path)
    lid, off = offsets[5]
    flip(path, lid, off + len(rec(5)) - 22)
    save_queues(path, QueueState(appending=7, read=[0, 1, 2]))  # log7 does not exist
    rc, text = run(mi.inspect_db, path)
    assert rc == 0, text
    assert f"valid up to byte {off}, then crc (1 whole record 6..6 after it)" in text
    assert "discarded by replay" in text
    assert "record ids on disk: 1..9" in text
    assert "valid prefix: records 1..4" in text
    assert "missing on disk" in text


def test_inspect_shows_shared_memory_and_live_writer(tmp_path):
    path, _ = make_db(tmp_path)
    real = os.path.realpath(path)
    lock = WriterLock(path)
    seg = ov.OverlayWriter(real, 5, 64, 4096)
    try:
        seg.publish(9, [((3, 1), b"hello"), ((3, 2), None)])
        for word, v in ((ov.COMMITTED, 9), (ov.DURABLE, 8), (ov.ENACTED, 3)):
            seg.q[word] = v
        before_shm = bytes(seg.m)
        before = snapshot(path)
        rc, text = run(mi.inspect_db, path)
        assert rc == 0, text
        assert "writer: alive" in text
        assert f"{seg.name}: generation 5, live, writer pid {os.getpid()}" in text
        assert ("committed 9, durable 8, enacted 3; entries 2 of 64 slots, "
                "heap 72 of 4096 bytes") in text
        assert bytes(seg.m) == before_shm  # mapped read-only, nothing written
        assert snapshot(path) == before
        assert "STALE" not in text
        lock.release()
        rc, text = run(mi.inspect_db, path)
        assert "writer: not alive" in text
        assert f"{seg.name} (STALE): generation 5, live" in text
        assert (f"1 stale segment: left by a writer that is gone; remove with `mpwal cleanup "
                f"{real}`") in text
        doc = json.loads(run(mi.inspect_db, path, as_json=True)[1])
        assert [(s["name"], s["stale"], s["state_name"]) for s in doc["segments"]] == \
            [(seg.name, True, "live")]
    finally:
        lock.release()
        seg.retire(ov.CLOSED)
        seg.release()
    assert not ov.stale_segments(real)


# -- not a database, and nothing changes -------------------------------------------------------

@pytest.mark.parametrize("fn", ALL + [mi.cleanup])
def test_not_a_database(tmp_path, fn):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    missing = tmp_path / "missing"
    for p, why in ((empty, "is not an mpwal database"), (missing, "does not exist"),
                   (a_file, "is not a directory")):
        rc, text = run(fn, str(p))
        assert rc == 2
        assert text.startswith(f"error: {p} {why}") and text.count("\n") == 1, text
    assert os.listdir(empty) == []
    assert not missing.exists()
    assert a_file.read_bytes() == b"x"


@pytest.mark.parametrize("fn", [mi.inspect_db, mi.verify])
def test_json_errors_are_json(tmp_path, fn):
    rc, text = run(fn, str(tmp_path / "missing"), as_json=True)
    assert rc == 2
    assert json.loads(text) == {"error": f"{tmp_path / 'missing'} does not exist"}


def test_dump_json_error_is_json(tmp_path):
    rc, text = run(mi.dump, str(tmp_path), json_lines=True)
    assert rc == 2
    assert "not an mpwal database" in json.loads(text)["error"]


def _damage(kind: str, path: str, offsets: dict) -> None:
    if kind == "crc":
        lid, off = offsets[5]
        flip(path, lid, off + 20)
    elif kind == "torn":
        lid, off = offsets[9]
        os.truncate(os.path.join(path, f"log{lid}"), off + 7)
    elif kind == "gap":
        os.unlink(os.path.join(path, "log1"))
    elif kind == "garbage":
        with open(os.path.join(path, "log9"), "wb") as f:
            f.write(b"\x07" * 100)


@pytest.mark.parametrize("damage", ["none", "crc", "torn", "gap", "garbage"])
@pytest.mark.parametrize("queues", [True, False])
def test_nothing_changes_on_disk(tmp_path, damage, queues):
    path, offsets = make_db(tmp_path, queues=queues)
    open(os.path.join(path, "log5"), "wb").close()
    _damage(damage, path, offsets)
    before = snapshot(path)
    for fn in ALL:
        run(fn, path)
    run(mi.dump, path, json_lines=True)
    run(mi.inspect_db, path, as_json=True)
    run(mi.verify, path, as_json=True)
    assert snapshot(path) == before
    assert not ov.stale_segments(os.path.realpath(path))


def test_no_write_calls_are_made(tmp_path, monkeypatch):
    """Every open is read-only, no lock is taken, nothing is renamed, truncated or removed, and
    shared memory is opened and mapped read-only (root ignores file modes, so this checks the
    calls rather than relying on a read-only directory)."""
    import builtins
    import fcntl
    import mmap

    import posix_ipc

    path, offsets = make_db(tmp_path)
    _damage("crc", path, offsets)
    real = os.path.realpath(path)
    lock = WriterLock(path)
    seg = ov.OverlayWriter(real, 1, 16, 4096)
    calls = []

    def guard(name, fn, bad):
        def wrapped(*a, **kw):
            if bad(*a, **kw):
                calls.append((name, a, kw))
                raise AssertionError(f"write-like call {name}{a}{kw}")
            return fn(*a, **kw)
        monkeypatch.setattr(*name_of(name), wrapped)

    def name_of(dotted):
        mod, attr = dotted.rsplit(".", 1)
        return {"os": os, "builtins": builtins, "fcntl": fcntl, "mmap": mmap,
                "posix_ipc": posix_ipc}[mod], attr

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    try:
        guard("os.open", os.open, lambda p, flags, *a, **kw: bool(flags & write_flags))
        guard("builtins.open", builtins.open,
              lambda f, mode="r", *a, **kw: any(c in mode for c in "wax+"))
        for name in ("os.truncate", "os.ftruncate", "os.unlink", "os.remove", "os.rename",
                     "os.replace", "os.mkdir", "os.makedirs", "fcntl.flock", "fcntl.lockf"):
            guard(name, eval(name), lambda *a, **kw: True)
        guard("fcntl.fcntl", fcntl.fcntl,
              lambda fd, cmd, *a: cmd not in (fcntl.F_OFD_GETLK, fcntl.F_GETLK, fcntl.F_GETFL))
        guard("posix_ipc.SharedMemory", posix_ipc.SharedMemory,
              lambda name, flags=0, *a, **kw: flags != 0 or not kw.get("read_only"))
        guard("posix_ipc.unlink_shared_memory", posix_ipc.unlink_shared_memory, lambda *a: True)
        guard("mmap.mmap", mmap.mmap,
              lambda fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, *a:
              bool(prot & mmap.PROT_WRITE))
        outs = [run(fn, path) for fn in ALL] + [run(mi.dump, path, json_lines=True),
                                                run(mi.inspect_db, path, as_json=True),
                                                run(mi.verify, path, as_json=True)]
    finally:
        monkeypatch.undo()
        lock.release()
        seg.retire(ov.CLOSED)
        seg.release()
    assert not calls
    assert [rc for rc, _ in outs] == [0, 1, 1, 1, 0, 1]
    assert f"{seg.name}: generation 1, live" in outs[0][1]
    assert "writer: alive" in outs[0][1]


def test_discarded_log_with_out_of_sequence_records_is_counted_whole(tmp_path):
    path, _ = make_db(tmp_path, logs=((1, 2, 3), (7, 9, 10)))
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert "log1 at byte 0: gap: expected record 4, but the next log starts at record 7" in text
    assert "replay discards 3 whole records" in text  # 7, 9 and 10


# -- log headers: database id and epoch, ignored logs ----------------------------------------

def test_each_log_shows_its_database_id_and_epoch(tmp_path):
    path, offsets = make_db(tmp_path)
    ident = database_id(path).hex()
    rc, text = run(mi.dump, path)
    assert rc == 0
    for lid in range(3):  # a line before each log's records, then records at file offsets
        assert f"log log{lid} database {ident} epoch 1\nrecord {3 * lid + 1} log{lid} byte " \
            f"{LOG_HEADER_SIZE}\n" in text
    objs = [json.loads(line) for line in run(mi.dump, path, json_lines=True)[1].splitlines()]
    assert {(o["database_id"], o["epoch"]) for o in objs} == {(ident, 1)}
    assert [o["offset"] for o in objs] == [offsets[r][1] for r in range(1, 10)]
    rc, text = run(mi.inspect_db, path)
    assert f"database id: {ident}\n" in text
    doc = json.loads(run(mi.verify, path, as_json=True)[1])
    assert doc["database_id"] == ident and doc["log_epoch_floor"] == 0
    assert [(lg["database_id"], lg["epoch"]) for lg in doc["logs"]] == [(ident, 1)] * 3
    assert doc["ignored"] == []


def test_ignored_logs_are_reported_with_why(tmp_path):
    """Logs read_logs ignores (another database's, stale, without a header) are listed with why
    by every tool, as text and JSON; they are no problem of the database (exit 0), and their
    records count neither in the prefix nor in the record ids on disk."""
    path, _ = make_db(tmp_path)
    save_queues(path, QueueState(epoch=1, generation=1, appending=2, read=[0, 1], next_log=8,
                                 log_epoch_floor=1))
    other = bytes(range(16))
    with open(os.path.join(path, "log5"), "wb") as f:
        f.write(encode_log_header(other, 1) + rec(10))  # another database's
    write_log(path, 6, rec(10), epoch=0)  # stale: below the floor
    with open(os.path.join(path, "log7"), "wb") as f:
        f.write(rec(10))  # no header
    whys = {"log5": f"its header names database {other.hex()}, not this one",
            "log6": "it is stale: epoch 0, older than 1",
            "log7": "it has no log header"}
    before = snapshot(path)

    rc, text = run(mi.verify, path)
    assert rc == 0 and "result: ok" in text, text
    assert "valid prefix: 9 records, 1..9, in 3 logs" in text
    for log, why in whys.items():
        assert f"note: {log} is ignored: {why}" in text
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("  log")}
    assert rows["log5"][4:] == ["1", other.hex(), "ignored"]
    assert rows["log6"][4:] == ["0", database_id(path).hex(), "ignored"]
    assert rows["log7"][4:] == ["-", "-", "ignored"]
    doc = json.loads(run(mi.verify, path, as_json=True)[1])
    assert doc["ok"] is True and doc["log_epoch_floor"] == 1
    assert [(i["log"], i["records"]) for i in doc["ignored"]] == [
        ("log5", 1), ("log6", 1), ("log7", 1)]
    for i in doc["ignored"]:
        assert i["why"].startswith(whys[i["log"]])

    rc, text = run(mi.inspect_db, path)
    assert rc == 0
    assert "record ids on disk: 1..9" in text and "valid prefix: records 1..9" in text
    for log, why in whys.items():
        assert f"note: {log} is ignored: {why}" in text
    doc = json.loads(run(mi.inspect_db, path, as_json=True)[1])
    assert [i["log"] for i in doc["ignored"]] == ["log5", "log6", "log7"]
    logs = {lg["log"]: lg for lg in doc["logs"]}
    assert logs["log5"]["state"] == "ignored" and logs["log5"]["database_id"] == other.hex()
    assert doc["record_ids_on_disk"] == {"first": 1, "last": 9}

    rc, text = run(mi.dump, path)
    assert rc == 0 and "record 10" not in text
    assert f"note: log5 is ignored: {whys['log5']}" in text
    rc, text = run(mi.dump, path, json_lines=True)
    objs = [json.loads(line) for line in text.splitlines()]
    assert [o["record_id"] for o in objs[:9]] == list(range(1, 10))
    assert [(o["ignored"]["log"], o["ignored"]["why"][:len(whys[o["ignored"]["log"]])])
            for o in objs[9:]] == list(whys.items())
    assert snapshot(path) == before


@pytest.mark.parametrize("o", [1, 16, 20, LOG_HEADER_SIZE - 1])
def test_verify_names_a_log_whose_header_does_not_verify(tmp_path, o):
    """A flipped byte in log1's log header (its database id, epoch or CRC): the header fails
    its CRC and the prefix ends before log1, named at byte 0."""
    path, _ = make_db(tmp_path)
    flip(path, 1, o)
    rc, text = run(mi.verify, path)
    assert rc == 1
    assert "problem: log1 at byte 0: bad header (the log header" in text
    assert "valid prefix: 3 records, 1..3" in text
    assert "discarded: its log header does not verify" in text
    assert "replay discards 6 whole records" in text
    doc = json.loads(run(mi.verify, path, as_json=True)[1])
    assert (doc["problem"]["log"], doc["problem"]["offset"], doc["problem"]["why"]) == \
        ("log1", 0, "bad header")
    rc, text = run(mi.dump, path)
    assert rc == 1 and text.splitlines()[-1].startswith("problem: log1 at byte 0: bad header")


def test_first_record_problem_is_named_at_its_byte_after_the_header(tmp_path):
    """A bad first record of a log is named at its own offset, just after the log header."""
    path, offsets = make_db(tmp_path)
    lid, off = offsets[4]
    assert off == LOG_HEADER_SIZE
    flip(path, lid, off + 20)
    doc = json.loads(run(mi.verify, path, as_json=True)[1])
    assert (doc["problem"]["log"], doc["problem"]["offset"], doc["problem"]["record_id"]) == \
        ("log1", LOG_HEADER_SIZE, 4)


def test_format1_directory_has_no_database_id(tmp_path):
    """A directory of format 1 (no id; logs without a header) verifies as before: its logs
    are its own, shown without an epoch or database id."""
    path = str(tmp_path / "db")
    os.makedirs(path)
    with open(os.path.join(path, "mpwal.meta"), "w") as f:
        json.dump({"mpwal": 1, "tables": [{"id": 1, "kind": "index"},
                                          {"id": 3, "kind": "value", "slot_size": 64}]}, f)
    for name in ("index1.tbl", "value3.tbl"):
        open(os.path.join(path, name), "wb").close()
    with open(os.path.join(path, "log0"), "wb") as f:
        f.write(rec(1) + rec(2))
    rc, text = run(mi.verify, path)
    assert rc == 0 and "result: ok" in text and "ignored" not in text
    assert "database id: none (format 1" in text
    assert next(ln for ln in text.splitlines() if ln.startswith("  log0")).split()[4:] == \
        ["-", "-", "ok"]
    rc, text = run(mi.dump, path)
    assert rc == 0 and text.startswith("log log0 database - epoch -\nrecord 1 log0 byte 0\n")


def test_live_changes_are_reported_not_mixed(tmp_path, monkeypatch):
    """A log cleaned between read_logs and the second pass, or a queue state that moves while a
    problem is seen, makes verify/dump say so and exit 2 instead of printing a mix."""
    path, offsets = make_db(tmp_path)
    real_load = mi.load_queues
    bumps = iter(range(1, 1000))

    def moving(p):
        st = real_load(p)
        st.version += next(bumps)
        return st

    monkeypatch.setattr(mi, "load_queues", moving)
    rc, text = run(mi.verify, path)
    assert rc == 0 and "note: the queue state changed" in text  # clean: every record verified
    _damage("crc", path, offsets)
    rc, text = run(mi.verify, path)
    assert rc == 2 and "result: inconclusive" in text
    rc, text = run(mi.inspect_db, path)
    assert rc == 0 and "note: the database changed while it was read" in text
    monkeypatch.undo()

    monkeypatch.setattr(mi, "_read_log", lambda p, lid: b"")  # every log cleaned meanwhile
    rc, text = run(mi.dump, path)
    assert rc == 2 and text == "note: log0 was cleaned or reused while it was read; the dump " \
        "stops here: run it again\n"
    rc, text = run(mi.dump, path, json_lines=True)
    assert rc == 2 and "cleaned or reused" in json.loads(text)["note"]
    rc, text = run(mi.verify, path)
    assert rc == 2 and "note: log0 was cleaned or reused" in text
