"""``KVProducer``: puts and deletes from any process, through a key-value directory's writer."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from .. import _wire as wire
from .._errors import ClosedError, TableError
from .._tables import layer_of
from ..kv import KVReader, _layout as L
from ..kv._keys import MappingReads, check_key, check_value, columns_of
from ..kv._ops import encode
from ._producer import Producer


class KVProducer(Producer, MappingReads):
    """A producer of a key-value directory's writer (``KVWriter``): ``put``, ``delete``,
    ``batch()``, and ``get`` through a ``KVReader``. The writer plans each batch (slot
    allocation needs its one planner) and commits it as one record. Options as ``Producer``'s."""

    _kind = L.KIND

    def __init__(self, path: Any, *, timeout: float = 30.0, durability: str = "relaxed") -> None:
        super().__init__(path, timeout=timeout, durability=durability)
        layer = layer_of(self.path)
        assert layer is not None  # check_layer made sure
        self._names = {name: i for i, name in enumerate(columns_of(layer))}

    def _column(self, column: str) -> int:
        number = self._names.get(column) if isinstance(column, str) else None
        if number is None:
            raise TableError(f"no column {column!r}; this directory has {list(self._names)}")
        return number

    def put(self, key: bytes, value: bytes, *, column: str = "default") -> int:
        """Set ``key`` to ``value``; the record id once the writer committed it."""
        return self._send([(self._column(column), check_key(key), check_value(value))])

    def delete(self, key: bytes, *, column: str = "default") -> int:
        """Remove ``key``; the record id (a producer's delete is a record even when the key
        was not there: the writer knows it as done)."""
        return self._send([(self._column(column), check_key(key), None)])

    def batch(self) -> KVProducerBatch:
        """Changes committed as one record when the ``with`` block ends."""
        self._client.check_usable("KVProducer")
        return KVProducerBatch(self)

    def get(self, key: bytes, default: bytes | None = None, *, column: str = "default") -> bytes | None:
        """The newest committed value of ``key`` (through a KVReader of the directory)."""
        return self._reads().get(key, default, column=column)

    def _reads(self) -> Any:
        self._client.check_usable("KVProducer")
        if self._reader is None:
            self._reader = KVReader(self.path)
        return self._reader

    def _send(self, changes: list[tuple[int, bytes, bytes | None]]) -> int:
        self._client.check_usable("KVProducer")
        return self._client.submit(wire.LAYER, encode(changes), self.durability == "commit")


class KVProducerBatch:
    """One atomic batch of a KVProducer; ``record_id`` is set once the writer committed it."""

    def __init__(self, producer: KVProducer) -> None:
        self._p = producer
        self._changes: list[tuple[int, bytes, bytes | None]] = []
        self._state = "open"
        self.record_id: int | None = None

    def _check(self) -> None:
        if self._state != "open":
            raise ClosedError(f"this batch is {self._state}; start a new one with producer.batch()")

    def put(self, key: bytes, value: bytes, *, column: str = "default") -> None:
        """Set ``key`` to ``value`` in this batch (checked now; sent when the block ends)."""
        self._check()
        self._changes.append((self._p._column(column), check_key(key), check_value(value)))

    def delete(self, key: bytes, *, column: str = "default") -> None:
        """Remove ``key`` in this batch."""
        self._check()
        self._changes.append((self._p._column(column), check_key(key), None))

    def __enter__(self) -> KVProducerBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None or self._state != "open":
            self._state = "discarded" if self._state == "open" else self._state
            return
        self._state = "committing"
        try:
            self.record_id = self._p._send(self._changes)
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"
