"""Adversarial review of engine v2: each test forces one interleaving or input on the real engine,
in one process where it can (a hook then does, at that instant, what another process would: an
enactor, a writer opening, a signal), with real processes where the bug needs them (fork).

Each test asserts what the design (docs/DESIGN.md, the module docstrings) promises, and each
once failed: a snapshot or a private read answered from the logs after an enactor passed it, a
grow that failed or was interrupted, a pin checked against a retired generation, a stray
``log00``, a forked child keeping a dead reader's pin, record ids restarting after a lost queue
state. They are the regression tests of those fixes.
"""

from __future__ import annotations

import os
import time

import pytest

import mpwal
import mpwal._reader
from mpwal import _fileio as fileio
from mpwal._enactor import Enactor
from mpwal._overlay import stale_segments, unlink_segment
from mpwal._pins import ReaderTable, _slot_word
from mpwal._queues import load_queues

T = 1  # a value table
TABLES = [mpwal.ValueTable(T, slot_size=32)]
MISSING = object()


def commit(w: mpwal.Writer, **values: bytes | None) -> int:
    """One record setting slot int(name[1:]) of table T for each k<N>=data."""
    with w.record() as rec:
        for name, data in values.items():
            rec.insert_value(T, int(name[1:]), data)
    return rec.record_id


def enact_all(path: str) -> int:
    """Enact and clean everything the read queue holds now, as an ``mpwal enactor`` would;
    returns the last record enacted."""
    e = Enactor(path)
    try:
        e.drain()
        return e.enacted
    finally:
        e.close()


def snapshot_read_through(files, read_value, s):
    """``s.value(T, 0)`` with the reader's table reads going through ``read_value`` (a hook
    that does, at that instant, what another process would); MISSING if it expired."""
    files.read_value = read_value
    try:
        return s.value(T, 0)
    except mpwal.SnapshotExpiredError:
        return MISSING
    finally:
        del files.read_value


def leftovers(path: str) -> list[str]:
    """This directory's segments still in /dev/shm, removed (so the ``db`` fixture's own check
    does not turn the test's failure into an error)."""
    left = stale_segments(os.path.realpath(path))
    for name in left:
        unlink_segment(name)
    return left


# -- 1. snapshots read from the logs trust the tables without looking again -------------------

def test_a_snapshot_read_from_the_logs_as_it_expires_never_returns_newer_data(db):
    """As above with a pinned snapshot whose ``max_snapshot_age`` runs out during one call
    (between the age check at the call's start and its table read): an enactor passes the
    expired pin and writes record 2, and the call returns record 2's value. The shared-memory
    path looks at ``enacting`` after its table read for exactly this; the log path does not.
    (The hook moves the pin's time back by ``max_snapshot_age``: the clock running on.)"""
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000, max_snapshot_age=30)
    commit(w, k0=b"v1")
    w.rotate()
    assert enact_all(db) == 1
    r = mpwal.Reader(db)
    s = r.snapshot()
    commit(w, k0=b"v2")
    w.close()  # record 2 stays in the logs: the young pin holds the close's enactment back
    assert load_queues(db).last_cleaned_record == 1
    files = r._files
    real_read = files.read_value
    passed = []

    def read_value(tid, index):
        if not passed:  # the call checked the snapshot's age already: now it runs out
            old = s._pinned_at - int(31e9)
            s._pinned_at = old
            r._pins.q[_slot_word(s._slot) + 1] = old
            passed.append(enact_all(db))  # an enactor passes the expired pin
        return real_read(tid, index)

    try:
        got = snapshot_read_through(files, read_value, s)
    finally:
        s.close()
        r.close()
    assert passed == [2]
    assert got in (MISSING, b"v1"), f"the snapshot at record 1 read {got!r}, written by record 2"


def test_a_snapshot_answered_for_a_stopped_writer_never_returns_newer_data(db, monkeypatch):
    """The same hole in ``_consistent``'s stuck-window branch: the writer is stopped inside a
    structural window (``struct`` odd; ``SIGSTOP``, which ``_stopped`` reports), so a snapshot
    call answers from the logs up to its pin (``_stuck_view``). ``enacting`` is looked at
    before ``from_logs(view)`` reads the tables; the pin expires in between and an enactor
    process (which a stopped writer does not stop) applies record 2: the call returns it."""
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000, max_snapshot_age=30)
    commit(w, k0=b"v1")
    w.rotate()
    assert enact_all(db) == 1
    r = mpwal.Reader(db)
    s = r.snapshot()
    commit(w, k0=b"v2")
    w.rotate()
    files = r._files
    real_read = files.read_value
    passed = []

    def read_value(tid, index):
        if not passed:
            old = s._pinned_at - int(31e9)
            s._pinned_at = old
            r._pins.q[_slot_word(s._slot) + 1] = old
            passed.append(enact_all(db))
        return real_read(tid, index)

    monkeypatch.setattr(mpwal._reader, "_stopped", lambda pid: True)
    q = w._publisher.ov.q
    with w._lock:  # the writer is stopped in the middle of a structural window
        q[0] += 1
        try:
            got = snapshot_read_through(files, read_value, s)
        finally:
            q[0] += 1
    s.close()
    r.close()
    w.close()
    assert passed == [2]
    assert got in (MISSING, b"v1"), f"the snapshot at record 1 read {got!r}, written by record 2"


# -- 2. private mode trusts the tables for as long as the call runs ----------------------------

def test_a_private_values_batch_never_shows_part_of_a_newer_record(db):
    """A reader in private mode (no live writer) answers from the logs (record 2 wrote k0)
    over the tables (k1, of record 1). While one ``values()`` call runs, a writer opens (its
    replay), commits record 3 (k0 and k1) and its close enacts it: the call's table read of k1
    returns record 3's value next to record 2's k0, a record seen in part (invariant 5). Looking
    at the queue file's identity again after the call's table reads would catch it."""
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    commit(w, k0=b"a1", k1=b"b1")
    w.rotate()
    assert enact_all(db) == 1
    holder = mpwal.Reader(db)
    hold = holder.snapshot()
    commit(w, k0=b"a2")
    w.close()  # record 2 stays in the logs (the pin at 1 holds the close's enactment back)
    hold.close()
    holder.close()
    r = mpwal.Reader(db)
    assert r.mode == "private" and r.values(T, [0, 1]) == [b"a2", b"b1"]
    files = r._files
    real_read = files.read_value
    meanwhile = []

    def read_value(tid, index):
        if not meanwhile:  # this process is descheduled; another one does all of this
            with mpwal.Writer(db, TABLES, enactor="none", log_age=1000) as w2:
                meanwhile.append(commit(w2, k0=b"a3", k1=b"b3"))
        return real_read(tid, index)

    files.read_value = read_value
    try:
        got = r.values(T, [0, 1])
    finally:
        del files.read_value
        r.close()
    assert meanwhile == [3]
    assert got in ([b"a2", b"b1"], [b"a3", b"b3"]), f"one values() call read {got}"


# -- 3. growing the overlay: a failure between its steps ---------------------------------------

def small_overlay_writer(db: str) -> mpwal.Writer:
    """A writer whose overlay holds 8 keys: a record of 12 new keys makes it grow."""
    return mpwal.Writer(db, TABLES, enactor="none", log_age=1000, overlay_slots=16,
                        overlay_bytes=4096)


def twelve_new_keys(w: mpwal.Writer, first: int = 100) -> int:
    return commit(w, **{f"k{i}": b"x%d" % i for i in range(first, first + 12)})


def test_a_grow_that_fails_leaves_no_segment_behind(db):
    """The queue-state write that names the new generation fails (EIO on its rename): the
    commit fails before its append (nothing committed, the writer goes on), but the segment
    the grow created is neither used nor removed, and outlives the writer's close."""
    w = small_overlay_writer(db)
    commit(w, k0=b"v1")
    fileio.arm(fileio.FaultPlan("rename", 1))
    try:
        with pytest.raises(mpwal.StorageError):
            twelve_new_keys(w)
    finally:
        fileio.arm(None)
    assert w.last_record_id == 1
    with mpwal.Reader(db) as r:
        assert r.value(T, 0) == b"v1"
    w.close()
    assert leftovers(db) == []


def test_a_snapshot_pinned_while_the_overlay_grows_reads_at_its_record(db, monkeypatch):
    """Between the reader's watermark (1, in generation g) and its pin store, the writer grows
    the overlay into generation g+1 with record 2 and the enactor applies record 2, announcing
    ``enacting`` in g+1. The reader's Dekker check loads ``enacting`` from g, which nobody
    writes any more, so it keeps a pin (1) that is already passed. The
    snapshot's first read then spins and raises SnapshotExpiredError, though it is brand new."""
    w = small_overlay_writer(db)
    commit(w, k0=b"v1")
    gen = w.stats()["generation"]
    r = mpwal.Reader(db)
    real_pin = ReaderTable.pin
    meanwhile = []

    def pin(self, i, fd, record_id):
        if not meanwhile:  # other processes: the writer grows, the enactor enacts
            with w.record() as rec:
                rec.insert_value(T, 0, b"v2")
                for k in range(100, 112):
                    rec.insert_value(T, k, b"x")
            w.rotate()
            meanwhile.append((w.stats()["generation"], enact_all(db)))
        return real_pin(self, i, fd, record_id)

    monkeypatch.setattr(ReaderTable, "pin", pin)
    s = r.snapshot()
    try:
        assert meanwhile == [(gen + 1, 2)]
        try:
            got = s.value(T, 0)
        except mpwal.SnapshotExpiredError as e:
            got = e
    finally:
        s.close()
        r.close()
        w.close()
    assert got == {1: b"v1", 2: b"v2"}[s.record_id], f"the snapshot at {s.record_id}: {got!r}"


# -- 5. log names -----------------------------------------------------------------------------

def test_a_stray_file_named_like_a_log_never_loses_a_committed_record(db):
    """An empty file ``log00`` (a stray copy, say) next to ``log0``: ``log_ids`` lists id 0
    twice, replay puts 0 twice in the pool, so the second log the writer starts is log0 again,
    truncated ("pool logs are empty; this is a safety net") while log0 sits unenacted in the read
    queue. Record 2 was committed and read back, and is gone from the logs and the tables."""
    with mpwal.Writer(db, TABLES, enactor="none", log_age=1000) as w:
        commit(w, k0=b"a")
    with open(os.path.join(db, "log00"), "wb"):
        pass
    with mpwal.Writer(db, TABLES, enactor="none", log_age=1000) as w:
        commit(w, k1=b"b")
        assert w.value(T, 1) == b"b"
        w.rotate()
        commit(w, k2=b"c")
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        got = [w.value(T, i) for i in range(3)]
    assert got == [b"a", b"b", b"c"]


# -- 6. a dead reader's pin, held by a child it forked ------------------------------------------

_FORKING_READER = """
import os, sys, mpwal
r = mpwal.Reader(sys.argv[1])
s = r.snapshot()
child = os.fork()
if child == 0:  # a worker forked the usual way (multiprocessing's "fork"): it never reads
    os.close(1)
    os.close(2)
    import time
    time.sleep(60)
    os._exit(0)
print(s.record_id, child, flush=True)
os._exit(0)  # the reader dies holding its snapshot
"""


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_a_dead_readers_pin_holds_nothing_when_it_had_forked(db):
    """A reader process takes a snapshot, forks a worker (which inherits every descriptor, the
    snapshot's too: ``O_CLOEXEC`` only acts at exec) and dies. Its pin should hold nothing (the
    kernel drops a dead process's lock, ``_pins.py``), but the worker keeps the open file
    description, and with it the lock: the enactor stops at the dead reader's pin. (The writer
    closes its own lock's descriptor in a forked child; snapshots do nothing of the kind.)"""
    import signal
    import subprocess
    import sys
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    grandchild = 0
    try:
        commit(w, k0=b"v1")
        proc = subprocess.Popen([sys.executable, "-c", _FORKING_READER, db],
                                stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline().split()  # the reader prints, then dies
        proc.stdout.close()
        proc.wait(30)
        pin, grandchild = int(line[0]), int(line[1])
        assert pin == 1
        commit(w, k0=b"v2")
        w.rotate()
        # the worker lets go of the lock in its at-fork handler, which runs when it is first
        # scheduled: give it a moment (it may not have run yet when its parent died)
        deadline = time.monotonic() + 10
        got = enact_all(db)
        while got < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            got = enact_all(db)
    finally:
        if grandchild:
            os.kill(grandchild, signal.SIGKILL)
        w.close()
    assert got == 2, f"enactment stopped at {got}: the pin of a dead reader holds it"


# -- 7. record ids after a lost queue state -------------------------------------------------------

def test_a_reader_across_a_lost_queue_state_never_reads_part_of_a_record(db):
    """The queue state is lost between two writers (the next writer rebuilds it from the logs,
    as designed) after every log was cleaned. mpwal.meta keeps the last record id the tables
    hold, so record ids go on from it (they once started again at 1, and a reader whose floor
    was higher answered from one stale view, showing part of a newer record)."""
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        for i in range(5):
            commit(w, k9=b"old%d" % i)
        r = mpwal.Reader(db)
        assert r.last_record_id == 5
    os.unlink(os.path.join(db, "queues"))
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    try:
        first = commit(w, k0=b"a1")
        assert r.values(T, [0, 1]) == [b"a1", None]
        second = commit(w, k0=b"a2", k1=b"b2")
        w.rotate()
        enact_all(db)
        got = r.values(T, [0, 1])
    finally:
        r.close()
        w.close()
    assert (first, second) == (6, 7)  # mpwal.meta remembers that the tables hold record 5
    assert got == [b"a2", b"b2"], f"a values() call after record 2 read {got}"
