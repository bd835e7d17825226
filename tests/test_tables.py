"""Unit tests of mpwal._tables: table definitions, the metadata file, the table files, check_key."""

from __future__ import annotations

import json
import os
import struct

import pytest

from mpwal._errors import ArgumentRangeError, ArgumentTypeError, DatabaseError, Error, TableError
from mpwal._tables import (
    FORMAT_VERSION,
    META_FILE,
    IndexTable,
    TableFiles,
    ValueTable,
    check_key,
    is_database,
    load_catalog,
    merge_catalog,
)


@pytest.fixture
def d(tmp_path):
    """An empty directory."""
    return str(tmp_path)


def meta_doc(path: str) -> dict:
    with open(os.path.join(path, META_FILE)) as f:
        return json.load(f)


def write_meta(path: str, raw) -> None:
    with open(os.path.join(path, META_FILE), "wb") as f:
        f.write(raw if isinstance(raw, bytes) else json.dumps(raw).encode())


# -- table definitions ------------------------------------------------------------------------

@pytest.mark.parametrize("tid", [0, 1, 0xFFFF])
def test_table_ids_in_range_accepted(tid):
    """Table ids 0..65535 are valid for both kinds."""
    assert IndexTable(tid).id == tid and ValueTable(tid, 8).id == tid


@pytest.mark.parametrize("tid", [-1, 0x10000, True, "1", 1.0, None])
def test_bad_table_ids_rejected(tid):
    """A table id that is not an int in 0..65535 (bools included) is a TableError."""
    with pytest.raises(TableError):
        IndexTable(tid)
    with pytest.raises(TableError):
        ValueTable(tid, 8)


@pytest.mark.parametrize("size", [1, 256, 1 << 26])
def test_value_slot_size_in_range(size):
    """slot_size 1..2**26 is accepted and sets the stride to 4 + slot_size."""
    t = ValueTable(3, size)
    assert t.stride == 4 + size and t.max_key == (1 << 40) // (4 + size)


@pytest.mark.parametrize("size", [0, -1, (1 << 26) + 1, True, "8", 8.0, None])
def test_value_slot_size_rejected(size):
    """slot_size that is not an int in 1..2**26 (bools included) is a TableError."""
    with pytest.raises(TableError):
        ValueTable(3, size)


def test_table_describe_and_file_names():
    """describe() and file_name follow the documented metadata and file layout."""
    assert IndexTable(1).describe() == {"id": 1, "kind": "index"}
    assert ValueTable(3, 256).describe() == {"id": 3, "kind": "value", "slot_size": 256}
    assert IndexTable(1).file_name == "index1.tbl" and ValueTable(3, 9).file_name == "value3.tbl"
    assert IndexTable(1).max_key == (1 << 40) // 512


def test_table_error_is_keyerror_with_plain_message():
    """TableError is an mpwal.Error and a KeyError whose str() is not quoted."""
    e = TableError("table 5 is not defined")
    assert isinstance(e, Error) and isinstance(e, KeyError)
    assert str(e) == "table 5 is not defined"


# -- the catalog ------------------------------------------------------------------------------

def test_merge_creates_metadata_and_empty_table_files(d):
    """A first merge writes mpwal.meta and creates each table's file empty."""
    assert not is_database(d)
    cat = merge_catalog(d, [ValueTable(3, 256), IndexTable(1)])
    assert cat == {1: IndexTable(1), 3: ValueTable(3, 256)}
    assert is_database(d)
    doc = meta_doc(d)
    ident = doc.pop("database_id")
    assert len(bytes.fromhex(ident)) == 16  # random, made at creation
    assert doc == {"mpwal": FORMAT_VERSION, "tables": [
        {"id": 1, "kind": "index"}, {"id": 3, "kind": "value", "slot_size": 256}]}
    for name in ("index1.tbl", "value3.tbl"):
        assert os.path.getsize(os.path.join(d, name)) == 0
    assert load_catalog(d) == cat
    merge_catalog(d, [ValueTable(5, 16)])
    assert meta_doc(d)["database_id"] == ident  # kept when the catalog grows


def test_merge_with_no_tables_still_makes_a_database(d):
    """Merging an empty list into a new directory writes metadata with no tables."""
    assert merge_catalog(d, []) == {}
    assert is_database(d) and load_catalog(d) == {}


def test_merge_adds_tables(d):
    """A later merge may add tables; earlier ones and their files stay."""
    merge_catalog(d, [IndexTable(1)])
    with open(os.path.join(d, "index1.tbl"), "wb") as f:
        f.write(b"keep")
    cat = merge_catalog(d, [ValueTable(2, 16)])
    assert cat == {1: IndexTable(1), 2: ValueTable(2, 16)} == load_catalog(d)
    assert os.path.getsize(os.path.join(d, "value2.tbl")) == 0
    with open(os.path.join(d, "index1.tbl"), "rb") as f:
        assert f.read() == b"keep"


def test_merge_same_definition_is_a_no_op(d):
    """Repeating an identical definition succeeds and does not rewrite the metadata."""
    merge_catalog(d, [IndexTable(1), ValueTable(2, 16)])
    meta = os.path.join(d, META_FILE)
    before = os.stat(meta)
    assert merge_catalog(d, [ValueTable(2, 16)]) == {1: IndexTable(1), 2: ValueTable(2, 16)}
    after = os.stat(meta)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


@pytest.mark.parametrize("first,second", [
    (IndexTable(1), ValueTable(1, 8)),
    (ValueTable(1, 8), IndexTable(1)),
    (ValueTable(1, 8), ValueTable(1, 9)),
])
def test_conflicting_redefinition_raises(d, first, second):
    """Redefining a table id with another kind or slot size is a TableError; nothing changes."""
    merge_catalog(d, [first])
    with open(os.path.join(d, META_FILE), "rb") as f:
        before = f.read()
    with pytest.raises(TableError, match="already defined"):
        merge_catalog(d, [second])
    with open(os.path.join(d, META_FILE), "rb") as f:
        assert f.read() == before
    assert load_catalog(d) == {1: first}


def test_conflict_within_one_merge(d):
    """Two definitions of one id in the same call conflict too, and nothing is written."""
    with pytest.raises(TableError):
        merge_catalog(d, [IndexTable(4), ValueTable(4, 8)])
    assert not is_database(d)


def test_merge_rejects_non_tables(d):
    """Anything but IndexTable/ValueTable in the wanted list is a TableError."""
    with pytest.raises(TableError):
        merge_catalog(d, [{"id": 1, "kind": "index"}])


def test_load_catalog_of_non_database(d):
    """A directory without mpwal.meta is a DatabaseError."""
    with pytest.raises(DatabaseError, match="not an mpwal database"):
        load_catalog(d)


def test_newer_format_version_refused(d):
    """Metadata of a newer on-disk format is a DatabaseError asking for an upgrade."""
    write_meta(d, {"mpwal": FORMAT_VERSION + 1, "tables": []})
    with pytest.raises(DatabaseError, match="upgrade"):
        load_catalog(d)
    with pytest.raises(DatabaseError):
        merge_catalog(d, [IndexTable(1)])


@pytest.mark.parametrize("raw", [
    b"",
    b"{",
    b"\xff\xfe not utf-8",
    b"null",
    b"[1, 2]",
    b'{"tables": []}',
    b'{"mpwal": 1}',
    b'{"mpwal": "1", "tables": []}',
    b'{"mpwal": 1, "tables": [{"id": 1}]}',
    b'{"mpwal": 1, "tables": [{"id": 1, "kind": "btree"}]}',
    b'{"mpwal": 1, "tables": [{"kind": "index"}]}',
    b'{"mpwal": 1, "tables": [{"id": 1, "kind": "value"}]}',
    b'{"mpwal": 1, "tables": [{"id": 1, "kind": "value", "slot_size": 0}]}',
    b'{"mpwal": 1, "tables": [{"id": 70000, "kind": "index"}]}',
    b'{"mpwal": 1, "tables": [{"id": "1", "kind": "index"}]}',
])
def test_damaged_meta_is_database_error(d, raw):
    """Unreadable or inconsistent metadata is a DatabaseError, never another exception."""
    write_meta(d, raw)
    with pytest.raises(DatabaseError):
        load_catalog(d)


@pytest.mark.parametrize("raw", [
    b'{"mpwal": 1, "tables": [1]}',
    b'{"mpwal": 1, "tables": [null]}',
    b'{"mpwal": 1, "tables": "ab"}',
])
def test_damaged_meta_non_object_table_entry(d, raw):
    """A table entry that is not a JSON object is damaged metadata: DatabaseError."""
    write_meta(d, raw)
    with pytest.raises(DatabaseError):
        load_catalog(d)


# -- the table files --------------------------------------------------------------------------

@pytest.fixture
def files(d):
    cat = merge_catalog(d, [IndexTable(1), ValueTable(2, 8)])
    tf = TableFiles(d, cat, writable=True)
    yield tf
    tf.close()


def test_value_write_read(files):
    """A written value reads back; the file holds u32 stored=len+1 then the bytes at i*stride."""
    files.write_value(2, 3, b"abc")
    assert files.read_value(2, 3) == b"abc"
    with open(os.path.join(files.path, "value2.tbl"), "rb") as f:
        raw = f.read()
    assert len(raw) == 3 * 12 + 4 + 3
    assert raw[36:40] == struct.pack("<I", 4) and raw[40:43] == b"abc"
    assert raw[:36] == bytes(36)


def test_value_empty_bytes_differs_from_none(files):
    """b'' is a stored (empty) value; None removes the value."""
    files.write_value(2, 0, b"")
    assert files.read_value(2, 0) == b""
    files.write_value(2, 0, None)
    assert files.read_value(2, 0) is None


def test_value_full_slot_and_overwrite_shorter(files):
    """A slot_size-long value fits; a shorter overwrite reads back without the old tail."""
    files.write_value(2, 1, b"12345678")
    files.write_value(2, 2, b"neighbor")
    assert files.read_value(2, 1) == b"12345678"
    files.write_value(2, 1, b"xy")
    assert files.read_value(2, 1) == b"xy"
    assert files.read_value(2, 2) == b"neighbor"


def test_value_removal_and_unwritten_slots(files):
    """Removed, never-written and past-EOF slots all read as None."""
    files.write_value(2, 5, b"v")
    files.write_value(2, 5, None)
    assert files.read_value(2, 5) is None
    assert files.read_value(2, 0) is None  # hole before a written slot
    assert files.read_value(2, 1000) is None  # past EOF


def test_chunk_write_read_and_zero_past_eof(files):
    """A chunk reads back whole; chunks past EOF are 512 zero bytes."""
    assert files.read_chunk(1, 7) == bytes(512)
    data = bytes(range(256)) * 2
    files.write_chunk(1, 2, data)
    assert files.read_chunk(1, 2) == data
    assert files.read_chunk(1, 0) == bytes(512)
    assert files.read_chunk(1, 3) == bytes(512)
    assert os.path.getsize(os.path.join(files.path, "index1.tbl")) == 3 * 512


def test_partial_chunk_padded_with_zeros(files):
    """A chunk cut short by the file's end is padded with zeros to 512 bytes."""
    with open(os.path.join(files.path, "index1.tbl"), "wb") as f:
        f.write(b"\x07" * 100)
    assert files.read_chunk(1, 0) == b"\x07" * 100 + bytes(412)


def test_drop_empties_the_file_and_tables_refill(files):
    """drop() empties a table without shrinking its file (a mapping reader would get SIGBUS):
    every slot reads empty, every chunk zero, through pread and through a mapping; later
    writes work again."""
    mapped = TableFiles(files.path, files.catalog, writable=False, mapped=True)
    files.write_chunk(1, 1, b"\x01" * 512)
    files.write_value(2, 4, b"gone")
    assert mapped.read_value(2, 4) == b"gone" and mapped.read_chunk(1, 1) == b"\x01" * 512
    sizes = [os.path.getsize(os.path.join(files.path, n)) for n in ("index1.tbl", "value2.tbl")]
    files.drop(1)
    files.drop(2)
    assert [os.path.getsize(os.path.join(files.path, n))
            for n in ("index1.tbl", "value2.tbl")] == sizes
    for f in (files, mapped):
        assert f.read_chunk(1, 1) == bytes(512) and f.read_value(2, 4) is None
    files.write_value(2, 0, b"new")
    files.write_value(2, 900, b"far")  # the file grows: the mapping follows
    assert mapped.read_value(2, 0) == b"new" and mapped.read_value(2, 900) == b"far"
    assert mapped.read_value(2, 10**6) is None  # past the end: never written
    mapped.close()


def test_read_only_handle_sees_writes_and_cannot_write(files):
    """A read-only TableFiles reads what the writable one wrote, and cannot write."""
    files.write_value(2, 1, b"shared")
    ro = TableFiles(files.path, files.catalog, writable=False)
    try:
        assert ro.read_value(2, 1) == b"shared"
        with pytest.raises(OSError):
            ro.write_value(2, 1, b"nope")
        files.drop(2)
        assert ro.read_value(2, 1) is None  # same file, truncated under the open handle
    finally:
        ro.close()


def test_sync_clears_dirty(files):
    """Writes mark their table dirty; sync() fsyncs and clears the set."""
    files.write_value(2, 0, b"a")
    files.write_chunk(1, 0, bytes(512))
    assert files.dirty == {1, 2}
    files.sync()
    assert files.dirty == set()


def test_missing_table_file_is_storage_error(d):
    """Opening a table whose file was removed is a StorageError (an OSError)."""
    from mpwal._errors import StorageError
    cat = merge_catalog(d, [IndexTable(1)])
    os.unlink(os.path.join(d, "index1.tbl"))
    tf = TableFiles(d, cat, writable=False)
    with pytest.raises(StorageError):
        tf.read_chunk(1, 0)


# -- check_key --------------------------------------------------------------------------------

CAT = {1: IndexTable(1), 2: ValueTable(2, 8)}


def test_check_key_returns_table():
    """A valid (table, key) pair returns the table, at both ends of the key range."""
    assert check_key(CAT, 1, 0, "index") is CAT[1]
    assert check_key(CAT, 1, CAT[1].max_key - 1, "index") is CAT[1]
    assert check_key(CAT, 2, CAT[2].max_key - 1, "value") is CAT[2]


@pytest.mark.parametrize("tid,kind", [(3, "index"), (0, "value"), ("1", "index"), (True, "index"),
                                      (1.0, "index"), (None, "value")])
def test_check_key_unknown_table(tid, kind):
    """An undefined table id, or one that is not an int, is a TableError."""
    with pytest.raises(TableError):
        check_key(CAT, tid, 0, kind)


def test_check_key_wrong_kind():
    """Using an index table as a value table (and back) is a TableError naming both kinds."""
    with pytest.raises(TableError, match="index table, not a value table"):
        check_key(CAT, 1, 0, "value")
    with pytest.raises(TableError, match="value table, not an index table"):
        check_key(CAT, 2, 0, "index")


@pytest.mark.parametrize("key", ["0", 1.0, None, True, False, b"\x00"])
def test_check_key_type(key):
    """A key that is not an int (bools included) is an ArgumentTypeError, also a TypeError."""
    with pytest.raises(ArgumentTypeError):
        check_key(CAT, 2, key, "value")
    with pytest.raises(TypeError):
        check_key(CAT, 1, key, "index")


@pytest.mark.parametrize("tid,key", [(1, -1), (1, (1 << 62) // 512), (2, -5), (2, (1 << 62) // 12),
                                     (2, 1 << 64)])
def test_check_key_range(tid, key):
    """A negative key or one at/after max_key is an ArgumentRangeError, also a ValueError."""
    kind = CAT[tid].kind
    with pytest.raises(ArgumentRangeError):
        check_key(CAT, tid, key, kind)
    with pytest.raises(ValueError):
        check_key(CAT, tid, key, kind)
