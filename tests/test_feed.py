"""The change feed and its cursors (DESIGN "Change feed and shipping", ``mpwal/_feed.py``,
``mpwal/_retention.py``): every record once, in id order, across rotations, cleaning, writer
restarts (SIGKILL too) and overlay growth; durable records only by default; a cursor holds the
logs it needs, up to ``max_retained_bytes``, past which it is lost, loudly; a bare feed that
falls behind the cleaner says so."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import struct
import time

import crcmod.predefined
import pytest

import mpwal

CTX = multiprocessing.get_context("spawn")
TABLES = [mpwal.ValueTable(3, 64), mpwal.IndexTable(1)]
OPTS = dict(log_size=2048, log_age=0.05)  # logs rotate, are enacted and cleaned all the time
CRC = crcmod.predefined.mkCrcFun("crc-32")


def _commit(w: mpwal.Writer, i: int) -> int:
    with w.record() as rec:
        rec.insert_value(3, i % 500, b"value %d" % i)
        if i % 3 == 0:
            rec.insert_index(1, i % 7, i % 64, i)
        if i % 50 == 49:
            rec.drop_table(1)
    assert rec.record_id is not None
    return rec.record_id


def _wait_enacted(w: mpwal.Writer) -> None:
    w.rotate()
    deadline = time.monotonic() + 20
    while w.stats()["enacted"] < w.last_record_id or w.stats()["logs"]["read"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_feed_yields_every_record_once_in_order_with_its_changes(db):
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Reader(db) as r:
        cur = r.cursor("all")
        assert cur.position == 0
        for i in range(1, 301):
            assert _commit(w, i) == i
        w.sync()
        _wait_enacted(w)  # every log enacted and cleaned: kept only for the cursor
        got = list(cur.changes(timeout=0.2))
        assert [c.record_id for c in got] == list(range(1, 301))
        for c in got:
            i = c.record_id
            assert c.values == {(3, i % 500): b"value %d" % i}
            # (a drop discards the record's earlier changes to the table)
            assert c.index == ({(1, i % 7): {i % 64: i}} if i % 3 == 0 and i % 50 != 49 else {})
            assert c.drops == ((1,) if i % 50 == 49 else ())
            assert c.epoch >= 1
            # the record's bytes as the log holds them: BEGIN, its id, ..., END and the CRC
            assert c.data[0] == 1 and struct.unpack_from("<Q", c.data, 1)[0] == i
            assert struct.unpack("<I", c.data[-4:])[0] == CRC(c.data[:-4])
        cur.advance(300)
        assert cur.position == 300


def test_a_feed_without_a_cursor_that_falls_behind_the_cleaner_says_so(db):
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Reader(db) as r:
        for i in range(1, 200):
            _commit(w, i)
        w.sync()
        _wait_enacted(w)
        with pytest.raises(mpwal.CursorLostError, match="no longer retained") as e:
            next(r.changes(after=0, timeout=0.1))
        assert e.value.position == 0
        # from what is still there (nothing new) a feed just waits, and returns on its timeout
        start = time.monotonic()
        assert list(r.changes(after=w.last_record_id, timeout=0.2)) == []
        assert time.monotonic() - start >= 0.2


def test_durable_feeds_wait_for_the_fsync_and_relaxed_ones_do_not(db):
    with mpwal.Writer(db, TABLES, log_size=1 << 20, log_age=3600) as w, mpwal.Reader(db) as r:
        before = w.stats()["durable"]
        rid = _commit(w, 1)
        assert w.stats()["durable"] == before < rid
        assert [c.record_id for c in r.changes(after=rid - 1, timeout=0.1, durable=False)] == [rid]
        assert list(r.changes(after=rid - 1, timeout=0.1)) == []  # not on disk yet
        w.sync()
        assert [c.record_id for c in r.changes(after=rid - 1, timeout=0.1)] == [rid]


def test_a_following_feed_sees_records_as_they_commit_across_growth_and_a_writer_restart(db):
    """One feed, read while the writer commits, grows its overlay and is closed and opened
    again: every record once, in order; the epoch moves with the writer."""
    w = mpwal.Writer(db, TABLES, overlay_slots=16, overlay_bytes=4096, **OPTS)
    r = mpwal.Reader(db)
    cur = r.cursor("follower")
    seen: list[mpwal.Change] = []
    feed = cur.changes(timeout=20.0)  # (a loaded machine: the feed must not give up early)
    for i in range(1, 151):
        _commit(w, i)
        if i % 10 == 0:
            w.sync()
            while not seen or seen[-1].record_id < i:
                seen.append(next(feed))
    assert w.stats()["generation"] > 1  # it grew
    w.close()
    w = mpwal.Writer(db, TABLES, **OPTS)
    for i in range(151, 201):
        _commit(w, i)
    w.sync()
    seen += [c for c in cur.changes(timeout=0.3) if c.record_id > seen[-1].record_id]
    assert [c.record_id for c in seen] == list(range(1, 201))
    assert seen[-1].epoch > seen[0].epoch
    r.close()
    w.close()


def _ingest_then_die(db: str, count: int, out) -> None:
    w = mpwal.Writer(db, TABLES, durability="commit", **OPTS)
    for i in range(1, count + 1):
        out.put(_commit(w, i))
    out.put("done")
    time.sleep(60)  # killed here


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_a_cursor_keeps_its_records_through_a_sigkilled_writers_replay(db):
    with mpwal.Writer(db, TABLES, **OPTS):
        pass
    with mpwal.Reader(db) as r:
        r.cursor("c")  # made before the writer ingests: it holds everything after 0
    out = CTX.Queue()
    p = CTX.Process(target=_ingest_then_die, args=(db, 300, out))
    p.start()
    assert out.get(timeout=60) == 1
    while out.get(timeout=60) != "done":
        pass
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Reader(db) as r:  # replays, empties logs
        assert w.last_record_id == 300
        got = [c.record_id for c in r.cursor("c").changes(timeout=0.3)]
        assert got == list(range(1, 301))


def test_past_max_retained_bytes_the_slowest_cursor_is_lost_loudly(db, caplog):
    caplog.set_level(logging.WARNING, logger="mpwal")
    with mpwal.Writer(db, TABLES, max_retained_bytes=20_000, **OPTS) as w, mpwal.Reader(db) as r:
        slow, fast = r.cursor("slow"), r.cursor("fast")
        for i in range(1, 2001):
            _commit(w, i)
            if i % 100 == 0:
                fast.advance(w.last_record_id - 50)
        w.sync()
        _wait_enacted(w)
        with pytest.raises(mpwal.CursorLostError, match="max_retained_bytes=20000") as e:
            print(slow.position)
        assert e.value.position == 0
        with pytest.raises(mpwal.CursorLostError):
            next(slow.changes(timeout=0.1))
        assert "cursor 'slow'" in caplog.text and "dropped at record 0" in caplog.text
        got = [c.record_id for c in fast.changes(timeout=0.2)]
        assert got == list(range(fast.position + 1, 2001))  # the fast one kept what it needs
        slow.delete()
        assert r.cursor("slow").position == w.last_record_id  # made again, at the end


def test_cleaning_keeps_only_what_a_cursor_has_not_passed(db):
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Reader(db) as r:
        cur = r.cursor("c")
        for i in range(1, 401):
            _commit(w, i)
        w.sync()
        _wait_enacted(w)
        feed_dir = os.path.join(db, "feed")
        assert os.listdir(feed_dir)
        cur.advance(200)
        for i in range(401, 420):  # more cleaning: what the cursor passed goes
            _commit(w, i)
        _wait_enacted(w)
        deadline = time.monotonic() + 10  # (the enactor prunes just after it cleans)
        while True:
            lasts = [int(n.split("-")[1].split(".")[0]) for n in os.listdir(feed_dir)]
            if lasts and min(lasts) > 200:  # every kept log still has a record after 200
                break
            assert time.monotonic() < deadline, lasts
            time.sleep(0.01)
        assert [c.record_id for c in cur.changes(timeout=0.2)] == list(range(201, 420))


def test_inspect_lists_cursors_and_what_they_keep(db, capsys):
    from mpwal.tools import cli
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Reader(db) as r:
        r.cursor("replica")
        for i in range(1, 100):
            _commit(w, i)
    assert cli.main(["inspect", db]) == 0
    out = capsys.readouterr().out
    assert "cursor 'replica': at record 0, live" in out and "logs kept for them" in out


def test_a_bare_feed_changes_nothing_on_disk(db):
    with mpwal.Writer(db, TABLES, **OPTS) as w:
        for i in range(1, 50):
            _commit(w, i)
    before = {n: open(os.path.join(db, n), "rb").read() for n in os.listdir(db)
              if os.path.isfile(os.path.join(db, n))}
    with mpwal.Reader(db) as r:
        list(r.changes(after=49, timeout=0.05))
    after = {n: open(os.path.join(db, n), "rb").read() for n in os.listdir(db)
             if os.path.isfile(os.path.join(db, n))}
    assert before == after


def test_bad_arguments(db):
    with mpwal.Writer(db, TABLES, **OPTS), mpwal.Reader(db) as r:
        with pytest.raises(mpwal.ArgumentRangeError):
            r.changes(after=-1)
        with pytest.raises(mpwal.ArgumentRangeError):
            r.cursor("")
        with pytest.raises(mpwal.ArgumentRangeError):
            r.cursor("c").advance(-5)
    with pytest.raises(mpwal.ArgumentRangeError):
        mpwal.Writer(db, TABLES, max_retained_bytes=-1)


def test_records_longer_than_a_read_and_many_in_one_log(db):
    """The feed reads a log a chunk at a time: a record longer than the chunk, and many records
    in one long log, come whole and once."""
    big = [mpwal.ValueTable(5, 4 << 20)]
    with mpwal.Writer(db, big, log_size=64 << 20, log_age=3600) as w, mpwal.Reader(db) as r:
        sizes = [10, 3 << 20, 100, (2 << 20) + 7, 5]
        for i, n in enumerate(sizes):
            with w.record() as rec:
                rec.insert_value(5, i, bytes([i]) * n)
        for i in range(3000):
            with w.record() as rec:
                rec.insert_value(5, 100 + i, b"x" * 1000)
        w.sync()
        got = list(r.changes(timeout=0.2))
        assert [c.record_id for c in got] == list(range(1, 3006))
        assert [len(got[i].values[(5, i)]) for i in range(5)] == sizes
