"""The applier: turns committed records into table-file writes. The one place that does it, for
the enactor (rotated logs, or the records its writer handed over in memory) and for replay.

Records are after-images, so applying one again is harmless, but never an older one after a
newer one (readers would briefly see older data): callers apply in record-id order and skip
what the tables already hold. Within a batch the newest value of each slot and the final
contents of each index chunk are written once; values of consecutive slots of a table go out
in one ``pwrite``. A record that drops a table starts a new batch (its drops come first in it,
so every later change in the batch applies to the emptied table).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from . import _backend, _fileio as fileio
from ._format import DROP_TABLE, INSERT_INDEX, INSERT_VALUE, Record, entries_of
from ._tables import Table, TableFiles, ValueTable, load_catalog, record_problem

BATCH_RECORDS = 512
BATCH_BYTES = 4 << 20
BATCH_CHANGES = 8192  # values and chunks per batch: the enactor thread holds the GIL that long
_U64 = struct.Struct("<Q")

# what a writer hands its enactor thread per record: (record id, {(table, index): bytes or
# None}, [((table, chunk), 512-byte after-image)], dropped tables)
Handed = tuple[int, dict, list, tuple]


def batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Group records, in order, into batches of at most BATCH_RECORDS records, BATCH_BYTES
    bytes or BATCH_CHANGES changes (a record is never split); a record that drops a table
    starts a new batch."""
    batch: list[Record] = []
    size = changes = 0
    for rec in records:
        drops = bool(rec.ops) and rec.ops[0].kind == DROP_TABLE  # drops come first in a record
        if batch and (drops or len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES
                      or changes >= BATCH_CHANGES):
            yield batch
            batch, size, changes = [], 0, 0
        batch.append(rec)
        size += rec.end - rec.start
        changes += len(rec.ops)
    if batch:
        yield batch


class Applier:
    """Writes records into the table files of ``path`` (opened for writing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.catalog: dict[int, Table] = load_catalog(path)
        self.files = TableFiles(path, self.catalog, writable=True)
        self._sizes = slot_sizes(self.catalog)

    def problem(self, rec: Record) -> str | None:
        """Why a record read from a log cannot be applied (``tables.record_problem``), after
        looking again for tables defined since this applier started; None if it can."""
        why = record_problem(self.catalog, rec.ops)
        if why is not None:
            self.catalog.update(load_catalog(self.path))
            why = record_problem(self.catalog, rec.ops)
        return why

    def apply(self, batch: list[Record]) -> None:
        """Apply a batch of decoded records (see ``batches``)."""
        files = self.files
        values: dict[tuple[int, int], bytes | None] = {}
        chunks: dict[tuple[int, int], bytearray] = {}
        for rec in batch:
            for kind, table, key, mask, data in rec.ops:
                if kind == INSERT_VALUE:
                    values[(table, key)] = data
                elif kind == INSERT_INDEX:
                    self._table(table)
                    chunk = chunks.get((table, key))
                    if chunk is None:
                        chunk = chunks[(table, key)] = bytearray(files.read_chunk(table, key))
                    assert data is not None
                    for e, v in entries_of(mask, data):
                        _U64.pack_into(chunk, e * 8, v)
                else:  # DROP_TABLE: first in its record, and its record first in the batch
                    self._table(table)
                    files.drop(table)
        for (tid, c), chunk in chunks.items():
            files.write_chunk(tid, c, bytes(chunk))
        if values:
            self._write_values(values)

    def apply_handed(self, batch: list[Handed]) -> None:
        """Apply records as a writer handed them over: index chunks come as whole after-images,
        so nothing is read. A record with drops comes alone, or first."""
        files = self.files
        values: dict[tuple[int, int], bytes | None] = {}
        chunks: dict[tuple[int, int], bytes] = {}
        for _rid, vals, images, drops in batch:
            for t in drops:
                self._table(t)
                files.drop(t)
            values.update(vals)
            chunks.update(images)
        for (tid, c), image in chunks.items():
            self._table(tid)
            files.write_chunk(tid, c, image)
        if values:
            self._write_values(values)

    def sync(self, everything: bool = False) -> None:
        self.files.sync(everything)

    def close(self) -> None:
        self.files.close()

    def _table(self, tid: int) -> Table:
        if tid not in self.catalog:
            self.catalog.update(load_catalog(self.path))
        return self.catalog[tid]

    def _write_values(self, values: dict[tuple[int, int], bytes | None]) -> None:
        """Write slots, joining runs of consecutive indices of a table into one pwrite."""
        native = _backend.native
        runs_of = slot_runs if native is None else native.slot_runs  # the C twin
        try:
            runs = runs_of(values, self._sizes)
        except KeyError:  # a table defined since: look again, once
            for tid, _ in values:
                self._table(tid)
            self._sizes = slot_sizes(self.catalog)
            runs = runs_of(values, self._sizes)
        files = self.files
        for tid, first, buf in runs:
            fileio.pwrite_all(files.fd(tid), buf, first * (4 + self._sizes[tid]))
            files.dirty.add(tid)


def slot_sizes(catalog: dict[int, Table]) -> dict[int, int]:
    """{value table: slot_size} of a catalog."""
    return {tid: t.slot_size for tid, t in catalog.items() if isinstance(t, ValueTable)}


def slot_runs(values: dict[tuple[int, int], bytes | None],
              sizes: dict[int, int]) -> list[tuple[int, int, bytes]]:
    """(table, first index, bytes) of each run of consecutive slots that ``values`` ({(table,
    index): bytes, or None for an empty slot}) fills, in (table, index) order: each slot its
    u32 ``stored`` (0 empty, else length + 1), then the value padded to ``sizes[table]`` bytes
    (``_tables.py``). The reference of ``_native.slot_runs``."""
    runs = []
    keys = sorted(values)
    n = len(keys)
    i = 0
    while i < n:
        tid, first = keys[i]
        size = sizes[tid]
        slot = struct.Struct(f"<I{size}s")
        j = i + 1
        while j < n and keys[j] == (tid, first + j - i):
            j += 1
        parts = []
        for key in keys[i:j]:
            d = values[key]
            if d is not None and len(d) > size:
                raise ValueError(f"a {len(d)}-byte value does not fit a {size}-byte slot")
            parts.append(slot.pack(0, b"") if d is None else slot.pack(len(d) + 1, d))
        runs.append((tid, first, b"".join(parts)))
        i = j
    return runs
