"""The exception hierarchy: every error mpwal raises on purpose is an ``mpwal.Error``.

Each message says what went wrong and what to do about it; the classes say what kind of thing
went wrong, so callers can catch exactly what they can handle.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error raised by mpwal."""


class ArgumentTypeError(Error, TypeError):
    """An argument has the wrong type (for example a str where bytes are expected)."""


class ArgumentRangeError(Error, ValueError):
    """An argument is out of range: a negative or too large index, an entry outside 0..63."""


class ValueTooLargeError(ArgumentRangeError):
    """A value is longer than the slot size declared for its value table."""


class TableError(Error, KeyError):
    """A table id is unknown, of the wrong kind, or defined in a conflicting way."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexFullError(Error):
    """A key-value column's index chunk for a key has no empty entry (reindexing into a
    bigger index is not built yet): the put is refused and nothing else changes."""


class ClosedError(Error):
    """The handle was closed; open a new Writer or Reader."""


class ForkedError(Error):
    """The handle was inherited through fork(); open a new one in the child process."""


class WriterLockedError(Error):
    """Another live Writer holds the directory."""


class DatabaseError(Error):
    """The directory is not an mpwal database, or one this version cannot open."""


class CorruptionError(Error):
    """A log or metadata file holds bytes that do not verify."""


class StorageError(Error, OSError):
    """An operating-system I/O call failed (EIO, ENOSPC, EACCES ...).

    When a commit with ``durability="commit"`` raises it, the record is committed but not known
    to be durable, and ``record_id`` (set only then) is its id."""

    record_id: int


class WriterFailedError(Error):
    """An earlier I/O failure left the writer unable to commit; close it and open a new one."""


class NoWriterError(Error):
    """A producer found no writer to commit through within its timeout (none running, or one
    that stopped answering). When the submission had been sent, it may have committed: the
    message says so."""


class CursorLostError(Error):
    """A change-feed cursor was dropped (its logs passed the writer's ``max_retained_bytes``), or
    a feed without a cursor reached a record whose log was already cleaned. ``position`` is the
    last record it got to."""

    def __init__(self, message: str, position: int = 0) -> None:
        super().__init__(message)
        self.position = position


class BackpressureError(Error):
    """Enactment did not free overlay or log space within the timeout."""


class UnsupportedPlatformError(Error):
    """This machine cannot run mpwal: raised when a Writer or Reader opens on a processor other
    than x86-64, whose ordering of stores between processes the shared-memory protocol relies
    on. (On an operating system other than Linux, ``import mpwal`` itself raises ImportError.)"""


def storage_error(exc: OSError, doing: str) -> StorageError:
    """Wrap an OSError into a StorageError whose message says what was being done."""
    hint = {
        28: "the disk is full: free space, then reopen",
        13: "permission denied: check the directory's owner and mode",
        30: "the file system is read-only",
        5: "the device reported an I/O error: check the disk",
    }.get(exc.errno or 0, "check the disk and the directory")
    err = StorageError(exc.errno, f"{doing} failed: {exc.strerror or exc} ({hint})")
    err.__cause__ = exc
    return err


class SnapshotExpiredError(Error):
    """A snapshot can no longer answer at its record id: it was held past the writer's
    ``max_snapshot_age``, or a new writer replayed the logs past it. Take a new snapshot."""
