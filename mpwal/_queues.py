"""Locks and the queue state shared by the processes of one database directory.

Files:

* ``writer.lock``: the writer holds an open-file-description write lock (``F_OFD_SETLK``) on it
  for its whole life. The kernel drops it when the process dies, so ``writer_alive`` (an
  ``F_OFD_GETLK`` test, which takes nothing) is also the liveness probe readers use. OFD locks,
  unlike ``lockf``, are not lost when some other descriptor of the same file is closed in the
  writer's process (a Reader in the same process, say).
* ``queue.lock`` (``filelock``): held while the queue state changes and while a log is
  truncated, so no process reads a queue that is half-updated.
* ``enactor.lock`` (``filelock``): held by the one process that enacts and cleans.
* ``queues``: the queue state, JSON, replaced atomically (write then rename) under
  ``queue.lock``. Readers never lock: they compare the file's identity (inode, mtime, size)
  before and after looking at log files and read again when it changed.

The directory stays the truth after a crash: a writer that opens rebuilds the queue state from
the log files it finds (``replay``), so this file only coordinates live processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import filelock

from . import _fileio as fileio
from ._errors import StorageError, WriterLockedError, storage_error

WRITER_LOCK = "writer.lock"
QUEUE_LOCK = "queue.lock"
ENACTOR_LOCK = "enactor.lock"
QUEUE_FILE = "queues"
MAX_LOG_POOL_SIZE = 16

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid


def log_path(path: str, log_id: int) -> str:
    return os.path.join(path, f"log{log_id}")


def log_ids(path: str) -> list[int]:
    """Ids of the ``log{N}`` files in ``path``: only names this code makes (``log`` and the id
    in ASCII digits, no leading zero), so a stray ``log00`` or ``log²`` is no log of ours and
    can never alias a real one."""
    out = []
    for name in os.listdir(path):
        digits = name[3:]
        if name.startswith("log") and digits.isascii() and digits.isdigit() \
                and name == f"log{int(digits)}":
            out.append(int(digits))
    return sorted(out)


class WriterLock:
    """The exclusive, process-lifetime lock that makes a process the directory's one writer."""

    def __init__(self, path: str):
        self.file = os.path.join(path, WRITER_LOCK)
        try:
            self.fd = fileio.create(self.file)
        except OSError as e:
            raise storage_error(e, f"opening {self.file}") from None
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, 0, 0, 0))
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WriterLockedError(
                    f"{os.path.dirname(self.file)} already has a live writer; close it first, or "
                    "open a mpwal.Reader to read") from None
            raise storage_error(e, f"locking {self.file}") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops an OFD lock
            self.fd = -1


def writer_alive(path: str) -> bool:
    """Whether some process holds ``writer.lock``. Takes no lock, writes nothing."""
    try:
        fd = os.open(os.path.join(path, WRITER_LOCK), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # A read-lock probe: it conflicts with the writer's write lock and with nothing else.
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_RDLCK, 0, 0, 0, 0))
        return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def file_lock(path: str, name: str) -> filelock.BaseFileLock:
    """A cross-process lock on ``path/name`` whose file stays in place after release (filelock
    4 also lets go of it in a forked child, so a child cannot keep it past its parent). The
    file is made here first, so that it belongs to the directory's owner (``fileio.create``)."""
    lock_file = os.path.join(path, name)
    if not os.path.exists(lock_file):
        try:
            os.close(fileio.create(lock_file))
        except OSError as e:
            raise storage_error(e, f"creating {lock_file}") from None
    return filelock.FileLock(os.path.join(path, name), mode=0o600, thread_local=False,
                             preserve_lock_file=True)


@dataclass
class QueueState:
    """Which log is appending, which wait to be enacted (``read``), cleaned or reused (``pool``)."""

    version: int = 0  # bumped on every change; readers use it to detect a change under them
    epoch: int = 0  # bumped by every writer open (replay rebuilds the queues)
    generation: int = 0  # shared-memory generation of the live writer
    appending: int | None = None
    read: list = field(default_factory=list)
    cleanup: list = field(default_factory=list)
    pool: list = field(default_factory=list)
    next_log: int = 0
    last_cleaned_record: int = 0  # newest record id whose log was cleaned
    sync_data: bool = True  # the writer's option, for enactors in other processes
    writer_pid: int = 0  # the live writer, so an enactor can tell a new writer from the old one
    log_epoch_floor: int = 0  # logs of an older epoch were replayed and emptied: stale if seen
    max_retained_bytes: int = 1 << 30  # the writer's bound on logs kept for cursors (_retention)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def load_queues(path: str) -> QueueState | None:
    try:
        raw = fileio.read_file(os.path.join(path, QUEUE_FILE))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise storage_error(e, "reading the queue state") from None
    try:
        return QueueState(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # a damaged queue file is rebuilt from the logs by the next writer


def save_queues(path: str, state: QueueState, sync: bool = False) -> None:
    """Write ``state`` (caller holds queue.lock); bumps its version."""
    state.version += 1
    try:
        fileio.write_file_atomic(os.path.join(path, QUEUE_FILE), state.to_bytes(), sync=sync)
    except OSError as e:
        raise storage_error(e, "writing the queue state") from None



class QueueStore:
    """The queue state of one directory, changed only through the named transitions below.

    Each transition is load, change, save under ``queue.lock``; none fsyncs a log or the
    directory while it holds the lock except the enactor's ``clean`` (truncating logs is what the
    lock is for) and replay's ``reset``, so the commit path (``start_log``, ``rotate``) never
    waits for a disk flush behind the lock. ``last`` is the state as this process last saw it:
    the writer's fallback should the file be unreadable (its next open rebuilds it from the
    logs); the enactor has none and does nothing then.

    The transitions, who makes them, and what they change:

    ==================  ========  ===============================================================
    ``new_epoch``       writer    epoch + 1, writer pid, sync_data (every open, before replay)
    ``replayed``        writer    last_cleaned_record: the replayed prefix is in the tables
    ``reset``           writer    every log truncated and pooled, a new generation, and the
                                  epoch floor (logs of older epochs are stale from now on)
    ``start_log``       writer    a pool log (or a new id) becomes the appending log
    ``rotate``          writer    the appending log joins the read queue
    ``set_generation``  writer    the overlay grew into a new generation
    ``finish_log``      enactor   the read queue's head, enacted, moves to cleanup
    ``clean``           enactor   cleanup logs are truncated into the pool (at most 16 kept)
    ==================  ========  ===============================================================
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = file_lock(path, QUEUE_LOCK)  # reentrant: replay nests transitions in it
        self.last: QueueState | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """``queue.lock`` for one transition, with Ctrl-C held off in the main thread until it
        is over: a KeyboardInterrupt inside filelock's acquire or release could leave the
        lock taken by a descriptor nobody releases, and every later transition of this
        process waiting for it. The interrupt is raised when the transition ends."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            with self.lock:  # another thread, a nested transition, or an application's handler
                yield
            return
        caught: list[int] = []
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
        try:
            with self.lock:
                yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if caught:
                raise KeyboardInterrupt

    def epoch(self) -> int:
        """The epoch of the last state this process wrote (the writer's own, after replay)."""
        assert self.last is not None
        return self.last.epoch

    def read(self) -> QueueState | None:
        """The state now, without the lock (the file is replaced atomically)."""
        return load_queues(self.path)

    @contextlib.contextmanager
    def _change(self, sync: bool = False) -> Iterator[QueueState]:
        """A writer's transition: load under the lock (or fall back on ``last``), let the caller
        change the state, save it unless the body raised."""
        with self._locked():
            st = load_queues(self.path) or self.last or QueueState()
            yield st
            save_queues(self.path, st, sync=sync)
            self.last = st

    # -- the writer ---------------------------------------------------------------------------
    def new_epoch(self, writer_pid: int, sync_data: bool, floor: int = 0,
                  max_retained_bytes: int = 1 << 30) -> tuple[QueueState, bool]:
        """A writer opens: bump the epoch (an enactor of the last one lets go of its lock),
        to above ``floor`` too (the metadata's copy, should the queue state have been lost).
        Returns the state and whether a queue file existed."""
        with self._locked():
            existed = load_queues(self.path) is not None
            with self._change() as st:
                st.epoch = max(st.epoch, floor) + 1
                st.log_epoch_floor = max(st.log_epoch_floor, floor)
                st.writer_pid = writer_pid
                st.sync_data = sync_data
                st.max_retained_bytes = max_retained_bytes
            return st, existed

    def replayed(self, last_record: int) -> None:
        """Replay applied the prefix through ``last_record`` and fsynced the tables: fsynced,
        before any log is truncated, so no later open reuses those ids or replays them again."""
        with self._change(sync=True) as st:
            st.last_cleaned_record = max(st.last_cleaned_record, last_record)

    def reset(self, generation: int, truncate_all: Callable[[], list[int]]) -> QueueState:
        """After ``replayed``: ``truncate_all()`` empties every log and returns the ids left;
        they become the pool (the rest are deleted), and ``generation`` the live one."""
        with self._change(sync=True) as st:
            ids = truncate_all()
            st.pool = ids[:MAX_LOG_POOL_SIZE]
            for lid in ids[MAX_LOG_POOL_SIZE:]:
                os.unlink(log_path(self.path, lid))
            st.read, st.cleanup, st.appending = [], [], None
            st.next_log = (max(ids) + 1) if ids else st.next_log
            st.generation = generation
            st.log_epoch_floor = st.epoch
        return st

    def start_log(self) -> tuple[int, bool]:
        """Make a pool log, or a new log id, the appending log: (log id, whether it is new)."""
        with self._change() as st:
            if st.pool:
                lid, created = st.pool.pop(0), False
            else:
                lid, created = st.next_log, True
                st.next_log += 1
            st.appending = lid
        return lid, created

    def rotate(self, log_id: int) -> None:
        """The appending log ``log_id`` (fsynced first with sync_wal) joins the read queue."""
        with self._change() as st:
            st.appending = None
            st.read.append(log_id)

    def set_generation(self, generation: int) -> None:
        with self._change() as st:
            st.generation = generation

    # -- the enactor --------------------------------------------------------------------------
    def finish_log(self, log_id: int, epoch: int, enacted: int) -> bool:
        """The head ``log_id`` is enacted through record ``enacted`` and the tables are synced:
        it moves to cleanup (fsynced: replay must not start before it). False if it is not the
        head of ``epoch`` any more (a new writer replayed meanwhile)."""
        with self._locked():
            st = load_queues(self.path)
            if st is None or st.epoch != epoch or not st.read or st.read[0] != log_id:
                return False
            st.read.pop(0)
            st.cleanup.append(log_id)
            st.last_cleaned_record = max(st.last_cleaned_record, enacted)
            save_queues(self.path, st, sync=True)
            self.last = st
        return True

    def clean(self, truncate: Callable[[int], bool]) -> list[int]:
        """Truncate the cleanup logs in order (``truncate(id)``: False if the file is gone) and
        return them to the pool, keeping at most MAX_LOG_POOL_SIZE; returns the ids cleaned."""
        with self._locked():
            st = load_queues(self.path)
            if st is None or not st.cleanup:
                return []
            done = [lid for lid in st.cleanup if truncate(lid)]
            st.pool.extend(done)
            st.cleanup = []
            st.pool.sort()
            for lid in st.pool[MAX_LOG_POOL_SIZE:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(log_path(self.path, lid))
            st.pool = st.pool[:MAX_LOG_POOL_SIZE]
            save_queues(self.path, st)
            self.last = st
        return done

__all__ = ["WriterLock", "writer_alive", "QueueState", "QueueStore", "load_queues", "save_queues", "StorageError"]
