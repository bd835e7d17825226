"""Unit tests of mpwal._durability.GroupCommit (the writer's group commit)."""

from __future__ import annotations

import threading
import time

import pytest

from mpwal._durability import GroupCommit


def test_one_flush_covers_every_waiter():
    published = []
    g = GroupCommit(published.append)
    flushes = []
    appended = [0]

    def flush():
        flushes.append(appended[0])
        time.sleep(0.05)  # waiters pile up meanwhile
        g.advance(appended[0])

    appended[0] = 8
    threads = [threading.Thread(target=g.wait, args=(rid, flush)) for rid in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert g.durable == 8 and published[-1] == 8
    assert len(flushes) < 8  # shared: far fewer fsyncs than commits
    g.wait(5, lambda: pytest.fail("already durable: no flush"))


def test_a_failed_flush_raises_in_its_caller_and_lets_the_next_waiter_try():
    g = GroupCommit(lambda rid: None)

    def broken():
        raise OSError(5, "EIO")

    with pytest.raises(OSError):
        g.wait(1, broken)
    g.wait(1, lambda: g.advance(1))  # not stuck "syncing"
    assert g.durable == 1


def test_advance_never_goes_back():
    published = []
    g = GroupCommit(published.append)
    g.advance(5)
    g.advance(3)
    assert g.durable == 5 and published == [5]
