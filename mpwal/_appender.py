"""The appender: the writer's stage that owns the appending log.

It gives each record its id, writes the record's bytes at the end of the appending log (a log's
first record comes with the log's header, ``_format.py``), rotates a log into the read queue
once it passes ``log_size`` bytes or ``log_age`` seconds, and hands group commit the
descriptors to fsync. It runs under the writer's lock; it never touches shared memory.

Failure rules (invariant 1 and the all-or-nothing append):

* a write that fails leaves the log as it was (the torn bytes are taken back): the record is not
  committed and its id is free; ``next_id`` moves past a record only once its bytes are counted;
* any I/O failure (or an exception that leaves the queue state and our descriptors in doubt)
  stops the writer through ``fail``/``stop``, which the ``Writer`` supplies: committed records
  are safe in the log, and the next writer replays them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from . import _fileio as fileio
from ._errors import StorageError
from ._queues import QueueStore, log_path

log = logging.getLogger("mpwal")
MAX_UNSYNCED_LOGS = 64
PRESYNC_BYTES = 1 << 20  # with sync_wal: fsync the appending log ahead, outside the lock, past this


class Appender:
    """The appending log of one writer. ``fail(e, doing)`` turns an OSError into the writer's
    StorageError (and stops the writer); ``stop(e)`` stops it for any other exception;
    ``log_started(first_record_id)`` is told when a record begins a new log."""

    def __init__(self, path: str, queues: QueueStore, header: bytes, next_id: int, *,
                 sync_wal: bool, sync_new_names: bool, log_size: int,
                 fail: Callable[[OSError, str], StorageError],
                 stop: Callable[[BaseException], None],
                 log_started: Callable[[int], None], rotated: Callable[[int], None]) -> None:
        self.path = path
        self.queues = queues
        self.header = header
        self.next_id = next_id  # the id of the next record: never reused once counted
        self.sync_wal = sync_wal
        self.sync_new_names = sync_new_names  # fsync the directory when a log file is created
        self.log_size = log_size
        self.fail = fail
        self.stop = stop
        self.log_started = log_started
        self.rotated = rotated  # told the last record id of a log fsynced by rotation
        self.log_id: int | None = None
        self.fd = -1
        self.bytes = 0
        self.presynced = 0  # bytes of the appending log an fdatasync ahead of rotation covered
        self.since = 0.0  # when the appending log got its first record
        self.unsynced: list[int] = []  # fds of rotated logs not yet fsynced
        self.dir_dirty = False  # a log file was created and the directory not fsynced
        self.rotations = 0

    @property
    def full(self) -> bool:
        return self.bytes >= self.log_size

    def older_than(self, seconds: float) -> bool:
        return bool(self.bytes) and time.monotonic() - self.since >= seconds

    def append(self, data: bytes, rid: int) -> None:
        """Write record ``rid`` (``rid == next_id``) at the end of the appending log. On any
        exception the log is taken back to where it was (or, failing that, the writer stops):
        the record is then not committed and its id is free."""
        if self.fd < 0:
            self._open()
        start = self.bytes
        if not start:  # a log's first record comes with the log's header
            data = self.header + data
        try:
            fileio.write_all(self.fd, data)
            self.bytes = start + len(data)
            self.next_id = rid + 1  # the id is in the log now: never reuse it
        except BaseException as e:
            if self.next_id != rid:
                raise  # counted: committed after all
            self.bytes = start
            try:  # take the torn bytes back (not through fileio: a rollback is not a fault
                # site), so the log ends at a record boundary
                os.ftruncate(self.fd, start)
                os.lseek(self.fd, start, os.SEEK_SET)
            except OSError as again:
                self.fail(again, "taking back a torn record")
            if isinstance(e, OSError):
                raise self.fail(e, "appending a record to the log") from None
            raise
        if not start:
            self.since = time.monotonic()

    def _open(self) -> None:
        try:
            lid, created = self.queues.start_log()
            fd = fileio.create(log_path(self.path, lid), os.O_WRONLY)
            try:
                if os.fstat(fd).st_size:  # pool logs are empty; this is a safety net
                    fileio.truncate(fd, 0)
                if created:  # the new name must be durable before a record in it is
                    if self.sync_new_names:
                        fileio.sync_dir(self.path)
                    else:
                        self.dir_dirty = True  # sync() makes it durable
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            raise self.fail(e, "opening a new log file") from None
        except BaseException as e:  # the queue state may name a log we do not hold: stop
            self.stop(e)
            raise
        self.log_id, self.fd, self.bytes, self.presynced = lid, fd, 0, 0
        self.log_started(self.next_id)

    def rotate(self) -> None:
        """Move the appending log to the read queue (fsync it first with ``sync_wal``)."""
        if self.fd < 0 or not self.bytes:
            return
        fd, lid = self.fd, self.log_id
        assert lid is not None  # an open appending log has an id
        try:
            if self.sync_wal:
                fileio.fsync(fd)
            self.queues.rotate(lid)
        except OSError as e:
            raise self.fail(e, f"rotating log{lid}") from None
        except BaseException as e:  # the queue state may list this log as read while we
            self.stop(e)  # still hold it as appending: stop here
            raise
        self.fd, self.log_id, self.bytes, self.presynced = -1, None, 0, 0
        self.rotations += 1
        if self.sync_wal:
            os.close(fd)
            self.rotated(self.next_id - 1)
        else:
            self.unsynced.append(fd)
            if len(self.unsynced) > MAX_UNSYNCED_LOGS:  # bound the open descriptors
                try:
                    for f in self.unsynced:
                        fileio.fdatasync(f)
                except OSError as e:
                    raise self.fail(e, "syncing rotated logs") from None
                finally:
                    for f in self.unsynced:
                        os.close(f)
                    self.unsynced = []
        log.debug("rotated log%d into the read queue", lid)

    def presync_fd(self) -> int | None:
        """With ``sync_wal``: a duplicate of the appending log's descriptor to fdatasync now,
        outside the writer's lock, once ``PRESYNC_BYTES`` more are written (or None). The
        rotation's own fsync, under the lock, then has little left to write: commits do not
        wait for a whole log to reach the disk."""
        if not self.sync_wal or self.fd < 0 or self.bytes - self.presynced < PRESYNC_BYTES:
            return None
        self.presynced = self.bytes
        return os.dup(self.fd)

    def take_for_flush(self) -> tuple[int, list[int], list[int]]:
        """For group commit (under the writer's lock): the last record id, duplicates of the
        descriptors to fdatasync, and the rotated logs' descriptors now handed over (close them
        after)."""
        fds = [os.dup(self.fd)] if self.fd >= 0 else []
        fds.extend(os.dup(f) for f in self.unsynced)
        unsynced, self.unsynced = self.unsynced, []
        return self.next_id - 1, fds, unsynced

    def sync_dir_if_dirty(self) -> None:
        if self.dir_dirty:
            self.dir_dirty = False
            fileio.sync_dir(self.path)

    def sync_now(self) -> None:
        """fsync every log that holds committed records, in this thread."""
        self.sync_dir_if_dirty()
        for fd in ([self.fd] if self.fd >= 0 else []) + self.unsynced:
            fileio.fdatasync(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self.unsynced:
            os.close(fd)
        self.unsynced = []
