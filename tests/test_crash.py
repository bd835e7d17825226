"""Real SIGKILL of the writer, the enactor process and readers at seeded random points
(issue 3's crash tests, issue 4 part 3). ``MPWAL_LONG=1`` runs 50 points per role."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time

import pytest

import mpwal
from mpwal._overlay import OverlayWriter
from mpwal._queues import QUEUE_LOCK, file_lock

from procs import (TABLES, VALUE_TABLE, check_value, commit_workload, expected_state,
                   make_value, read_state, reader_loop)

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("multiprocess")]
LONG = bool(os.environ.get("MPWAL_LONG"))
POINTS = 50 if LONG else 6
KEYS, PER = 300, 6
fork = multiprocessing.get_context("fork")
spawn = multiprocessing.get_context("spawn")


def _writer_child(path, first, fd, durability, enactor):
    """Commit from record ``first`` on, forever; write each durable record id to ``fd``."""
    try:
        w = mpwal.Writer(path, TABLES, durability=durability, enactor=enactor, log_size=2048,
                         log_age=0.02)

        def ack(rid):
            if durability == "commit":
                os.write(fd, struct.pack("<Q", rid))
            elif rid % 7 == 0:
                os.write(fd, struct.pack("<Q", w.sync()))

        commit_workload(w, first, first + 10**6, KEYS, PER, on_commit=ack)
    finally:
        os._exit(1)


def _read_acks(fd) -> int:
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    data = data[: len(data) // 8 * 8]
    return max(struct.unpack(f"<{len(data) // 8}Q", data), default=0)


def test_sigkill_writer_at_random_points(db):
    """Kill the writer at random moments (with per-commit durability, or sync() every 7
    records; enactor as thread or process): after each restart every acknowledged record is
    there, none is partly there, and the state equals a prefix of the committed sequence."""
    rng = random.Random(1234)
    acked_total = 0
    last = 0
    out, stop = spawn.Queue(), spawn.Event()
    reader = spawn.Process(target=reader_loop, args=(db, KEYS, 3600, out, stop))
    with mpwal.Writer(db, TABLES):
        pass
    reader.start()
    try:
        for point in range(POINTS):
            durability = rng.choice(["commit", "relaxed"])
            enactor = rng.choice(["thread", "process"])
            rfd, wfd = os.pipe()
            p = fork.Process(target=_writer_child, args=(db, last + 1, wfd, durability, enactor))
            p.start()
            os.close(wfd)
            time.sleep(rng.uniform(0.1, 0.6))
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            acked = _read_acks(rfd)
            os.close(rfd)
            with mpwal.Writer(db, TABLES, enactor="none") as w:
                last_now = w.last_record_id
                assert last_now >= max(acked, last), (point, acked, last_now)
                assert read_state(w, KEYS) == expected_state(last_now, KEYS, PER), point
            acked_total += acked > last
            last = last_now
        assert last > POINTS  # the kills did not all come before any commit
        stop.set()
        reads, errors = out.get(timeout=60)  # it read on across every kill and replay
        assert errors == [] and reads > 0, errors
    finally:
        if reader.is_alive():
            os.kill(reader.pid, signal.SIGKILL)
        reader.join()


def _enactor_pid(w):
    pid = w.stats()["enactor_pid"]
    return pid if pid not in (0, os.getpid()) else None


def test_sigkill_enactor_process_at_random_points(db):
    """Kill the enactor process at random moments while the writer commits: the writer restarts
    it, nothing blocks for good, and after close and reopen every record is there."""
    rng = random.Random(99)
    with mpwal.Writer(db, TABLES, enactor="process", log_size=1024, log_age=0.01) as w:
        rid = 0
        kills = 0
        killed = None
        for _point in range(POINTS):
            n = rng.randint(5, 30)
            commit_workload(w, rid + 1, rid + n, KEYS, PER)
            rid += n
            deadline = time.monotonic() + 10
            while (pid := _enactor_pid(w)) in (None, killed) and time.monotonic() < deadline:
                time.sleep(0.01)
            killed = pid
            time.sleep(rng.uniform(0, 0.05))
            try:
                os.kill(pid, signal.SIGKILL)
                kills += 1
            except (ProcessLookupError, TypeError):
                pass
        deadline = time.monotonic() + 30
        while w.stats()["enacted"] < rid:
            assert time.monotonic() < deadline, "enactment never resumed"
            time.sleep(0.02)
        assert kills >= POINTS // 2 and w.stats()["enactor_restarts"] >= 1
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == rid
        assert read_state(w, KEYS) == expected_state(rid, KEYS, PER)


def test_sigkill_readers_affects_no_one(db):
    """Readers killed at random points never disturb the writer or the other readers."""
    rng = random.Random(7)
    with mpwal.Writer(db, TABLES, log_size=4096, log_age=0.02) as w:
        out = spawn.Queue()
        survivor = spawn.Process(target=reader_loop, args=(db, KEYS, 6 + POINTS * 0.1, out))
        survivor.start()
        rid = 0
        for _point in range(POINTS):
            victim = fork.Process(target=reader_loop, args=(db, KEYS, 60, out))
            victim.start()
            commit_workload(w, rid + 1, rid + 10, KEYS, PER)
            rid += 10
            time.sleep(rng.uniform(0.01, 0.1))
            os.kill(victim.pid, signal.SIGKILL)
            victim.join()
        reads, errors = out.get(timeout=120)
        survivor.join(30)
        assert errors == [] and reads > 0
        assert read_state(w, KEYS) == expected_state(rid, KEYS, PER)


def _die_mid_publish(path, at, fd):
    """A writer that SIGKILLs itself in the middle of publishing record ``at``: some of its
    versions linked into shared memory, the watermark not yet raised."""
    real = OverlayWriter.publish

    def publish(self, rid, items, *rest):
        if rid == at:
            self._link(rid, list(items)[:1], (), ())  # part of the record is linked
            os.write(fd, b"x")
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, rid, items, *rest)

    OverlayWriter.publish = publish
    w = mpwal.Writer(path, TABLES, enactor="none", log_age=1000)
    commit_workload(w, 1, at, KEYS, PER)
    os._exit(1)


def test_writer_killed_mid_publish(db):
    """SIGKILL in the middle of a publish: a reader that was following answers at once from
    the whole records below the watermark (no spin, no half record), and follows the new
    writer, whose replay keeps the record (it was in the log)."""
    with mpwal.Writer(db, TABLES):
        pass
    rfd, wfd = os.pipe()
    p = fork.Process(target=_die_mid_publish, args=(db, 20, wfd))
    p.start()
    os.close(wfd)
    r = None
    deadline = time.monotonic() + 30
    while r is None or r.mode != "shared-memory":  # attach while the writer lives
        if r is not None:
            r.close()
        r = mpwal.Reader(db)
        assert time.monotonic() < deadline
    assert os.read(rfd, 1) == b"x"
    p.join()
    os.close(rfd)
    started = time.monotonic()
    # the watermark was never raised to 20: the dead writer's segment still answers at 19,
    # whole, at once; half of record 20's versions are linked there and must not show
    assert r.last_record_id == 19
    state = read_state(r, KEYS)
    assert time.monotonic() - started < 10
    assert state == expected_state(19, KEYS, PER)
    with mpwal.Writer(db, TABLES) as w:  # replay keeps record 20: it was in the log
        assert w.last_record_id == 20
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 0, make_value(0, 21))
        assert check_value(0, r.value(VALUE_TABLE, 0)) == 21
        assert r.mode == "shared-memory"
    r.close()


def _hold_queue_lock(path, fd):
    lock = file_lock(path, QUEUE_LOCK)
    lock.acquire()
    os.write(fd, b"x")
    time.sleep(60)


def test_writer_killed_holding_queue_lock_does_not_wedge(db):
    """A process killed while it holds queue.lock leaves no lock behind: the enactor and the
    next writer go on."""
    with mpwal.Writer(db, TABLES, enactor="none", log_age=1000) as w:
        commit_workload(w, 1, 10, KEYS, PER)
    rfd, wfd = os.pipe()
    p = fork.Process(target=_hold_queue_lock, args=(db, wfd))
    p.start()
    assert os.read(rfd, 1) == b"x"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    started = time.monotonic()
    with mpwal.Writer(db, TABLES, log_size=512, log_age=0.01) as w:
        commit_workload(w, 11, 30, KEYS, PER)
        while w.stats()["enacted"] < 30:
            assert time.monotonic() - started < 20
            time.sleep(0.01)
    os.close(rfd)
    os.close(wfd)


def _open_and_die(path):
    mpwal.Writer(path, TABLES, enactor="none")
    os.kill(os.getpid(), signal.SIGKILL)


def test_segment_of_killed_writer_removed_by_next_writer(db):
    """A killed writer's shared memory outlives it only until the next writer opens, which
    marks it superseded (readers that map it move on) and unlinks it."""
    from mpwal._overlay import SUPERSEDED, OverlayReader, stale_segments
    with mpwal.Writer(db, TABLES):
        pass
    p = fork.Process(target=_open_and_die, args=(db,))
    p.start()
    p.join()
    real = os.path.realpath(db)
    (left,) = stale_segments(real)
    old = OverlayReader(left)
    with mpwal.Writer(db, TABLES) as w:
        assert stale_segments(real) == [w.stats()["segment"]] != [left]
        assert old.q[0] == SUPERSEDED
    old.release()
