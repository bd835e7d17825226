"""Group commit: one fsync covers every commit waiting for durability, from every thread.

A commit with ``durability="commit"`` (or a ``sync()``) waits until ``durable`` reaches its
record id. The first waiter to find no fsync under way runs ``flush`` for everybody: it fsyncs
whatever the writer has appended so far and advances ``durable`` to the last record that fsync
covers. The others wait on the condition; a waiter whose record came after the fsync started
runs the next one. A rotation with ``sync_wal`` advances ``durable`` too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class GroupCommit:
    """``durable``: the newest record id known to be on disk."""

    def __init__(self, on_durable: Callable[[int], None]) -> None:
        self.durable = 0
        self._on_durable = on_durable  # publishes the new value (the writer's overlay word)
        self._cond = threading.Condition(threading.Lock())
        self._syncing = False

    def advance(self, record_id: int) -> None:
        """Records up to ``record_id`` are on disk; wake whoever waits for them."""
        with self._cond:
            if record_id > self.durable:
                self.durable = record_id
                self._on_durable(record_id)
            self._cond.notify_all()

    def wait(self, record_id: int, flush: Callable[[], None]) -> None:
        """Return once ``record_id`` is durable. ``flush()`` fsyncs everything appended so far
        and calls ``advance``; it runs in at most one thread at a time, and its exception is
        this call's."""
        while True:
            with self._cond:
                while self.durable < record_id and self._syncing:
                    self._cond.wait()
                if self.durable >= record_id:
                    return
                self._syncing = True
            try:
                flush()
            finally:
                with self._cond:
                    self._syncing = False
                    self._cond.notify_all()
