"""Snapshots (``Reader.snapshot()``): reads pinned at one record id across calls, while the
writer commits newer records and the enactor applies rotated logs; the reader table of pins
(``_pins.py``); real processes moving money between accounts; a writer SIGSTOPped again and
again while a reader times every call; a writer killed under a snapshot.

Values are self-describing (``procs.make_value``: key and record id), so every read can be
checked against the model state at the snapshot's record id: never newer, never older.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import signal
import struct
import time

import pytest

import mpwal
from mpwal._overlay import STRUCT, SUPERSEDED, OverlayReader, segment_name
from mpwal._pins import FILE_BYTES, MAX_AGE_W, PINS_MAGIC, READERS_FILE, SLOTS, ReaderTable, read_pins
from mpwal._queues import load_queues

from procs import (INDEX_TABLE, SLOT, TABLES, VALUE_TABLE, check_value, commit_workload,
                   expected_state, make_value, read_state, writes_of)

CTX = multiprocessing.get_context("spawn")
KEYS, PER = 200, 12  # the workload of commit_workload: 12 of 200 keys per record


# -- helpers ---------------------------------------------------------------------------------

def wait_for(pred, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def enacted(w: mpwal.Writer) -> int:
    return w.stats()["enacted"]


def settle(w: mpwal.Writer, upto: int, hold: float = 0.15) -> None:
    """Wait until enactment reaches ``upto``, then give it ``hold`` more seconds (many
    rotations at log_age 0.01) to go past it if it were going to."""
    wait_for(lambda: enacted(w) >= upto, what=f"enactment to reach {upto}")
    time.sleep(hold)


def live_pins(path: str) -> list[dict]:
    """Every pinned slot of the reader table (slot, record_id, age, pid, live)."""
    return read_pins(os.path.realpath(path))


def chunk_of(state: dict[int, int], chunk: int) -> bytes:
    """The index chunk commit_workload leaves: entry k % 64 of chunk k // 64 = k's record."""
    out = bytearray(512)
    for k, rid in state.items():
        if k // 64 == chunk:
            out[(k % 64) * 8:(k % 64) * 8 + 8] = rid.to_bytes(8, "little")
    return bytes(out)


def check_snapshot_state(s: mpwal.Snapshot, state: dict[int, int]) -> None:
    """Every key, one call at a time and all at once, and every index chunk and some entries,
    as ``state`` (key -> record id) says: the state at ``s.record_id``."""
    vals = s.values(VALUE_TABLE, range(KEYS))
    for k in range(KEYS):
        one = s.value(VALUE_TABLE, k)
        assert one == vals[k], f"key {k}: value() and values() disagree in one snapshot"
        got = None if one is None else check_value(k, one)
        assert got == state.get(k), f"key {k}: record {got} in the snapshot at " \
                                    f"{s.record_id}, want {state.get(k)}"
    for c in range((KEYS + 63) // 64):
        assert s.index_chunk(INDEX_TABLE, c) == chunk_of(state, c), f"chunk {c}"
    for k in range(0, KEYS, 17):
        assert s.index_entry(INDEX_TABLE, k // 64, k % 64) == state.get(k, 0), f"entry of {k}"


def files_of(path: str) -> dict[str, tuple[bytes, int, int]]:
    """Every file's contents, mtime (ns) and mode: to show that something changed nothing."""
    out = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        st = os.stat(p)
        with open(p, "rb") as f:
            out[name] = (f.read(), st.st_mtime_ns, st.st_mode)
    return out


# -- 1. one process --------------------------------------------------------------------------

@pytest.mark.parametrize("enactor", ["thread", "process"])
def test_a_snapshot_reads_its_record_while_newer_ones_commit_and_enact(db, enactor):
    """The enactor (a thread of the writer, whose slot locks conflict with the reader's in the
    same process, or a process reading the logs' files) stops at the pin; the snapshot reads
    the state at its record id, from the overlay and the table files; a plain read sees the
    newest record; once the snapshot closes, enactment catches up."""
    w = mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01, enactor=enactor)
    r = mpwal.Reader(db)
    try:
        commit_workload(w, 1, 40, KEYS, PER)
        pin = r.last_record_id
        assert pin == 40
        with r.snapshot() as s:
            assert s.record_id == pin
            check_snapshot_state(s, expected_state(pin, KEYS, PER))  # before anything moves
            commit_workload(w, pin + 1, 160, KEYS, PER)
            settle(w, pin)
            assert enacted(w) == pin, "the enactor went past a live snapshot's pin"
            assert w.stats()["logs"]["read"], "rotated logs wait behind the pin"
            assert r.last_record_id == 160
            assert read_state(r, KEYS) == expected_state(160, KEYS, PER)
            check_snapshot_state(s, expected_state(pin, KEYS, PER))
            commit_workload(w, 161, 200, KEYS, PER)  # more versions freed, more rotations
            time.sleep(0.05)
            check_snapshot_state(s, expected_state(pin, KEYS, PER))
            assert enacted(w) == pin
            assert [p["record_id"] for p in live_pins(db)] == [pin]
        wait_for(lambda: enacted(w) == 200, what="enactment after the snapshot closed")
        assert live_pins(db) == []
        assert read_state(r, KEYS) == expected_state(200, KEYS, PER)
        with r.snapshot() as s2:
            assert s2.record_id == 200
            check_snapshot_state(s2, expected_state(200, KEYS, PER))
        assert w.stats()["enactor_errors"] == []
    finally:
        r.close()
        w.close()


def test_a_snapshot_before_a_drop_still_reads_the_dropped_table(db):
    """A record drops both tables (and writes key 0 again): the snapshot taken before it still
    reads every old value, the enactor does not apply the drop past the pin, plain reads see
    the emptied tables at once; after the snapshot closes the drop is enacted."""
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w, mpwal.Reader(db) as r:
        commit_workload(w, 1, 30, KEYS, PER)
        before = expected_state(30, KEYS, PER)
        with r.snapshot() as s:
            assert s.record_id == 30
            with w.record() as rec:
                rec.drop_table(VALUE_TABLE)
                rec.drop_table(INDEX_TABLE)
                rec.insert_value(VALUE_TABLE, 0, make_value(0, 31))
                rec.insert_index(INDEX_TABLE, 0, 0, 31)
            assert rec.record_id == 31
            commit_workload(w, 32, 60, KEYS, PER)
            model = state_after_drop(31, 60)
            settle(w, 30)
            assert enacted(w) == 30, "the enactor applied a drop past a live pin"
            check_snapshot_state(s, before)
            assert read_state(r, KEYS) == model
        wait_for(lambda: enacted(w) == 60, what="enactment after the snapshot closed")
        assert read_state(r, KEYS) == model
        with r.snapshot() as s:
            check_snapshot_state(s, model)


def state_after_drop(drop_rid: int, last: int) -> dict[int, int]:
    """The model after record ``drop_rid`` dropped both tables and wrote key 0, then records
    drop_rid+1..last of the workload."""
    state = {0: drop_rid}
    for rid in range(drop_rid + 1, last + 1):
        for k in writes_of(rid, KEYS, PER):
            state[k] = rid
    return state


def test_many_snapshots_at_once_nested_each_in_its_own_slot(db):
    """Nested snapshots of two readers of one process, at three record ids: each has its own
    slot, reads its own state, and the enactor stops at the oldest live pin, moving up to the
    next one as each closes."""
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w, \
            mpwal.Reader(db) as r, mpwal.Reader(db) as r2:
        commit_workload(w, 1, 20, KEYS, PER)
        with r.snapshot() as s1:
            commit_workload(w, 21, 50, KEYS, PER)
            with r2.snapshot() as s2, r.snapshot() as s2b:
                commit_workload(w, 51, 90, KEYS, PER)
                with r2.snapshot() as s3:
                    commit_workload(w, 91, 120, KEYS, PER)
                    assert (s1.record_id, s2.record_id, s2b.record_id, s3.record_id) == \
                        (20, 50, 50, 90)
                    pins = live_pins(db)
                    assert sorted(p["record_id"] for p in pins) == [20, 50, 50, 90]
                    assert len({p["slot"] for p in pins}) == 4
                    assert {p["pid"] for p in pins} == {os.getpid()}
                    settle(w, 20)
                    assert enacted(w) == 20
                    for s in (s3, s2b, s2, s1):
                        check_snapshot_state(s, expected_state(s.record_id, KEYS, PER))
                    s1.close()  # out of order: the oldest goes first
                    settle(w, 50)
                    assert enacted(w) == 50
                    for s in (s2, s2b, s3):
                        check_snapshot_state(s, expected_state(s.record_id, KEYS, PER))
                    with pytest.raises(mpwal.ClosedError):
                        s1.value(VALUE_TABLE, 0)
                s2b.close()
                time.sleep(0.05)
                assert enacted(w) == 50  # s2 still holds 50
            settle(w, 120)
            assert enacted(w) == 120
        assert live_pins(db) == []
        assert read_state(r2, KEYS) == expected_state(120, KEYS, PER)


def test_all_slots_taken_refuses_a_snapshot_until_one_is_closed(db):
    with mpwal.Writer(db, TABLES, enactor="none") as w, mpwal.Reader(db) as r:
        commit_workload(w, 1, 3, KEYS, PER)
        held = [r.snapshot() for _ in range(SLOTS)]
        try:
            assert sorted(s._slot for s in held) == list(range(SLOTS))
            with pytest.raises(mpwal.DatabaseError, match="close snapshots"):
                r.snapshot()
            held.pop(100).close()
            with r.snapshot() as s:
                assert s._slot == 100 and s.record_id == 3
        finally:
            for s in held:
                s.close()
        assert live_pins(db) == []


def test_record_id_is_the_readers_watermark_at_creation(db):
    with mpwal.Writer(db, TABLES, enactor="none") as w, mpwal.Reader(db) as r:
        with r.snapshot() as s:
            assert s.record_id == r.last_record_id == 0
            assert s.value(VALUE_TABLE, 1) is None and s.index_entry(INDEX_TABLE, 0, 1) == 0
        for last in (1, 2, 7):
            commit_workload(w, w.last_record_id + 1, last, KEYS, PER)
            before = r.last_record_id
            with r.snapshot() as s:
                assert s.record_id == before == r.last_record_id == w.last_record_id == last
                assert repr(s) == f"<mpwal.Snapshot at record {last}>"


def test_closed_snapshots_and_readers_raise_closed_error(db):
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        commit_workload(w, 1, 2, KEYS, PER)
    r = mpwal.Reader(db)
    s = r.snapshot()
    s.close()
    s.close()  # idempotent
    calls = (lambda: s.value(VALUE_TABLE, 0), lambda: s.values(VALUE_TABLE, [0, 1]),
             lambda: s.index_chunk(INDEX_TABLE, 0), lambda: s.index_entry(INDEX_TABLE, 0, 0))
    for call in calls:
        with pytest.raises(mpwal.ClosedError):
            call()
    with r.snapshot() as s:  # the reader is still fine
        assert s.record_id == 2
    s = r.snapshot()
    r.close()
    with pytest.raises(mpwal.ClosedError):
        r.snapshot()
    calls = (lambda: s.value(VALUE_TABLE, 0), lambda: s.values(VALUE_TABLE, [0, 1]),
             lambda: s.index_chunk(INDEX_TABLE, 0), lambda: s.index_entry(INDEX_TABLE, 0, 0))
    for call in calls:
        with pytest.raises(mpwal.ClosedError):
            call()
    s.close()  # (releasing the pin after the reader closed is the next test's subject)


def test_closing_the_reader_first_releases_its_snapshots_pins(db):
    """``s = r.snapshot()``, then ``r.close()`` before ``s.close()``: the snapshot's close must
    still release its pin (or the reader's close must), and raise nothing."""
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w:
        commit_workload(w, 1, 10, KEYS, PER)
        r = mpwal.Reader(db)
        s = r.snapshot()
        r.close()
        problem = None
        try:
            s.close()  # now: ValueError, operation forbidden on released memoryview object
        except Exception as e:
            problem = e
        commit_workload(w, 11, 40, KEYS, PER)
        try:
            assert problem is None, f"Snapshot.close() after Reader.close() raised {problem!r}"
            assert live_pins(db) == [], "the snapshot's pin outlived both closes"
            wait_for(lambda: enacted(w) == 40, timeout=5, what="enactment past the pin")
        finally:
            if s._fd >= 0:  # the leaked descriptor holding the slot's lock: let the writer go
                os.close(s._fd)
                s._fd = -1


def test_a_snapshot_garbage_collected_unclosed_releases_its_pin(db):
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w, mpwal.Reader(db) as r:
        commit_workload(w, 1, 10, KEYS, PER)
        s = r.snapshot()
        commit_workload(w, 11, 30, KEYS, PER)
        settle(w, 10, hold=0.05)
        assert enacted(w) == 10
        del s
        gc.collect()
        assert live_pins(db) == []
        wait_for(lambda: enacted(w) == 30, what="enactment past a collected snapshot")


def test_a_private_snapshot_keeps_its_record_when_a_writer_starts_and_commits(db):
    """A snapshot taken while no writer runs (private mode; its pin is in the reader table the
    last writer left) reads its record's state after a new writer opened, replayed and
    committed newer records: the new writer's enactor honours the pin. Never newer data."""
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=1000) as w:
        commit_workload(w, 1, 25, KEYS, PER)
    r = mpwal.Reader(db)
    try:
        assert r.mode == "private"
        s = r.snapshot()
        assert s.record_id == 25
        assert [p["record_id"] for p in live_pins(db)] == [25]
        check_snapshot_state(s, expected_state(25, KEYS, PER))
        with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w:
            assert w.last_record_id == 25
            commit_workload(w, 26, 90, KEYS, PER)
            time.sleep(0.15)
            assert enacted(w) == 25, "the new writer's enactor went past a private snapshot"
            check_snapshot_state(s, expected_state(25, KEYS, PER))
            assert r.mode == "shared-memory"
            assert read_state(r, KEYS) == expected_state(90, KEYS, PER)
            s.close()
            wait_for(lambda: enacted(w) == 90, what="enactment after the snapshot closed")
    finally:
        r.close()


def test_a_snapshot_outlives_its_writers_close(db):
    """The writer closes while a snapshot pins an older record: close returns (its last
    enactment stops at the pin, the logs stay for replay), and the snapshot outlives it,
    reading the logs up to its pin over the tables; nothing is lost."""
    w = mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01)
    commit_workload(w, 1, 20, KEYS, PER)
    r = mpwal.Reader(db)
    s = r.snapshot()
    commit_workload(w, 21, 60, KEYS, PER)
    started = time.monotonic()
    w.close()
    assert time.monotonic() - started < 10
    assert load_queues(db).last_cleaned_record <= 20  # the logs past the pin stay
    check_snapshot_state(s, expected_state(20, KEYS, PER))  # from the logs, up to its pin
    assert r.mode == "private"
    check_snapshot_state(s, expected_state(20, KEYS, PER))
    s.close()
    with r.snapshot() as s:
        assert s.record_id == 60
        check_snapshot_state(s, expected_state(60, KEYS, PER))
    r.close()
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        assert w.last_record_id == 60
        assert read_state(w, KEYS) == expected_state(60, KEYS, PER)


def test_an_expired_snapshot_raises_and_holds_nothing_back(db):
    """Held past max_snapshot_age, a snapshot holds the enactor back no more, and every read
    of it raises SnapshotExpiredError; a new snapshot reads again."""
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01, max_snapshot_age=0.4) as w, \
            mpwal.Reader(db) as r:
        commit_workload(w, 1, 10, KEYS, PER)
        s = r.snapshot()
        pinned = time.monotonic()
        commit_workload(w, 11, 50, KEYS, PER)
        wait_for(lambda: enacted(w) >= 10 or time.monotonic() - pinned > 0.3,
                 what="enactment up to the pin")
        if time.monotonic() - pinned < 0.3:  # (a loaded machine may take longer: skip this)
            assert enacted(w) == 10
            check_snapshot_state(s, expected_state(10, KEYS, PER))
        wait_for(lambda: enacted(w) == 50, what="enactment past an expired pin")
        assert time.monotonic() - pinned > 0.4
        for call in (lambda: s.value(VALUE_TABLE, 0), lambda: s.values(VALUE_TABLE, [0, 1]),
                     lambda: s.index_chunk(INDEX_TABLE, 0),
                     lambda: s.index_entry(INDEX_TABLE, 0, 0)):
            with pytest.raises(mpwal.SnapshotExpiredError, match="max_snapshot_age"):
                call()
        assert [p["record_id"] for p in live_pins(db)] == [10]  # pinned, but holding nothing
        s.close()
        assert live_pins(db) == []
        with r.snapshot() as s:
            assert s.record_id == 50
            check_snapshot_state(s, expected_state(50, KEYS, PER))


def test_snapshots_never_read_newer_or_older_than_their_record(db):
    """A random interleaving in one process: commits, snapshots taken and closed in any order
    (up to 6 at once), random reads of each held snapshot checked against the model state at
    its record id, while logs rotate and the enactor runs behind the oldest pin."""
    rng = random.Random(5)
    state: dict[int, int] = {}
    held: list[tuple[mpwal.Snapshot, dict[int, int]]] = []
    with mpwal.Writer(db, TABLES, log_size=4096, log_age=0.01) as w, \
            mpwal.Reader(db) as r, mpwal.Reader(db) as r2:
        try:
            for rid in range(1, 301):
                commit_workload(w, rid, rid, KEYS, PER)
                for k in writes_of(rid, KEYS, PER):
                    state[k] = rid
                if len(held) < 6 and rng.random() < 0.1:
                    s = rng.choice((r, r2)).snapshot()
                    assert s.record_id == rid
                    held.append((s, dict(state)))
                if held and rng.random() < 0.06:
                    held.pop(rng.randrange(len(held)))[0].close()
                if held:
                    floor = min(s.record_id for s, _ in held)
                    assert enacted(w) <= floor, "enactment passed the oldest live pin"
                for s, want in held:
                    ks = rng.sample(range(KEYS), 8)
                    for k, v in zip(ks, s.values(VALUE_TABLE, ks)):
                        assert (v and check_value(k, v)) == want.get(k), (k, s.record_id)
                    k = rng.randrange(KEYS)
                    got = s.value(VALUE_TABLE, k)
                    assert (got and check_value(k, got)) == want.get(k), (k, s.record_id)
                    assert s.index_entry(INDEX_TABLE, k // 64, k % 64) == want.get(k, 0)
                time.sleep(0.002)
            assert w.stats()["rotations"] > 5
        finally:
            for s, _ in held:
                s.close()
        wait_for(lambda: enacted(w) == 300, what="enactment after the last snapshot closed")



def test_a_restarted_enactor_process_honours_a_held_pin(db):
    """The enactor process is SIGKILLed while a snapshot holds it back; the one the writer
    starts in its place stops at the same pin."""
    with mpwal.Writer(db, TABLES, enactor="process", log_size=2048, log_age=0.01) as w, \
            mpwal.Reader(db) as r:
        commit_workload(w, 1, 20, KEYS, PER)
        wait_for(lambda: enacted(w) == 20, what="the first enactment")
        with r.snapshot() as s:
            commit_workload(w, 21, 60, KEYS, PER)
            old = w.stats()["enactor_pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: w.stats()["enactor_pid"] not in (0, old),
                     what="a new enactor process")
            commit_workload(w, 61, 90, KEYS, PER)
            settle(w, 20, hold=0.3)
            assert enacted(w) == 20, "the restarted enactor went past a live pin"
            check_snapshot_state(s, expected_state(20, KEYS, PER))
        wait_for(lambda: enacted(w) == 90, what="enactment after the snapshot closed")
        assert w.stats()["enactor_restarts"] >= 1


# -- 2. the reader table ---------------------------------------------------------------------

def hold_snapshot(path: str, out) -> None:
    """Take a snapshot, say at which record, and hold it until killed."""
    r = mpwal.Reader(path)
    s = r.snapshot()
    out.put((os.getpid(), s.record_id, check_value(0, s.value(VALUE_TABLE, 0))))
    time.sleep(120)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_a_killed_reader_holding_a_snapshot_holds_nothing(db):
    """A reader process SIGKILLed while it holds a snapshot: the kernel drops its slot's lock,
    so the enactor clears the slot and goes on past the dead pin."""
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 0, make_value(0, 1))
        commit_workload(w, 2, 20, KEYS, PER)
        out = CTX.Queue()
        p = CTX.Process(target=hold_snapshot, args=(db, out), daemon=True)
        p.start()
        try:
            pid, pin, rid0 = out.get(timeout=60)
            assert pin >= 20 and rid0 <= pin
            commit_workload(w, pin + 1, pin + 60, KEYS, PER)
            settle(w, pin)
            assert enacted(w) == pin, "the enactor went past a live reader's pin"
            assert [(q["record_id"], q["pid"]) for q in live_pins(db)] == [(pin, pid)]
            os.kill(pid, signal.SIGKILL)
            p.join(30)
            assert p.exitcode == -signal.SIGKILL
            wait_for(lambda: enacted(w) == pin + 60, what="enactment past a dead reader's pin")
            assert live_pins(db) == [], "the dead reader's slot was not cleared"
        finally:
            if p.is_alive():
                p.kill()
                p.join(30)


def test_the_reader_table_after_a_writer_open(db):
    with mpwal.Writer(db, TABLES, enactor="none", max_snapshot_age=7.5):
        f = os.path.join(db, READERS_FILE)
        st = os.stat(f)
        assert st.st_size == FILE_BYTES and st.st_mode & 0o777 == 0o600
        with open(f, "rb") as fh:
            words = struct.unpack(f"<{FILE_BYTES // 8}Q", fh.read())
        assert words[0] == PINS_MAGIC and words[2] == SLOTS
        assert words[MAX_AGE_W] == 7_500_000_000
        assert not any(words[64:]), "a new reader table holds pins"


@pytest.mark.parametrize("writer", ["closed", "live"])
def test_reading_changes_no_file_and_a_snapshot_writes_only_the_reader_table(db, writer):
    """A Reader that opens and reads (every call) changes no file, with or without a live
    writer; taking and using snapshots changes the reader table and nothing else."""
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    commit_workload(w, 1, 30, KEYS, PER)
    if writer == "closed":
        w.close()
    try:
        time.sleep(0.05)  # (mtimes have a coarse clock on some file systems)
        before = files_of(db)
        with mpwal.Reader(db) as r:
            assert r.mode == ("private" if writer == "closed" else "shared-memory")
            assert read_state(r, KEYS) == expected_state(30, KEYS, PER)
            r.values(VALUE_TABLE, range(KEYS))
            r.index_chunk(INDEX_TABLE, 1)
            r.stats()
            assert r.last_record_id == 30
        assert files_of(db) == before, "a reader changed a file"
        with mpwal.Reader(db) as r:
            with r.snapshot() as s, r.snapshot() as s2:
                check_snapshot_state(s, expected_state(30, KEYS, PER))
                s2.values(VALUE_TABLE, [1, 2])
        after = files_of(db)
        assert sorted(after) == sorted(before)
        assert [n for n in after if after[n] != before[n]] == [READERS_FILE]
        assert live_pins(db) == []
    finally:
        w.close()


def test_snapshots_in_a_directory_without_a_reader_table(db):
    """A directory no writer of this version opened (no ``readers`` file): reading changes
    nothing there; the first snapshot creates the reader table (and nothing else) and pins in
    it, so the next writer's enactor honours that pin."""
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        commit_workload(w, 1, 10, KEYS, PER)
    f = os.path.join(db, READERS_FILE)
    os.unlink(f)
    before = files_of(db)
    with mpwal.Reader(db) as r:
        assert read_state(r, KEYS) == expected_state(10, KEYS, PER)
        assert files_of(db) == before
        with r.snapshot() as s:
            assert s.record_id == 10
            check_snapshot_state(s, expected_state(10, KEYS, PER))
            assert [p["record_id"] for p in live_pins(db)] == [10]
        after = files_of(db)
        assert [n for n in after if after.get(n) != before.get(n)] == [READERS_FILE]
        assert os.stat(f).st_size == FILE_BYTES and os.stat(f).st_mode & 0o777 == 0o600
        t = ReaderTable(os.path.realpath(db))
        assert t.max_age == 60.0
        t.close()
        s = r.snapshot()
        with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01, max_snapshot_age=30) as w:
            t = ReaderTable(os.path.realpath(db))
            assert t.max_age == 30.0  # the writer's own
            t.close()
            commit_workload(w, 11, 60, KEYS, PER)
            settle(w, 10)
            assert enacted(w) == 10, "the writer's enactor went past a pin taken before it"
            check_snapshot_state(s, expected_state(10, KEYS, PER))
            s.close()
            wait_for(lambda: enacted(w) == 60, what="enactment after the snapshot closed")


def test_a_snapshot_without_write_access_to_the_reader_table_pins_nothing(db, monkeypatch):
    """Without write access to ``readers`` a snapshot still reads at its record, but pins
    nothing: once enactment passes it, its reads raise SnapshotExpiredError."""
    def denied(cls, path):
        raise PermissionError(13, "Permission denied", os.path.join(path, READERS_FILE))

    monkeypatch.setattr(ReaderTable, "open_or_create", classmethod(denied))
    with mpwal.Writer(db, TABLES, log_size=2048, log_age=0.01) as w, mpwal.Reader(db) as r:
        commit_workload(w, 1, 10, KEYS, PER)
        with r.snapshot() as s:
            assert s.record_id == 10 and live_pins(db) == []
            check_snapshot_state(s, expected_state(10, KEYS, PER))
            commit_workload(w, 11, 60, KEYS, PER)
            wait_for(lambda: enacted(w) == 60, what="enactment (nothing pins it)")
            with pytest.raises(mpwal.SnapshotExpiredError, match="enactor passed it"):
                check_snapshot_state(s, expected_state(10, KEYS, PER))


# -- 3. real processes: money moves between accounts, the total never changes ---------------

ACCOUNTS = 50
TOTAL = ACCOUNTS * 1_000_000
ACCOUNT = struct.Struct("<QQ")  # balance, id of the record that last wrote it
MONEY_SECONDS = 4.0


def money_writer(path: str, out, stop) -> None:
    """Fund the accounts in record 1, then move a random amount between two random accounts
    per record until ``stop``; every record also stamps its id into index entry 0 of chunk 0.
    Small logs and overlay: logs rotate and are enacted throughout, the overlay grows."""
    try:
        w = mpwal.Writer(path, TABLES, log_size=4096, log_age=0.02, overlay_slots=64,
                         overlay_bytes=1 << 13)
        bal = [TOTAL // ACCOUNTS] * ACCOUNTS
        with w.record() as rec:
            for a in range(ACCOUNTS):
                rec.insert_value(VALUE_TABLE, a, ACCOUNT.pack(bal[a], 1))
            rec.insert_index(INDEX_TABLE, 0, 0, 1)
        out.put(("ready", rec.record_id))
        rng = random.Random(11)
        while not stop.is_set():
            src, dst = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(0, bal[src])
            rid = w.last_record_id + 1
            bal[src] -= amount
            bal[dst] += amount
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, src, ACCOUNT.pack(bal[src], rid))
                rec.insert_value(VALUE_TABLE, dst, ACCOUNT.pack(bal[dst], rid))
                rec.insert_index(INDEX_TABLE, 0, 0, rid)
            assert rec.record_id == rid
        st = w.stats()
        out.put(("done", w.last_record_id, st["enacted"], st["rotations"], st["generation"],
                 st["enactor_errors"]))
        w.close()
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))
        raise


def money_reader(path: str, how: str, seconds: float, out) -> None:
    """Check the total again and again: ``snapshot``, one ``s.value`` call per account inside
    a snapshot (and its record stamp, and ``s.values`` agreeing); ``values``, one
    ``r.values`` call. Puts (how, checks, errors, first and last record id) on ``out``."""
    errors: list[str] = []
    checks = 0
    first = last = 0
    rng = random.Random(os.getpid())
    try:
        r = mpwal.Reader(path)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(errors) < 5:
            if how == "snapshot":
                with r.snapshot() as s:
                    rid = s.record_id
                    vals = []
                    for a in range(ACCOUNTS):
                        vals.append(s.value(VALUE_TABLE, a))
                        if a == ACCOUNTS // 2 and rng.random() < 0.1:
                            time.sleep(0.005)  # across a rotation or enactment now and then
                    stamp = s.index_entry(INDEX_TABLE, 0, 0)
                    again = s.values(VALUE_TABLE, range(ACCOUNTS))
                if stamp != rid:
                    errors.append(f"snapshot at {rid} read the stamp of record {stamp}")
                if again != vals:
                    errors.append(f"snapshot at {rid}: values() and value() disagree")
            else:
                before = r.last_record_id
                vals = r.values(VALUE_TABLE, range(ACCOUNTS))
                rid = r.last_record_id
                if rid < before:
                    errors.append(f"last_record_id went back from {before} to {rid}")
            if rid < last:
                errors.append(f"{how}: record id went back from {last} to {rid}")
            first = first or rid
            last = rid
            if any(v is None for v in vals):
                errors.append(f"{how} at {rid}: an account is missing")
                continue
            accounts = [ACCOUNT.unpack(v) for v in vals]
            total = sum(b for b, _ in accounts)
            if total != TOTAL:
                errors.append(f"{how} at {rid}: the total is {total}, not {TOTAL}")
            newest = max(w for _, w in accounts)
            if newest > rid:
                errors.append(f"{how} at {rid}: an account written by record {newest}")
            checks += 1
        r.close()
    except Exception as e:  # reported to the test, which fails on it
        errors.append(f"{how}: {type(e).__name__}: {e}")
    out.put((how, checks, errors, first, last))


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_money_moves_but_every_snapshot_and_every_values_call_sees_the_total(db):
    out, stop = CTX.Queue(), CTX.Event()
    wp = CTX.Process(target=money_writer, args=(db, out, stop))
    wp.start()
    readers = []
    try:
        msg = out.get(timeout=60)
        assert msg[0] == "ready", msg
        readers = [CTX.Process(target=money_reader, args=(db, how, MONEY_SECONDS, out))
                   for how in ("snapshot", "values")]
        for p in readers:
            p.start()
        results = [out.get(timeout=MONEY_SECONDS + 60) for _ in readers]
        stop.set()
        done = out.get(timeout=60)
    finally:
        stop.set()
        for p in readers + [wp]:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
    assert done[0] == "done", done
    _, last, enacted_then, rotations, generation, enactor_errors = done
    assert wp.exitcode == 0 and all(p.exitcode == 0 for p in readers)
    assert enactor_errors == []
    for how, checks, errors, first, seen in results:
        assert errors == [], f"{how}: {errors}"
        assert checks > 20, f"{how}: only {checks} checks"
        assert seen > first, f"{how}: the writer did not move on while it read ({first})"
    assert rotations > 20 and enacted_then > 1, (rotations, enacted_then)
    with mpwal.Reader(db) as r:
        assert r.last_record_id == last
        with r.snapshot() as s:
            assert sum(ACCOUNT.unpack(v)[0] for v in s.values(VALUE_TABLE, range(ACCOUNTS))) \
                == TOTAL
    print(f"money: {last} records, {rotations} rotations, generation {generation}, "
          f"checks {[(h, c) for h, c, *_ in results]}")


# -- 4. a writer stopped again and again: no reader call waits for it ------------------------

STOP_KEYS = 150  # every record rewrites every key: a whole record is easy to recognise
CALL_BOUND = 0.4  # s; well above a call's normal time, well below a long stop
LONG_STOP = 0.7  # s; every tenth stop is this long, so a call that waited would take longer


def rewriting_writer(path: str, out, stop) -> None:
    """Commit records that each rewrite all STOP_KEYS keys until ``stop``; small logs rotate
    and are enacted (by the writer's thread: a SIGSTOP stops it too)."""
    w = mpwal.Writer(path, TABLES, log_size=48 << 10, log_age=0.02)
    out.put(("open", os.getpid()))
    while not stop.is_set():
        rid = w.last_record_id + 1
        with w.record() as rec:
            rec.insert_values(VALUE_TABLE, [(k, make_value(k, rid, SLOT))
                                            for k in range(STOP_KEYS)])
    out.put(("closing", w.last_record_id, w.stats()["rotations"]))
    w.close()


def whole(vals) -> int:
    """The one record every value of a read came from; raises AssertionError otherwise."""
    assert all(v is not None for v in vals), "a read saw part of a record"
    rids = {check_value(k, v) for k, v in enumerate(vals)}
    assert len(rids) == 1, f"a read mixed records {sorted(rids)[:5]}"
    return rids.pop()


def timed_reader(path: str, out, stop) -> None:
    """Time every call (value, values, snapshot, snapshot's value and values, last_record_id)
    until ``stop``, checking each answer; put (calls, slowest per kind, errors) on ``out``."""
    errors: list[str] = []
    slowest: dict[str, float] = {}
    calls = 0
    rng = random.Random(os.getpid())

    def timed(kind: str, fn, *args):
        nonlocal calls
        t0 = time.monotonic()
        got = fn(*args)
        dt = time.monotonic() - t0
        calls += 1
        if dt > slowest.get(kind, 0.0):
            slowest[kind] = dt
        return got

    try:
        r = mpwal.Reader(path)
        seen = 0
        out.put(("reading",))
        while not stop.is_set() and len(errors) < 5:
            try:
                rid = whole(timed("values", r.values, VALUE_TABLE, range(STOP_KEYS)))
                last = timed("last_record_id", lambda: r.last_record_id)
                if not seen <= rid <= last:
                    errors.append(f"values() at {rid}: seen {seen}, last_record_id {last}")
                seen = rid
                k = rng.randrange(STOP_KEYS)
                one = timed("value", r.value, VALUE_TABLE, k)
                if check_value(k, one) < rid:
                    errors.append(f"value() of key {k} older than a values() before it")
                with timed("snapshot", r.snapshot) as s:
                    pin = s.record_id
                    if pin < seen:
                        errors.append(f"a snapshot at {pin} after a read at {seen}")
                    for _ in range(3):
                        k = rng.randrange(STOP_KEYS)
                        got = check_value(k, timed("snapshot.value", s.value, VALUE_TABLE, k))
                        if got != pin:
                            errors.append(f"snapshot at {pin}: key {k} from record {got}")
                    got = whole(timed("snapshot.values", s.values, VALUE_TABLE,
                                      range(STOP_KEYS)))
                    if got != pin:
                        errors.append(f"snapshot at {pin}: values() from record {got}")
            except AssertionError as e:
                errors.append(str(e))
        r.close()
    except Exception as e:  # reported to the test, which fails on it
        errors.append(f"{type(e).__name__}: {e}")
    out.put(("result", calls, slowest, errors))


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def struct_odd(path: str) -> bool | None:
    """Whether the live segment's structural counter is odd now (None: no segment to look at)."""
    try:
        seg = OverlayReader(segment_name(os.path.realpath(path), load_queues(path).generation))
    except FileNotFoundError:
        return None
    try:
        s = seg.q[STRUCT]
        return bool(s & 1) and s != SUPERSEDED
    finally:
        seg.release()


def stop_writer(path: str, pid: int, rng: random.Random, in_a_window: bool) -> None:
    """SIGSTOP the writer at a random moment or, ``in_a_window``, as soon as its segment's
    structural counter is seen odd (so that the stop lands inside a structural window)."""
    if not in_a_window:
        time.sleep(rng.uniform(0.001, 0.03))
    else:
        try:
            seg = OverlayReader(segment_name(os.path.realpath(path),
                                             load_queues(path).generation))
        except FileNotFoundError:
            seg = None
        if seg is not None:
            q = seg.q
            deadline = time.monotonic() + 0.5
            while not (q[STRUCT] & 1 and q[STRUCT] != SUPERSEDED) and time.monotonic() < deadline:
                pass
            seg.release()
    os.kill(pid, signal.SIGSTOP)
    while proc_state(pid) != "T":
        time.sleep(0.0005)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_no_reader_or_snapshot_call_waits_for_a_stopped_writer(db):
    """SIGSTOP the writer (and its enactor thread) 30 times or more, for 50-100 ms, and every
    tenth time for LONG_STOP, until at least two stops landed inside a structural window: a
    reader process timing every call, plain and in snapshots, sees none take longer than
    CALL_BOUND, and whole records at the snapshot's own record id only."""
    out_w, out_r, stop_w, stop_r = CTX.Queue(), CTX.Queue(), CTX.Event(), CTX.Event()
    wp = CTX.Process(target=rewriting_writer, args=(db, out_w, stop_w))
    wp.start()
    rp = None
    pid = None
    try:
        _, pid = out_w.get(timeout=60)
        rp = CTX.Process(target=timed_reader, args=(db, out_r, stop_r))
        rp.start()
        assert out_r.get(timeout=60) == ("reading",)
        rng = random.Random(17)
        in_window = 0
        for i in range(90):
            # 30 stops, then more (each trying for a window) until two landed in one: a
            # window is a few microseconds, so a stop lands in one only now and then
            if i >= 30 and in_window >= 2:
                break
            long = i % 10 == 9  # these try for a window, where a waiting call would wait
            stop_writer(db, pid, rng, long or i >= 30 or rng.random() < 0.5)
            in_window += bool(struct_odd(db))
            time.sleep(LONG_STOP if long else rng.uniform(0.05, 0.1))
            os.kill(pid, signal.SIGCONT)
            time.sleep(rng.uniform(0.02, 0.05))
        stop_r.set()
        _, calls, slowest, errors = out_r.get(timeout=60)
        stop_w.set()
        _, last, rotations = out_w.get(timeout=60)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        stop_r.set()
        stop_w.set()
        for p in (rp, wp):
            if p is not None:
                p.join(60)
                if p.is_alive():
                    p.kill()
                    p.join()
    assert wp.exitcode == 0 and rp.exitcode == 0
    assert errors == [], errors
    assert set(slowest) == {"values", "last_record_id", "value", "snapshot", "snapshot.value",
                            "snapshot.values"}, slowest
    slow = {k: round(v, 3) for k, v in slowest.items() if v > CALL_BOUND}
    assert not slow, f"reader calls that waited for the stopped writer: {slow}"
    assert in_window, "no stop landed inside a structural window: the test proved little"
    assert calls > 1000 and rotations > 10, (calls, rotations)
    print(f"stops: {in_window} in a window; {calls} calls, {last} records, {rotations} "
          f"rotations; slowest {({k: round(v, 3) for k, v in slowest.items()})}")



# -- 5. a writer killed under a snapshot, and its replay -----------------------------------

def committing_writer(path: str, out) -> None:
    """Commit the workload forever (until SIGKILLed), saying every tenth record id."""
    w = mpwal.Writer(path, TABLES, log_size=2048, log_age=0.01)
    out.put(w.last_record_id)
    commit_workload(w, w.last_record_id + 1, 10**6, KEYS, PER,
                    on_commit=lambda rid: rid % 10 == 0 and out.put(rid))


def snapshot_then_kill_the_writer(db: str) -> tuple[mpwal.Reader, mpwal.Snapshot]:
    """A writer process commits; a snapshot here pins record P >= 30; the writer commits 100
    more records (its enactor held at P), then is SIGKILLed, its logs left for replay."""
    out = CTX.Queue()
    p = CTX.Process(target=committing_writer, args=(db, out), daemon=True)
    p.start()
    try:
        assert out.get(timeout=60) == 0
        wait_for(lambda: out.get(timeout=60) >= 30, what="30 records")
        r = mpwal.Reader(db)
        s = r.snapshot()
        wait_for(lambda: out.get(timeout=60) >= s.record_id + 100, what="100 more records")
        assert r.stats()["enacted"] <= s.record_id
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join(30)
    return r, s


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_a_snapshot_outliving_a_killed_writer_and_its_replay_never_reads_newer_data(db):
    """A snapshot pins record P; its writer commits far past P, then is SIGKILLed; a new
    writer replays every log into the table files (past P). The snapshot answers P's state
    or raises SnapshotExpiredError, before and after the replay, never anything newer."""
    r, s = snapshot_then_kill_the_writer(db)
    pin = s.record_id
    want = expected_state(pin, KEYS, PER)
    outcomes = []

    def check() -> None:
        try:
            check_snapshot_state(s, want)
            outcomes.append("read")
        except mpwal.SnapshotExpiredError:
            outcomes.append("expired")

    check()  # the dead writer's segment, the table files as its enactor left them
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        last = w.last_record_id
        assert last >= pin + 100
        check()
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 0, make_value(0, last + 1))
        check()
        assert check_value(0, r.value(VALUE_TABLE, 0)) == last + 1
    check()  # no writer: private mode over the replayed tables
    s.close()
    r.close()
    assert outcomes[0] == "read", outcomes  # the dead writer's segment still serves it
    assert outcomes[-1] == "expired", outcomes  # the replayed tables hold records past P


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_a_snapshot_read_in_the_middle_of_a_replay_never_reads_newer_data(db, monkeypatch):
    """A new writer's replay has applied the dead writer's logs (records past the pin) to the
    table files and not yet recorded it in the queue state: a snapshot read then must answer
    its record's state or raise SnapshotExpiredError, not the replayed tables' newer data."""
    import threading

    import mpwal._replay
    r, s = snapshot_then_kill_the_writer(db)
    want = expected_state(s.record_id, KEYS, PER)
    applied, go = threading.Event(), threading.Event()

    class PausedApplier(mpwal._replay.Applier):
        def sync(self, *args, **kwargs):
            super().sync(*args, **kwargs)
            applied.set()  # the tables hold every replayed record now
            go.wait(30)

    monkeypatch.setattr(mpwal._replay, "Applier", PausedApplier)
    opened: list = []
    t = threading.Thread(target=lambda: opened.append(mpwal.Writer(db, TABLES, enactor="none")))
    t.start()
    try:
        assert applied.wait(30), "the replay did not get to its fsync"
        try:
            check_snapshot_state(s, want)
        except mpwal.SnapshotExpiredError:
            pass
    finally:
        go.set()
        t.join(60)
        for w in opened:
            w.close()
        s.close()
        r.close()


def test_inspect_lists_snapshots_read_only(db, capsys):
    """``mpwal inspect`` lists the pinned snapshots (record id, age, pid; a dead reader's pin
    as dead), in text and JSON, and reading the reader table changes nothing."""
    import json

    from mpwal.tools import cli
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    try:
        commit_workload(w, 1, 3, 10, 2)
        r = mpwal.Reader(db)
        s = r.snapshot()
        # a slot pinned by nobody (a reader that died before the enactor cleared its slot)
        with open(os.path.join(db, READERS_FILE), "r+b") as f:
            f.seek(FILE_BYTES - 64)
            f.write(struct.pack("<3Q", 2, time.monotonic_ns(), 999999))
        before = open(os.path.join(db, READERS_FILE), "rb").read()
        assert cli.main(["inspect", db]) == 0
        text = capsys.readouterr().out
        assert "snapshots: 1 pinned by live readers, oldest at record 3" in text
        assert "1 left by dead readers" in text
        assert "slot 0: record 3" in text and f"(pid {os.getpid()})" in text
        assert f"slot {SLOTS - 1}: record 2" in text and "pid 999999, dead" in text
        assert cli.main(["inspect", "--json", db]) == 0
        pins = json.loads(capsys.readouterr().out)["snapshots"]
        assert [(p["slot"], p["record_id"], p["live"]) for p in pins] == [(0, 3, True), (SLOTS - 1, 2, False)]
        assert open(os.path.join(db, READERS_FILE), "rb").read() == before  # read only
        s.close()
        r.close()
        with open(os.path.join(db, READERS_FILE), "r+b") as f:
            f.seek(FILE_BYTES - 64)
            f.write(bytes(8))
        assert cli.main(["inspect", db]) == 0
        assert "snapshots: none pinned" in capsys.readouterr().out
    finally:
        w.close()
