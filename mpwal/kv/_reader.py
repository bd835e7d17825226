"""``KVReader``: reads a key-value directory from any process, over the engine's ``Reader``.

Each call reads at one watermark (``Reader.read_with``): a lookup's index chunk and value slots
come from the same records, so no call sees half a put or half a batch; ``get_many`` is one
view, and ``keys()``/``items()`` and a ``snapshot()`` pin one for as long as they last.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

from .._errors import TableError
from .._overlay import RETRY
from .._reader import Reader, Snapshot
from .._tables import layer_of
from . import _layout as L
from ._column import Column
from ._keys import MappingReads, check_key
from ._writer import load_columns

CHUNKS_PER_READ = 256  # index chunks read at once while iterating


class _Reads(MappingReads):
    """What KVReader and KVSnapshot share: the lookups, over a ``read_with``."""

    _columns: dict[str, Column]

    def _read(self, fn: Any) -> Any:
        raise NotImplementedError

    def _column(self, column: str) -> Column:
        col = self._columns.get(column) if isinstance(column, str) else None
        if col is None:
            raise TableError(f"no column {column!r}; this directory has {list(self._columns)}")
        return col

    def get(self, key: bytes, default: bytes | None = None, *, column: str = "default") -> bytes | None:
        """The value of ``key``, or ``default``."""
        col, k = self._column(column), check_key(key)
        got = self._fast_get(col, [k])
        got = self._read(lambda v: col.get(v, k)) if got is RETRY else got[0]
        return default if got is None else got

    def _fast_get(self, col: Column, keys: list[bytes]) -> Any:
        """The native backend's whole gets (``Lookups.kv_get``), or RETRY: the Python path."""
        return RETRY

    def get_many(self, keys: Iterable[bytes], *, column: str = "default") -> list[bytes | None]:
        """``get`` of many keys, all at one watermark (None for a missing key)."""
        col = self._column(column)
        ks = [check_key(k) for k in keys]
        got = self._fast_get(col, ks)
        if got is RETRY:
            got = self._read(lambda v: [col.get(v, k) for k in ks])
        return got

    def count(self, column: str = "default") -> int:
        """Keys in ``column``."""
        col = self._column(column)
        return self._read(lambda v: col.header(v)[L.COUNT])

    def __len__(self) -> int:
        return self.count()

    def _items_in(self, read: Any, col: Column) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``col``, CHUNKS_PER_READ index chunks per read, all through
        ``read`` (a snapshot's: one watermark): the current index, then the one a reindex is
        emptying."""
        for table, bits in read(lambda v: col.indexes(col.header(v))):
            for first in range(0, 1 << bits, CHUNKS_PER_READ):
                yield from read(lambda v, first=first, table=table, bits=bits:
                                col.chunk_pairs(v, table, bits, first, CHUNKS_PER_READ))


class KVReader(_Reads):
    """Read-only view of a key-value directory, in any process: ``get``, ``[]``, ``in``,
    ``len``, ``get_many``, ``keys``, ``items``, ``snapshot()``. A context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._r = Reader(path, layer=L.KIND)
        try:
            layer = layer_of(self._r.path)
            assert layer is not None  # the Reader checked the kind
            self._columns = {c.name: c for c in load_columns(layer)}
        except BaseException:
            self._r.close()
            raise
        self.path = self._r.path

    def _read(self, fn: Any) -> Any:
        return self._r.read_with(fn)

    def _fast_get(self, col: Column, keys: list[bytes]) -> Any:
        """A live writer's segment serving this reader at its newest watermark (the Reader's
        one-try path, as ``value()`` takes it): the native kv_get, C all the way, every key at
        one watermark; RETRY otherwise, or when kv_get says the Python path must answer."""
        seg = self._r._fast
        if seg is None or seg.kv_get is None:
            return RETRY
        salt = col.salt
        return seg.kv_get(col.header_table, [L.key_hash(salt, k) for k in keys], keys,
                          col.default_bits, self._r._files.read_chunk)

    @property
    def last_record_id(self) -> int:
        """The newest record this reader can see."""
        return self._r.last_record_id

    def snapshot(self) -> KVSnapshot:
        """Every read through it at one record id, across calls: ``with r.snapshot() as s``."""
        return KVSnapshot(self, self._r.snapshot())

    def keys(self, column: str = "default") -> Iterator[bytes]:
        """Every key of ``column``, in one consistent view (a snapshot held while iterating)."""
        for k, _ in self.items(column):
            yield k

    def items(self, column: str = "default") -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``column``, in one consistent view."""
        col = self._column(column)
        with self._r.snapshot() as s:
            yield from self._items_in(s.read_with, col)

    def stats(self) -> dict[str, Any]:
        """The engine Reader's stats."""
        return self._r.stats()

    def close(self) -> None:
        """Close the reader (its snapshots stop holding the enactor). Idempotent."""
        self._r.close()

    def __enter__(self) -> KVReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpwal.KVReader {self.path!r} columns={list(self._columns)}>"


class KVSnapshot(_Reads):
    """A pinned watermark of a KVReader: every read through it sees exactly the records up to
    ``record_id``."""

    def __init__(self, reader: KVReader, snap: Snapshot) -> None:
        self._columns = reader._columns
        self._snap = snap
        self.record_id = snap.record_id

    def _read(self, fn: Any) -> Any:
        return self._snap.read_with(fn)

    def keys(self, column: str = "default") -> Iterator[bytes]:
        """Every key of ``column`` as of ``record_id``."""
        for k, _ in self.items(column):
            yield k

    def items(self, column: str = "default") -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of ``column`` as of ``record_id``."""
        return self._items_in(self._snap.read_with, self._column(column))

    def close(self) -> None:
        """Release the pin. Idempotent."""
        self._snap.close()

    def __enter__(self) -> KVSnapshot:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
