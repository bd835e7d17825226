"""One record being built: its changes, validated as they are made, and read-your-own-writes.

A record is the unit of atomicity: its changes are encoded as one log record and published in
one sequence-lock window, so readers see all of them or none. Nothing reaches the log or the
overlays until the ``with`` block ends without an exception.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Protocol

from . import _backend
from ._errors import ArgumentRangeError, ArgumentTypeError, ClosedError, ValueTooLargeError
from ._format import CHUNK_ENTRIES, DROP_TABLE, INSERT_INDEX, LogScan, encode_record, entries_of
from ._overlay import MAX_DROPS
from ._tables import Table, check_key

U64 = (1 << 64) - 1


class Committer(Protocol):
    """What a Record needs of whoever commits it (the Writer): the table catalog to validate
    against, the committed data for reading through, and the commit itself."""

    _catalog: dict[int, Table]

    def value(self, table: int, index: int) -> bytes | None: ...

    def index_entry(self, table: int, chunk: int, entry: int) -> int: ...

    def _commit(self, rec: ChangeSet) -> int: ...


class ChangeSet:
    """The changes of one record, validated against a table catalog as they are made, and its
    encoding. It needs no Writer: any process that reads the catalog can build one (``Record``
    is the Writer's, and adds reading through to committed data and the commit itself)."""

    __slots__ = ("_catalog", "_values", "_chunks", "_drops", "_state", "_tag")

    def __init__(self, catalog: dict[int, Table]) -> None:
        self._catalog = catalog
        self._values: dict[tuple[int, int], bytes | None] = {}
        self._chunks: dict[tuple[int, int], list] = {}  # (table, chunk) -> [mask, {entry: value}]
        self._drops: list[int] = []
        self._state = "open"
        self._tag: tuple[int, int] | None = None  # a producer's (slot, seq): ``_intake.py``

    # -- building ----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._state != "open":
            raise ClosedError(f"this record is {self._state}; start a new one with writer.record()")

    def insert_value(self, table: int, index: int, data: bytes | None) -> None:
        """Set slot ``index`` of value table ``table`` to ``data``; None removes the value."""
        self._check()
        t = check_key(self._catalog, table, index, "value")
        if data is not None:
            if type(data) is not bytes:
                data = _as_bytes(data)
            if len(data) > t.slot_size:
                raise ValueTooLargeError(
                    f"value of {len(data)} bytes does not fit table {table}'s slot_size "
                    f"{t.slot_size}; split it or define a table with larger slots")
        self._values[(table, index)] = data

    def insert_values(self, table: int, items: Iterable[tuple[int, bytes | None]]) -> None:
        """``insert_value`` for many (index, data) pairs of one table, with less overhead."""
        self._check()
        t = check_key(self._catalog, table, 0, "value")
        size = t.slot_size
        limit = t.max_key
        native = _backend.native
        if native is not None:  # the C twin of the loop below, for pairs it needs no word on
            if type(items) is not list and type(items) is not tuple:
                items = self._pairs(items)
            if native.gather(self._values, table, items, limit, size):
                return
        values = {}  # all or nothing: merged into the record once every pair checked out
        for pair in self._pairs(items):
            try:
                index, data = pair
            except (TypeError, ValueError):
                raise ArgumentTypeError(f"items must be (index, data) pairs, got {pair!r}") from None
            if type(index) is not int or not 0 <= index < limit:
                check_key(self._catalog, table, index, "value")
            if data is not None:
                if type(data) is not bytes:
                    data = _as_bytes(data)
                if len(data) > size:
                    raise ValueTooLargeError(
                        f"value of {len(data)} bytes at index {index} does not fit table {table}'s "
                        f"slot_size {size}")
            values[(table, index)] = data
        self._values.update(values)

    @staticmethod
    def _pairs(items: Iterable[tuple[int, bytes | None]]) -> list[tuple[int, bytes | None]]:
        """``items`` as a list (taken once: a generator is read only here)."""
        try:
            return items if type(items) is list else list(items)
        except TypeError:
            raise ArgumentTypeError(f"items must be an iterable of (index, data) pairs, not "
                                    f"{type(items).__name__}") from None

    def insert_index(self, table: int, chunk: int, entry: int, value: int) -> None:
        """Set entry ``entry`` (0..63) of chunk ``chunk`` of index table ``table`` to a u64."""
        self._check()
        check_key(self._catalog, table, chunk, "index")
        if type(entry) is not int or not 0 <= entry < CHUNK_ENTRIES:
            if not isinstance(entry, int) or isinstance(entry, bool):
                raise ArgumentTypeError(f"entry must be an int, not {type(entry).__name__}")
            raise ArgumentRangeError(f"entry {entry} is outside 0..{CHUNK_ENTRIES - 1}")
        if type(value) is not int or not 0 <= value <= U64:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ArgumentTypeError(f"an index entry must be an int, not {type(value).__name__}")
            raise ArgumentRangeError(f"index entry value {value} is not a u64 (0..2**64-1)")
        entry, value = int(entry), int(value)  # plain ints (an int subclass's __eq__ could
        c = self._chunks.get((table, chunk))  # run code while the record is encoded)
        if c is None:
            c = self._chunks[(table, chunk)] = [0, {}]
        c[0] |= 1 << entry
        c[1][entry] = value

    def drop_table(self, table: int) -> None:
        """Empty ``table`` for every reader once this record commits; earlier changes to it in
        this record are discarded, later ones apply to the emptied table."""
        self._check()
        if table not in self._catalog:
            check_key(self._catalog, table, 0, "value")  # raises the right error
        if table not in self._drops:
            if len(self._drops) >= MAX_DROPS:
                raise ArgumentRangeError(
                    f"one record can drop at most {MAX_DROPS} tables; drop the others in a "
                    "following record")
            self._drops.append(table)
        for key in [k for k in self._values if k[0] == table]:
            del self._values[key]
        for key in [k for k in self._chunks if k[0] == table]:
            del self._chunks[key]

    @property
    def empty(self) -> bool:
        """Whether no change was made yet."""
        return not (self._values or self._chunks or self._drops)

    def encode(self, record_id: int) -> bytes:
        """The log record of these changes under ``record_id`` (``_format.py``)."""
        native = _backend.native
        if native is not None:  # the C twin of encode_record
            return native.encode(record_id, self._drops, self._chunks, self._values)
        return encode_record(record_id, self._drops, self._chunks, self._values)


class Record(ChangeSet):
    """Changes of one atomic record; get one from ``Writer.record()``."""

    __slots__ = ("_w", "record_id")

    def __init__(self, writer: Committer) -> None:
        super().__init__(writer._catalog)
        self._w = writer
        self.record_id: int | None = None  # set when the record commits

    # -- reading your own changes -----------------------------------------------------------
    def value(self, table: int, index: int) -> bytes | None:
        """The value as this record would leave it: its own change, else the committed one."""
        self._check()
        check_key(self._catalog, table, index, "value")
        key = (table, index)
        if key in self._values:
            return self._values[key]
        if table in self._drops:
            return None
        return self._w.value(table, index)

    def index_entry(self, table: int, chunk: int, entry: int) -> int:
        """The entry as this record would leave it: its own change, else the committed one."""
        self._check()
        check_key(self._catalog, table, chunk, "index")
        c = self._chunks.get((table, chunk))
        if c is not None and entry in c[1]:
            return c[1][entry]
        if table in self._drops:
            return 0
        return self._w.index_entry(table, chunk, entry)

    # -- committing --------------------------------------------------------------------------
    def commit(self) -> int:
        """Commit now (the ``with`` block does this for you); returns the record id."""
        self._check()
        self._state = "committing"
        try:
            self.record_id = self._w._commit(self)
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"
        return self.record_id

    def discard(self) -> None:
        """Drop the record's changes (the ``with`` block does this when it raises)."""
        if self._state == "open":
            self._state = "discarded"

    def __enter__(self) -> Record:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            if self._state == "open":
                self.commit()
        else:
            self.discard()


def _as_bytes(data: object) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise ArgumentTypeError(
        f"a value must be bytes, bytearray or memoryview (or None to remove), not {type(data).__name__}")


def change_set_of(data: bytes, record_id: int, catalog: dict[int, Table]) -> ChangeSet:
    """One log record (``_format.py``) read back as the change set that makes it, checked
    against ``catalog`` as the writer's API checks each change (a producer's submission, under
    record id 0; a shipped record, under its own). ArgumentTypeError if ``data`` is not exactly
    one whole record of that id."""
    scan = LogScan(data, expect_id=record_id)
    recs = list(scan.records())
    if len(recs) != 1 or scan.problem is not None or scan.end != len(data):
        raise ArgumentTypeError(f"a record that does not decode ({scan.problem or 'not one record'})")
    cs = ChangeSet(catalog)
    values: dict[int, list[tuple[int, bytes | None]]] = {}
    for op in recs[0].ops:
        if op.kind == DROP_TABLE:
            cs.drop_table(op.table)
        elif op.kind == INSERT_INDEX:
            for e, v in entries_of(op.mask, op.data or b""):
                cs.insert_index(op.table, op.key, e, v)
        else:
            values.setdefault(op.table, []).append((op.key, op.data))
    for table, pairs in values.items():
        cs.insert_values(table, pairs)
    return cs
