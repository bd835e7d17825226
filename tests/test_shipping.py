"""Shipping to NATS JetStream and following a stream (``mpwal ship``, ``mpwal follow``;
``mpwal/shipping/``), against a real ``nats-server -js`` on loopback that the test starts and
stops: the shipper SIGKILLed at random moments and started again leaves each record in the
stream once, in order; a follower killed and started again catches up, and its replica equals
the source slot by slot."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import mpwal
from nats_server import NatsServer

CTX = multiprocessing.get_context("spawn")
TABLES = [mpwal.ValueTable(3, 64), mpwal.IndexTable(1)]
KEYS = 400


@pytest.fixture
def nats_url(tmp_path):
    server = NatsServer(str(tmp_path / "nats-store"))
    yield server.url
    server.stop()


def _commit(w: mpwal.Writer, i: int) -> None:
    with w.record() as rec:
        rec.insert_value(3, i % KEYS, b"value %d" % i)
        if i % 4 == 0:
            rec.insert_index(1, i % 9, i % 64, i)


def _writing(db: str, count: int, out) -> None:
    with mpwal.Writer(db, TABLES, log_size=4096, log_age=0.05) as w:
        for i in range(1, count + 1):
            _commit(w, i)
            if i % 50 == 0:
                w.sync()
                time.sleep(0.002)
    out.put("done")


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mpwal", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _stream_record_ids(url: str, stream: str) -> list[int]:
    import nats

    async def go() -> list[int]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except Exception:  # deleted (a gap repaired)
                continue
            if msg.subject.endswith(".records"):
                out.append(int(msg.headers["Mpwal-Record-Id"]))
        await nc.close()
        return out
    return asyncio.run(go())


def _make_stream(url: str, stream: str) -> None:
    """The stream, made before the shipper does, with JetStream's shortest duplicate window
    (0.1 s): a shipper started again later cannot lean on de-duplication, only on resuming
    from what the stream holds."""
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(name=stream, subjects=["mpwal.>"], duplicate_window=0.1)
        await nc.close()
    asyncio.run(go())


def _same_state(a: str, b: str) -> None:
    with mpwal.Reader(a) as ra, mpwal.Reader(b) as rb:
        assert ra.last_record_id == rb.last_record_id
        assert ra.values(3, range(KEYS)) == rb.values(3, range(KEYS))
        for c in range(9):
            assert ra.index_chunk(1, c) == rb.index_chunk(1, c)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_ship_killed_at_random_and_a_follower_killed_once_end_exactly_equal(tmp_path, nats_url):
    src, rep = str(tmp_path / "src"), str(tmp_path / "replica")
    with mpwal.Writer(src, TABLES) as w, mpwal.Reader(src) as r:
        r.cursor("ship:S", start=0)  # the shipper's cursor, before the first record
        first = w.last_record_id
    assert first == 0
    count = 3000
    out = CTX.Queue()
    writer = CTX.Process(target=_writing, args=(src, count, out))
    writer.start()
    rng = random.Random(11)
    _make_stream(nats_url, "S")
    follower = _cli("follow", "--nats", nats_url, "--stream", "S", rep)
    try:
        for _ in range(6):  # the shipper killed at random moments while the writer commits
            p = _cli("ship", src, "--nats", nats_url, "--stream", "S")
            time.sleep(rng.uniform(0.2, 0.8))
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            time.sleep(0.15)  # past the duplicate window
            if _ == 2:  # and the follower once
                os.kill(follower.pid, signal.SIGKILL)
                follower.wait(10)
                follower = _cli("follow", "--nats", nats_url, "--stream", "S", rep)
        assert out.get(timeout=120) == "done"
        writer.join(30)
        p = _cli("ship", src, "--nats", nats_url, "--stream", "S", "--idle-exit", "1")
        assert p.wait(120) == 0, p.stderr.read() if p.stderr else ""
        ids = _stream_record_ids(nats_url, "S")
        with mpwal.Reader(src) as r:
            last = r.last_record_id
        assert ids == list(range(1, last + 1))  # each once, in order
        os.kill(follower.pid, signal.SIGKILL)
        follower.wait(10)
        f = _cli("follow", "--nats", nats_url, "--stream", "S", rep, "--idle-exit", "1")
        assert f.wait(120) == 0, f.stderr.read() if f.stderr else ""
    finally:
        for proc in (follower,):
            if proc.poll() is None:
                proc.kill()
        writer.join(30)
    _same_state(src, rep)


def test_a_key_value_directory_ships_and_its_replica_reads_the_same(tmp_path, nats_url):
    src, rep = str(tmp_path / "src"), str(tmp_path / "replica")
    with mpwal.KVWriter(src, log_size=4096, log_age=0.05) as kv:
        with mpwal.Reader(src, layer="kv") as r:  # (the engine's view of a key-value directory)
            r.cursor("ship:K", start=0)
        for i in range(300):
            with kv.batch() as b:
                b.put(b"key-%d" % i, b"v" * (i * 7))
                if i % 10 == 9:
                    b.delete(b"key-%d" % (i - 5))
        kv.put(b"big", b"B" * 100_000)
        kv.sync()
    from mpwal.shipping._follow import follow
    from mpwal.shipping._ship import ship
    assert ship(os.path.realpath(src), nats_url, "K", idle_exit=0.3, progress=None) == 0
    assert follow(nats_url, "K", rep, idle_exit=0.3, progress=None) == 0
    with mpwal.KVReader(src) as a, mpwal.KVReader(rep) as b:
        assert dict(a.items()) == dict(b.items()) and len(a) == len(b) == 271
        assert b[b"big"] == b"B" * 100_000
    with pytest.raises(mpwal.DatabaseError, match="is a replica .*only mpwal follow writes it"):
        mpwal.KVWriter(rep)  # read-only to everyone but its follower
    assert follow(nats_url, "K", rep, idle_exit=0.2, progress=None) == 0  # which goes on


def test_ship_says_what_to_do_when_records_were_cleaned_before_it_started(tmp_path, nats_url):
    src = str(tmp_path / "src")
    with mpwal.Writer(src, TABLES, log_size=2048, log_age=0.05) as w:
        for i in range(1, 300):
            _commit(w, i)
    from mpwal.shipping._ship import ship
    assert ship(os.path.realpath(src), nats_url, "X", idle_exit=0.2, progress=None) == 1


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_ship_rides_out_the_stream_leaders_death_in_a_three_node_cluster(tmp_path):
    """A stream of 3 replicas on a 3-node JetStream cluster on loopback; its leader is
    SIGKILLed while the shipper ships: no gap, no repeat, and the follower ends equal."""
    import nats
    from nats_server import cluster
    servers = cluster(str(tmp_path / "cluster"))
    urls = ",".join(s.url for s in servers)
    src, rep = str(tmp_path / "src"), str(tmp_path / "replica")
    shipper = None
    try:
        async def make_stream() -> None:
            nc = await nats.connect(servers=[s.url for s in servers])
            js = nc.jetstream()
            deadline = time.monotonic() + 30
            while True:  # until the cluster has elected its meta leader
                try:
                    await js.add_stream(name="R", subjects=["mpwal.>"], num_replicas=3)
                    break
                except Exception:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
            await nc.close()
        asyncio.run(make_stream())
        with mpwal.Writer(src, TABLES), mpwal.Reader(src) as r:
            r.cursor("ship:R", start=0)
        out = CTX.Queue()
        writer = CTX.Process(target=_writing, args=(src, 2000, out))
        writer.start()
        shipper = _cli("ship", src, "--nats", urls, "--stream", "R")
        time.sleep(1.0)

        async def leader() -> str:
            nc = await nats.connect(servers=[s.url for s in servers])
            info = await nc.jetstream().stream_info("R")
            await nc.close()
            return info.cluster.leader
        name = asyncio.run(leader())
        victim = next(s for i, s in enumerate(servers) if f"n{i}" == name)
        victim.proc.kill()
        victim.proc.wait(10)
        alive = [s for s in servers if s is not victim]
        assert out.get(timeout=120) == "done"
        writer.join(30)
        with mpwal.Reader(src) as r:
            last = r.last_record_id
        url = alive[0].url
        deadline = time.monotonic() + 90
        while True:
            try:
                ids = _stream_record_ids(url, "R")
            except Exception:  # the stream electing its new leader
                ids = []
            if ids and ids[-1] >= last:
                break
            assert time.monotonic() < deadline, f"the stream reached {ids[-1:]} of {last}"
            time.sleep(0.5)
        shipper.kill()
        shipper.wait(10)
        assert ids == list(range(1, last + 1)), shipper.stderr.read() if shipper.stderr else ""
        f = _cli("follow", "--nats", ",".join(s.url for s in alive), "--stream", "R", rep,
                 "--idle-exit", "1")
        assert f.wait(120) == 0, f.stderr.read() if f.stderr else ""
        _same_state(src, rep)
    finally:
        if shipper is not None:
            shipper.kill()
            shipper.wait(10)
        for s in servers:
            if s.proc.poll() is None:
                s.stop()
