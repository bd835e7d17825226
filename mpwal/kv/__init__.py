"""The key-value layer: parity-db's hash column over the engine's tables and log.

``KVWriter`` (the directory's one writer) and ``KVReader`` (any process, any number); the
layout is in ``_layout.py``, lookups and the plan of changes in ``_column.py``.
"""

from ._reader import KVReader, KVSnapshot
from ._writer import KVBatch, KVWriter

__all__ = ["KVWriter", "KVReader", "KVSnapshot", "KVBatch"]
