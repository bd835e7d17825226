"""Unit tests of the queue state's transitions (mpwal._queues.QueueStore)."""

from __future__ import annotations

import os
import time

import pytest

from mpwal import _fileio as fileio
from mpwal._fileio import FaultPlan
from mpwal._queues import MAX_LOG_POOL_SIZE, QueueStore, load_queues, log_path


def store(tmp_path) -> QueueStore:
    path = str(tmp_path)
    return QueueStore(path)


def test_new_epoch_counts_opens_and_says_whether_a_state_existed(tmp_path):
    q = store(tmp_path)
    st, existed = q.new_epoch(123, sync_data=False)
    assert (st.epoch, st.writer_pid, st.sync_data, existed) == (1, 123, False, False)
    st, existed = q.new_epoch(456, sync_data=True)
    assert (st.epoch, st.writer_pid, existed) == (2, 456, True)
    assert load_queues(q.path).epoch == 2


def test_logs_come_from_the_pool_first_then_new_ids(tmp_path):
    q = store(tmp_path)
    q.new_epoch(1, True)
    assert q.start_log() == (0, True)
    q.rotate(0)
    assert q.start_log() == (1, True)
    st = load_queues(q.path)
    assert (st.appending, st.read, st.next_log) == (1, [0], 2)
    open(log_path(q.path, 0), "wb").close()
    assert q.finish_log(0, st.epoch, enacted=7)
    assert q.clean(lambda lid: True) == [0]
    q.rotate(1)
    assert q.start_log() == (0, False)  # reused from the pool
    st = load_queues(q.path)
    assert (st.pool, st.read, st.appending, st.last_cleaned_record) == ([], [1], 0, 7)


def test_finish_log_only_for_the_head_of_the_same_epoch(tmp_path):
    q = store(tmp_path)
    q.new_epoch(1, True)
    lid, _ = q.start_log()
    q.rotate(lid)
    assert not q.finish_log(lid, epoch=99, enacted=5)  # a new writer replayed meanwhile
    assert not q.finish_log(lid + 1, epoch=1, enacted=5)  # not the head
    assert load_queues(q.path).read == [lid]
    assert q.finish_log(lid, epoch=1, enacted=5)
    assert load_queues(q.path).cleanup == [lid]


def test_clean_keeps_at_most_the_pool_size_and_deletes_the_rest(tmp_path):
    q = store(tmp_path)
    q.new_epoch(1, True)
    n = MAX_LOG_POOL_SIZE + 3
    for _ in range(n):
        lid, _ = q.start_log()
        open(log_path(q.path, lid), "wb").close()
        q.rotate(lid)
        assert q.finish_log(lid, 1, lid + 1)
    os.unlink(log_path(q.path, 2))  # gone meanwhile: truncate() says so
    assert q.clean(lambda lid: os.path.exists(log_path(q.path, lid))) == [i for i in range(n) if i != 2]
    st = load_queues(q.path)
    assert len(st.pool) == MAX_LOG_POOL_SIZE and st.cleanup == []
    left = sorted(int(n[3:]) for n in os.listdir(q.path) if n.startswith("log"))
    assert left == st.pool


def test_the_commit_path_transitions_fsync_nothing(tmp_path):
    """start_log and rotate, taken on the commit path, never fsync while holding the lock."""
    q = store(tmp_path)
    q.new_epoch(1, True)
    plan = FaultPlan("fsync", 1 << 60)
    fileio.arm(plan)
    try:
        for _ in range(5):
            lid, _ = q.start_log()
            q.rotate(lid)
    finally:
        fileio.arm(None)
    assert plan.counts["fsync"] == 0 and plan.counts["rename"] == 10


def test_a_damaged_state_file_falls_back_on_the_last_state_seen(tmp_path):
    q = store(tmp_path)
    q.new_epoch(1, True)
    q.start_log()
    with open(os.path.join(q.path, "queues"), "wb") as f:
        f.write(b"{damaged")
    q.rotate(0)
    st = load_queues(q.path)
    assert (st.epoch, st.read, st.appending) == (1, [0], None)


def test_ctrl_c_during_a_transition_waits_for_its_end(tmp_path):
    """A SIGINT that arrives while a transition holds queue.lock (here: while the state is
    being saved) is raised as KeyboardInterrupt once the transition is over: the state is
    saved and the lock released, so the next transition of this process does not wait for a
    lock nobody will let go of."""
    import signal

    from mpwal import _queues
    qs = QueueStore(str(tmp_path))
    qs.new_epoch(os.getpid(), True)
    real_save = _queues.save_queues

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs at the next bytecode boundaries, in here
        real_save(*args, **kwargs)

    _queues.save_queues = save
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # (ignored, if started
    try:  # from a shell's background job)
        with pytest.raises(KeyboardInterrupt):
            qs.start_log()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        _queues.save_queues = real_save
        signal.signal(signal.SIGINT, inherited)
    assert not qs.lock.is_locked
    assert load_queues(str(tmp_path)).appending is not None  # the transition happened whole
    qs.rotate(load_queues(str(tmp_path)).appending)  # and the next one takes the lock
