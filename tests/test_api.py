"""The public API in one process: records, reads, errors and misuse (issue 2 and issue 4 part 4)."""

from __future__ import annotations

import os
import stat

import pytest

import mpwal
from mpwal._overlay import stale_segments

TABLES = [mpwal.IndexTable(1), mpwal.ValueTable(3, slot_size=16)]


def snapshot(path):
    """Names, sizes and contents of every file: to show that something changed nothing."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def w(db):
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        yield w


def test_record_round_trip(w, db):
    """Values, removals and index entries committed in one record are read back everywhere."""
    with w.record() as rec:
        rec.insert_value(3, 42, b"payload")
        rec.insert_value(3, 43, b"")
        rec.insert_index(1, 7, 5, 0xDEAD)
        rec.insert_index(1, 7, 63, 2**64 - 1)
        assert rec.value(3, 42) == b"payload"  # its own uncommitted change
        assert rec.index_entry(1, 7, 5) == 0xDEAD
    assert rec.record_id == 1 and w.last_record_id == 1
    with mpwal.Reader(db) as r:
        assert r.mode == "shared-memory"
        assert r.value(3, 42) == b"payload"
        assert r.value(3, 43) == b""
        assert r.value(3, 44) is None
        assert r.values(3, [42, 43, 44]) == [b"payload", b"", None]
        assert r.index_entry(1, 7, 5) == 0xDEAD
        assert r.index_entry(1, 7, 63) == 2**64 - 1
        chunk = r.index_chunk(1, 7)
        assert len(chunk) == 512 and chunk[:40] == bytes(40)
        assert r.index_chunk(1, 8) == bytes(512)
        assert r.last_record_id == 1
        with w.record() as rec:
            rec.insert_value(3, 42, None)
        assert r.value(3, 42) is None
        assert r.last_record_id == 2


def test_record_discarded_when_block_raises(w, db):
    """A record whose block raises leaves no trace and takes no record id."""
    with pytest.raises(RuntimeError):
        with w.record() as rec:
            rec.insert_value(3, 1, b"x")
            raise RuntimeError("boom")
    assert w.value(3, 1) is None and w.last_record_id == 0
    with w.record() as rec:
        rec.insert_value(3, 1, b"y")
    assert rec.record_id == 1
    with pytest.raises(mpwal.ClosedError):
        rec.insert_value(3, 2, b"z")


def test_drop_table(w, db):
    """drop_table empties the table for readers once it commits; later inserts apply after it."""
    with w.record() as rec:
        rec.insert_value(3, 1, b"a")
        rec.insert_value(3, 2, b"b")
        rec.insert_index(1, 0, 0, 9)
    with mpwal.Reader(db) as r:
        with w.record() as rec:
            rec.insert_value(3, 9, b"before")  # discarded by the drop that follows
            rec.drop_table(3)
            rec.insert_value(3, 2, b"again")
            assert rec.value(3, 1) is None
        assert r.value(3, 1) is None and r.value(3, 9) is None
        assert r.value(3, 2) == b"again"
        assert r.index_entry(1, 0, 0) == 9
        with w.record() as rec:
            rec.drop_table(1)
        assert r.index_chunk(1, 0) == bytes(512)


def test_reopen_replays_and_adding_tables(db):
    """Records survive close and reopen; tables can be added, not redefined."""
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        with w.record() as rec:
            rec.insert_value(3, 5, b"five")
    with mpwal.Writer(db, [mpwal.ValueTable(4, slot_size=8)]) as w:
        assert w.value(3, 5) == b"five"
        assert w.last_record_id == 1
        with w.record() as rec:
            rec.insert_value(4, 0, b"new")
        assert rec.record_id == 2
    with pytest.raises(mpwal.TableError, match="already defined"):
        mpwal.Writer(db, [mpwal.ValueTable(3, slot_size=32)])
    with mpwal.Reader(db) as r:
        assert r.mode == "private"
        assert r.value(4, 0) == b"new" and r.value(3, 5) == b"five"


@pytest.mark.parametrize("call, exc", [
    (lambda rec: rec.insert_value(3, 0, "text"), mpwal.ArgumentTypeError),
    (lambda rec: rec.insert_value(3, "0", b"x"), mpwal.ArgumentTypeError),
    (lambda rec: rec.insert_value(3, -1, b"x"), mpwal.ArgumentRangeError),
    (lambda rec: rec.insert_value(3, 2**63, b"x"), mpwal.ArgumentRangeError),
    (lambda rec: rec.insert_value(3, 0, b"x" * 17), mpwal.ValueTooLargeError),
    (lambda rec: rec.insert_value(9, 0, b"x"), mpwal.TableError),
    (lambda rec: rec.insert_value(1, 0, b"x"), mpwal.TableError),
    (lambda rec: rec.insert_index(3, 0, 0, 1), mpwal.TableError),
    (lambda rec: rec.insert_index(1, 0, 64, 1), mpwal.ArgumentRangeError),
    (lambda rec: rec.insert_index(1, 0, -1, 1), mpwal.ArgumentRangeError),
    (lambda rec: rec.insert_index(1, 0, 0, 2**64), mpwal.ArgumentRangeError),
    (lambda rec: rec.insert_index(1, 0, 0, -1), mpwal.ArgumentRangeError),
    (lambda rec: rec.insert_index(1, 0, 0, 1.5), mpwal.ArgumentTypeError),
    (lambda rec: rec.insert_index(1, 0, True, 1), mpwal.ArgumentTypeError),
    (lambda rec: rec.insert_values(3, [(0, b"ok"), (1, b"x" * 99)]), mpwal.ValueTooLargeError),
    (lambda rec: rec.drop_table(77), mpwal.TableError),
    (lambda rec: rec.insert_values(3, [1, 2]), mpwal.ArgumentTypeError),
    (lambda rec: rec.insert_values(3, None), mpwal.ArgumentTypeError),
    (lambda rec: rec.insert_values(3, [(0, b"ok"), (1, "text")]), mpwal.ArgumentTypeError),
])
def test_bad_input_is_refused_and_changes_nothing(w, db, call, exc):
    """Each kind of bad argument raises its own mpwal exception; nothing reaches the log."""
    with w.record() as rec:
        rec.insert_value(3, 0, b"kept")
    before = w.last_record_id
    with pytest.raises(exc) as info:
        with w.record() as rec:
            call(rec)
    assert isinstance(info.value, mpwal.Error) and str(info.value)
    assert w.last_record_id == before and w.value(3, 0) == b"kept"


def test_bad_reader_arguments(w, db):
    """Readers validate their arguments like the writer does."""
    with mpwal.Reader(db) as r:
        with pytest.raises(mpwal.TableError):
            r.value(8, 0)
        with pytest.raises(mpwal.ArgumentRangeError):
            r.value(3, -5)
        with pytest.raises(mpwal.ArgumentTypeError):
            r.values(3, [1, "2"])
        with pytest.raises(mpwal.ArgumentRangeError):
            r.index_entry(1, 0, 64)
        with pytest.raises(mpwal.ArgumentTypeError):
            r.values(3, 5)


def test_use_after_close(db):
    """A closed Writer or Reader says so; closing twice is harmless."""
    w = mpwal.Writer(db, TABLES, enactor="none")
    rec = w.record()
    r = mpwal.Reader(db)
    w.close()
    w.close()
    r.close()
    for call in (w.record, lambda: w.value(3, 0), w.sync, w.stats, lambda: rec.commit(),
                 lambda: r.value(3, 0), lambda: r.index_chunk(1, 0), lambda: r.last_record_id):
        with pytest.raises(mpwal.ClosedError):
            call()


def test_second_writer_refused_at_once(w, db):
    """A second Writer on a directory raises WriterLockedError and changes nothing."""
    before = snapshot(db)
    with pytest.raises(mpwal.WriterLockedError, match="live writer"):
        mpwal.Writer(db, TABLES)
    assert snapshot(db) == before


def test_not_a_database(tmp_path):
    """A non-empty directory without metadata, or a newer format, is refused untouched."""
    d = tmp_path / "other"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(mpwal.DatabaseError, match="not an mpwal database"):
        mpwal.Writer(str(d), TABLES)
    assert os.listdir(d) == ["notes.txt"]
    with pytest.raises(mpwal.DatabaseError):
        mpwal.Reader(str(d))
    with pytest.raises(mpwal.DatabaseError):
        mpwal.Reader(str(tmp_path / "missing"))


def test_newer_format_refused(db):
    """A database written by a newer mpwal is refused with a hint to upgrade."""
    with mpwal.Writer(db, TABLES, enactor="none"):
        pass
    meta = os.path.join(db, "mpwal.meta")
    with open(meta) as f:
        text = f.read()
    with open(meta, "w") as f:
        f.write(text.replace('"mpwal": 2', '"mpwal": 99'))
    before = snapshot(db)
    with pytest.raises(mpwal.DatabaseError, match="upgrade"):
        mpwal.Writer(db, TABLES)
    with pytest.raises(mpwal.DatabaseError, match="upgrade"):
        mpwal.Reader(db)
    assert snapshot(db) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(db):
    """A directory without write permission gives StorageError, not a crash."""
    with mpwal.Writer(db, TABLES, enactor="none"):
        pass
    os.chmod(db, 0o500)
    try:
        with pytest.raises(mpwal.StorageError):
            mpwal.Writer(db, TABLES)
    finally:
        os.chmod(db, 0o700)


def test_read_only_directory_checked(db, monkeypatch):
    """The permission check runs even as root (simulated): StorageError, nothing created."""
    os.makedirs(db)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == os.path.realpath(db) else real_access(p, mode))
    with pytest.raises(mpwal.StorageError, match="permission"):
        mpwal.Writer(db, TABLES)
    assert os.listdir(db) == []


def test_bad_options(db):
    """Options are checked before anything is created."""
    for kwargs, exc in [({"durability": "sometimes"}, mpwal.ArgumentRangeError),
                        ({"enactor": "fiber"}, mpwal.ArgumentRangeError),
                        ({"log_size": "big"}, mpwal.ArgumentTypeError),
                        ({"log_age": -1}, mpwal.ArgumentRangeError),
                        ({"overlay_slots": 4}, mpwal.ArgumentRangeError),
                        ({"overlay_slots": 100}, mpwal.ArgumentRangeError),
                        ({"log_age": float("nan")}, mpwal.ArgumentRangeError)]:
        with pytest.raises(exc):
            mpwal.Writer(db, TABLES, **kwargs)
    assert not os.path.exists(db)
    with pytest.raises(mpwal.TableError):
        mpwal.Writer(db, ["table"])
    with pytest.raises(mpwal.TableError):
        mpwal.Writer(db, 5)
    with pytest.raises(mpwal.TableError):
        mpwal.ValueTable(1, slot_size=0)


def test_fork_child_cannot_use_writer(w, db):
    """After fork() the child gets ForkedError from the writer, keeps reading with a Reader, and
    its exit does not release the parent's lock or shared memory."""
    with w.record() as rec:
        rec.insert_value(3, 1, b"one")
    r = mpwal.Reader(db)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            try:
                with w.record():
                    pass
                code = 1
            except mpwal.ForkedError:
                pass
            if r.value(3, 1) != b"one":
                code = 2
            w.close()  # a no-op in the child
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with w.record() as rec:
        rec.insert_value(3, 2, b"two")
    assert r.value(3, 2) == b"two"
    with pytest.raises(mpwal.WriterLockedError):
        mpwal.Writer(db, TABLES)
    r.close()


def test_files_and_segments_owner_only(w, db):
    """Files and shared memory are created 0600 (owner only); the directory 0700."""
    with w.record() as rec:
        rec.insert_value(3, 1, b"x")
    w.sync()
    for name in os.listdir(db):
        mode = stat.S_IMODE(os.stat(os.path.join(db, name)).st_mode)
        assert mode & 0o077 == 0, (name, oct(mode))
    assert stat.S_IMODE(os.stat(db).st_mode) & 0o077 == 0
    (seg,) = stale_segments(os.path.realpath(db))
    assert stat.S_IMODE(os.stat("/dev/shm" + seg).st_mode) == 0o600


def test_reader_maps_read_only(w, db):
    """A reader's mapping (``OverlayReader``, what every Reader maps) refuses writes: readers
    cannot change shared memory."""
    from mpwal._overlay import OverlayReader
    seg = OverlayReader(w.stats()["segment"])
    try:
        with pytest.raises(TypeError):
            seg.m[0:1] = b"x"
        with pytest.raises(TypeError):
            seg.q[0] = 2
    finally:
        seg.release()


def test_clean_close_removes_segment(db):
    """No segment outlives a clean close (the db fixture also checks this after every test)."""
    w = mpwal.Writer(db, TABLES)
    real = os.path.realpath(db)
    assert len(stale_segments(real)) == 1
    w.close()
    assert stale_segments(real) == []


def test_reader_never_writes(w, db):
    """Opening and using a Reader changes no file (invariant 8), with and without a writer."""
    with w.record() as rec:
        rec.insert_value(3, 1, b"x")
    before = snapshot(db)
    with mpwal.Reader(db) as r:
        r.value(3, 1), r.index_chunk(1, 0), r.stats()
    assert snapshot(db) == before
    w.close()
    before = snapshot(db)
    with mpwal.Reader(db) as r:
        assert r.mode == "private" and r.value(3, 1) == b"x"
        r.stats()
    assert snapshot(db) == before


def test_stats(w, db):
    """stats() reports record ids, queues, overlay use and the generation on both sides."""
    with w.record() as rec:
        rec.insert_value(3, 1, b"x")
    s = w.stats()
    assert s["committed"] == 1 and s["overlay_entries"] == 1 and s["generation"] >= 1
    assert set(s["logs"]) == {"appending", "read", "cleanup", "pool"}
    with mpwal.Reader(db) as r:
        rs = r.stats()
        assert rs["committed"] == 1 and rs["generation"] == s["generation"]
        assert rs["overlay_entries"] == 1
