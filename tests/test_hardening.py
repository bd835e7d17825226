"""Regression tests for what a new user and an attacker found: each test failed before its fix.

Poison indices past a table's limit, huge sparse table files, a writer stopped inside a publish
window, two processes creating one directory, records with many drops, failures after a record
reached the log, an interrupt inside a publish window, the enactor thread's hand-off, and
another user (root) opening the owner's database.
"""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
import uuid

import pytest

import mpwal
from mpwal import _fileio as fileio, _tables as tables
from mpwal._enactor import Enactor, Handoff
from mpwal._fileio import FaultPlan
from mpwal._overlay import STRUCT, OverlayReader, segment_name, stale_segments
from mpwal._queues import load_queues

from procs import SLOT, TABLES, VALUE_TABLE, check_value, make_value, write_log
from reliability import scale

CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def tmpfs_db():
    """A database path on tmpfs (/dev/shm), removed afterwards."""
    base = f"/dev/shm/pytest-{uuid.uuid4().hex[:12]}"
    os.mkdir(base, 0o700)
    yield os.path.join(base, "db")
    shutil.rmtree(base, ignore_errors=True)


# -- 1. indices past the table limit -------------------------------------------------------

@pytest.mark.parametrize("table,slot,index", [(3, 8, 2 ** 42), (3, 256, 10 ** 11)])
def test_value_index_past_the_limit_is_refused_at_the_call(db, table, slot, index):
    with mpwal.Writer(db, [mpwal.ValueTable(table, slot_size=slot)], enactor="none") as w:
        with pytest.raises(mpwal.ArgumentRangeError, match="at most .* slots of .* TiB"):
            with w.record() as rec:
                rec.insert_value(table, index, b"x")
        with pytest.raises(mpwal.ArgumentRangeError):
            with w.record() as rec:
                rec.insert_values(table, [(0, b"ok"), (index, b"x")])
        assert w.last_record_id == 0


def test_chunk_past_the_limit_is_refused_at_the_call(db):
    with mpwal.Writer(db, [mpwal.IndexTable(1)], enactor="none") as w:
        with pytest.raises(mpwal.ArgumentRangeError, match="at most 2147483648 chunks"):
            with w.record() as rec:
                rec.insert_index(1, 2 ** 35, 0, 1)
        assert w.last_record_id == 0


def test_negative_index_message_names_the_range(db):
    with mpwal.Writer(db, [mpwal.ValueTable(3, slot_size=256)], enactor="none") as w:
        with pytest.raises(mpwal.ArgumentRangeError) as e:
            w.value(3, -1)
    n = mpwal.ValueTable(3, 256).max_key
    assert f"must be 0..{n - 1} (value table 3 holds at most {n} slots of 256 bytes" in str(e.value)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_the_largest_index_of_every_table_enacts_and_reopens(db, tmpfs_db, where):
    """A record at each table's last index is accepted, enacted into a (sparse) table file at
    the limit, and the directory opens again and reads it back, on disk and on tmpfs."""
    path = db if where == "disk" else tmpfs_db
    defs = [mpwal.IndexTable(1), mpwal.ValueTable(2, slot_size=1), mpwal.ValueTable(3, slot_size=8),
            mpwal.ValueTable(4, slot_size=256), mpwal.ValueTable(5, slot_size=1 << 26)]
    with mpwal.Writer(path, defs) as w:
        with w.record() as rec:
            rec.insert_index(1, defs[0].max_key - 1, 63, 0xFEED)
            for t in defs[1:]:
                rec.insert_value(t.id, t.max_key - 1, b"z")
    with mpwal.Writer(path, defs) as w:  # enacted at the last close; replay has nothing to do
        assert w.stats()["enactor_errors"] == []
        assert w.index_entry(1, defs[0].max_key - 1, 63) == 0xFEED
    with mpwal.Reader(path) as r:
        assert r.mode == "private"
        assert r.index_entry(1, defs[0].max_key - 1, 63) == 0xFEED
        for t in defs[1:]:
            assert r.value(t.id, t.max_key - 1) == b"z"
            assert r.value(t.id, 0) is None
        assert os.path.getsize(os.path.join(path, "value4.tbl")) <= tables.MAX_TABLE_BYTES


# -- 2. huge sparse table files --------------------------------------------------------------

def test_reads_of_a_huge_sparse_table_do_not_map_all_of_it(tmpfs_db):
    """A table file whose apparent size is beyond any address space (grown by hand on tmpfs)
    still reads: the mapping covers a window, the rest is read with pread."""
    with mpwal.Writer(tmpfs_db, [mpwal.ValueTable(3, slot_size=8)]) as w:
        with w.record() as rec:
            rec.insert_value(3, 5, b"low")
    fp = os.path.join(tmpfs_db, "value3.tbl")
    try:
        os.truncate(fp, 1 << 62)
    except OSError as e:
        pytest.skip(f"this tmpfs refuses a 4 EiB sparse file: {e}")
    stride = 12
    far = (tables.MAP_WINDOW // stride) + 1000  # past the mapped window
    fd = os.open(fp, os.O_WRONLY)
    os.pwrite(fd, (4).to_bytes(4, "little") + b"far", far * stride)
    os.close(fd)
    with mpwal.Reader(tmpfs_db) as r:
        assert r.value(3, 5) == b"low"
        assert r.value(3, far) == b"far"
        assert r.value(3, far + 1) is None
        assert r.values(3, [5, far]) == [b"low", b"far"]


def test_reads_fall_back_to_pread_when_a_table_cannot_be_mapped(db, monkeypatch):
    with mpwal.Writer(db, [mpwal.ValueTable(3, slot_size=8), mpwal.IndexTable(1)]) as w:
        with w.record() as rec:
            rec.insert_value(3, 7, b"seven")
            rec.insert_index(1, 2, 3, 99)

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_room)
    with mpwal.Reader(db) as r:
        assert r.value(3, 7) == b"seven"
        assert r.value(3, 8) is None
        assert r.index_entry(1, 2, 3) == 99


# -- 3. a writer stopped inside a publish window -------------------------------------------

KEYS = 1500  # every record rewrites every key, so a whole record is easy to recognise


def whole_record(vals) -> int:
    """The one record id every value of a values() batch came from (0: none written yet)."""
    rids = {check_value(k, v) for k, v in enumerate(vals) if v is not None}
    assert len(rids) <= 1, f"a read mixed records {sorted(rids)[:5]}"
    if rids:
        assert all(v is not None for v in vals), "a read saw part of a record"
    return rids.pop() if rids else 0


def rewriting_writer(path: str, out, stop) -> None:
    """Commit records that each rewrite all KEYS keys, until ``stop`` is set; a SIGINT
    (KeyboardInterrupt) ends the loop, and then we report what happened and wait."""
    # a process started from a shell's background job inherits SIGINT ignored, and Python then
    # leaves it ignored: this test needs the KeyboardInterrupt wherever it is run from
    signal.signal(signal.SIGINT, signal.default_int_handler)
    w = mpwal.Writer(path, TABLES, log_size=4 << 20, log_age=1000)
    out.put(("open", os.getpid()))

    def commit() -> int:
        rid = w.last_record_id + 1
        with w.record() as rec:
            rec.insert_values(VALUE_TABLE, [(k, make_value(k, rid, SLOT)) for k in range(KEYS)])
        return rec.record_id

    last = 0
    interrupted = False
    try:
        while not stop.is_set():
            last = commit()
    except KeyboardInterrupt:
        interrupted = True
    try:
        commit()
        after = "committed"
    except mpwal.WriterFailedError:
        after = "refused"
    out.put(("stopped", last, interrupted, after))
    stop.wait(60) if interrupted else None
    w.close()


def signal_in_a_window(db: str, pid: int, sig: int, rng: random.Random) -> None:
    """Send ``sig`` to the writer at a random moment, or (every other time) the moment its
    segment's counter is seen odd, so that many signals land inside a publish window."""
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0.005, 0.05))
        os.kill(pid, sig)
        return
    seg = OverlayReader(segment_name(os.path.realpath(db), load_queues(db).generation))
    q = seg.q
    deadline = time.monotonic() + 5
    while not q[STRUCT] & 1 and time.monotonic() < deadline:
        pass
    os.kill(pid, sig)
    seg.release()


def in_a_window(db: str) -> bool:
    """Whether the live segment's counter is odd now (a window is open)."""
    seg = OverlayReader(segment_name(os.path.realpath(db), load_queues(db).generation))
    odd = bool(seg.q[STRUCT] & 1)
    seg.release()
    return odd


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_readers_never_wait_for_a_stopped_writer(db):
    """SIGSTOP the writer again and again at random moments, many of them inside a publish
    window: every reader call made meanwhile returns while the writer is still stopped, and
    sees whole records only, never older than before."""
    out, stop = CTX.Queue(), CTX.Event()
    p = CTX.Process(target=rewriting_writer, args=(db, out, stop))
    p.start()
    try:
        _, pid = out.get(timeout=60)
        r = mpwal.Reader(db)
        rng = random.Random(8)
        in_window = 0
        seen = 0
        stops = scale(25, 200)
        for _ in range(stops):
            signal_in_a_window(db, pid, signal.SIGSTOP, rng)
            while proc_state(pid) != "T":
                time.sleep(0.001)
            in_window += in_a_window(db)
            got: list = []

            def reads(got: list = got) -> None:  # this round's list, even if the thread outlives it
                got.append(whole_record(r.values(VALUE_TABLE, range(KEYS))))
                got.append(r.last_record_id)
                got.append(r.value(VALUE_TABLE, KEYS - 1))

            t = threading.Thread(target=reads, daemon=True)
            t.start()
            t.join(10)  # a call that waits for the writer would still be running
            returned_while_stopped = not t.is_alive() and proc_state(pid) == "T"
            os.kill(pid, signal.SIGCONT)
            t.join()
            assert returned_while_stopped, "a reader call waited for the stopped writer"
            rid, last, one = got
            assert seen <= rid <= last, (seen, rid, last)
            assert one is not None and check_value(KEYS - 1, one) >= rid
            seen = rid
        assert in_window, f"none of {stops} stops landed inside a window: the test proved nothing"
        r.close()
    finally:
        os.kill(pid, signal.SIGCONT)
        stop.set()
        p.join(60)
    assert p.exitcode == 0


# -- 4. two processes creating one directory -----------------------------------------------

def racing_opener(paths, barrier, out) -> None:
    outcomes = []
    rng = random.Random(os.getpid())
    for path in paths:
        barrier.wait(30)
        time.sleep(rng.uniform(0, 0.004))  # let one get ahead by up to a few steps of an open
        try:
            w = mpwal.Writer(path, TABLES, enactor="none")
        except mpwal.WriterLockedError:
            outcomes.append("locked")
            continue
        except mpwal.Error as e:
            outcomes.append(f"{type(e).__name__}: {e}")
            continue
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 1, b"x")
        w.close()
        outcomes.append("opened")
    out.put(outcomes)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_two_processes_creating_one_directory(tmp_path):
    """The process that loses the race for a new directory gets WriterLockedError (or opens it
    after the winner closed), never "not an mpwal database"."""
    rounds = scale(300, 2000)
    paths = [str(tmp_path / f"db{i}") for i in range(rounds)]
    barrier, out = CTX.Barrier(2), CTX.Queue()
    procs = [CTX.Process(target=racing_opener, args=(paths, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    bad = [o for res in results for o in res if o not in ("opened", "locked")]
    assert not bad, bad[:3]
    for i, path in enumerate(paths):  # every directory is a good database
        with mpwal.Reader(path) as r:
            assert r.value(VALUE_TABLE, 1) == b"x", i


# -- 5. many drops in one record -----------------------------------------------------------

def test_a_record_dropping_too_many_tables_is_refused_at_once(db):
    defs = [mpwal.ValueTable(t, slot_size=8) for t in range(200)]
    with mpwal.Writer(db, defs, enactor="none", backpressure_timeout=60) as w:
        with w.record() as rec:
            for t in range(128):
                rec.drop_table(t)
        assert rec.record_id == 1
        started = time.monotonic()
        with pytest.raises(mpwal.ArgumentRangeError, match="at most 128 tables"):
            with w.record() as rec:
                for t in range(200):
                    rec.drop_table(t)
        assert time.monotonic() - started < 30  # refused at the call, not after a timeout
        assert w.last_record_id == 1


# -- 6. a failure after the record reached the log -----------------------------------------

def test_a_commit_whose_rotation_fails_returns_its_id(db):
    """The disk fills while the log rotates after a commit: that commit returns its id (the
    record is in the log and visible), and the writer refuses later commits."""
    w = mpwal.Writer(db, TABLES, enactor="none", log_size=1, log_age=1000)
    fileio.arm(FaultPlan("rename", 2, errno.ENOSPC))  # 1: the new log's queue state; 2: rotation
    try:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 1, b"kept")
        assert rec.record_id == 1
    finally:
        fileio.arm(None)
    with mpwal.Reader(db) as r:
        assert r.value(VALUE_TABLE, 1) == b"kept"
    with pytest.raises(mpwal.WriterFailedError) as e:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 2, b"refused")
    assert isinstance(e.value.__cause__, mpwal.StorageError)
    w.close()
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 1 and w.value(VALUE_TABLE, 1) == b"kept"
        assert w.value(VALUE_TABLE, 2) is None


def test_a_publish_failure_after_the_append_commits_and_readers_see_it(db, monkeypatch):
    """A failure while publishing (the record already in the log): the commit returns its id,
    every reader sees the whole record (from the log), the id is never reused, and later
    commits are refused until a new writer replays."""
    from mpwal._overlay import OverlayWriter
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    with w.record() as rec:
        rec.insert_value(VALUE_TABLE, 1, b"one")
    r = mpwal.Reader(db)
    assert r.mode == "shared-memory"

    def broken(self, *args):
        raise MemoryError("injected")

    monkeypatch.setattr(OverlayWriter, "publish", broken)
    with w.record() as rec:
        rec.insert_value(VALUE_TABLE, 2, b"two")
        rec.insert_value(VALUE_TABLE, 3, b"three")
    assert rec.record_id == 2
    monkeypatch.undo()
    assert r.values(VALUE_TABLE, [1, 2, 3]) == [b"one", b"two", b"three"]
    assert r.last_record_id == 2
    with pytest.raises(mpwal.WriterFailedError):
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 4, b"four")
    w.close()
    r.close()
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 2
        assert w.value(VALUE_TABLE, 3) == b"three" and w.value(VALUE_TABLE, 4) is None


# -- 7. an interrupt inside a publish window -------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_an_interrupt_anywhere_in_a_commit_publishes_all_or_nothing(tmp_path):
    """SIGINT (KeyboardInterrupt) lands at a random point of a commit loop: readers see whole
    records only, the interrupted record is either wholly there or not at all, and the
    directory reopens to the same state."""
    rng = random.Random(3)
    for trial in range(scale(12, 80)):
        db = str(tmp_path / f"db{trial}")
        out, stop = CTX.Queue(), CTX.Event()
        p = CTX.Process(target=rewriting_writer, args=(db, out, stop))
        p.start()
        try:
            _, pid = out.get(timeout=60)
            time.sleep(rng.uniform(0.05, 0.2))
            signal_in_a_window(db, pid, signal.SIGINT, rng)
            _, last, interrupted, after = out.get(timeout=60)
            assert interrupted
            with mpwal.Reader(db) as r:
                seen = whole_record(r.values(VALUE_TABLE, range(KEYS)))
                assert r.last_record_id == seen >= last + (after == "committed")
        finally:
            stop.set()
            p.join(60)
        assert p.exitcode == 0
        with mpwal.Writer(db, TABLES) as w:
            again = whole_record([w.value(VALUE_TABLE, k) for k in range(KEYS)])
            assert again >= seen


# -- 8. the enactor thread's hand-off --------------------------------------------------------

def test_a_stale_handoff_list_never_passes_for_a_reused_log(db):
    """Another enactor enacted a log from its file while the writer's hand-off still held that
    log's list; once the pool reuses the log id, the list must not stand in for the new
    records."""
    with mpwal.Writer(db, TABLES, enactor="none", log_size=1, log_age=1000) as w:
        for i in (1, 2, 3):  # one record a log: log0, log1, log2, cleaned into the pool at close
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, i, b"old%d" % i)
    handoff = Handoff()
    for i in (1, 2, 3):  # lists a writer made for those logs and nobody took
        handoff.start_log(i).append((i, {(VALUE_TABLE, i): b"stale"}, [], ()))
    with mpwal.Writer(db, TABLES, enactor="none", log_size=1, log_age=1000) as w:
        for i in (4, 5, 6):  # the same log ids again, from the pool
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, i - 3, b"new%d" % i)
        e = Enactor(db)
        e.handoff = handoff
        e.drain()
        e.close()
        assert len(handoff) == 0  # the stale lists were dropped, not used
        assert w.stats()["enacted"] == 6
    with mpwal.Reader(db) as r:
        assert r.values(VALUE_TABLE, [1, 2, 3]) == [b"new4", b"new5", b"new6"]


# -- 9. another user opening the owner's database --------------------------------------------

def as_user(uid: int, gid: int, fn, *args) -> None:
    """Run ``fn(*args)`` in a forked child under ``uid``/``gid``; raise if it failed."""
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fn(*args)
        except BaseException as e:
            os.write(wfd, repr(e).encode()[:4000])
            code = 1
        os._exit(code)
    os.close(wfd)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, msg


def owner_reads(path: str, want: bytes) -> None:
    with mpwal.Reader(path) as r:
        assert r.mode == "shared-memory", r.mode
        assert r.value(VALUE_TABLE, 1) == want


def owner_writes(path: str) -> None:
    with mpwal.Writer(path, TABLES) as w:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 2, b"owner")
    with mpwal.Reader(path) as r:
        assert r.value(VALUE_TABLE, 2) == b"owner"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_root_opening_a_users_database_does_not_lock_the_owner_out():
    uid = gid = 65534  # nobody
    base = f"/tmp/mpwal-owner-{uuid.uuid4().hex[:8]}"
    os.mkdir(base, 0o755)
    path = os.path.join(base, "db")
    try:
        os.mkdir(path, 0o700)
        os.chown(path, uid, gid)
        as_user(uid, gid, owner_writes, path)  # the owner creates it
        with mpwal.Writer(path, TABLES + [mpwal.ValueTable(9, slot_size=8)]) as w:  # root
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, 1, b"root")
            as_user(uid, gid, owner_reads, path, b"root")  # the owner reads root's overlay
        wrong = [n for n in os.listdir(path) if os.stat(os.path.join(path, n)).st_uid != uid]
        assert not wrong, f"files root left owned by root: {wrong}"
        as_user(uid, gid, owner_writes, path)  # and writes again
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_log_record_past_a_table_limit_ends_replay_instead_of_failing_the_open(db, caplog):
    """A log left by an older mpwal with a record this version refuses (an index past the
    table limit) ends the valid prefix there, for replay and private readers alike; the
    directory opens."""
    from mpwal._format import encode_record
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 1, b"one")
    poison = 2 ** 42
    logbytes = (encode_record(2, [], {}, {(VALUE_TABLE, 2): b"two"})
                + encode_record(3, [], {}, {(VALUE_TABLE, poison): b"x"})
                + encode_record(4, [], {}, {(VALUE_TABLE, 4): b"four"}))
    write_log(db, 7, logbytes)  # with this database's log header, as a writer writes it
    with mpwal.Reader(db) as r:
        assert r.mode == "private"
        assert r.values(VALUE_TABLE, [1, 2, 4]) == [b"one", b"two", None]
        assert r.last_record_id == 2
    from mpwal._queues import save_queues
    st = load_queues(db)
    st.read = [7]  # as if rotated: the enactor refuses the record instead of failing on it
    save_queues(db, st)
    e = Enactor(db)
    with pytest.raises(mpwal.CorruptionError, match="log7 record 3 cannot be enacted"):
        e.drain()
    e.close()
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 2
        assert [w.value(VALUE_TABLE, i) for i in (1, 2, 4)] == [b"one", b"two", None]
    assert "stops at record 3" in caplog.text


def test_a_publish_failure_under_commit_durability_still_fsyncs_before_returning(db, monkeypatch):
    """With durability="commit", the commit whose publish failed returns only once its record
    is on disk; if that fsync fails too, it says the record is committed but not durable."""
    from mpwal._overlay import OverlayWriter

    def broken(self, *args):
        raise MemoryError("injected")

    for fail_fsync in (False, True):
        path = f"{db}-{fail_fsync}"
        w = mpwal.Writer(path, TABLES, enactor="none", durability="commit", log_age=1000)
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 1, b"one")
        plan = FaultPlan("fsync", 1 if fail_fsync else 10 ** 9, errno.EIO)
        monkeypatch.setattr(OverlayWriter, "publish", broken)
        fileio.arm(plan)
        try:
            if fail_fsync:
                with pytest.raises(mpwal.StorageError, match="record 2 is committed") as e:
                    with w.record() as rec:
                        rec.insert_value(VALUE_TABLE, 2, b"two")
                assert e.value.record_id == 2
            else:
                with w.record() as rec:
                    rec.insert_value(VALUE_TABLE, 2, b"two")
                assert rec.record_id == 2
            assert plan.counts["fsync"] >= 1  # the record's log was fsynced before the answer
        finally:
            fileio.arm(None)
            monkeypatch.undo()
        w.close()
        with mpwal.Writer(path, TABLES) as w:
            assert w.value(VALUE_TABLE, 2) == b"two"
        assert not stale_segments(os.path.realpath(path))


def test_an_interrupt_during_rotation_stops_the_writer_and_loses_nothing(db, monkeypatch):
    """A KeyboardInterrupt right after a rotation saved the queue state: the writer refuses
    later commits (it no longer knows which log it holds) and every committed record survives."""
    from mpwal._queues import QueueStore
    real = QueueStore.rotate
    calls = []

    def interrupted(self, log_id):
        real(self, log_id)  # the rotation is saved, then the interrupt lands
        calls.append(log_id)
        if len(calls) == 3:
            raise KeyboardInterrupt

    w = mpwal.Writer(db, TABLES, log_size=200, log_age=1000)
    monkeypatch.setattr(QueueStore, "rotate", interrupted)
    committed = 0
    with pytest.raises(KeyboardInterrupt):
        for i in range(1, 400):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, i % 50, make_value(i % 50, i, SLOT))
            committed = i
    monkeypatch.undo()
    with pytest.raises(mpwal.WriterFailedError):
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 0, b"refused")
    w.close()
    with mpwal.Writer(db, TABLES) as w:
        last = w.last_record_id
        assert last >= committed > 0
        newest = {i % 50: i for i in range(1, last + 1)}  # every committed record, replayed
        for k in range(50):
            data = w.value(VALUE_TABLE, k)
            assert (check_value(k, data) if data else None) == newest.get(k), k
