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

import errno
import fcntl
import json
import os
import struct
from dataclasses import asdict, dataclass, field

import filelock

from . import fileio
from .errors import StorageError, WriterLockedError, storage_error

WRITER_LOCK = "writer.lock"
QUEUE_LOCK = "queue.lock"
ENACTOR_LOCK = "enactor.lock"
QUEUE_FILE = "queues"
MAX_LOG_POOL_SIZE = 16

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid


def log_path(path: str, log_id: int) -> str:
    return os.path.join(path, f"log{log_id}")


def log_ids(path: str) -> list[int]:
    """Ids of the ``log{N}`` files in ``path``."""
    out = []
    for name in os.listdir(path):
        if name.startswith("log") and name[3:].isdigit():
            out.append(int(name[3:]))
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


__all__ = ["WriterLock", "writer_alive", "QueueState", "load_queues", "save_queues", "StorageError"]
