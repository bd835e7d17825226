"""Rotation, enactment, cleaning, replay, durability and bounded memory (issue 3)."""

from __future__ import annotations

import os
import threading
import time

import pytest

import mpwal
from mpwal import _fileio as fileio
from mpwal._logs import read_logs
from mpwal._overlay import OverlayWriter, stale_segments
from mpwal._queues import log_ids

from procs import (TABLES, VALUE_TABLE, check_value, commit_workload,
                   expected_state, make_value, read_state)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("enactor", ["thread", "process"])
def test_long_run_recycles_logs_and_stays_bounded(db, enactor):
    """Committing for a while with small rotations recycles log files through the pool (at most
    16 kept), and disk and shared memory stop growing; readers stay correct throughout."""
    keys, per = 300, 10
    w = mpwal.Writer(db, TABLES, enactor=enactor, log_size=4096, log_age=0.02)
    r = mpwal.Reader(db)
    try:
        sizes = []
        rid = 0
        for _round in range(5):
            commit_workload(w, rid + 1, rid + 150, keys, per)
            rid += 150
            assert read_state(r, keys) == expected_state(rid, keys, per)
            wait_for(lambda rid=rid: w.stats()["enacted"] == rid)  # called in this round only
            wait_for(lambda: not w.stats()["logs"]["read"] and not w.stats()["logs"]["cleanup"])
            s = w.stats()
            assert s["overlay_entries"] == 0 and s["pending_bytes"] == 0
            assert len(s["logs"]["pool"]) <= 16
            assert len(log_ids(db)) <= 17
            sizes.append(dir_bytes(db))
        assert s["rotations"] > 30
        assert max(sizes[2:]) <= sizes[1] * 1.5 + 65536  # the logs are reused, not multiplied
        assert s["enactor_restarts"] == 0 and s["enactor_errors"] == []
        if enactor == "process":
            assert s["enactor_pid"] != os.getpid()
    finally:
        r.close()
        w.close()
    with mpwal.Reader(db) as r:
        assert read_state(r, keys) == expected_state(rid, keys, per)


def test_age_rotation_enacts_a_trickle(db):
    """A single small commit is rotated and enacted within about log_age, not at 64 MiB."""
    with mpwal.Writer(db, TABLES, log_age=0.2) as w:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 1, b"x")
        wait_for(lambda: w.stats()["enacted"] == 1, timeout=5)
        wait_for(lambda: w.stats()["overlay_entries"] == 0, timeout=5)
        assert w.value(VALUE_TABLE, 1) == b"x"


def test_visible_only_after_log_write(db, monkeypatch):
    """Invariant 1: while a record's bytes are being appended, no reader sees it; once it is
    published, its bytes are in the log file."""
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    r = mpwal.Reader(db)
    seen = []
    real_write = fileio.write_all
    real_put = OverlayWriter.publish

    def write_all(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith("log"):
            seen.append(("write", r.last_record_id, r.value(VALUE_TABLE, 5)))
        real_write(fd, data)

    def publish(self, rid, *args):
        logs = read_logs(db)
        seen.append(("publish", rid, logs.last_record_id))
        real_put(self, rid, *args)

    monkeypatch.setattr(fileio, "write_all", write_all)
    monkeypatch.setattr(OverlayWriter, "publish", publish)
    try:
        for rid in (1, 2):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, 5, make_value(5, rid))
    finally:
        monkeypatch.undo()
        r.close()
        w.close()
    writes = [s for s in seen if s[0] == "write"]
    publishes = [s for s in seen if s[0] == "publish"]
    assert writes[0][1:] == (0, None) and writes[1][1] == 1
    assert check_value(5, writes[1][2]) == 1
    assert [(p[1], p[2]) for p in publishes] == [(1, 1), (2, 2)]


def test_record_id_rule_keeps_newer_overlay_entry(db):
    """Invariant 2: enacting record 1 does not remove key 5's overlay entry written by record 2,
    and an entry leaves the overlay only once its data is in the table file."""
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    try:
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 5, b"one")
            rec.insert_value(VALUE_TABLE, 6, b"six")
        w.rotate()
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 5, b"two")
        from mpwal._enactor import Enactor
        e = Enactor(db)
        e.detach_on_new_writer = False
        e.step()  # enacts record 1 only: record 2 is still in the appending log
        assert e.enacted == 1
        st = w.stats()  # frees the versions of what was enacted
        assert st["enacted"] == 1 and st["pending_records"] == 1
        assert st["overlay_entries"] == 1  # key 5 (record 2's version); key 6 left
        assert e.files.read_value(VALUE_TABLE, 6) == b"six"
        with mpwal.Reader(db) as r:
            assert r.value(VALUE_TABLE, 5) == b"two" and r.value(VALUE_TABLE, 6) == b"six"
        e.close()
    finally:
        w.close()


def test_truncate_only_after_tables_synced(db, monkeypatch):
    """Invariant 3: a log is truncated only after its records are enacted and the tables are
    fsynced, and logs are truncated in order."""
    events = []
    real_fsync, real_truncate = fileio.fsync, fileio.truncate

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]))
        real_fsync(fd)

    def truncate(fd, n):
        events.append(("truncate", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]))
        real_truncate(fd, n)

    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000, log_size=600)
    monkeypatch.setattr(fileio, "fsync", fsync)
    monkeypatch.setattr(fileio, "truncate", truncate)
    commit_workload(w, 1, 30, 100, 5)
    w.close()  # drains: enacts and cleans every log in this process
    monkeypatch.undo()
    truncs = [name for kind, name in events if kind == "truncate"]
    assert len(truncs) >= 3
    first_trunc = events.index(("truncate", truncs[0]))
    assert ("fsync", "value3.tbl") in events[:first_trunc]
    assert ("fsync", "index1.tbl") in events[:first_trunc]
    order = [int(n[3:]) for n in truncs]
    assert order == sorted(order)  # fresh logs are numbered in rotation order


def test_replay_applies_longest_prefix_and_is_idempotent(db, tmp_path):
    """Replay applies records in id order up to a torn tail; replaying twice gives the same
    tables."""
    import shutil
    pid = os.fork()
    if pid == 0:
        w = mpwal.Writer(db, TABLES, enactor="none", log_size=1500, log_age=1000)
        commit_workload(w, 1, 40, 200, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    logs = read_logs(db)
    assert len(logs.valid) > 2 and logs.last_record_id == 40
    last = logs.valid[-1]
    path = os.path.join(db, f"log{last.log_id}")
    cut = last.records[-1].start + 7  # tear the newest record
    os.truncate(path, cut)
    copy = str(tmp_path / "copy")
    shutil.copytree(db, copy)
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 39
        assert read_state(w, 200) == expected_state(39, 200, 5)
    tables1 = {n: open(os.path.join(db, n), "rb").read() for n in ("value3.tbl", "index1.tbl")}
    # replay the same logs on top of tables that already hold them: same result
    for n in ("value3.tbl", "index1.tbl"):
        shutil.copy(os.path.join(db, n), os.path.join(copy, n))
    with mpwal.Writer(copy, TABLES) as w:
        assert read_state(w, 200) == expected_state(39, 200, 5)
    for n, data in tables1.items():
        assert open(os.path.join(copy, n), "rb").read() == data
    for seg in stale_segments(os.path.realpath(copy)):
        pytest.fail(f"segment left: {seg}")


def test_replay_io_error_fails_open_and_keeps_logs(db, monkeypatch):
    """Invariant 4: an I/O error while reading the logs fails the open and deletes nothing."""
    pid = os.fork()
    if pid == 0:
        w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
        commit_workload(w, 1, 10, 50, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    before = {n: open(os.path.join(db, n), "rb").read() for n in os.listdir(db) if n.startswith("log")}
    import mpwal._logs as logs_mod
    real = logs_mod.fileio.read_file

    def failing(path):
        if os.path.basename(path).startswith("log"):
            raise OSError(5, "Input/output error")
        return real(path)

    monkeypatch.setattr(logs_mod.fileio, "read_file", failing)
    with pytest.raises(mpwal.StorageError, match="I/O error"):
        mpwal.Writer(db, TABLES)
    monkeypatch.undo()
    after = {n: open(os.path.join(db, n), "rb").read() for n in os.listdir(db) if n.startswith("log")}
    assert after == before
    with mpwal.Writer(db, TABLES) as w:
        assert read_state(w, 50) == expected_state(10, 50, 5)


def test_sync_makes_everything_durable(db, monkeypatch):
    """sync() returns after an fsync that covers every record committed before it."""
    calls = []
    real = fileio.fdatasync
    monkeypatch.setattr(fileio, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    with mpwal.Writer(db, TABLES, sync_wal=False, log_age=1000) as w:
        commit_workload(w, 1, 5, 50, 3)
        assert w.stats()["durable"] == 0
        assert w.sync() == 5
        assert calls and w.stats()["durable"] == 5
        n = len(calls)
        w.sync()
        assert len(calls) == n  # nothing new: no fsync


def test_group_commit_shares_fsyncs(db, monkeypatch):
    """With durability="commit", 4 threads committing at once share fsyncs: fewer fsyncs than
    commits, and every commit returns durable."""
    calls = []
    real = fileio.fdatasync

    def slow_sync(fd):
        calls.append(fd)
        time.sleep(0.005)  # a disk that takes its time lets commits pile up
        real(fd)

    monkeypatch.setattr(fileio, "fdatasync", slow_sync)
    with mpwal.Writer(db, TABLES, durability="commit", log_age=1000) as w:
        errors = []

        def work(t):
            try:
                for i in range(25):
                    with w.record() as rec:
                        rec.insert_value(VALUE_TABLE, t * 100 + i, b"v")
                    assert w.stats()["durable"] >= rec.record_id
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert w.last_record_id == 100
        assert len(calls) < 100


def test_backpressure_waits_then_raises(db):
    """With no enactor and tight limits, a commit waits up to the timeout, then raises
    BackpressureError; what was committed stays intact."""
    w = mpwal.Writer(db, TABLES, enactor="none", max_pending_bytes=2000,
                     backpressure_timeout=0.3, log_age=1000)
    try:
        committed = 0
        with pytest.raises(mpwal.BackpressureError, match="enactor"):
            for rid in range(1, 100):
                with w.record() as rec:
                    rec.insert_value(VALUE_TABLE, rid, make_value(rid, rid))
                committed = rid
        assert 0 < committed < 99
        for rid in range(1, committed + 1):
            assert check_value(rid, w.value(VALUE_TABLE, rid)) == rid
    finally:
        w.close()
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == committed


def test_backpressure_resumes_when_enactor_catches_up(db):
    """With an enactor running, tight limits only slow commits down; nothing fails."""
    with mpwal.Writer(db, TABLES, max_pending_bytes=4000, max_overlay_bytes=1 << 16,
                      overlay_slots=64, overlay_bytes=8192, log_size=1024, log_age=0.01) as w:
        commit_workload(w, 1, 150, 500, 8)
        assert read_state(w, 500) == expected_state(150, 500, 8)
        s = w.stats()
        assert s["overlay_capacity_bytes"] <= 1 << 16


def test_overlay_memory_is_given_back(db):
    """After a burst is enacted the overlay is emptied and its heap reset (reclaim)."""
    with mpwal.Writer(db, TABLES, log_age=0.02) as w:
        big = mpwal.ValueTable(9, slot_size=4096)
        w.close()
    with mpwal.Writer(db, TABLES + [mpwal.ValueTable(9, slot_size=4096)], log_age=0.02) as w:
        for rid in range(50):
            with w.record() as rec:
                rec.insert_values(9, [(rid * 20 + i, b"z" * 4000) for i in range(20)])
        wait_for(lambda: w.stats()["overlay_entries"] == 0)
        wait_for(lambda: w.stats()["pending_records"] == 0)
        assert w.stats()["overlay_bytes"] == 0  # (the ring's reset: tests/test_overlay.py)
        del big


def test_enactor_process_killed_is_replaced(db):
    """Killing the enactor process does not block the writer for good: it is restarted and
    enactment goes on."""
    import signal
    with mpwal.Writer(db, TABLES, enactor="process", log_size=1024, log_age=0.02) as w:
        commit_workload(w, 1, 20, 100, 5)
        wait_for(lambda: w.stats()["enactor_pid"] not in (0, os.getpid()))
        os.kill(w.stats()["enactor_pid"], signal.SIGKILL)
        commit_workload(w, 21, 60, 100, 5)
        wait_for(lambda: w.stats()["enacted"] == 60, timeout=30)
        assert w.stats()["enactor_restarts"] >= 1


def test_hand_started_enactor_lets_a_new_writer_replay(db):
    """`mpwal enactor PATH` running beside the writer enacts; a new writer takes over after the
    old one dies without being blocked by it."""
    import signal
    import subprocess
    import sys
    with mpwal.Writer(db, TABLES, enactor="none"):
        pass
    proc = subprocess.Popen([sys.executable, "-m", "mpwal", "enactor", db])
    try:
        pid = os.fork()
        if pid == 0:
            w = mpwal.Writer(db, TABLES, enactor="none", log_size=1024, log_age=0.02)
            commit_workload(w, 1, 50, 100, 5)
            time.sleep(0.5)
            os._exit(0)
        os.waitpid(pid, 0)
        with mpwal.Writer(db, TABLES, enactor="none", log_size=1024, log_age=0.02) as w:
            assert w.last_record_id == 50
            commit_workload(w, 51, 80, 100, 5)
            wait_for(lambda: w.stats()["enacted"] == 80, timeout=30)
            assert read_state(w, 100) == expected_state(80, 100, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_enactor_thread_handoff_matches_log_replay(db, tmp_path):
    """The enactor thread applies records handed over in memory (values, chunk after-images,
    drops); the table files it leaves are byte for byte those enacting the log files gives."""
    other = str(tmp_path / "other")

    def workload(w):
        for rid in range(1, 121):
            with w.record() as rec:
                if rid % 40 == 0:
                    rec.drop_table(VALUE_TABLE if rid % 80 else 1)
                for k in range(rid % 7, 300, 37):
                    rec.insert_value(VALUE_TABLE, k, None if k % 5 == 0 else make_value(k, rid))
                    rec.insert_index(1, k // 64, k % 64, rid)
            if rid % 10 == 0:
                w.rotate()

    with mpwal.Writer(db, TABLES, enactor="thread", log_age=1000) as w:
        workload(w)
        w.rotate()
        wait_for(lambda: w.stats()["enacted"] == 120)
        assert w.stats()["logs_handed_over"] == 0  # every rotated log was taken from memory
    with mpwal.Writer(other, TABLES, enactor="none", log_age=1000) as w:
        workload(w)
    for name in ("value3.tbl", "index1.tbl"):
        with open(os.path.join(db, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name


def test_every_table_synced_before_a_log_is_truncated(db, monkeypatch):
    """An enactor fsyncs every table before truncating a log, also tables an earlier enactor
    (stopped mid-log, or killed) wrote and it did not (invariant 3)."""
    from mpwal._enactor import Enactor
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    try:
        commit_workload(w, 1, 30, 100, 5)
        w.rotate()
        first = Enactor(db)
        first.detach_on_new_writer = False
        first.step()  # applies records, publishes how far it got, and stops ("killed")
        first.close()
        events = []
        real_fsync, real_truncate = fileio.fsync, fileio.truncate
        monkeypatch.setattr(fileio, "fsync", lambda fd: (events.append(
            ("fsync", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])), real_fsync(fd)))
        monkeypatch.setattr(fileio, "truncate", lambda fd, n: (events.append(
            ("truncate", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])), real_truncate(fd, n)))
        second = Enactor(db)
        second.detach_on_new_writer = False
        second.drain()
        second.close()
        monkeypatch.undo()
        cut = next(i for i, e in enumerate(events) if e[0] == "truncate")
        assert {("fsync", "value3.tbl"), ("fsync", "index1.tbl")} <= set(events[:cut])
    finally:
        w.close()


def test_sync_covers_every_rotated_log(db, monkeypatch):
    """With sync_wal off and more rotated logs than the writer keeps open, sync() still
    fsyncs every log it acknowledges."""
    synced = set()
    real = fileio.fdatasync

    def fdatasync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real(fd)

    monkeypatch.setattr(fileio, "fdatasync", fdatasync)
    with mpwal.Writer(db, TABLES, enactor="none", sync_wal=False, log_size=1, log_age=1000) as w:
        rotated = []
        for rid in range(1, 81):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, rid, b"v")
            rotated.append(w.stats()["logs"]["read"][-1])
        assert w.sync() == 80
        assert {f"log{lid}" for lid in set(rotated)} <= synced


def test_enactor_after_a_dead_writer_does_not_apply_again(db):
    """An enactor that starts after the writer died takes the dead segment's ``enacted`` word
    and the queue file's last cleaned record: it applies nothing twice (an older record applied
    again would show readers older data)."""
    from mpwal._enactor import Enactor
    pid = os.fork()
    if pid == 0:
        w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
        commit_workload(w, 1, 20, 100, 5)
        w.rotate()
        e = Enactor(db)
        e.detach_on_new_writer = False
        e.step()
        os._exit(0 if e.enacted == 20 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    e = Enactor(db)
    e.detach_on_new_writer = False
    applied = []
    e.applier.apply = lambda batch: applied.extend(r.record_id for r in batch)
    e.step()
    assert e.enacted == 20 and applied == []
    e.close()
    with mpwal.Writer(db, TABLES) as w:  # removes the dead writer's segment
        assert read_state(w, 100) == expected_state(20, 100, 5)


def test_enactor_that_cannot_start_leaves_the_directory_usable(db, monkeypatch):
    """If the enactor process cannot be started, the open fails with StorageError and leaves
    no lock and no shared memory behind."""
    import errno
    import subprocess

    def no_fork(*args, **kwargs):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_fork)
    with pytest.raises(mpwal.StorageError, match="enactor"):
        mpwal.Writer(db, TABLES, enactor="process")
    monkeypatch.undo()
    assert stale_segments(os.path.realpath(db)) == []
    with mpwal.Writer(db, TABLES):
        pass


def test_handoff_is_whole_logs_only(db, monkeypatch):
    """Records committed before the enactor thread holds its lock are not handed over for that
    log (the enactor reads it from the file); a log handed over holds every one of its records."""
    from mpwal._enactor import Enactor
    real_run = Enactor.run
    started = threading.Event()

    def late_run(self):  # the thread takes enactor.lock only after the first commits
        started.wait(10)
        real_run(self)

    monkeypatch.setattr(Enactor, "run", late_run)
    with mpwal.Writer(db, TABLES, log_size=1 << 20, log_age=1000) as w:
        commit_workload(w, 1, 20, 100, 5)
        started.set()
        wait_for(lambda: w.stats()["enactor_holding_lock"])
        commit_workload(w, 21, 40, 100, 5)  # same log, now with the lock held
        w.rotate()
        commit_workload(w, 41, 60, 100, 5)  # a new log, handed over whole
        w.rotate()
        wait_for(lambda: w.stats()["enacted"] == 60)
        wait_for(lambda: w.stats()["overlay_entries"] == 0)
        assert read_state(w, 100) == expected_state(60, 100, 5)


def test_appending_log_is_synced_ahead_outside_the_lock_and_a_failure_stops_the_writer(db, monkeypatch):
    """With sync_wal, the housekeeping thread fdatasyncs the appending log once PRESYNC_BYTES
    more are in it, without the writer's lock (commits go on meanwhile), so the rotation's
    fsync under the lock has little left. A failed one stops the writer: the kernel may have
    dropped the pages it could not write, and a later fsync would not say so."""
    from mpwal import _appender, _writer
    monkeypatch.setattr(_appender, "PRESYNC_BYTES", 1024)
    held = []
    real = os.fdatasync

    def fdatasync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
        if name.startswith("log"):
            held.append(w._lock._is_owned())
            if fail:
                raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(_writer.os, "fdatasync", fdatasync)
    fail = False
    w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
    try:
        for rid in range(1, 41):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, rid, b"v" * 60)
        wait_for(lambda: held)
        assert held and not any(held), "presync ran under the writer's lock"
        fail = True
        n = len(held)
        for rid in range(41, 81):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, rid, b"v" * 60)
        wait_for(lambda: len(held) > n)
        wait_for(lambda: w._failed is not None)
        with pytest.raises(mpwal.WriterFailedError, match="syncing the appending log"):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, 99, b"x")
    finally:
        w.close()
    with mpwal.Writer(db, TABLES, enactor="none") as w2:  # committed records replay
        assert w2.last_record_id == 80
        assert w2.value(VALUE_TABLE, 80) == b"v" * 60
