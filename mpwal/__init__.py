"""mpwal: a multiprocessing-safe write-ahead log with shared-memory overlays.

One ``Writer`` process appends atomic records to log files; any number of ``Reader`` processes
see every committed record at once through overlays in POSIX shared memory; an enactor applies
records to the table files in the background. See README.md and DESIGN.md.
"""

import logging

from . import _backend
from ._platform import check_platform

check_platform()  # a clear ImportError off Linux, before the modules that need it

from ._errors import (ArgumentRangeError, ArgumentTypeError, BackpressureError, ClosedError,
                     CorruptionError, CursorLostError, DatabaseError, Error, ForkedError, IndexFullError, NoWriterError,
                     SnapshotExpiredError,
                     StorageError, TableError, UnsupportedPlatformError, ValueTooLargeError,
                     WriterFailedError, WriterLockedError)
from ._feed import Change, Cursor
from ._reader import Reader, Snapshot
from ._record import Record
from ._tables import IndexTable, ValueTable
from ._writer import Writer
from .kv import KVBatch, KVReader, KVSnapshot, KVWriter
from .producers import KVProducer, KVProducerBatch, Producer

# library warnings reach the application's logging configuration, or nowhere: not stderr
logging.getLogger("mpwal").addHandler(logging.NullHandler())

__version__ = "0.1.0"
backend: str = _backend.BACKEND  # "native" or "python": which backend runs the hot paths

__all__ = [
    "Writer", "Reader", "Snapshot", "Record", "IndexTable", "ValueTable",
    "KVWriter", "KVReader", "KVSnapshot", "KVBatch", "IndexFullError",
    "Producer", "KVProducer", "KVProducerBatch", "NoWriterError",
    "Change", "Cursor", "CursorLostError",
    "Error", "ArgumentTypeError", "ArgumentRangeError", "ValueTooLargeError", "TableError",
    "ClosedError", "ForkedError", "WriterLockedError", "DatabaseError", "CorruptionError",
    "StorageError", "WriterFailedError", "BackpressureError", "UnsupportedPlatformError",
    "SnapshotExpiredError",
]

# the public names are mpwal's own: the modules behind them (mpwal._writer, ...) are private
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
