"""Readers in other processes see every commit at once, whole, never going back (issue 2)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

import mpwal

from procs import (INDEX_TABLE, TABLES, VALUE_TABLE, check_value, commit_workload,
                   expected_state, make_value, read_state, reader_loop)

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("multiprocess")]
spawn = multiprocessing.get_context("spawn")


@pytest.mark.parametrize("enactor", ["thread", "process"])
def test_concurrent_readers_see_only_whole_committed_values(db, enactor):
    """A writer commits while 2 reader processes check every value they read (whole, committed,
    monotonic per key); small logs make rotation, enactment and cleaning happen meanwhile."""
    keys, per = 2000, 20
    w = mpwal.Writer(db, TABLES, enactor=enactor, log_size=8192, log_age=0.05,
                     overlay_slots=1 << 10, overlay_bytes=1 << 16)
    try:
        out = spawn.Queue()
        procs = [spawn.Process(target=reader_loop, args=(db, keys, 4.0, out)) for _ in range(2)]
        for p in procs:
            p.start()
        commit_workload(w, 1, 600, keys, per)
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        for reads, errors in results:
            assert errors == []
            assert reads > 1000
        assert read_state(w, keys) == expected_state(600, keys, per)
        s = w.stats()
        assert s["rotations"] > 5
    finally:
        w.close()
    with mpwal.Reader(db) as r:
        assert read_state(r, keys) == expected_state(600, keys, per)


def _wait_and_read(path, key, rid_queue, out):
    r = mpwal.Reader(path)
    while True:
        rid = rid_queue.get()
        if rid is None:
            break
        data = r.value(VALUE_TABLE, key)
        out.put(check_value(key, data) if data is not None else 0)
    r.close()


def test_commit_visible_in_other_process_when_record_returns(db):
    """As soon as record() returns, another process reads the new value (no polling)."""
    with mpwal.Writer(db, TABLES) as w:
        rq, out = spawn.Queue(), spawn.Queue()
        p = spawn.Process(target=_wait_and_read, args=(db, 7, rq, out))
        p.start()
        for rid in range(1, 51):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, 7, make_value(7, rid))
            rq.put(rid)
            assert out.get(timeout=30) == rid
        rq.put(None)
        p.join(30)
        assert p.exitcode == 0


def test_reader_follows_overlay_growth(db):
    """When the overlay outgrows its segment, readers move to the next generation unharmed."""
    with mpwal.Writer(db, TABLES, enactor="none", overlay_slots=16, overlay_bytes=4096) as w:
        r = mpwal.Reader(db)
        gen = w.stats()["generation"]
        for rid in range(1, 201):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, rid, make_value(rid, rid))
                rec.insert_index(INDEX_TABLE, rid // 64, rid % 64, rid)
            assert check_value(rid, r.value(VALUE_TABLE, rid)) == rid
        assert w.stats()["generation"] > gen
        assert r.stats()["generation"] == w.stats()["generation"]
        assert r.recoveries > 0
        r.close()


def test_writer_never_waits_for_a_stopped_reader(db):
    """A reader process stopped with SIGSTOP in the middle of its work does not slow commits
    down or block them (invariant 6)."""
    import signal
    import time
    keys = 500
    with mpwal.Writer(db, TABLES, log_size=4096, log_age=0.05) as w:
        out = spawn.Queue()
        p = spawn.Process(target=reader_loop, args=(db, keys, 30.0, out))
        p.start()
        time.sleep(1.0)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            commit_workload(w, 1, 300, keys, 10)  # would hang if a reader could block us
            assert w.last_record_id == 300
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)


def test_private_reader_without_writer_sees_unenacted_records(db):
    """With no live writer, a reader reads committed records straight from the logs
    (invariant 8: it changes nothing), and moves to shared memory when a writer opens."""
    pid = os.fork()
    if pid == 0:  # a writer that dies without closing: its records are only in the logs
        w = mpwal.Writer(db, TABLES, enactor="none", log_age=1000)
        commit_workload(w, 1, 30, 100, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    r = mpwal.Reader(db)
    assert r.mode == "private"
    assert read_state(r, 100) == expected_state(30, 100, 5)
    assert r.last_record_id == 30
    with mpwal.Writer(db, TABLES) as w:
        assert w.last_record_id == 30
        with w.record() as rec:
            rec.insert_value(VALUE_TABLE, 1, make_value(1, 31))
        assert check_value(1, r.value(VALUE_TABLE, 1)) == 31
        assert r.mode == "shared-memory"
    r.close()
