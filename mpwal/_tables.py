"""Table definitions, the metadata file that records them, and the table files.

Metadata: ``mpwal.meta`` in the database directory, JSON::

    {"mpwal": 2, "database_id": "<32 hex digits>",
     "tables": [{"id": 1, "kind": "index"}, {"id": 3, "kind": "value", "slot_size": 256}]}

``layer`` (when present) names the layer built on the engine that owns the directory and its
settings (``{"kind": "kv", ...}``: a key-value directory, ``mpwal/kv/``): a directory is opened
only by the layer that made it (``check_layer``).
``mpwal`` is the on-disk format version; a newer one is refused. ``database_id`` is random,
made when the database is created; every log file names it in its header (``_format.py``).
``log_epoch_floor`` and ``replayed_through`` (when present) repeat the queue state's epoch
floor (the epoch of the last writer open, below which every log is stale) and the last record
id known to be in the tables (replay and the enactor's finished logs); they are kept here too
so that losing the queue state can neither make an old log current again nor start record ids
again below used ones.
Format 1 (mpwal 0.1) had no id and no log headers: the first writer open upgrades it, once
replay has emptied its logs (``upgrade_meta``). Table ids are one u16 namespace shared by both
kinds.

Table files, created empty when the table is defined so readers can open them at once:

* ``index{id}.tbl``: chunk ``c`` at offset ``c * 512``: 64 u64 entries, little-endian. Bytes past
  the end of the file read as zeros.
* ``value{id}.tbl``: slot ``i`` at offset ``i * (4 + slot_size)``: u32 ``stored`` then
  ``slot_size`` bytes. ``stored == 0`` is an empty slot, otherwise the value is the first
  ``stored - 1`` bytes. Past the end of the file every slot is empty.

Every table file is at most ``MAX_TABLE_BYTES`` (1 TiB): each table's highest index follows
from it (``max_key``: 2**31 chunks for an index table, ``2**40 // (4 + slot_size)`` slots for a
value table), and a change past it is refused when it is made. The bound keeps every offset
inside what common file systems allow (ext4 stops at 16 TiB), so no accepted record can fail to
enact and leave the directory unopenable.

Table files never shrink: dropping a table punches a hole over the whole file (it keeps its
size and reads as zeros: every slot empty, every chunk zero) rather than truncating or
deleting it. Readers map table files read-only (a read is a slice, not a system call), and a
mapped file that shrank would kill them with SIGBUS; an open handle also keeps reading the
table's real contents. A file that grew is mapped again. A mapping covers at most the first
``MAP_WINDOW`` bytes of a file (a sparse file's apparent size can be far more than the address
space can map); slots past it, or of a file that cannot be mapped, are read with ``pread``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast, overload

from . import _fileio as fileio
from ._errors import (ArgumentRangeError, ArgumentTypeError, DatabaseError, StorageError, TableError,
                     storage_error)
from ._format import CHUNK_BYTES, DROP_TABLE, INSERT_INDEX, INSERT_VALUE, Op

FORMAT_VERSION = 2
META_FILE = "mpwal.meta"
MAX_TABLE_ID = 0xFFFF
MAX_TABLE_BYTES = 1 << 40  # the largest a table file may grow: see the module comment
MAP_WINDOW = 1 << 32  # readers map at most this much of a table file
ZERO_CHUNK = bytes(CHUNK_BYTES)
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class IndexTable:
    """An index table: an array of 64-entry chunks of u64, changed one entry at a time."""

    id: int
    kind = "index"

    def __post_init__(self) -> None:
        _check_table_id(self.id)

    def describe(self) -> dict[str, Any]:
        """The table as ``mpwal.meta`` records it."""
        return {"id": self.id, "kind": "index"}

    @property
    def file_name(self) -> str:
        """The table file's name in the database directory."""
        return f"index{self.id}.tbl"

    @property
    def max_key(self) -> int:
        """Chunks 0..max_key-1 exist: a table file is at most MAX_TABLE_BYTES."""
        return MAX_TABLE_BYTES // CHUNK_BYTES

    def capacity(self) -> str:
        """How much the table can hold, in words (for error messages)."""
        return f"index table {self.id} holds at most {self.max_key} chunks of {CHUNK_BYTES} bytes"


@dataclass(frozen=True)
class ValueTable:
    """A value table: slots addressed by a u64 index, each holding up to ``slot_size`` bytes."""

    id: int
    slot_size: int
    kind = "value"

    def __post_init__(self) -> None:
        _check_table_id(self.id)
        if not isinstance(self.slot_size, int) or isinstance(self.slot_size, bool):
            raise TableError(f"ValueTable({self.id}): slot_size must be an int, not {type(self.slot_size).__name__}")
        if not 1 <= self.slot_size <= 1 << 26:
            raise TableError(f"ValueTable({self.id}): slot_size must be 1..{1 << 26}, got {self.slot_size}")

    def describe(self) -> dict[str, Any]:
        """The table as ``mpwal.meta`` records it."""
        return {"id": self.id, "kind": "value", "slot_size": self.slot_size}

    @property
    def file_name(self) -> str:
        """The table file's name in the database directory."""
        return f"value{self.id}.tbl"

    @property
    def stride(self) -> int:
        """Bytes per slot in the table file: a u32 length, then ``slot_size`` bytes."""
        return 4 + self.slot_size

    @property
    def max_key(self) -> int:
        """Slots 0..max_key-1 exist: a table file is at most MAX_TABLE_BYTES."""
        return MAX_TABLE_BYTES // self.stride

    def capacity(self) -> str:
        """How much the table can hold, in words (for error messages)."""
        return f"value table {self.id} holds at most {self.max_key} slots of {self.slot_size} bytes"


Table = IndexTable | ValueTable


def _check_table_id(tid: object) -> None:
    if not isinstance(tid, int) or isinstance(tid, bool):
        raise TableError(f"a table id must be an int, not {type(tid).__name__}")
    if not 0 <= tid <= MAX_TABLE_ID:
        raise TableError(f"table id {tid} is outside 0..{MAX_TABLE_ID}")


def table_from(desc: dict[str, Any]) -> Table:
    if desc.get("kind") == "index":
        return IndexTable(desc["id"])
    if desc.get("kind") == "value":
        return ValueTable(desc["id"], desc["slot_size"])
    raise DatabaseError(f"unknown table kind in {META_FILE}: {desc!r}")


def is_database(path: str) -> bool:
    return os.path.exists(os.path.join(path, META_FILE))


def load_catalog(path: str) -> dict[int, Table]:
    """The tables recorded in ``path``'s metadata; DatabaseError if it is not an mpwal database."""
    return _load_meta(path)[0]


def database_id(path: str) -> bytes | None:
    """The database's id, or None in a directory of format 1 (not upgraded yet)."""
    return _load_meta(path)[1]


# the counters the metadata keeps a copy of, so that they survive the loss of the queue state
COUNTERS = ("log_epoch_floor", "replayed_through")


def epoch_floor(path: str) -> int:
    """The epoch floor kept in the metadata (``set_floors``); 0 if there is none."""
    return _load_meta(path)[2]["log_epoch_floor"]


def replayed_through(path: str) -> int:
    """The last record id known to be in the tables (set by replay, and by the enactor when it
    finishes a log), as the metadata keeps it; 0 if none."""
    return _load_meta(path)[2]["replayed_through"]


def set_floors(path: str, epoch: int, replayed: int) -> None:
    """Keep the epoch floor and the last replayed record id in the metadata too (fsynced), so
    that they survive the loss of the queue state: logs of older epochs stay stale, new epochs
    stay above theirs, and record ids never start again below ids that were used."""
    catalog, ident, old, layer = _load_meta(path)
    new = {"log_epoch_floor": max(epoch, old["log_epoch_floor"]),
           "replayed_through": max(replayed, old["replayed_through"])}
    if new != old:
        _write_meta(path, catalog, ident, new, layer)


def layer_of(path: str) -> dict[str, Any] | None:
    """The layer that owns the directory (its ``layer`` object), or None for a raw one."""
    return _load_meta(path)[3]


def check_layer(path: str, kind: str | None) -> None:
    """Refuse to open a directory with the API of another layer: a key-value directory with
    ``mpwal.Writer``/``Reader``, or a raw one with the key-value API (DatabaseError)."""
    layer = layer_of(path)
    found = None if layer is None else layer.get("kind")
    if found == kind:
        return
    if found is None:
        raise DatabaseError(f"{path} is a raw mpwal directory (tables of slots and chunks), not "
                            f"a {kind} directory: open it with mpwal.Writer or mpwal.Reader")
    if found == "kv":
        raise DatabaseError(f"{path} is a key-value directory: open it with mpwal.KVWriter or "
                            "mpwal.KVReader, not the raw table API")
    raise DatabaseError(f"{path} belongs to an unknown layer {found!r}: upgrade mpwal to open it")


def _load_meta(path: str) -> tuple[dict[int, Table], bytes | None, dict[str, int],
                                   dict[str, Any] | None]:
    meta = os.path.join(path, META_FILE)
    try:
        raw = fileio.read_file(meta)
    except FileNotFoundError:
        raise DatabaseError(
            f"{path} is not an mpwal database (no {META_FILE}); open a Writer on it first") from None
    except OSError as e:
        raise storage_error(e, f"reading {meta}") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("tables"), list) or \
                not all(isinstance(d, dict) for d in doc["tables"]):
            raise ValueError("not an object with a list of table objects")
        version = doc["mpwal"]
        tables = [table_from(d) for d in doc["tables"]]
        dbid = doc.get("database_id")
        if version == FORMAT_VERSION and (not isinstance(dbid, str) or len(dbid) != 32):
            raise ValueError("no database_id of 32 hex digits")
        ident = bytes.fromhex(dbid) if isinstance(dbid, str) and version >= 2 else None
        layer = doc.get("layer")
        if layer is not None and (not isinstance(layer, dict) or
                                  not isinstance(layer.get("kind"), str)):
            raise ValueError("a layer that is not an object with a kind")
        counters = {k: doc.get(k, 0) for k in COUNTERS}
        for k, v in counters.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{k} {v!r} is not a count")
    except (ValueError, KeyError, TypeError, TableError) as e:
        raise DatabaseError(f"{meta} is damaged ({e}); restore it from a backup") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DatabaseError(
            f"{path} has on-disk format {version}, newer than this mpwal's {FORMAT_VERSION}: "
            "upgrade mpwal to open it")
    return {t.id: t for t in tables}, ident, counters, layer


def _write_meta(path: str, catalog: dict[int, Table], ident: bytes | None,
                counters: dict[str, int] | None = None,
                layer: dict[str, Any] | None = None) -> None:
    doc: dict = {"mpwal": FORMAT_VERSION if ident is not None else 1}
    if ident is not None:
        doc["database_id"] = ident.hex()
    if layer is not None:
        doc["layer"] = layer
    for k, v in (counters or {}).items():
        if v:
            doc[k] = v
    doc["tables"] = [t.describe() for t in sorted(catalog.values(), key=lambda t: t.id)]
    try:
        fileio.write_file_atomic(os.path.join(path, META_FILE), json.dumps(doc).encode(), sync=True)
    except OSError as e:
        raise storage_error(e, f"writing {META_FILE}") from None


def upgrade_meta(path: str) -> bytes:
    """Give a directory of format 1 its database id (format 2); its id. Call only when no log
    holds records (after replay), as logs of format 1 have no header."""
    catalog, ident, floor, layer = _load_meta(path)
    if ident is None:
        ident = os.urandom(16)
        _write_meta(path, catalog, ident, floor, layer)
    return ident


def merge_catalog(path: str, wanted: Iterable[Table],
                  layer: dict[str, Any] | None = None) -> dict[int, Table]:
    """Create or extend the metadata with ``wanted`` tables; refuse a conflicting redefinition.
    ``layer``: the owning layer's object, recorded when the directory is created."""
    try:
        wanted = list(wanted)
    except TypeError:
        raise TableError(f"tables must be a list of IndexTable and ValueTable, not "
                         f"{type(wanted).__name__}") from None
    for t in wanted:
        if not isinstance(t, (IndexTable, ValueTable)):
            raise TableError(f"tables must be IndexTable or ValueTable, not {type(t).__name__}")
    if is_database(path):
        existing, ident, floor, layer = _load_meta(path)
    else:
        existing, ident, floor = {}, os.urandom(16), {}
    merged = dict(existing)
    for t in wanted:
        old = merged.get(t.id)
        if old is not None and old != t:
            raise TableError(
                f"table {t.id} is already defined as {old.describe()}, not {t.describe()}: "
                "use another id for the new table")
        merged[t.id] = t
    if merged != existing or not existing:
        for t in merged.values():  # table files first, so a reader never meets a table without one
            fp = os.path.join(path, t.file_name)
            try:
                os.close(fileio.create(fp))
            except OSError as e:
                raise storage_error(e, f"creating {fp}") from None
        _write_meta(path, merged, ident, floor, layer)
    return merged


class TableFiles:
    """Open handles on the table files of one directory, for reading and (enactor) writing."""

    def __init__(self, path: str, catalog: dict[int, Table], writable: bool, mapped: bool = False):
        self.path = path
        self.catalog = catalog
        self.writable = writable
        self.mapped = mapped  # read through read-only mappings (readers), else pread
        self._fds: dict[int, int] = {}
        self._maps: dict[int, mmap.mmap | None] = {}
        self._unmappable: set[int] = set()  # tables whose file could not be mapped
        self.dirty: set[int] = set()

    def fd(self, tid: int) -> int:
        fd = self._fds.get(tid)
        if fd is None:
            t = self.catalog[tid]
            fp = os.path.join(self.path, t.file_name)
            try:
                fd = os.open(fp, os.O_RDWR if self.writable else os.O_RDONLY)
            except OSError as e:
                raise storage_error(e, f"opening table file {fp}") from None
            self._fds[tid] = fd
        return fd

    def _map(self, tid: int, end: int) -> mmap.mmap | None:
        """The mapping of a table file, mapped again if the file grew towards ``end``. It covers
        at most MAP_WINDOW bytes, and may be None (an empty file, or one that cannot be mapped):
        callers read what it does not cover with pread."""
        m = self._maps.get(tid)
        if m is not None and (len(m) >= end or len(m) == MAP_WINDOW):
            return m
        if tid in self._unmappable:
            return None
        fd = self.fd(tid)
        try:
            size = min(os.fstat(fd).st_size, MAP_WINDOW)
        except OSError as e:
            raise storage_error(e, f"reading table file {self.catalog[tid].file_name}") from None
        if not size or (m is not None and size <= len(m)):
            return m
        try:
            new = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            self._unmappable.add(tid)  # no address space for it: pread from now on
            if m is not None:
                m.close()
            self._maps[tid] = None
            return None
        if m is not None:
            m.close()
        self._maps[tid] = new
        return new

    def _past_end(self, tid: int, m: mmap.mmap | None, off: int) -> bool:
        """Whether ``off`` lies past the end of the file as ``_map`` just saw it (a mapping
        shorter than MAP_WINDOW covers the whole file; None is an empty one)."""
        if tid in self._unmappable:
            return False
        return off >= (len(m) if m is not None else 0) and (m is None or len(m) < MAP_WINDOW)

    @property
    def maps(self) -> dict[int, mmap.mmap | None]:
        """{table: the read-only mapping of its file so far, or None if it cannot be mapped},
        changed in place as files are mapped further (the native lookups read slots from it)."""
        return self._maps

    def read_value(self, tid: int, index: int) -> bytes | None:
        t = cast(ValueTable, self.catalog[tid])  # callers checked it is a value table
        stride = t.stride
        off = index * stride
        if self.mapped:
            m = self._maps.get(tid)
            if m is None or off + stride > len(m):
                m = self._map(tid, off + stride)
            if m is not None and off + stride <= len(m):
                stored = _U32.unpack_from(m, off)[0]
                if not stored or stored > stride - 3:
                    return None
                return m[off + 4:off + 3 + stored]
            if self._past_end(tid, m, off):
                return None  # never written
        try:
            raw = os.pread(self.fd(tid), stride, off)
        except OSError as e:
            raise storage_error(e, f"reading table file {t.file_name}") from None
        if len(raw) < 4:
            return None
        stored = _U32.unpack_from(raw)[0]
        if stored == 0:
            return None
        return raw[4:3 + stored] if stored - 1 <= len(raw) - 4 else None

    def read_chunk(self, tid: int, chunk: int) -> bytes:
        off = chunk * CHUNK_BYTES
        if self.mapped:
            m = self._maps.get(tid)
            if m is None or off + CHUNK_BYTES > len(m):
                m = self._map(tid, off + CHUNK_BYTES)
            if m is not None and off + CHUNK_BYTES <= len(m):
                return m[off:off + CHUNK_BYTES]
            if self._past_end(tid, m, off):
                return ZERO_CHUNK
        try:
            raw = os.pread(self.fd(tid), CHUNK_BYTES, off)
        except OSError as e:
            raise storage_error(e, f"reading table file {self.catalog[tid].file_name}") from None
        return raw if len(raw) == CHUNK_BYTES else raw + ZERO_CHUNK[len(raw):]

    def write_value(self, tid: int, index: int, data: bytes | None) -> None:
        t = cast(ValueTable, self.catalog[tid])  # the enactor checked it is a value table
        if data is None:
            blob = b"\0\0\0\0"
        else:
            blob = _U32.pack(len(data) + 1) + data
        fileio.pwrite_all(self.fd(tid), blob, index * t.stride)
        self.dirty.add(tid)

    def write_chunk(self, tid: int, chunk: int, data: bytes) -> None:
        fileio.pwrite_all(self.fd(tid), data, chunk * CHUNK_BYTES)
        self.dirty.add(tid)

    def drop(self, tid: int) -> None:
        fd = self.fd(tid)
        fileio.punch_hole(fd, os.fstat(fd).st_size)
        self.dirty.add(tid)

    def sync(self, everything: bool = False) -> None:
        """fsync every table written since the last sync (or every table)."""
        for tid in sorted(self.catalog if everything else self.dirty):
            fileio.fsync(self.fd(tid))
        self.dirty.clear()

    def close(self) -> None:
        for m in self._maps.values():
            if m is not None:
                m.close()
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@overload
def check_key(catalog: dict[int, Table], tid: int, key: int, kind: Literal["value"]) -> ValueTable: ...
@overload
def check_key(catalog: dict[int, Table], tid: int, key: int, kind: Literal["index"]) -> IndexTable: ...
def check_key(catalog: dict[int, Table], tid: int, key: int, kind: str) -> Table:
    """Validate a (table, index-or-chunk) pair at the API boundary; return the table."""
    t = catalog.get(tid) if type(tid) is int else None
    if t is None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise TableError(f"a table id must be an int, not {type(tid).__name__}")
        raise TableError(f"table {tid} is not defined; known tables: {sorted(catalog)}")
    if t.kind != kind:
        raise TableError(f"table {tid} is {'an' if t.kind == 'index' else 'a'} {t.kind} table, "
                         f"not {'an' if kind == 'index' else 'a'} {kind} table")
    if type(key) is not int:
        if isinstance(key, bool) or not isinstance(key, int):
            raise ArgumentTypeError(f"the {'chunk' if kind == 'index' else 'index'} must be an int, "
                                    f"not {type(key).__name__}")
    if not 0 <= key < t.max_key:
        raise ArgumentRangeError(
            f"{'chunk' if kind == 'index' else 'index'} {key} is out of range: it must be "
            f"0..{t.max_key - 1} ({t.capacity()}; a table file is at most "
            f"{MAX_TABLE_BYTES >> 40} TiB)")
    return t


def op_problem(catalog: dict[int, Table], op: Op) -> str | None:
    """Why a decoded log entry (``format.Op``) cannot be applied to the tables of ``catalog``,
    or None. This writer never logs such an entry (``check_key`` refuses it first); a log that
    holds one is damaged or was written by an older mpwal, and replay ends its prefix there."""
    t = catalog.get(op.table)
    if t is None:
        return f"table {op.table} is not defined in {META_FILE}"
    if op.kind == DROP_TABLE:
        return None
    want = "index" if op.kind == INSERT_INDEX else "value"
    if t.kind != want:
        return f"insert_{want} into table {op.table}, which is {'an' if t.kind == 'index' else 'a'} {t.kind} table"
    if not 0 <= op.key < t.max_key:
        return (f"{'chunk' if want == 'index' else 'index'} {op.key} of table {op.table} is past "
                f"its limit ({t.capacity()})")
    if op.kind == INSERT_VALUE and op.data is not None:
        size = cast(ValueTable, t).slot_size  # t is a value table: its kind was checked above
        if len(op.data) > size:
            return f"a {len(op.data)}-byte value in table {op.table}, whose slot_size is {size}"
    return None



def record_problem(catalog: dict[int, Table], ops: list[Op]) -> str | None:
    """The first ``op_problem`` of a record's entries, or None: the one check that replay,
    private readers and the enactor make before they apply a record read from a log file."""
    for op in ops:
        why = op_problem(catalog, op)
        if why is not None:
            return why
    return None

__all__ = ["IndexTable", "ValueTable", "TableFiles", "load_catalog", "merge_catalog", "StorageError"]
