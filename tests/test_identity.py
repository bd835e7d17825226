"""Database identity and log epochs: every database has a random id in ``mpwal.meta`` (format 2),
every log the writer writes starts with a log header naming that id and the writer's epoch, and
the logs read as the database's (by replay and by a private Reader) are only its own current
ones. A log of another database, a stale log (an epoch below the queue state's
``log_epoch_floor``) and, in a database with an id, a log without a header are ignored: their
records never appear, and replay warns and empties them. A directory of format 1 (no id, logs
without a header) is upgraded by its first writer open; a format newer than this mpwal's is
refused. The header's CRC is checked against crcmod's CRC-32, independent of zlib.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import struct
import traceback

import crcmod.predefined
import pytest
from procs import INDEX_TABLE, TABLES, VALUE_TABLE, log_header_for, write_log

import mpwal
from mpwal import _tables as mtables
from mpwal._format import (
    BEGIN_SIZE,
    LOG_HEADER,
    LOG_HEADER_SIZE,
    LOG_PREFIX,
    LogScan,
    decode_log_header,
    encode_log_header,
    encode_record,
    first_record_id,
)
from mpwal._logs import LogIdentity, read_logs
from mpwal._queues import QUEUE_FILE, load_queues, log_ids, log_path
from mpwal._tables import FORMAT_VERSION, META_FILE, database_id, load_catalog

from reliability import dir_bytes, segments_left

crc32 = crcmod.predefined.mkCrcFun("crc-32")
FORK = multiprocessing.get_context("fork")


# -- helpers ----------------------------------------------------------------------------------

def value(tag: str, rid: int) -> bytes:
    return f"{tag}{rid}".encode()


def commit(w: mpwal.Writer, first: int, last: int, tag: str) -> None:
    """Records ``first..last``: each writes ``value(tag, rid)`` at index ``rid``."""
    for rid in range(first, last + 1):
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, rid, value(tag, rid))
        assert rec.record_id == rid


def _commit_and_die(path: str, first: int, last: int, tag: str) -> None:
    try:
        w = mpwal.Writer(path, TABLES, enactor="none", log_age=3600)
        commit(w, first, last, tag)
        w.sync()
        os._exit(0)  # no close: the records stay in the logs, un-enacted
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def crash_writer(path: str, first: int, last: int, tag: str) -> None:
    """Commit records ``first..last`` in a forked writer that exits without closing."""
    p = FORK.Process(target=_commit_and_die, args=(path, first, last, tag))
    p.start()
    p.join(60)
    assert p.exitcode == 0, f"the writer child failed with exit code {p.exitcode}"
    segments_left(path)


def logs_with_records(path: str) -> dict[int, bytes]:
    out = {}
    for lid in log_ids(path):
        with open(log_path(path, lid), "rb") as f:
            data = f.read()
        if data:
            out[lid] = data
    return out


def values(src, last: int) -> list[bytes | None]:
    return [src.value(VALUE_TABLE, i) for i in range(1, last + 1)]


def prefix_ids(path: str, identity: LogIdentity | None = None) -> list[int]:
    st = load_queues(path)
    ls = read_logs(path, start=st.last_cleaned_record + 1 if st else None, identity=identity)
    return [r.record_id for r in ls.records()]


def ignored(path: str) -> dict[int, str]:
    st = load_queues(path)
    return dict(read_logs(path, start=st.last_cleaned_record + 1 if st else None).ignored)


def replay_warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- the log header, checked with crcmod ------------------------------------------------------

def test_log_header_layout_and_crc_checked_with_crcmod():
    """The header is type 6, the database id, the epoch u64, and the CRC-32 of those 25 bytes."""
    ident = bytes(range(16))
    for epoch in (0, 1, 7, (1 << 64) - 1):
        body = struct.pack("<B", 6) + ident + struct.pack("<Q", epoch)
        assert encode_log_header(ident, epoch) == body + struct.pack("<I", crc32(body))
        assert decode_log_header(body + struct.pack("<I", crc32(body))) == (ident, epoch)
    assert LOG_HEADER == 6 and LOG_HEADER_SIZE == 29 and LOG_PREFIX == LOG_HEADER_SIZE + BEGIN_SIZE


def test_log_header_that_does_not_verify_is_refused():
    """Every byte of a header damaged (or a header cut short, or a CRC for other bytes): it does
    not decode; a CRC recomputed by crcmod over changed bytes makes them decode."""
    good = encode_log_header(b"\xab" * 16, 42)
    for o in range(LOG_HEADER_SIZE):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[o] ^= mask
            assert decode_log_header(bytes(bad)) is None, (o, mask)
    for n in range(LOG_HEADER_SIZE):
        assert decode_log_header(good[:n]) is None
    body = bytearray(good[:-4])
    body[17] ^= 1  # the epoch's low byte: 42 -> 43
    assert decode_log_header(bytes(body) + good[-4:]) is None
    assert decode_log_header(bytes(body) + struct.pack("<I", crc32(bytes(body)))) == \
        (b"\xab" * 16, 43)


def test_log_scan_reads_the_header_first_and_counts_offsets_from_the_file_start():
    """A scan from byte 0 reads the header (``header``), then records at file offsets; a header
    that does not verify ends the scan before any record ("bad header"); a log without one is
    scanned from byte 0 (format 1)."""
    ident = os.urandom(16)
    recs = encode_record(7, [], {}, {(3, 1): b"a"}) + encode_record(8, [], {}, {(3, 2): b"b"})
    head = encode_log_header(ident, 5)
    scan = LogScan(head + recs)
    got = list(scan.records())
    assert scan.header == (ident, 5) and scan.problem is None
    assert [(r.record_id, r.start) for r in got] == [(7, LOG_HEADER_SIZE),
                                                     (8, got[0].end)]
    assert scan.end == LOG_HEADER_SIZE + len(recs)
    assert first_record_id((head + recs)[:LOG_PREFIX]) == 7 == first_record_id(recs)
    bad = bytearray(head + recs)
    bad[20] ^= 0x10
    scan = LogScan(bytes(bad))
    assert list(scan.records()) == [] and scan.header is None
    assert (scan.problem, scan.end) == ("bad header", 0)
    scan = LogScan(recs)  # no header
    assert [r.start for r in scan.records()][0] == 0 and scan.header is None


def test_writer_logs_start_with_the_header_of_the_database_and_epoch(db):
    """The first bytes of a log a Writer writes are the header of the id in mpwal.meta and the
    writer's epoch (checked with crcmod), and its first record follows at LOG_HEADER_SIZE; a
    later writer open writes a later epoch."""
    epochs = []
    for n in range(2):
        with mpwal.Writer(db, TABLES, enactor="none", log_age=3600) as w:
            commit(w, 2 * n + 1, 2 * n + 2, "x")
            lid = w.stats()["logs"]["appending"]
            with open(log_path(db, lid), "rb") as f:
                data = f.read()
            epoch = load_queues(db).epoch
        with open(os.path.join(db, META_FILE)) as f:
            doc = json.load(f)
        assert doc["mpwal"] == FORMAT_VERSION == 2
        ident = bytes.fromhex(doc["database_id"])
        assert len(ident) == 16 and database_id(db) == ident
        head = data[:LOG_HEADER_SIZE]
        assert head[0] == 6 and head[1:17] == ident
        assert struct.unpack_from("<Q", head, 17)[0] == epoch
        assert struct.unpack_from("<I", head, 25)[0] == crc32(head[:25])
        recs = list(LogScan(data).records())
        assert [r.record_id for r in recs] == [2 * n + 1, 2 * n + 2]
        assert recs[0].start == LOG_HEADER_SIZE
        epochs.append(epoch)
    assert epochs[1] > epochs[0]


# -- logs that are not the database's ---------------------------------------------------------

def test_a_log_copied_from_another_database_is_ignored(tmp_path, caplog):
    """Logs of database B copied into database A, holding records whose ids continue A's: a
    private Reader of A and A's replay never show them; replay warns and empties them."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with mpwal.Writer(a, TABLES) as w:
        commit(w, 1, 3, "a")
    with mpwal.Writer(b, TABLES) as w:
        commit(w, 1, 3, "b")
    crash_writer(b, 4, 6, "b")  # B's records 4..6 stay in its logs
    foreign = logs_with_records(b)
    assert foreign
    copied = []
    for i, data in enumerate(foreign.values()):
        assert decode_log_header(data)[0] == database_id(b) != database_id(a)
        with open(log_path(a, 20 + i), "wb") as f:
            f.write(data)
        copied.append(20 + i)
    why = ignored(a)
    assert sorted(why) == copied
    assert all(f"names database {database_id(b).hex()}" in w for w in why.values())
    with mpwal.Reader(a) as r:
        assert r.mode == "private"
        assert r.last_record_id == 3
        assert values(r, 6) == [value("a", 1), value("a", 2), value("a", 3), None, None, None]
    # (not vacuous: A would take B's records if the logs named A)
    assert prefix_ids(a, LogIdentity(database_id(b), 0)) == [4, 5, 6]

    caplog.set_level(logging.WARNING, logger="mpwal")
    with mpwal.Writer(a, TABLES) as w:
        assert w.last_record_id == 3
        assert values(w, 6) == [value("a", 1), value("a", 2), value("a", 3), None, None, None]
        commit(w, 4, 4, "a")
    text = replay_warnings(caplog)
    for lid in copied:
        assert f"ignores log{lid}: its header names database {database_id(b).hex()}" in text
        assert os.path.getsize(log_path(a, lid)) == 0  # emptied with the others
    with mpwal.Reader(a) as r:
        assert values(r, 6) == [value("a", 1), value("a", 2), value("a", 3), value("a", 4),
                                None, None]


def test_a_stale_log_is_ignored(db, caplog):
    """A log of an older epoch that reappears (its truncation undone, say by a power loss) after
    a later writer replayed, took other records under the same ids and closed: its records
    never appear, though their ids continue the database's."""
    crash_writer(db, 1, 5, "old")  # records 1..5 of epoch e1, in the logs
    saved = logs_with_records(db)
    assert len(saved) == 1
    (lid, old), = saved.items()
    old_epoch = decode_log_header(old)[1]
    recs = {r.record_id: r for r in LogScan(old).records()}
    with open(log_path(db, lid), "r+b") as f:  # damage record 3: replay keeps 1..2 only
        f.truncate(recs[3].start + 5)
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 2
        commit(w, 3, 4, "new")  # ids 3 and 4 again, of a later epoch
    st = load_queues(db)
    assert old_epoch < st.log_epoch_floor and st.last_cleaned_record == 4
    with open(log_path(db, lid), "wb") as f:  # the old bytes are back
        f.write(old)
    expect = [value("old", 1), value("old", 2), value("new", 3), value("new", 4), None]
    why = ignored(db)
    assert list(why) == [lid] and f"stale: epoch {old_epoch}" in why[lid]
    with mpwal.Reader(db) as r:
        assert r.mode == "private"
        assert r.last_record_id == 4
        assert values(r, 5) == expect
    # (not vacuous: without the epoch floor the old record 5 would be taken)
    assert prefix_ids(db, LogIdentity(database_id(db), 0)) == [5]

    caplog.set_level(logging.WARNING, logger="mpwal")
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 4
        assert values(w, 5) == expect
        commit(w, 5, 5, "newer")
    assert f"ignores log{lid}: it is stale: epoch {old_epoch}" in replay_warnings(caplog)
    with mpwal.Reader(db) as r:
        assert values(r, 5) == expect[:4] + [value("newer", 5)]


def test_a_log_without_a_header_is_ignored_in_a_database_with_an_id(db, caplog):
    """Records that continue the database's ids in a log without a header (as format 1 wrote
    them): a database with an id does not take them."""
    with mpwal.Writer(db, TABLES) as w:
        commit(w, 1, 2, "a")
    bare = b"".join(encode_record(rid, [], {}, {(VALUE_TABLE, rid): value("bare", rid)})
                    for rid in (3, 4))
    with open(log_path(db, 9), "wb") as f:
        f.write(bare)
    why = ignored(db)
    assert list(why) == [9] and "no log header" in why[9]
    with mpwal.Reader(db) as r:
        assert r.mode == "private" and r.last_record_id == 2
        assert values(r, 4) == [value("a", 1), value("a", 2), None, None]
    caplog.set_level(logging.WARNING, logger="mpwal")
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 2
        assert values(w, 4) == [value("a", 1), value("a", 2), None, None]
    assert "ignores log9: it has no log header" in replay_warnings(caplog)
    assert os.path.getsize(log_path(db, 9)) == 0
    # (not vacuous: the same records after this database's header are taken)
    write_log(db, 9, bare)
    with mpwal.Reader(db) as r:
        assert r.last_record_id == 4
        assert values(r, 4) == [value("a", 1), value("a", 2), value("bare", 3), value("bare", 4)]


# -- format 1: upgraded at the first writer open ----------------------------------------------

def make_format1(path: str, last: int, queue_file: bool) -> None:
    """A directory as mpwal 0.1 (format 1) left it: no database id, records 1..``last`` in two
    logs without a header, and (``queue_file``) a queue state of that version (no epoch floor)."""
    os.makedirs(path)
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump({"mpwal": 1, "tables": [t.describe() for t in TABLES]}, f)
    for t in TABLES:
        open(os.path.join(path, t.file_name), "wb").close()
    split = last // 2
    for lid, rids in ((0, range(1, split + 1)), (1, range(split + 1, last + 1))):
        with open(log_path(path, lid), "wb") as f:
            f.write(b"".join(encode_record(rid, [], {(INDEX_TABLE, 0): (1, {0: rid})},
                                           {(VALUE_TABLE, rid): value("v1-", rid)})
                             for rid in rids))
    if queue_file:
        with open(os.path.join(path, QUEUE_FILE), "w") as f:
            json.dump({"version": 9, "epoch": 3, "generation": 2, "appending": 1, "read": [0],
                       "cleanup": [], "pool": [], "next_log": 2, "last_cleaned_record": 0,
                       "sync_data": True, "writer_pid": 0}, f)


@pytest.mark.parametrize("queue_file", [True, False], ids=["queue-file", "no-queue-file"])
def test_format1_directory_is_upgraded_at_the_first_writer_open(db, queue_file, monkeypatch):
    """Format 1 logs have no header and are read as the database's until the first writer
    open, which replays them (every record kept), gives the directory format 2 and an id, and
    writes headers in new logs from then on. An mpwal of format 1 would refuse it now."""
    make_format1(db, 6, queue_file)
    assert database_id(db) is None
    assert not ignored(db)
    with mpwal.Reader(db) as r:  # a private reader takes the logs without a header
        assert r.mode == "private" and r.last_record_id == 6
        assert values(r, 6) == [value("v1-", i) for i in range(1, 7)]
    with mpwal.Writer(db, TABLES, enactor="none", log_age=3600) as w:
        assert w.last_record_id == 6
        assert values(w, 6) == [value("v1-", i) for i in range(1, 7)]
        assert w.index_entry(INDEX_TABLE, 0, 0) == 6
        with open(os.path.join(db, META_FILE)) as f:
            doc = json.load(f)
        assert doc["mpwal"] == FORMAT_VERSION == 2
        ident = bytes.fromhex(doc["database_id"])
        assert database_id(db) == ident and len(ident) == 16
        # and the producers' reserved table (65535: slots of 16 bytes), which every writer adds
        assert load_catalog(db) == {t.id: t for t in TABLES} | {65535: mpwal.ValueTable(65535, 16)}
        assert all(os.path.getsize(log_path(db, lid)) == 0 for lid in (0, 1))  # replayed
        commit(w, 7, 7, "v2-")
        lid = w.stats()["logs"]["appending"]
        with open(log_path(db, lid), "rb") as f:
            data = f.read()
        assert decode_log_header(data) == (ident, load_queues(db).epoch)
        assert [r.record_id for r in LogScan(data).records()] == [7]
    with mpwal.Writer(db, TABLES) as w:  # upgraded once: the id stays
        assert database_id(db) == ident
        assert values(w, 7) == [value("v1-", i) for i in range(1, 7)] + [value("v2-", 7)]
    with mpwal.Reader(db) as r:
        assert values(r, 7) == [value("v1-", i) for i in range(1, 7)] + [value("v2-", 7)]
    # a log without a header is not the database's any more
    with open(log_path(db, 5), "wb") as f:
        f.write(encode_record(8, [], {}, {(VALUE_TABLE, 8): b"bare"}))
    assert "no log header" in ignored(db)[5]
    with mpwal.Reader(db) as r:
        assert r.last_record_id == 7 and r.value(VALUE_TABLE, 8) is None
    # an mpwal of format 1 refuses format 2 as newer
    monkeypatch.setattr(mtables, "FORMAT_VERSION", 1)
    with pytest.raises(mpwal.DatabaseError, match="newer than this mpwal's 1"):
        load_catalog(db)


def test_format1_directory_keeps_format1_until_a_writer_opens(db):
    """A private Reader of a format 1 directory changes nothing: no upgrade, no id."""
    make_format1(db, 4, queue_file=True)
    before = dir_bytes(db)
    with mpwal.Reader(db) as r:
        assert r.last_record_id == 4
    assert dir_bytes(db) == before and database_id(db) is None


# -- formats this mpwal refuses ---------------------------------------------------------------

def test_a_format_newer_than_this_mpwal_is_refused(db):
    """mpwal.meta of a format above FORMAT_VERSION (an mpwal newer than this one wrote it):
    Writer, Reader and the catalog refuse it with DatabaseError, and nothing changes on disk."""
    with mpwal.Writer(db, TABLES) as w:
        commit(w, 1, 1, "a")
    meta = os.path.join(db, META_FILE)
    with open(meta) as f:
        doc = json.load(f)
    doc["mpwal"] = FORMAT_VERSION + 1
    with open(meta, "w") as f:
        json.dump(doc, f)
    before = dir_bytes(db)
    for open_it in (lambda: mpwal.Writer(db, TABLES), lambda: mpwal.Reader(db),
                    lambda: load_catalog(db), lambda: database_id(db)):
        with pytest.raises(mpwal.DatabaseError, match=f"format {FORMAT_VERSION + 1}, newer"):
            open_it()
    assert dir_bytes(db) == before


@pytest.mark.parametrize("dbid", [None, "abc", 12])
def test_format2_meta_without_a_database_id_is_damaged(db, dbid):
    """Format 2 without a database id of 32 hex digits: refused as damaged."""
    with mpwal.Writer(db, TABLES):
        pass
    meta = os.path.join(db, META_FILE)
    with open(meta) as f:
        doc = json.load(f)
    if dbid is None:
        del doc["database_id"]
    else:
        doc["database_id"] = dbid
    with open(meta, "w") as f:
        json.dump(doc, f)
    with pytest.raises(mpwal.DatabaseError, match="damaged"):
        mpwal.Writer(db, TABLES)


def test_log_header_for_helper_matches_the_writer(db):
    """tests/procs.py's log_header_for gives the header the writer writes."""
    with mpwal.Writer(db, TABLES, enactor="none", log_age=3600) as w:
        commit(w, 1, 1, "a")
        with open(log_path(db, w.stats()["logs"]["appending"]), "rb") as f:
            assert f.read(LOG_HEADER_SIZE) == log_header_for(db)


def test_a_stale_log_is_ignored_after_the_queue_file_was_rebuilt(db):
    """As test_a_stale_log_is_ignored, but the queue file was lost before the later writer
    opened: the epochs it writes must still be above the old log's, so that it is stale."""
    for _ in range(3):  # a few writer opens: the epoch grows
        mpwal.Writer(db, TABLES).close()
    crash_writer(db, 1, 5, "old")
    (lid, old), = logs_with_records(db).items()
    recs = {r.record_id: r for r in LogScan(old).records()}
    with open(log_path(db, lid), "r+b") as f:
        f.truncate(recs[3].start + 5)
    os.unlink(os.path.join(db, QUEUE_FILE))  # lost: the next writer rebuilds it from the logs
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 2
        commit(w, 3, 4, "new")
    with open(log_path(db, lid), "wb") as f:
        f.write(old)
    assert lid in ignored(db)
    with mpwal.Reader(db) as r:
        assert r.last_record_id == 4
        assert values(r, 5) == [value("old", 1), value("old", 2), value("new", 3),
                                value("new", 4), None]
