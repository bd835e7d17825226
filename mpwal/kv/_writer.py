"""``KVWriter``: the one writer of a key-value directory, over the engine's ``Writer``.

Every put, delete and batch is planned against the newest committed data under the batch's own
changes (``_column.Pending``) and then committed as one ordinary record. Batches are serialised
by the KVWriter's lock from their first change to their commit, as SQLite's ``BEGIN
IMMEDIATE``: slot allocation and free lists need one planner at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from .._errors import (ArgumentRangeError, ArgumentTypeError, ClosedError, DatabaseError, IndexFullError,
                       TableError)
from .._tables import IndexTable, ValueTable, is_database, layer_of
from .._writer import Writer
from . import _layout as L, _ops
from ._column import Column, IndexFullError as _Full, Pending, Planner
from ._keys import MappingReads, check_column_names, check_key, check_value, columns_of


class KVWriter(MappingReads):
    """The writer of a key-value directory: ``put``, ``delete``, ``get``, ``batch()``; a
    mapping's ``[]``, ``del`` and ``in`` on the "default" column. Thread-safe; a context
    manager. ``writer_options`` are the engine Writer's (durability, sync_wal, enactor, ...)."""

    def __init__(self, path: str | os.PathLike[str], columns: Iterable[str] | None = None, *,
                 index_bits: int = L.INDEX_BITS, **writer_options: Any) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if type(index_bits) is not int or not L.MIN_INDEX_BITS <= index_bits <= L.MAX_INDEX_BITS:
            raise ArgumentRangeError(f"index_bits must be an int from {L.MIN_INDEX_BITS} to "
                                     f"{L.MAX_INDEX_BITS}, got {index_bits!r}")
        wanted = None if columns is None else check_column_names(columns)
        real = os.path.realpath(os.fspath(path))
        existing = layer_of(real) if is_database(real) else None
        layer: dict[str, Any] | None
        if existing is None:
            names = wanted or ["default"]
            layer = {"kind": L.KIND, "version": L.VERSION, "salt": os.urandom(16).hex(),
                     "columns": names, "index_bits": index_bits}
        else:
            layer = existing
            names = columns_of(layer) if layer.get("kind") == L.KIND else []  # (else the
            # Writer refuses the directory: it belongs to another layer)
        tables = [t for i in range(len(names)) for t in column_tables(i)]
        self._w = Writer(real, tables, layer=layer, **writer_options)
        try:
            layer = layer_of(real)  # what the directory holds (another creator may have won)
            assert layer is not None  # the Writer checked the kind
            self._columns = {c.name: c for c in load_columns(layer)}
            if wanted is not None and wanted != list(self._columns):
                raise DatabaseError(f"{real} has the columns {list(self._columns)}, not {wanted}: "
                                    "open it with those (adding columns is not supported yet)")
        except BaseException:
            self._w.close()
            raise
        self.path = real
        self._lock = threading.RLock()
        self._closed = False
        self._names = list(self._columns)
        self._w._layer_handler = self._from_producer  # KVProducer's batches (``_ops.py``)

    # -- reads -----------------------------------------------------------------------------
    def _column(self, column: str) -> Column:
        col = self._columns.get(column) if isinstance(column, str) else None
        if col is None:
            raise TableError(f"no column {column!r}; this directory has {list(self._columns)}")
        return col

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the KVWriter of {self.path} is closed; open a new mpwal.KVWriter")

    def get(self, key: bytes, default: bytes | None = None, *, column: str = "default") -> bytes | None:
        """The newest committed value of ``key``, or ``default``."""
        k = check_key(key)
        with self._lock:  # not between a batch's planning and its commit
            self._check_open()
            got = self._column(column).get(Pending(self._w), k)
        return default if got is None else got

    def count(self, column: str = "default") -> int:
        """Keys in ``column``."""
        with self._lock:
            self._check_open()
            return self._column(column).header(Pending(self._w))[L.COUNT]

    def __len__(self) -> int:
        return self.count()

    @property
    def last_record_id(self) -> int:
        """The newest committed record id."""
        return self._w.last_record_id

    # -- changes ---------------------------------------------------------------------------
    def batch(self) -> KVBatch:
        """One atomic record of many changes: ``with kv.batch() as b: b.put(...)``; committed
        when the block ends, discarded if it raises. Its ``get`` reads its own changes."""
        self._check_open()
        return KVBatch(self)

    def put(self, key: bytes, value: bytes, *, column: str = "default") -> int:
        """Set ``key`` to ``value``; returns the record id."""
        with self.batch() as b:
            b.put(key, value, column=column)
        assert b.record_id is not None
        return b.record_id

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.put(key, value)

    def delete(self, key: bytes, *, column: str = "default") -> int | None:
        """Remove ``key``; the record id, or None if it was not there (nothing is written)."""
        with self.batch() as b:
            b.delete(key, column=column)
        return b.record_id

    def __delitem__(self, key: bytes) -> None:
        if self.delete(key) is None:
            raise KeyError(key)

    def _from_producer(self, body: bytes, tag: tuple[int, int]) -> int:
        """Plan and commit a producer's batch (the writer's intake calls it): one record, with
        the submission's tag (``_wire.py``), even when it changes nothing else, so that a
        resubmission is known for what it is."""
        changes = _ops.decode(body, len(self._names))
        with self.batch() as b:
            b._tag = tag
            for column, key, value in changes:
                name = self._names[column]
                if value is None:
                    b.delete(check_key(key), column=name)
                else:
                    b.put(check_key(key), check_value(value), column=name)
        assert b.record_id is not None
        return b.record_id

    # -- the engine's --------------------------------------------------------------------------
    def sync(self) -> int:
        """Returns once everything committed before it is on disk; that record id."""
        self._check_open()
        return self._w.sync()

    def stats(self) -> dict[str, Any]:
        """The engine Writer's stats, plus each column's key count."""
        with self._lock:
            self._check_open()
            out = self._w.stats()
            view = Pending(self._w)
            out["columns"] = {name: {"keys": c.header(view)[L.COUNT]}
                              for name, c in self._columns.items()}
            return out

    def close(self) -> None:
        """Close the engine Writer (it rotates, lets the enactor finish, frees shared memory)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._w.close()

    def __enter__(self) -> KVWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpwal.KVWriter {self.path!r} columns={list(self._columns)}" \
               f"{' closed' if self._closed else ''}>"


class KVBatch:
    """The changes of one record of a KVWriter (see ``KVWriter.batch``). ``record_id`` is set
    once it commits (None if it changed nothing)."""

    def __init__(self, kv: KVWriter) -> None:
        self._kv = kv
        self._pending = Pending(kv._w)
        self._state = "open"
        self._locked = False
        self._tag: tuple[int, int] | None = None  # a producer's submission (``_from_producer``)
        self.record_id: int | None = None

    def __enter__(self) -> KVBatch:
        self._kv._lock.acquire()
        self._locked = True
        self._pending = Pending(self._kv._w)  # read under the lock: nothing moves meanwhile
        return self

    def _check(self) -> None:
        if self._state != "open":
            raise ClosedError(f"this batch is {self._state}; start a new one with kv.batch()")
        if not self._locked:
            raise ClosedError("use a batch as a context manager: with kv.batch() as b: ...")
        self._kv._check_open()

    def _plan(self, column: str, change: Any) -> Any:
        """Run one change on a child of the batch's changes: a refused change leaves the batch
        as it was."""
        self._check()
        col = self._kv._column(column)
        child = Pending(self._pending)
        try:
            out = change(Planner(col, child))
        except _Full as e:
            raise IndexFullError(
                f"column {column!r}: the index has no room for this key ({e}); the batch is as "
                "it was before this change: commit it, and put again once the reindex moved on, "
                "or create the directory with a larger index_bits") from None
        self._pending.merge(child)
        return out

    def put(self, key: bytes, value: bytes, *, column: str = "default") -> None:
        """Set ``key`` to ``value`` in this batch."""
        k, v = check_key(key), check_value(value)
        self._plan(column, lambda p: p.put(k, v))

    def delete(self, key: bytes, *, column: str = "default") -> bool:
        """Remove ``key`` (in this batch); whether it was there."""
        k = check_key(key)
        return bool(self._plan(column, lambda p: p.delete(k)))

    def get(self, key: bytes, default: bytes | None = None, *, column: str = "default") -> bytes | None:
        """The value of ``key`` with this batch's changes."""
        self._check()
        got = self._kv._column(column).get(self._pending, check_key(key))
        return default if got is None else got

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None and self._state == "open":
                self._commit()
            elif self._state == "open":
                self._state = "discarded"
        finally:
            self._locked = False
            self._kv._lock.release()

    def _commit(self) -> None:
        self._state = "committing"
        p = self._pending
        try:
            if p or self._tag is not None:
                w = self._kv._w
                rec = w.record()
                for t in sorted(p.drops):  # first: the entries after them apply
                    rec.drop_table(t)
                for (t, c), ents in p.entries.items():
                    for e, v in ents.items():
                        rec.insert_index(t, c, e, v)
                for (t, i), d in p.values.items():
                    rec.insert_value(t, i, d)
                if self._tag is None:
                    self.record_id = rec.commit()
                else:  # the intake answers it (and waits for durability) itself
                    rec._tag = self._tag
                    self.record_id = w._commit(rec, intake=True)
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"


def column_tables(number: int) -> list[IndexTable | ValueTable]:
    """The engine tables of column ``number`` (``_layout.py``)."""
    base = L.table_base(number)
    return [IndexTable(base + L.HEADER), IndexTable(base + L.INDEX_A), IndexTable(base + L.INDEX_B),
            *(ValueTable(base + L.TIER0 + t, size) for t, size in enumerate(L.TIERS))]


def load_columns(layer: dict[str, Any]) -> list[Column]:
    """The columns a directory's layer object describes."""
    salt = bytes.fromhex(layer["salt"])
    return [Column(name, i, salt, int(layer["index_bits"])) for i, name in enumerate(columns_of(layer))]
