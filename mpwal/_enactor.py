"""The enactor/cleaner: applies rotated logs to the table files, then cleans them into the pool.

One at a time per directory (``enactor.lock``). It runs as a thread of the writer by default, as
a process started by the writer (``enactor="process"``), or by hand (``mpwal enactor PATH``).
Whichever it is, it works only from the queue state file and the log files, and tells the writer
how far it got through one word of shared memory (``enacted``), so killing it loses nothing: the
next enactor reads ``enacted`` and skips what was applied (re-applying an older record after a
newer one would briefly put older data in a table file that readers might see).

Each step (parity-db's ``read_next``/``end_read``/``clean_logs``):

1. read the head of the read queue (a rotated log never changes again), apply its records in
   batches: values of consecutive slots are written with one ``pwrite``, each index chunk is read
   and written once per batch; a record that drops a table starts a new batch (``_applier.py``);
2. before each batch, honour the snapshots' pins (``_pins.py``): apply nothing past the oldest
   live pin younger than ``max_snapshot_age``, and announce the batch's last id in
   ``enacting`` (the barrier protocol of ``_pins.py``); publish ``enacted`` after the batch, only
   once its bytes are in the table files (invariant 2: the writer then frees those versions);
3. at the end of a log: fsync the tables when ``sync_data``, move the log to the cleanup queue,
   truncate cleanup logs in order and return them to the pool, keeping at most 16 and deleting
   the rest (invariant 3). Truncation happens under ``queue.lock``.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

import filelock
import posix_ipc

from . import _fileio as fileio, _retention as retention
from ._applier import BATCH_CHANGES, BATCH_RECORDS, Applier, batches
from ._errors import CorruptionError, StorageError, storage_error
from ._format import LOG_PREFIX, LogScan, first_record_id
from ._overlay import (ENACTED, ENACTING, ENACTOR_PID, LIVE, MAGIC, MAGIC_W, STATE, load_acquire,
                       segment_name, store_fenced, store_release)
from ._pins import ReaderTable
from ._tables import set_floors
from ._queues import ENACTOR_LOCK, QueueStore, file_lock, log_path

log = logging.getLogger("mpwal")


class _Progress:
    """A read-write mapping of the live generation's header, for the ``enacted`` word only."""

    def __init__(self, name: str):
        shm = posix_ipc.SharedMemory(name, 0)
        try:
            self.m = mmap.mmap(shm.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        self.q = memoryview(self.m).cast("Q")
        if load_acquire(self.m, self.q, MAGIC_W) != MAGIC:
            self.close()
            raise FileNotFoundError(name)

    @property
    def live(self) -> bool:
        return load_acquire(self.m, self.q, STATE) == LIVE

    def close(self) -> None:
        self.q.release()
        self.m.close()


class Handoff:
    """Records a writer hands to its enactor thread in memory, so that thread need not read and
    parse the logs it rotated: ``(record_id, values, chunk images, drops)`` per record.

    A list is keyed by the id of the first record of its log, never by the log's id: the pool
    reuses log ids, and a list left by an earlier use of the same id (another enactor enacted
    that log from its file) must never pass for the log's current records. Record ids are not
    reused within one writer's life, which is as long as a Handoff lives.
    """

    def __init__(self) -> None:
        self._lists: dict[int, list] = {}
        self._lock = threading.Lock()

    def start_log(self, first_record_id: int) -> list:
        """The list the writer fills with the records of a log it starts at ``first_record_id``."""
        with self._lock:
            lst: list = []
            self._lists[first_record_id] = lst
            return lst

    def take(self, first_record_id: int) -> list | None:
        """The list of the log that starts at ``first_record_id``, if the writer made one. Lists
        of logs that start earlier were enacted by another enactor: they are dropped."""
        with self._lock:
            for k in [k for k in self._lists if k < first_record_id]:
                del self._lists[k]
            return self._lists.pop(first_record_id, None)

    def __len__(self) -> int:
        return len(self._lists)


class _NewWriter(Exception):
    """A new writer opened (the queue epoch moved): let go of the enactor lock for its replay."""


class Enactor:
    """Enacts and cleans the logs of ``path`` until ``stop`` is set."""

    def __init__(self, path: str, stop: threading.Event | None = None, poll: float = 0.005):
        self.path = os.path.realpath(path)
        self.stop = stop or threading.Event()
        self.poll = poll
        self.applier = Applier(self.path)
        self.files = self.applier.files
        self.queues = QueueStore(self.path)
        self.progress: _Progress | None = None
        self.pins: ReaderTable | None = None
        self.generation = -1
        self.epoch = -1
        self.enacted = 0  # newest record applied by this enactor in this epoch
        self.current: int | None = None  # log id being enacted
        self.data = b""
        self.pos = 0
        self.error: BaseException | None = None
        self.detach_on_new_writer = True
        self.holding = False  # holds enactor.lock: a writer may hand it records in memory
        # filled by the Writer whose thread this is; a log missing from it is read from its file
        self.handoff: Handoff | None = None
        self.mem: list | None = None

    # -- driving -----------------------------------------------------------------------------
    def run(self) -> None:
        """Take the enactor lock (waiting while another enactor holds it), then work. A new
        writer (epoch) makes it let go of the lock so that the writer can replay alone."""
        lock = file_lock(self.path, ENACTOR_LOCK)
        try:
            while not self.stop.is_set():
                try:
                    lock.acquire(timeout=0.1)
                except filelock.Timeout:
                    continue
                self.holding = True
                try:
                    while not self.stop.is_set():
                        if not self.step():
                            self.stop.wait(self.poll)
                except _NewWriter:
                    self.holding = False
                    lock.release()
                    self.stop.wait(0.2)
                    continue
                self.holding = False
                lock.release()
        except BaseException as e:  # reported through stats(); the writer restarts enactors
            self.error = e
            log.error("enactor stopped: %s", e)
            raise
        finally:
            self.holding = False
            if lock.is_locked:
                lock.release()
            self.close()

    def close(self) -> None:
        """Close the table files and the progress mapping."""
        self.applier.close()
        if self.pins is not None:
            self.pins.close()
            self.pins = None
        if self.progress:
            self.progress.close()
            self.progress = None

    def drain(self) -> None:
        """Enact and clean everything queued now (used by close and by tests)."""
        while self.step():
            pass

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> bool:
        """Do one batch of work; False when there was nothing to do. I/O errors come out as
        StorageError."""
        try:
            return self._step()
        except StorageError:
            raise
        except OSError as e:
            raise storage_error(e, "enacting the logs") from None

    def _step(self) -> bool:
        st = self.queues.read()
        if st is None:
            return False
        self._follow(st)
        self._publish(self.enacted)
        if st.cleanup:
            self._clean()
            return True
        if not st.read:
            return False
        head = st.read[0]
        if head != self.current:
            self.current = head
            self.mem = self._handed_over(head)
            if not self.mem or self.mem[0][0] > self.enacted + 1:
                self.mem = None  # none, or not the whole log after what was applied: the file
            if self.mem is None:
                try:
                    self.data = fileio.read_file(log_path(self.path, head))
                except FileNotFoundError:
                    self.data = b""
            self.pos = 0
        if self.mem is not None:
            return self._step_in_memory(self.mem, head, st.epoch)
        scan = LogScan(self.data, start=self.pos)
        fresh = (rec for rec in scan.records() if rec.record_id > self.enacted)
        batch = next(batches(fresh), None)  # the rest of the log is scanned again next step
        if batch:
            limit = self._announce(batch[-1].record_id, st)
            batch = [rec for rec in batch if rec.record_id <= limit]
            if not batch:
                return False  # a snapshot holds the next record back
            for rec in batch:
                why = self.applier.problem(rec)
                if why is not None:
                    raise CorruptionError(f"log{head} record {rec.record_id} cannot be enacted "
                                          f"({why}); reopen the writer: replay ends the logs' "
                                          "prefix there")
            self.applier.apply(batch)
            self.pos = batch[-1].end
            self.enacted = batch[-1].record_id
            self._publish(self.enacted)
            return True
        if scan.problem:
            # A rotated log that does not verify: stop here; replay on the next open decides.
            raise CorruptionError(f"log{head} does not verify at byte {scan.end} "
                                  f"({scan.problem}); reopen the writer to replay")
        self._finish_log(head, st.epoch)
        return True

    def _handed_over(self, head: int) -> list | None:
        """The head log's records from the writer's Handoff, if it made a list for this log."""
        if self.handoff is None:
            return None
        try:
            fd = os.open(log_path(self.path, head), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            first = first_record_id(os.pread(fd, LOG_PREFIX, 0))
        finally:
            os.close(fd)
        return None if first is None else self.handoff.take(first)

    def _step_in_memory(self, mem: list, head: int, epoch: int) -> bool:
        """The head log's records as the writer handed them over (enactor thread): no file to
        read or parse, and index chunks come as whole after-images. ``mem`` is ``self.mem``."""
        while self.pos < len(mem) and mem[self.pos][0] <= self.enacted:
            self.pos += 1
        if self.pos == len(mem):
            self._finish_log(head, epoch)
            return True
        end = self.pos + 1
        if not mem[self.pos][3]:  # a record with drops is applied alone
            changes = len(mem[self.pos][1]) + len(mem[self.pos][2])
            while end < len(mem) and end - self.pos < BATCH_RECORDS and not mem[end][3] \
                    and changes < BATCH_CHANGES:
                changes += len(mem[end][1]) + len(mem[end][2])
                end += 1
        limit = self._announce(mem[end - 1][0], None)
        while end > self.pos and mem[end - 1][0] > limit:
            end -= 1
        if end == self.pos:
            return False  # a snapshot holds the next record back
        self.applier.apply_handed(mem[self.pos:end])
        self.pos = end
        self.enacted = mem[end - 1][0]
        self._publish(self.enacted)
        return True

    def _follow(self, st) -> None:
        """Attach to the writer's current generation; a new epoch (writer) restarts positions."""
        if st.epoch != self.epoch:
            if self.epoch != -1 and self.detach_on_new_writer:
                self.epoch = -1
                raise _NewWriter()
            self.epoch = st.epoch
            self.current = None
            self.enacted = 0
            if self.progress:
                self.progress.close()
                self.progress = None
            self.generation = -1
        # records the tables already hold: never apply them again (an older record applied
        # after a newer one would show readers older data)
        self.enacted = max(self.enacted, st.last_cleaned_record)
        if self.progress is not None and self.progress.live and st.generation == self.generation:
            return
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        try:  # also a dead writer's segment: its ``enacted`` word says how far enactment got
            self.progress = _Progress(segment_name(self.path, st.generation))
            self.generation = st.generation
            self.enacted = max(self.enacted, self.progress.q[ENACTED])
            self.progress.q[ENACTOR_PID] = os.getpid()
        except (posix_ipc.ExistentialError, FileNotFoundError):
            self.progress = None

    def _announce(self, target: int, st) -> int:
        """The newest record id this batch may apply (at most ``target``, not past the oldest
        pin), announced in ``enacting`` by the protocol of ``_pins.py``: store, barrier, look at
        the pins again, lower and repeat if a new pin appeared below; and look again whether
        the overlay generation was replaced meanwhile (the writer grew it), announcing in the
        new one too."""
        if self.pins is None:
            try:
                self.pins = ReaderTable(self.path)
            except FileNotFoundError:
                self.pins = None  # no writer of this version opened here: nobody can pin
        limit = target
        for _ in range(1000):
            if self.pins is not None:
                oldest = self.pins.oldest()
                if oldest is not None and oldest < limit:
                    limit = max(oldest, self.enacted)
            p = self.progress
            if p is not None and p.q[ENACTING] != limit:  # before the batch's file writes
                store_fenced(p.m, p.q, ENACTING, limit)
            if self.pins is None:
                return limit
            self.pins.barrier()
            oldest = self.pins.oldest()
            if oldest is not None and oldest < limit:
                continue
            if p is not None and not p.live:
                st = self.queues.read()
                if st is not None and st.generation != self.generation:
                    self._follow(st)
                    continue
            return limit
        return self.enacted  # pins kept appearing below: apply nothing this step

    def _publish(self, rid: int) -> None:
        p = self.progress
        if p is not None and p.q[ENACTED] < rid:  # after the batch's file writes
            store_release(p.m, p.q, ENACTED, rid)
        if p is not None and p.q[ENACTING] < rid:
            store_release(p.m, p.q, ENACTING, rid)

    # -- applying ----------------------------------------------------------------------------
    # -- the end of a log, cleaning ----------------------------------------------------------
    def _finish_log(self, head: int, epoch: int) -> None:
        st = self.queues.read()
        if st is None or st.epoch != epoch or not st.read or st.read[0] != head:
            self.current = None  # a new writer replayed meanwhile
            return
        if st.sync_data:
            # invariant 3: tables on disk before the log that holds them goes; all of them, as
            # an earlier enactor (killed, or stopped at close) may have written some
            self.files.sync(everything=True)
        if not self.queues.finish_log(head, epoch, self.enacted):
            self.current = None
            return
        # the tables hold every record through ``enacted`` now, and the log will be cleaned:
        # the metadata keeps that id too, so a lost queue state cannot restart record ids
        set_floors(self.path, 0, self.enacted)
        log.debug("enacted log%d through record %d", head, self.enacted)
        self.current = None
        self.data = b""
        self.mem = None
        self._clean()

    def _clean(self) -> None:
        for lid in self.queues.clean(self._truncate):
            log.debug("cleaned log%d", lid)
        with self.queues.lock:  # what the cursors have passed goes; past the bound, the slowest
            st = self.queues.read()
            if st is not None:
                retention.prune(self.path, st.max_retained_bytes)

    def _truncate(self, lid: int) -> bool:
        """Empty a cleaned log for the pool (under queue.lock), after keeping it in ``feed/``
        if a cursor has not passed it (``_retention.py``); False if it is gone."""
        retention.keep_if_needed(self.path, log_path(self.path, lid))
        try:
            fd = os.open(log_path(self.path, lid), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fileio.truncate(fd, 0)
            fileio.fsync(fd)
        finally:
            os.close(fd)
        return True

def run_process(path: str, parent_pid: int = 0) -> None:
    """Entry point of an enactor process: run until SIGTERM/SIGINT, or until the writer that
    started it (``parent_pid``) is gone."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if parent_pid:
        def watch() -> None:
            while not stop.wait(0.2):
                if os.getppid() != parent_pid:
                    stop.set()
        threading.Thread(target=watch, daemon=True).start()
    import gc
    gc.set_threshold(100_000, 50, 100)  # decoded records are short-lived and hold no cycles
    Enactor(path, stop).run()
