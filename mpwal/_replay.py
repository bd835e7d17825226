"""Replay: what a writer does when it opens, before it takes a commit.

It applies the longest valid prefix of the logs left on disk to the table files and starts a
new shared-memory generation with an empty overlay (everything replayed is in the tables). The
order matters for a writer killed in the middle of it:

1. bump the queue epoch (an enactor of the last writer lets go of ``enactor.lock``), and mark
   the dead writer's segments superseded, so readers leave them (they read the logs meanwhile);
2. take ``enactor.lock``, and only then read where the tables end (``last_cleaned_record``):
   an enactor of the dead writer may have cleaned logs until this moment;
3. apply the prefix that starts there, in batches (records are after-images: applying one
   again is harmless) and fsync the tables; the prefix ends at the first torn, corrupt,
   out-of-sequence or unenactable record (invariant 4);
4. record the last replayed id in the queue state, fsynced, before any log is truncated, so a
   later open neither reuses those ids nor replays an older log over newer table data;
5. create the new generation, then truncate every log into the pool, name the generation in
   the queue state and raise the epoch floor to this epoch (logs of older epochs are stale from
   now on), also in ``mpwal.meta``, so that a lost queue state cannot lower it.

An I/O error raises StorageError and keeps every log: the next open tries again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import filelock

from . import _fileio as fileio, _retention as retention
from ._applier import Applier, batches
from ._errors import DatabaseError, StorageError, storage_error
from ._format import Record
from ._logs import read_logs
from ._overlay import stale_segments, supersede_segment
from ._queues import ENACTOR_LOCK, QueueStore, file_lock, log_ids, log_path
from ._tables import epoch_floor, replayed_through, set_floors

log = logging.getLogger("mpwal")
ENACTOR_WAIT = 30.0  # seconds an enactor of the last writer gets to let go of its lock


def replay(path: str, queues: QueueStore, writer_pid: int, sync_data: bool,
           start_generation: Callable[[int, int], None], max_retained_bytes: int = 1 << 30) -> int:
    """Replay ``path``'s logs; returns the last record id in the tables. ``start_generation(
    generation, last_record_id)`` creates the new overlay: it is called under ``queue.lock``
    before the queue state names the generation, so a reader that reads it finds the segment."""
    st, loaded = queues.new_epoch(writer_pid, sync_data, epoch_floor(path), max_retained_bytes)
    generation = st.generation + 1
    for name in stale_segments(path):
        supersede_segment(name, generation)
    enactor_lock = file_lock(path, ENACTOR_LOCK)
    try:
        enactor_lock.acquire(timeout=ENACTOR_WAIT)
    except filelock.Timeout:
        raise DatabaseError(f"an enactor process still holds {ENACTOR_LOCK} after "
                            f"{ENACTOR_WAIT:.0f} s; stop it (it lets go when a new writer opens) "
                            "and reopen") from None
    try:
        st = queues.read() or st  # again, now that no enactor works
        kept = replayed_through(path)  # what the tables held at the last replay, should the
        loaded = loaded or kept > 0  # queue state have been lost since
        done = max(st.last_cleaned_record, kept)
        # (without a queue file, the logs alone say where the prefix starts)
        logs = read_logs(path, start=done + 1 if loaded else None)  # I/O error: raises
        for lid, why in logs.ignored:
            log.warning("replay of %s ignores log%d: %s; it is emptied with the others", path,
                        lid, why)
        if logs.problem:
            log.warning("replay of %s stops at %s; later records are dropped", path, logs.problem)
        applier = Applier(path)
        last = done
        count = 0
        try:
            for batch in batches(_applicable(path, logs.records(), applier)):
                applier.apply(batch)
                count += len(batch)
                last = batch[-1].record_id
            applier.sync()
        finally:
            applier.close()
        with queues.lock:
            queues.replayed(last)  # before any log is truncated
            start_generation(generation, last)
            valid = {lf.log_id for lf in logs.valid}
            st = queues.reset(generation, lambda: _truncate_all_logs(path, valid, last))
            retention.prune(path, st.max_retained_bytes)
            set_floors(path, st.log_epoch_floor, last)  # fsynced: they outlive the queue state
        if count:
            log.debug("replayed %d records of %s through record %d", count, path, last)
        return last
    except OSError as e:
        raise e if isinstance(e, StorageError) else storage_error(e, "replaying the logs") from None
    finally:
        enactor_lock.release()


def _applicable(path: str, records: Iterator[Record], applier: Applier) -> Iterator[Record]:
    """The records of the valid prefix up to the first one that cannot be applied (damaged, or
    written by an older mpwal): the prefix ends there."""
    for rec in records:
        why = applier.problem(rec)
        if why is not None:
            log.warning("replay of %s stops at record %d (%s); later records are dropped",
                        path, rec.record_id, why)
            return
        yield rec


def _truncate_all_logs(path: str, valid: set[int], last: int) -> list[int]:
    """Empty every log file (replay applied them) and make that durable; their ids. A log of
    the valid prefix (``valid``, records up to ``last``) that a cursor still needs is kept in
    ``feed/`` first (``_retention.py``)."""
    for lid in log_ids(path):
        if lid in valid:
            retention.keep_if_needed(path, log_path(path, lid), upto=last)
        fd = os.open(log_path(path, lid), os.O_RDWR)
        try:
            if os.fstat(fd).st_size:
                fileio.truncate(fd, 0)
                fileio.fsync(fd)
        finally:
            os.close(fd)
    fileio.sync_dir(path)
    return log_ids(path)
