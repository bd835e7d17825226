"""mpwal: a multiprocessing-safe write-ahead log with shared-memory overlays.

One ``Writer`` process appends atomic records to log files; any number of ``Reader`` processes
see every committed record at once through overlays in POSIX shared memory; an enactor applies
records to the table files in the background. See README.md and DESIGN.md.
"""

import logging

from .platform import check_platform

check_platform()  # a clear ImportError off Linux, before the modules that need it

from .errors import (ArgumentRangeError, ArgumentTypeError, BackpressureError, ClosedError,
                     CorruptionError, DatabaseError, Error, ForkedError, SnapshotExpiredError,
                     StorageError, TableError, UnsupportedPlatformError, ValueTooLargeError,
                     WriterFailedError, WriterLockedError)
from .reader import Reader, Snapshot
from .record import Record
from .tables import IndexTable, ValueTable
from .writer import Writer

# library warnings reach the application's logging configuration, or nowhere: not stderr
logging.getLogger("mpwal").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "Writer", "Reader", "Snapshot", "Record", "IndexTable", "ValueTable",
    "Error", "ArgumentTypeError", "ArgumentRangeError", "ValueTooLargeError", "TableError",
    "ClosedError", "ForkedError", "WriterLockedError", "DatabaseError", "CorruptionError",
    "StorageError", "WriterFailedError", "BackpressureError", "UnsupportedPlatformError",
    "SnapshotExpiredError",
]
