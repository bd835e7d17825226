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

from . import _fileio as fileio
from ._format import DROP_TABLE, INSERT_INDEX, INSERT_VALUE, Record, entries_of
from ._tables import Table, TableFiles, ValueTable, load_catalog, record_problem

BATCH_RECORDS = 512
BATCH_BYTES = 4 << 20
_U64 = struct.Struct("<Q")

# what a writer hands its enactor thread per record: (record id, {(table, index): bytes or
# None}, [((table, chunk), 512-byte after-image)], dropped tables)
Handed = tuple[int, dict, list, tuple]


def batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Group records, in order, into batches of at most BATCH_RECORDS records or BATCH_BYTES
    bytes; a record that drops a table starts a new batch."""
    batch: list[Record] = []
    size = 0
    for rec in records:
        drops = bool(rec.ops) and rec.ops[0].kind == DROP_TABLE  # drops come first in a record
        if batch and (drops or len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(rec)
        size += rec.end - rec.start
    if batch:
        yield batch


class Applier:
    """Writes records into the table files of ``path`` (opened for writing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.catalog: dict[int, Table] = load_catalog(path)
        self.files = TableFiles(path, self.catalog, writable=True)
        self._slot_structs: dict[int, struct.Struct] = {}

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
        tables: dict[int, dict[int, bytes | None]] = {}
        for (tid, index), data in values.items():
            slots = tables.get(tid)
            if slots is None:
                slots = tables[tid] = {}
            slots[index] = data
        for tid, slots in tables.items():
            slot = self._slot_struct(tid)  # u32 stored, then the data padded with zeros
            pack = slot.pack
            empty = pack(0, b"")
            fd = self.files.fd(tid)
            indices = sorted(slots)
            n = len(indices)
            i = 0
            while i < n:
                first = indices[i]
                j = i + 1
                while j < n and indices[j] == first + j - i:
                    j += 1
                run = map(slots.__getitem__, indices[i:j])
                buf = b"".join([empty if d is None else pack(len(d) + 1, d) for d in run])
                fileio.pwrite_all(fd, buf, first * slot.size)
                i = j
            self.files.dirty.add(tid)

    def _slot_struct(self, tid: int) -> struct.Struct:
        st = self._slot_structs.get(tid)
        if st is None:
            t = self._table(tid)
            assert isinstance(t, ValueTable)
            st = self._slot_structs[tid] = struct.Struct(f"<I{t.slot_size}s")
        return st
