"""Producers (DESIGN "Producers", ``mpwal/_wire.py``): records committed through the writer
from other processes, exactly once and in each producer's order, across SIGKILLs of producers
and of the writer; errors raised at the call; a malformed submission refused; the writer's disk
failing while producers wait."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
import zlib

import pytest

import mpwal
from producer_procs import (DATA, SPAN, TABLES, checking_reader, kv_key, kv_producing, payload,
                            producing, serving_kv_writer, serving_writer)

CTX = multiprocessing.get_context("spawn")
RESERVED = 65535  # the producers' table (a slot per (producer, seq), slot 0 the id counter)
OPTS = dict(log_size=1 << 16, log_age=0.05)


def test_a_producer_commits_through_the_writer(db):
    with mpwal.Writer(db, [*TABLES, mpwal.IndexTable(1)], **OPTS) as w, \
            mpwal.Producer(db, timeout=5) as p:
        with p.record() as rec:
            rec.insert_value(DATA, 42, b"payload")
            rec.insert_index(1, 7, 5, 0xDEAD)
        assert rec.record_id == w.last_record_id and p.producer_id == 1
        assert w.value(DATA, 42) == b"payload" and w.index_entry(1, 7, 5) == 0xDEAD
        with p.record() as rec:  # reads through to what is committed, and its own changes
            assert rec.value(DATA, 42) == b"payload" and rec.index_entry(1, 7, 5) == 0xDEAD
            rec.insert_value(DATA, 42, None)
            rec.drop_table(1)
            assert rec.value(DATA, 42) is None and rec.index_entry(1, 7, 5) == 0
        assert w.value(DATA, 42) is None and w.index_entry(1, 7, 5) == 0
        with mpwal.Reader(db) as r:
            assert r.last_record_id == w.last_record_id and r.value(DATA, 42) is None
        assert p.sync() == w.last_record_id
        assert w.stats()["producers"] == 1


def test_bad_input_raises_in_the_producer_and_nothing_reaches_the_writer(db):
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Producer(db, timeout=5) as p:
        before = w.last_record_id
        for change, error in [
            (lambda rec: rec.insert_value(DATA, 1, b"x" * 65), mpwal.ValueTooLargeError),
            (lambda rec: rec.insert_value(9, 1, b"x"), mpwal.TableError),
            (lambda rec: rec.insert_value(RESERVED, 64, b"x" * 16), mpwal.TableError),
            (lambda rec: rec.insert_value(DATA, -1, b"x"), mpwal.ArgumentRangeError),
            (lambda rec: rec.insert_value(DATA, 1, "text"), mpwal.ArgumentTypeError),
        ]:
            with pytest.raises(error):
                with p.record() as rec:
                    change(rec)
        assert w.last_record_id == before  # nothing was sent
        p.close()
        with pytest.raises(mpwal.ClosedError):
            p.record()


def test_the_reserved_table_cannot_be_defined_by_a_user(db):
    with pytest.raises(mpwal.TableError, match="reserved"):
        mpwal.Writer(db, [mpwal.ValueTable(RESERVED, 16)])


def test_no_writer_raises_after_the_timeout(db):
    with mpwal.Writer(db, TABLES, **OPTS):
        pass
    with mpwal.Producer(db, timeout=0.3) as p:
        start = time.monotonic()
        with pytest.raises(mpwal.NoWriterError, match="nothing was sent"):
            with p.record() as rec:
                rec.insert_value(DATA, 1, b"x")
        assert time.monotonic() - start >= 0.3
    with pytest.raises(mpwal.NoWriterError, match="not an mpwal database"):
        mpwal.Producer(db + "-none", timeout=0.2)


def test_a_producer_waits_for_a_writer_that_starts_later(db):
    with mpwal.Writer(db, TABLES, **OPTS):
        pass
    p = mpwal.Producer(db, timeout=20)
    got: list = []
    t = threading.Thread(target=lambda: got.append(_commit(p, 5, b"late")))
    t.start()
    time.sleep(0.3)
    with mpwal.Writer(db, TABLES, **OPTS) as w:
        t.join(20)
        assert got and got[0] == w.last_record_id and w.value(DATA, 5) == b"late"
    p.close()


def _commit(p: mpwal.Producer, index: int, data: bytes) -> int:
    with p.record() as rec:
        rec.insert_value(DATA, index, data)
    assert rec.record_id is not None
    return rec.record_id


def test_threads_of_one_producer_and_durable_commits(db):
    with mpwal.Writer(db, TABLES, **OPTS) as w, mpwal.Producer(db, durability="commit") as p:
        rids: dict[int, list[int]] = {t: [] for t in range(4)}

        def run(t: int) -> None:
            for i in range(50):
                rids[t].append(_commit(p, t * SPAN + i, payload(t, i)))

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        every = [r for t in rids for r in rids[t]]
        assert len(set(every)) == 200 and all(rids[t] == sorted(rids[t]) for t in rids)
        assert w.stats()["durable"] >= max(every)  # each was on disk when it returned
        for t in range(4):
            assert w.value(DATA, t * SPAN + 49) == payload(t, 49)


def test_kv_producer_puts_deletes_and_batches(db):
    with mpwal.KVWriter(db, log_size=1 << 16) as kv, mpwal.KVProducer(db, timeout=5) as kp:
        rid = kp.put(b"k", b"v")
        assert kv.get(b"k") == b"v" and rid == kv.last_record_id
        with kp.batch() as b:
            b.put(b"a", b"1")
            b.put(b"big", b"z" * 100_000)
            b.delete(b"k")
        assert b.record_id == kv.last_record_id
        assert kv.get(b"k") is None and kv.get(b"a") == b"1" and kv.get(b"big") == b"z" * 100_000
        assert kp.get(b"a") == b"1" and kp[b"big"] == b"z" * 100_000 and b"k" not in kp
        assert kp.delete(b"missing") == kv.last_record_id  # a record even so
        with pytest.raises(mpwal.TableError):
            kp.put(b"k", b"v", column="nope")
        with pytest.raises(mpwal.ArgumentTypeError):
            kp.put("k", b"v")  # type: ignore[arg-type]
        assert len(kv) == 2
    with pytest.raises(mpwal.DatabaseError, match="key-value"):
        mpwal.Producer(db, timeout=1)


# -- the protocol, by hand (the frames as mpwal/_wire.py specifies them) -------------------------

def _socket_name(path: str) -> bytes:
    import hashlib
    import json
    with open(os.path.join(path, "mpwal.meta")) as f:
        ident = bytes.fromhex(json.load(f)["database_id"])
    real = os.path.realpath(path)
    return b"\0mpwal-" + hashlib.blake2b(real.encode() + ident, digest_size=12).hexdigest().encode()


def _frame(kind: int, payload_: bytes) -> bytes:
    return struct.pack("<IB", len(payload_) + 1, kind) + payload_


def _hello(path: str, producer: int = 0) -> bytes:
    import json
    with open(os.path.join(path, "mpwal.meta")) as f:
        ident = bytes.fromhex(json.load(f)["database_id"])
    return _frame(1, struct.pack("<4sH16sQI", b"MPWP", 1, ident, producer, 0))


def _read_frame(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 5:
        head += s.recv(5 - len(head))
    length, kind = struct.unpack("<IB", head)
    body = b""
    while len(body) < length - 1:
        body += s.recv(length - 1 - len(body))
    return kind, body


def _record(entries: bytes) -> bytes:
    body = struct.pack("<BQ", 1, 0) + entries + b"\x04"
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("bad", ["garbage", "huge-length", "bad-crc", "bad-table", "torn-then-close",
                                 "submit-before-hello"])
def test_a_malformed_submission_is_refused_and_the_writer_goes_on(db, bad, caplog):
    with mpwal.Writer(db, TABLES, **OPTS) as w:
        before = w.last_record_id
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(_socket_name(db))
        if bad != "submit-before-hello":
            s.sendall(_hello(db))
            kind, _ = _read_frame(s)
            assert kind == 3  # WELCOME
        good_value = struct.pack("<BHQI", 3, DATA, 7, 2) + b"ok"
        frames = {
            "garbage": b"\x07" * 64,
            "huge-length": struct.pack("<IB", 0xFFFFFFF0, 2),
            "bad-crc": _frame(2, struct.pack("<QBB", 1, 0, 0) + _record(good_value)[:-1] + b"\0"),
            "bad-table": _frame(2, struct.pack("<QBB", 1, 0, 0) + _record(
                struct.pack("<BHQI", 3, 77, 7, 2) + b"no")),
            "torn-then-close": _frame(2, struct.pack("<QBB", 1, 0, 0) + _record(good_value))[:-3],
            "submit-before-hello": _frame(2, struct.pack("<QBB", 1, 0, 0) + _record(good_value)),
        }
        s.sendall(frames[bad])
        if bad in ("bad-crc", "bad-table"):
            kind, body = _read_frame(s)
            assert kind == 5  # REFUSED, naming the error the writer's API raises
            seq, rid, n = struct.unpack_from("<QQB", body)
            name = body[17:17 + n].decode()
            assert (seq, rid) == (1, 0) and name == ("TableError" if bad == "bad-table" else "ArgumentTypeError")
        s.close()
        time.sleep(0.2)
        # nothing of it is in the log (HELLO of a new producer commits its registration)
        assert w.value(DATA, 7) is None
        assert w.last_record_id == before + (0 if bad == "submit-before-hello" else 1)
        with mpwal.Producer(db, timeout=5) as p:  # and the writer serves producers still
            assert _commit(p, 8, b"fine") == w.last_record_id


# -- real processes, SIGKILL ---------------------------------------------------------------------

def _start_writer(db: str, options: dict | None = None, serve=serving_writer):
    out, stop = CTX.Queue(), CTX.Event()
    proc = CTX.Process(target=serve, args=(db, out, stop, options or {}))
    proc.start()
    msg = out.get(timeout=60)
    assert msg[0] == "open"
    return proc, out, stop


class _Producers:
    """Producer processes and what each acknowledged: {number: [(i, record id), ...]}."""

    def __init__(self, db: str, count: int, durabilities: list[str], per_record: int = 1,
                 held: tuple[int, ...] = (), kv: bool = False) -> None:
        self.acks: dict[int, list[tuple[int, int]]] = {n: [] for n in range(len(durabilities))}
        self.done: set[int] = set()
        self.errors: list[str] = []
        self.pipes, self.procs = [], []
        self.start = CTX.Event()  # the producers in ``held`` wait for it
        for n, durability in enumerate(durabilities):
            ours, theirs = CTX.Pipe()
            if kv:
                p = CTX.Process(target=kv_producing, args=(db, n, count, theirs, durability))
            else:
                p = CTX.Process(target=producing, args=(db, n, count, theirs, durability, per_record,
                                                        self.start if n in held else None))
            p.start()
            self.pipes.append(ours)
            self.procs.append(p)

    def poll(self, seconds: float = 0.02) -> None:
        deadline = time.monotonic() + seconds
        while True:
            for n, pipe in enumerate(self.pipes):
                try:
                    while pipe.poll():
                        kind, a, b = pipe.recv()
                        if kind == "ack":
                            self.acks[n].append((a, b))
                        elif kind == "done":
                            self.done.add(n)
                        else:
                            self.errors.append(f"producer {n}: {a}")
                except (EOFError, OSError):
                    pass  # killed
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def wait(self, until, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out: {self.errors}, done {self.done}"
            assert not self.errors, self.errors
            self.poll()

    def wait_for_stall(self, n: int) -> None:
        """Until producer ``n`` got no answer for a second (a stalled fsync holds its commit)."""
        last, since = len(self.acks[n]), time.monotonic()
        while time.monotonic() - since < 1.0:
            self.poll(0.05)
            if len(self.acks[n]) != last:
                last, since = len(self.acks[n]), time.monotonic()
            assert n not in self.done, "no fsync stalled"

    def kill(self, n: int) -> None:
        os.kill(self.procs[n].pid, signal.SIGKILL)
        self.procs[n].join(30)
        self.poll()

    def join(self) -> None:
        for p in self.procs:
            p.join(60)


def _check_exactly_once(db: str, producers: _Producers, count: int, killed: set[int]) -> None:
    """Every acknowledged record is there once, in its producer's order; the record ids count
    exactly the registrations and the submissions whose slots are there (a duplicate would be an
    extra id)."""
    with mpwal.Reader(db) as r:
        present = 0
        every_rid: list[int] = []
        for n, acks in producers.acks.items():
            got = r.values(DATA, [n * SPAN + i for i in range(count)])
            k = sum(1 for v in got if v is not None)
            assert got[:k] == [payload(n, i) for i in range(k)] and all(v is None for v in got[k:])
            assert [i for i, _ in acks] == list(range(len(acks)))
            if n in killed:
                assert len(acks) <= k <= len(acks) + 1  # its one in flight may have committed
            else:
                assert k == count == len(acks)
            rids = [rid for _, rid in acks]
            assert rids == sorted(rids)
            every_rid += rids
            present += k
        # (a registration is durable before its id is given: a writer killed in between used
        # an id nobody got, and the producer registers again)
        registrations = struct.unpack("<Q", r.value(RESERVED, 0))[0] - 1
        assert registrations >= len(producers.acks)
        assert len(set(every_rid)) == len(every_rid)
        assert r.last_record_id == registrations + present


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_sigkill_of_a_producer_and_of_the_writer_commits_each_acknowledged_record_once(db):
    count = 400
    writer, out, stop = _start_writer(db)
    producers = _Producers(db, count, ["relaxed", "relaxed", "commit", "commit"])
    rout, rstop = CTX.Queue(), CTX.Event()
    reader = CTX.Process(target=checking_reader, args=(db, 4, rout, rstop))
    reader.start()
    try:
        producers.wait(lambda: len(producers.acks[3]) >= 60)
        producers.kill(3)
        total = lambda: sum(len(a) for a in producers.acks.values())  # noqa: E731
        producers.wait(lambda: total() >= 500)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        time.sleep(0.3)  # producers wait with commits in flight
        writer, out, stop = _start_writer(db)
        producers.wait(lambda: producers.done >= {0, 1, 2})
        rstop.set()
        reads, errors = rout.get(timeout=60)
        assert not errors and reads > 0
    finally:
        rstop.set()
        stop.set()
        writer.join(60)
        reader.join(30)
        producers.join()
    _check_exactly_once(db, producers, count, killed={3})


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_writer_killed_during_a_group_commits_fsync_answers_from_the_log(db, monkeypatch):
    """The writer's 60th fsync stalls (fault switch): a durable producer's record is committed
    (in the log) and waits for it, unanswered, when the writer is SIGKILLed. The next writer
    replays it, and its WELCOME tells the producer it committed: it is not committed twice.
    Then a relaxed producer joins, and the writer is killed at random moments."""
    import random
    rng = random.Random(5)
    count = 300
    monkeypatch.setenv("MPWAL_FAULTS", "fsync:60:stall")
    writer, out, stop = _start_writer(db, {"enactor": "none"})  # (an enactor thread's fsyncs
    # would count too, and its stall would hold no commit)
    monkeypatch.delenv("MPWAL_FAULTS")
    producers = _Producers(db, count, ["relaxed", "commit"], per_record=20, held=(0,))
    try:
        producers.wait(lambda: len(producers.acks[1]) >= 5)
        producers.wait_for_stall(1)
        stalled_at = len(producers.acks[1])
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        writer, out, stop = _start_writer(db)
        producers.wait(lambda: len(producers.acks[1]) > stalled_at)
        producers.start.set()
        for _ in range(3):
            time.sleep(rng.uniform(0.1, 0.5))
            producers.poll()
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(30)
            writer, out, stop = _start_writer(db)
        producers.wait(lambda: producers.done == {0, 1})
    finally:
        stop.set()
        writer.join(60)
        producers.join()
    _check_exactly_once(db, producers, count, killed=set())


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_kv_producers_batches_are_committed_once_across_writer_kills(db, monkeypatch):
    """KVProducer batches (planned by the writer: the LAYER path) through a KVWriter killed
    during a stalled group-commit fsync and then at random: each batch once, in order."""
    import random
    rng = random.Random(9)
    count = 150
    monkeypatch.setenv("MPWAL_FAULTS", "fsync:40:stall")
    writer, out, stop = _start_writer(db, {"enactor": "none"}, serving_kv_writer)
    monkeypatch.delenv("MPWAL_FAULTS")
    producers = _Producers(db, count, ["commit", "relaxed"], kv=True)
    try:
        producers.wait_for_stall(0)
        for _ in range(3):
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(30)
            writer, out, stop = _start_writer(db, {}, serving_kv_writer)
            time.sleep(rng.uniform(0.1, 0.4))
            producers.poll()
        producers.wait(lambda: producers.done == {0, 1})
    finally:
        stop.set()
        writer.join(60)
        producers.join()
    with mpwal.KVReader(db) as kv:
        for n in (0, 1):  # the last two keys of each producer, the others deleted
            assert [kv.get(kv_key(n, i)) for i in (count - 2, count - 1)] == \
                [payload(n, i) * 50 for i in (count - 2, count - 1)]
            assert kv.get(kv_key(n, count - 3)) is None
        assert len(kv) == 4
        rids = [rid for n in (0, 1) for _, rid in producers.acks[n]]
        assert len(set(rids)) == 2 * count
        last_rid = kv.last_record_id
    with mpwal.Reader(db, layer="kv") as r:
        registrations = struct.unpack("<Q", r.value(RESERVED, 0))[0] - 1
    assert registrations >= 2 and last_rid == registrations + 2 * count  # none twice


def test_the_writers_disk_failing_reaches_waiting_producers_and_loses_nothing(db):
    """The fault switch fails a log write in the writer (this process) while producer processes
    commit: they get the writer's error (StorageError, then WriterFailedError), and after a new
    writer opens every acknowledged record is there."""
    from mpwal import _fileio as fileio
    w = mpwal.Writer(db, TABLES, enactor="none", **OPTS)  # (no enactor thread to meet the fault)
    producers = _Producers(db, 10_000, ["relaxed", "commit"])
    try:
        producers.wait(lambda: min(len(a) for a in producers.acks.values()) >= 20)
        fileio.arm(fileio.FaultPlan("write", 3))
        producers.wait(lambda: len(producers.errors) == 2, timeout=60)
        assert all("StorageError" in e or "WriterFailedError" in e for e in producers.errors)
    finally:
        fileio.arm(None)
        producers.join()
        w.close()
    with mpwal.Writer(db, TABLES, **OPTS) as w:
        for n, acks in producers.acks.items():
            for i, _ in acks:
                assert w.value(DATA, n * SPAN + i) == payload(n, i)
