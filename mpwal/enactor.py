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
   and written once per batch; a record that drops a table is applied on its own;
2. publish ``enacted`` after each batch, only once its bytes are in the table files (invariant 2:
   the writer then drops those overlay entries by the record-id rule);
3. at the end of a log: fsync the tables when ``sync_data``, move the log to the cleanup queue,
   truncate cleanup logs in order and return them to the pool, keeping at most 16 and deleting
   the rest (invariant 3). Truncation happens under ``queue.lock``.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading

import filelock
import posix_ipc

from . import fileio
from .errors import CorruptionError, StorageError, storage_error
from .format import DROP_TABLE, INSERT_INDEX, LogScan, entries_of
from .overlay import ENACTED, ENACTOR_PID, LIVE, MAGIC, MAGIC_W, STATE, segment_name
from .queues import (ENACTOR_LOCK, MAX_LOG_POOL_SIZE, QUEUE_LOCK, file_lock, load_queues, log_path,
                     save_queues, writer_alive)
from .tables import TableFiles, load_catalog

log = logging.getLogger("mpwal")
_U32 = struct.Struct("<I")
BATCH_RECORDS = 512
BATCH_BYTES = 4 << 20


class _Progress:
    """A read-write mapping of the live generation's header, for the ``enacted`` word only."""

    def __init__(self, name: str):
        shm = posix_ipc.SharedMemory(name, 0)
        try:
            self.m = mmap.mmap(shm.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        self.q = memoryview(self.m).cast("Q")
        if self.q[MAGIC_W] != MAGIC:
            self.close()
            raise FileNotFoundError(name)

    @property
    def live(self) -> bool:
        return self.q[STATE] == LIVE

    def close(self) -> None:
        self.q.release()
        self.m.close()


class _NewWriter(Exception):
    """A new writer opened (the queue epoch moved): let go of the enactor lock for its replay."""


class Enactor:
    """Enacts and cleans the logs of ``path`` until ``stop`` is set."""

    def __init__(self, path: str, stop: threading.Event | None = None, poll: float = 0.005):
        self.path = os.path.realpath(path)
        self.stop = stop or threading.Event()
        self.poll = poll
        self.catalog = load_catalog(self.path)
        self.files = TableFiles(self.path, self.catalog, writable=True)
        self.queue_lock = file_lock(self.path, QUEUE_LOCK)
        self.progress: _Progress | None = None
        self.generation = -1
        self.epoch = -1
        self.enacted = 0  # newest record applied by this enactor in this epoch
        self.current: int | None = None  # log id being enacted
        self.data = b""
        self.pos = 0
        self.error: BaseException | None = None
        self.detach_on_new_writer = True

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
                try:
                    while not self.stop.is_set():
                        if not self.step():
                            self.stop.wait(self.poll)
                except _NewWriter:
                    lock.release()
                    self.stop.wait(0.2)
                    continue
                lock.release()
        except BaseException as e:  # reported through stats(); the writer restarts enactors
            self.error = e
            log.error("enactor stopped: %s", e)
            raise
        finally:
            if lock.is_locked:
                lock.release()
            self.files.close()
            if self.progress:
                self.progress.close()

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
        st = load_queues(self.path)
        if st is None:
            return False
        self._follow(st)
        self._publish(self.enacted)
        if st.cleanup:
            self._clean()
            return True
        if not st.read:
            self._publish(self.enacted)
            return False
        head = st.read[0]
        if head != self.current:
            self.current = head
            try:
                self.data = fileio.read_file(log_path(self.path, head))
            except FileNotFoundError:
                self.data = b""
            self.pos = 0
        scan = LogScan(memoryview(self.data)[self.pos:])
        batch = []
        size = 0
        for rec in scan.records():
            if rec.record_id <= self.enacted:
                self.pos += rec.end - rec.start
                continue
            if any(op.kind == DROP_TABLE for op in rec.ops):
                if batch:
                    break  # apply what we have; the drop comes alone next step
                batch.append(rec)
                size += rec.end - rec.start
                break
            batch.append(rec)
            size += rec.end - rec.start
            if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                break
        if batch:
            self._apply(batch)
            self.pos += size
            self.enacted = batch[-1].record_id
            self._publish(self.enacted)
            return True
        if scan.problem:
            # A rotated log that does not verify: stop here; replay on the next open decides.
            raise CorruptionError(f"log{head} does not verify at byte {self.pos + scan.end} "
                                  f"({scan.problem}); reopen the writer to replay")
        self._finish_log(head, st.epoch)
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
        if self.progress is not None and self.progress.live and st.generation == self.generation:
            return
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if writer_alive(self.path):
            try:
                self.progress = _Progress(segment_name(self.path, st.generation))
                self.generation = st.generation
                self.enacted = max(self.enacted, self.progress.q[ENACTED])
                self.progress.q[ENACTOR_PID] = os.getpid()
            except (posix_ipc.ExistentialError, FileNotFoundError):
                self.progress = None

    def _publish(self, rid: int) -> None:
        p = self.progress
        if p is not None and p.q[ENACTED] < rid:
            p.q[ENACTED] = rid

    # -- applying ----------------------------------------------------------------------------
    def _table(self, tid: int):
        if tid not in self.catalog:
            self.catalog.update(load_catalog(self.path))
        return self.catalog[tid]

    def _apply(self, batch) -> None:
        files = self.files
        values = {}
        chunks = {}
        for rec in batch:
            for op in rec.ops:
                if op.kind == DROP_TABLE:
                    self._table(op.table)
                    files.drop(op.table)
                elif op.kind == INSERT_INDEX:
                    self._table(op.table)
                    key = (op.table, op.key)
                    chunk = chunks.get(key)
                    if chunk is None:
                        chunk = chunks[key] = bytearray(files.read_chunk(op.table, op.key))
                    for e, v in entries_of(op.mask, op.data):
                        struct.pack_into("<Q", chunk, e * 8, v)
                else:
                    values[(op.table, op.key)] = op.data
        for (tid, c), chunk in chunks.items():
            files.write_chunk(tid, c, bytes(chunk))
        self._write_values(values)

    def _write_values(self, values: dict) -> None:
        """Write slots, joining runs of consecutive indices of a table into one pwrite."""
        run = []
        run_table = run_start = run_next = None
        for tid, index in sorted(values):
            if tid != run_table or index != run_next:
                if run:
                    self._flush_run(run_table, run_start, run)
                run = []
                run_table, run_start = tid, index
            data = values[(tid, index)]
            stride = self._table(tid).stride
            if data is None:
                run.append(bytes(stride))
            else:
                run.append(_U32.pack(len(data) + 1) + data + bytes(stride - 4 - len(data)))
            run_next = index + 1
        if run:
            self._flush_run(run_table, run_start, run)

    def _flush_run(self, tid: int, start: int, run: list) -> None:
        t = self._table(tid)
        fileio.pwrite_all(self.files.fd(tid), b"".join(run), start * t.stride)
        self.files.dirty.add(tid)

    # -- the end of a log, cleaning ----------------------------------------------------------
    def _finish_log(self, head: int, epoch: int) -> None:
        sync_data = True
        with self.queue_lock:
            st = load_queues(self.path)
            if st is None or st.epoch != epoch or not st.read or st.read[0] != head:
                self.current = None
                return
            sync_data = st.sync_data
        if sync_data:
            self.files.sync()  # invariant 3: tables on disk before the log that holds them goes
        with self.queue_lock:
            st = load_queues(self.path)
            if st is None or st.epoch != epoch or not st.read or st.read[0] != head:
                self.current = None
                return
            st.read.pop(0)
            st.cleanup.append(head)
            st.last_cleaned_record = max(st.last_cleaned_record, self.enacted)
            save_queues(self.path, st, sync=sync_data)
        log.debug("enacted log%d through record %d", head, self.enacted)
        self.current = None
        self.data = b""
        self._clean()

    def _clean(self) -> None:
        with self.queue_lock:
            st = load_queues(self.path)
            if st is None or not st.cleanup:
                return
            for lid in st.cleanup:
                p = log_path(self.path, lid)
                try:
                    fd = os.open(p, os.O_RDWR)
                except FileNotFoundError:
                    continue
                try:
                    fileio.truncate(fd, 0)
                    fileio.fsync(fd)
                finally:
                    os.close(fd)
                st.pool.append(lid)
                log.debug("cleaned log%d", lid)
            st.cleanup = []
            st.pool.sort()
            extra = st.pool[MAX_LOG_POOL_SIZE:]
            st.pool = st.pool[:MAX_LOG_POOL_SIZE]
            for lid in extra:
                try:
                    os.unlink(log_path(self.path, lid))
                except FileNotFoundError:
                    pass
            save_queues(self.path, st)


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
    Enactor(path, stop).run()
