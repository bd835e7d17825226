#!/usr/bin/env python3
"""Benchmarks: mpwal beside SQLite (WAL mode) and LMDB, on the same workloads, in one run.

    python scripts/bench.py              # every figure, full sizes (several minutes)
    python scripts/bench.py --quick      # every figure, small sizes (a minute or two on 2 cores)
    python scripts/bench.py --only ingest,reads --markdown

Figures (``--only`` takes these names or their numbers):

1. ``ingest``    records of 1, 100 and 1000 values of 100 bytes, as fast as one thread commits
                 them: mpwal durability="relaxed", SQLite synchronous=NORMAL, LMDB sync off.
2. ``commit``    durable commits of 1-value records, 1 and 4 threads: mpwal durability="commit"
                 (group commit), SQLite synchronous=FULL (one connection per thread), LMDB sync on.
3. ``reads``     random point reads in 1 and 2 reader processes while a writer process ingests:
                 lookups/s per reader process, one key at a time and in batches of 100.
4. ``large``     64 KiB values, MB/s, beside a plain file fsynced as mpwal fsyncs its log
                 (every 64 MiB or every second).
5. ``sustained`` ingestion for a minute (5 s with --quick) with enactment running; the directory's
                 disk usage and mpwal's /dev/shm usage at the end, and the resident memory
                 (VmRSS) of the writing process (a fresh one per system) at the start and at the
                 end of the timed run.
6. ``lookups``   point lookups in one process with the writer idle: mpwal answers every one from
                 the overlay in shared memory (the reader's best case).
7. ``latency``   p50, p99 and max of each call's duration (time.perf_counter_ns), in µs: commits of
                 1 and 100 values paced at half each system's own peak rate (mpwal relaxed, SQLite
                 NORMAL, LMDB sync off), durable 1-value commits back to back (mpwal commit,
                 SQLite FULL, LMDB sync on), and a reader process's value() and values() of 100
                 keys while a writer process ingests records of 100.
8. ``kv``        the key-value layer (mpwal.KVWriter/KVReader): 16-byte random keys, 100-byte
                 values, batches of 100 over a keyspace of a million keys (100,000 with --quick),
                 beside SQLite (a WITHOUT ROWID table, WAL, NORMAL) and LMDB (sync off); then
                 gets of written keys from another process (a read transaction per get for
                 LMDB), and the disk each system used per key written.
9. ``producers`` 4 processes commit at once: mpwal producers of one writer, SQLite connections,
                 LMDB writers; records of 100 values (relaxed / NORMAL / sync off) and durable
                 1-value records (commit / FULL / sync on); each commit's p50 and p99.
10. ``shipping``  ``mpwal ship`` to a local nats-server -js: records/s of 1 KiB records, and the
                 replication lag source → replica (p50, p99) at 1,000 records/s.

Every figure runs mpwal on its default backend and, when that is the native one, again on the
Python backend ("…, Python backend" rows). Every timed loop runs for a fixed time and counts
what it finished (time.perf_counter). The column mpwal/this compares each row with mpwal's
first row of the same workload (the default configuration, native backend): on the table's
first column, mpwal's rate divided by the row's; in figure 7, the row's p99 divided by mpwal's.
Either way, above 1 mpwal is faster. Each workload gets a fresh temporary directory, removed
afterwards; mpwal writers are closed so their shared memory is unlinked. Nothing here asserts
on timings.

LMDB is optional (``pip install mpwal[bench]``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mpwal
from mpwal import _backend

lmdb: Any  # the optional binding, or None (imported so that mypy types it the same either way)
try:
    lmdb = importlib.import_module("lmdb")
    LMDB_MISSING = None
except ImportError:
    lmdb = None
    LMDB_MISSING = "lmdb not installed (pip install mpwal[bench])"


def _optional(name: str) -> tuple[Any, str | None]:
    """An optional system of figure 8 (the ``bench`` extra), or None and why it is missing."""
    try:
        return importlib.import_module(name), None
    except ImportError:
        return None, f"{name} not installed (pip install mpwal[bench])"


diskcache, DISKCACHE_MISSING = _optional("diskcache")
ultradict_mod, ULTRADICT_MISSING = _optional("UltraDict")

VALUE_TABLE = 3        # mpwal table for the 100-byte values
LARGE_TABLE = 4        # mpwal table for the 64 KiB values
SMALL = 100            # bytes per value, figures 1, 2, 3, 5
LARGE = 64 << 10       # bytes per value, figure 4
FILE_FSYNC_EVERY = 64 << 20   # the plain file's fsync period: mpwal's log_size default …
FILE_FSYNC_AGE = 1.0          # … and log_age default
LMDB_MAP_SIZE = 1 << 36       # address space only; the file grows as data is written
FILL = bytes(random.Random(1).randrange(256) for _ in range(SMALL - 8))
BIG_FILL = random.Random(2).randbytes(LARGE - 8)
FILL_KV = random.Random(3).randbytes(SMALL)  # the key-value figure's values


def val(key: int) -> bytes:
    """A 100-byte value that starts with its key, so readers can check what they got."""
    return key.to_bytes(8, "little") + FILL


def big_val(key: int) -> bytes:
    return key.to_bytes(8, "little") + BIG_FILL


def lkey(key: int) -> bytes:
    """LMDB key: 8 bytes big-endian, so ascending integers are ascending keys."""
    return key.to_bytes(8, "big")


@dataclass
class Sizes:
    ingest_s: float        # seconds per (workload, system) in figure 1
    commit_s: float        # figure 2
    read_keys: int         # keys written before the readers start, figure 3
    read_s: float          # seconds per read phase, figure 3
    large_bytes: int       # bytes of 64 KiB values per system, figure 4
    large_s: float         # time limit per system, figure 4
    sustained_s: float     # figure 5
    enactor_process_row: bool  # figure 5 also runs mpwal with enactor="process"
    latency_peak_s: float  # figure 7: the unpaced run that measures a system's peak rate
    latency_s: float       # figure 7: each timed phase (paced commits, durable commits, reads)
    keyspace: int = 1_000_000  # keys cycle over this range (figures 1, 2, 5, 7)


FULL = Sizes(ingest_s=5, commit_s=5, read_keys=200_000, read_s=5, large_bytes=1 << 30,
             large_s=60, sustained_s=60, enactor_process_row=True, latency_peak_s=1, latency_s=5)
QUICK = Sizes(ingest_s=0.5, commit_s=0.75, read_keys=20_000, read_s=0.5, large_bytes=64 << 20,
              large_s=3, sustained_s=5, enactor_process_row=False, latency_peak_s=0.25,
              latency_s=0.75)


# -- timing --------------------------------------------------------------------------------------

def run_for(seconds: float, step) -> tuple[int, float]:
    """Call ``step(i)`` for i = 0, 1, … until ``seconds`` have passed; return (calls, elapsed)."""
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        step(n)
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n, now - t0


def run_bounded(count: int, seconds: float, step) -> tuple[int, float]:
    """Call ``step(i)`` for i in range(count), stopping early after ``seconds``."""
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    while i < count:
        step(i)
        i += 1
        if time.perf_counter() >= deadline:
            break
    return i, time.perf_counter() - t0


def run_threads(nthreads: int, seconds: float, make_step) -> tuple[int, float]:
    """Run ``make_step(t)``'s step function in ``nthreads`` threads started together, each for
    ``seconds``; return (calls summed over threads, longest elapsed)."""
    barrier = threading.Barrier(nthreads)
    results: list = [None] * nthreads

    def body(t):
        try:
            step = make_step(t)
            barrier.wait()
            results[t] = run_for(seconds, step)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            barrier.abort()
            results[t] = e

    threads = [threading.Thread(target=body, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return sum(r[0] for r in results), max(r[1] for r in results)


LATENCY_SAMPLE = 200_000   # durations kept per timed phase of figure 7; beyond it, a reservoir
SPIN_NS = 200_000          # a paced call sleeps until this close to its time, then spins


class Sample:
    """The durations (ns) of one timed phase: every one up to LATENCY_SAMPLE, then a uniform
    reservoir of that many (algorithm R); the count and the maximum exactly."""

    def __init__(self) -> None:
        self.kept = array("q")
        self.seen = 0
        self.max = 0
        self.rng = random.Random(7)

    def add(self, ns: int) -> None:
        self.seen += 1
        self.max = max(self.max, ns)
        if len(self.kept) < LATENCY_SAMPLE:
            self.kept.append(ns)
        else:
            j = self.rng.randrange(self.seen)
            if j < LATENCY_SAMPLE:
                self.kept[j] = ns

    def summary(self) -> dict:
        """p50 and p99 (nearest rank on the kept durations) and max, in µs."""
        s = sorted(self.kept)
        if not s:
            return {}

        def rank(q: float) -> float:
            return s[max(0, math.ceil(q * len(s)) - 1)] / 1e3
        return {"p50 µs": rank(0.50), "p99 µs": rank(0.99), "max µs": self.max / 1e3}


def timed(fn: Callable[[Any], Any], record: Callable[[int], None]) -> Callable[[Any], Any]:
    """``fn`` that also passes each call's own duration (perf_counter_ns) to ``record``."""
    def call(arg):
        t = time.perf_counter_ns()
        got = fn(arg)
        record(time.perf_counter_ns() - t)
        return got
    return call


def run_paced(rate: float, seconds: float, step) -> tuple[int, float]:
    """Call ``step(i)`` for i = 0, 1, … at ``rate`` calls/s for ``seconds``, each call at its
    scheduled time t0 + i / rate (sleeping, then spinning, until it; at once when late); return
    (calls, elapsed)."""
    interval = 1e9 / rate
    t0 = time.perf_counter_ns()
    deadline = t0 + int(seconds * 1e9)
    i = 0
    while True:
        due, now = t0 + int(i * interval), time.perf_counter_ns()
        if now >= deadline:
            return i, (now - t0) / 1e9
        if due - now > SPIN_NS:
            time.sleep((due - now - SPIN_NS) / 1e9)
        while time.perf_counter_ns() < due:
            pass
        step(i)
        i += 1


RSS_FIELDS = ("VmRSS", "RssAnon", "RssShmem", "RssFile")  # all of it; anonymous, shared, file


def rss_mib() -> dict[str, float]:
    """This process's resident memory from /proc/self/status, in MiB: {RSS_FIELDS entry: MiB}
    (empty without /proc)."""
    got = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in RSS_FIELDS:
                    got[name] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return got


def rss_columns(start: dict[str, float], end: dict[str, float]) -> dict:
    """Figure 5's RSS columns, and the parts of the resident memory at the end (for its notes)."""
    return {"RSS start MiB": start.get("VmRSS"), "RSS end MiB": end.get("VmRSS"), "rss end": end}


def dir_disk_bytes(path: str) -> int:
    """Bytes the files under ``path`` occupy on disk (allocated blocks)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def shm_bytes(prefix: str = "mpwal-") -> tuple[int, int]:
    """(size, allocated bytes) of the /dev/shm entries whose names start with ``prefix``."""
    size = used = 0
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return 0, 0
    for n in names:
        if n.startswith(prefix):
            try:
                st = os.stat(os.path.join("/dev/shm", n))
            except FileNotFoundError:
                continue
            size += st.st_size
            used += st.st_blocks * 512
    return size, used


def mpwal_shm_prefix(db: str) -> str:
    """The /dev/shm name prefix of ``db``'s segments (all mpwal segments if unknown)."""
    try:
        from mpwal._overlay import segment_prefix
        return segment_prefix(os.path.realpath(db))[1:]
    except Exception:  # noqa: BLE001
        return "mpwal-"


# -- the three systems: opening ------------------------------------------------------------------

MPWAL_DIRS: list[str] = []  # every mpwal directory made, checked for leftover segments at the end


def open_mpwal(db: str, durability: str = "relaxed", enactor: str | None = None):
    MPWAL_DIRS.append(db)
    kw: dict[str, Any] = {} if enactor is None else {"enactor": enactor}
    return mpwal.Writer(db, tables=[mpwal.IndexTable(1), mpwal.ValueTable(VALUE_TABLE, slot_size=256),
                                    mpwal.ValueTable(LARGE_TABLE, slot_size=LARGE)],
                        sync_wal=True, sync_data=True, durability=durability, **kw)


def mpwal_put(w, k0: int, per_record: int) -> None:
    """One record of the values of keys k0 … k0 + per_record - 1."""
    with w.record() as rec:
        if per_record == 1:
            rec.insert_value(VALUE_TABLE, k0, val(k0))
        else:
            rec.insert_values(VALUE_TABLE, [(k, val(k)) for k in range(k0, k0 + per_record)])


def open_sqlite(db: str, sync: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("CREATE TABLE IF NOT EXISTS kv(k INTEGER PRIMARY KEY, v BLOB)")
    return conn


def sqlite_put(conn: sqlite3.Connection, items) -> None:
    """One record = one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT OR REPLACE INTO kv(k, v) VALUES (?, ?)", items)
    conn.execute("COMMIT")


def open_lmdb(db: str, sync: bool, readonly: bool = False):
    if readonly:
        return lmdb.open(db, map_size=LMDB_MAP_SIZE, readonly=True, lock=True, max_readers=256)
    return lmdb.open(db, map_size=LMDB_MAP_SIZE, sync=sync, metasync=sync, max_readers=256)


def lmdb_put(env, items) -> None:
    """One record = one write transaction; ``items`` already carry LMDB keys."""
    with env.begin(write=True) as txn:
        if len(items) == 1:
            txn.put(*items[0])
        else:
            txn.cursor().putmulti(items)


def key_block(i: int, per_record: int, keyspace: int) -> int:
    """First key of record ``i`` when records of ``per_record`` keys cycle over ``keyspace``."""
    return (i * per_record) % (keyspace - keyspace % per_record)


# -- figure 1: ingestion -------------------------------------------------------------------------

def ingest_mpwal(tmp: str, per_record: int, z: Sizes, enactor: str | None = None) -> dict:
    w = open_mpwal(os.path.join(tmp, "db"), durability="relaxed", enactor=enactor)
    try:
        n, dt = run_for(z.ingest_s, lambda i: mpwal_put(w, key_block(i, per_record, z.keyspace), per_record))
    finally:
        w.close()
    return {"records/s": n / dt, "values/s": n * per_record / dt}


def ingest_sqlite(tmp: str, per_record: int, z: Sizes, sync: str = "NORMAL") -> dict:
    conn = open_sqlite(os.path.join(tmp, "db.sqlite"), sync)
    try:
        def step(i):
            k0 = key_block(i, per_record, z.keyspace)
            sqlite_put(conn, [(k, val(k)) for k in range(k0, k0 + per_record)])
        n, dt = run_for(z.ingest_s, step)
    finally:
        conn.close()
    return {"records/s": n / dt, "values/s": n * per_record / dt}


def ingest_lmdb(tmp: str, per_record: int, z: Sizes, sync: bool = False) -> dict:
    env = open_lmdb(os.path.join(tmp, "db.lmdb"), sync)
    try:
        def step(i):
            k0 = key_block(i, per_record, z.keyspace)
            lmdb_put(env, [(lkey(k), val(k)) for k in range(k0, k0 + per_record)])
        n, dt = run_for(z.ingest_s, step)
    finally:
        env.close()
    return {"records/s": n / dt, "values/s": n * per_record / dt}


def figure_ingest(z: Sizes):
    rows = []
    for per in (1, 100, 1000):
        wl = f"{per} value{'s' if per > 1 else ''}/record"
        rows += backends(wl, "mpwal (relaxed)", ingest_mpwal, per, z)
        rows.append(measure(wl, "mpwal (relaxed, enactor process)", ingest_mpwal, per, z, "process"))
        rows.append(measure(wl, "SQLite WAL NORMAL", ingest_sqlite, per, z))
        rows.append(measure(wl, "LMDB sync off", ingest_lmdb, per, z, needs="lmdb"))
    return Figure("1. Ingestion: 100-byte values, one thread, one record per commit",
                  ["records/s", "values/s"], rows,
                  notes=["mpwal: sync_wal=True, durability=\"relaxed\" (fsync at log rotation); "
                         "SQLite: synchronous=NORMAL (fsync at checkpoints); LMDB: sync=False, metasync=False.",
                         "Timed: the commit loop only (opening and closing are outside)."])


# -- figure 2: durable commits -------------------------------------------------------------------

def commit_mpwal(tmp: str, nthreads: int, z: Sizes) -> dict:
    w = open_mpwal(os.path.join(tmp, "db"), durability="commit")
    try:
        def make_step(t):
            def step(i):
                k = (t + nthreads * i) % z.keyspace
                with w.record() as rec:
                    rec.insert_value(VALUE_TABLE, k, val(k))
            return step
        n, dt = run_threads(nthreads, z.commit_s, make_step)
    finally:
        w.close()
    return {"commits/s": n / dt}


def commit_sqlite(tmp: str, nthreads: int, z: Sizes) -> dict:
    db = os.path.join(tmp, "db.sqlite")
    open_sqlite(db, "FULL").close()   # create the table before the threads race to
    conns: list[sqlite3.Connection] = []
    try:
        def make_step(t):
            conn = open_sqlite(db, "FULL")   # one connection per thread
            conns.append(conn)

            def step(i):
                k = (t + nthreads * i) % z.keyspace
                sqlite_put(conn, [(k, val(k))])
            return step
        n, dt = run_threads(nthreads, z.commit_s, make_step)
    finally:
        for c in conns:
            c.close()
    return {"commits/s": n / dt}


def commit_lmdb(tmp: str, nthreads: int, z: Sizes) -> dict:
    env = open_lmdb(os.path.join(tmp, "db.lmdb"), sync=True)
    try:
        def make_step(t):
            def step(i):
                k = (t + nthreads * i) % z.keyspace
                lmdb_put(env, [(lkey(k), val(k))])
            return step
        n, dt = run_threads(nthreads, z.commit_s, make_step)
    finally:
        env.close()
    return {"commits/s": n / dt}


def figure_commit(z: Sizes):
    rows = []
    for nt in (1, 4):
        wl = f"{nt} thread{'s' if nt > 1 else ''}"
        rows += backends(wl, "mpwal (commit)", commit_mpwal, nt, z)
        rows.append(measure(wl, "SQLite WAL FULL", commit_sqlite, nt, z))
        rows.append(measure(wl, "LMDB sync on", commit_lmdb, nt, z, needs="lmdb"))
    return Figure("2. Durable commits: 1-value records, each commit returns once on disk",
                  ["commits/s"], rows,
                  notes=["mpwal: one Writer shared by the threads, durability=\"commit\" (group commit); "
                         "SQLite: synchronous=FULL, a connection per thread, busy_timeout=30 s; "
                         "LMDB: sync=True, one Environment shared by the threads."])


# -- figure 3: point reads in reader processes while a writer process ingests ---------------------
# Process bodies are module-level functions, as the 'spawn' start method requires.

def _writer_proc(system: str, db: str, nkeys: int, ready, ok, stop, count, out) -> None:
    """Write keys 0..nkeys-1, set ``ok`` and ``ready``, then overwrite records of 100 of them
    until stopped, counting records in ``count``. A failure goes on ``out``, then ``ready``."""
    try:
        per = 100
        if system == "mpwal":
            w = open_mpwal(db, durability="relaxed")
            def put(k0):
                mpwal_put(w, k0, per)
            close = w.close
        elif system == "sqlite":
            conn = open_sqlite(db, "NORMAL")
            def put(k0):
                sqlite_put(conn, [(k, val(k)) for k in range(k0, k0 + per)])
            close = conn.close
        else:
            env = open_lmdb(db, sync=False)
            def put(k0):
                lmdb_put(env, [(lkey(k), val(k)) for k in range(k0, k0 + per)])
            close = env.close
        try:
            for k0 in range(0, nkeys, per):
                put(k0)
            ok.value = 1
            ready.set()
            n = 0
            while not stop.is_set():
                put(key_block(n, per, nkeys))
                n += 1
                count.value = n
        finally:
            close()
    except BaseException:  # noqa: BLE001 - reported by the parent
        out.put(("error", "writer process", traceback.format_exc()))
        out.close()
        out.join_thread()   # in the pipe before the parent wakes up
        ready.set()


Getters = tuple[Callable[[Any], Any], Callable[[list[Any]], list[Any]]]  # (get one, get a batch)


def sqlite_getters(conn: sqlite3.Connection) -> Getters:
    """(get one key, get a batch of 100 keys) on the ``kv`` table."""
    one = "SELECT v FROM kv WHERE k = ?"
    many = "SELECT k, v FROM kv WHERE k IN (" + ",".join("?" * 100) + ")"

    def get(k):
        row = conn.execute(one, (k,)).fetchone()
        return row[0] if row else None

    def get_many(ks):
        found = dict(conn.execute(many, ks).fetchall())
        return [found.get(k) for k in ks]
    return get, get_many


def lmdb_getters(env: Any) -> Getters:
    """(get one key, get a batch) in a read transaction per call."""
    def get(k):
        with env.begin() as txn:
            return txn.get(lkey(k))

    def get_many(ks):
        with env.begin() as txn:
            return [txn.get(lkey(k)) for k in ks]
    return get, get_many


def _reader_proc(system: str, db: str, nkeys: int, seconds: float, seed: int, db_ready, rounds,
                 latency: bool, out) -> None:
    """Once ``db_ready`` is set, open the store and say so on ``out``; then, for each event of
    ``rounds`` in turn, wait for it and do random lookups one key at a time for ``seconds``, then
    in batches of 100 for ``seconds``, and put (lookups/s single, lookups/s batched, wrong
    answers) on ``out``; with ``latency``, each call is timed and the two rates are instead
    Sample summaries with the calls/s."""
    try:
        rng = random.Random(seed)
        keys = [rng.randrange(nkeys) for _ in range(20_000)]
        batches = [keys[i:i + 100] for i in range(0, len(keys), 100)]
        bad = 0
        if not db_ready.wait(300):
            raise RuntimeError("the writer process did not write the keys within 300 s")
        if system == "mpwal":
            r = mpwal.Reader(db)
            get_one = lambda k: r.value(VALUE_TABLE, k)                 # noqa: E731
            get_batch = lambda ks: r.values(VALUE_TABLE, ks)            # noqa: E731
            close = r.close
        elif system == "sqlite":
            conn = sqlite3.connect(db, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=30000")
            get_one, get_batch = sqlite_getters(conn)
            close = conn.close
        else:
            env = open_lmdb(db, sync=False, readonly=True)
            get_one, get_batch = lmdb_getters(env)
            close = env.close
        get, get_many = get_one, get_batch
        try:
            out.put(("ready", seed))

            def single(i):
                nonlocal bad
                j = (i * 100) % len(keys)
                for k in keys[j:j + 100]:
                    v = get(k)
                    if v is None or v[:8] != k.to_bytes(8, "little"):
                        bad += 1

            def batched(i):
                nonlocal bad
                ks = batches[i % len(batches)]
                for k, v in zip(ks, get_many(ks)):
                    if v is None or v[:8] != k.to_bytes(8, "little"):
                        bad += 1
            for go in rounds:
                go.wait()
                bad = 0
                if latency:
                    s1, s2 = Sample(), Sample()
                    get, get_many = timed(get_one, s1.add), timed(get_batch, s2.add)
                n1, dt1 = run_for(seconds, single)
                n2, dt2 = run_for(seconds, batched)
                if latency:
                    out.put(("result", {**s1.summary(), "calls/s": s1.seen / dt1},
                             {**s2.summary(), "calls/s": s2.seen / dt2}, bad))
                else:
                    out.put(("result", n1 * 100 / dt1, n2 * 100 / dt2, bad))
        finally:
            close()
    except BaseException:  # noqa: BLE001 - reported by the parent
        out.put(("error", f"reader process {seed}", traceback.format_exc()))


def child_error(who: str, tb: str) -> RuntimeError:
    """The exception to raise for a failed child process; its traceback goes to stderr."""
    print(f"--- {who} failed:\n{tb}", file=sys.stderr)
    return RuntimeError(f"{who}: {tb.strip().splitlines()[-1]}")


def _own_proc(fn, args: tuple, out) -> None:
    """Put ("ok", ``fn(*args)``, the mpwal directories it made) or ("error", who, traceback) on
    ``out``."""
    try:
        out.put(("ok", fn(*args), MPWAL_DIRS))
    except BaseException:  # noqa: BLE001 - reported by the parent
        out.put(("error", f"process running {fn.__name__}", traceback.format_exc()))


def in_own_process(tmp: str, fn, *args):
    """``fn(tmp, *args)`` in a fresh (spawned) process, so that what it measures of its process
    (its memory) is its own; waits for as long as the process lives."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_own_proc, args=(fn, (tmp, *args), out))
    p.start()
    try:
        while True:
            try:
                tag, *rest = out.get(timeout=1)
                break
            except queue.Empty:
                if not p.is_alive() and out.empty():
                    raise RuntimeError(f"the process running {fn.__name__} died "
                                       f"(exit code {p.exitcode})") from None
    finally:
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join()
    if tag == "error":
        raise child_error(*rest)
    MPWAL_DIRS.extend(rest[1])
    return rest[0]


def read_rounds(tmp: str, system: str, z: Sizes, readers: tuple[int, ...], seconds: float,
                latency: bool) -> dict[int, tuple[list, float]]:
    """A writer process and max(``readers``) reader processes (started together; the readers
    open the store once the writer has written the keys), then a round per entry n of
    ``readers`` in which readers 0 … n-1 read, each phase for ``seconds`` (see _reader_proc).
    Returns {n: (the n readers' results, writer records/s meanwhile)}."""
    ctx = mp.get_context("spawn")
    db = os.path.join(tmp, {"mpwal": "db", "sqlite": "db.sqlite", "lmdb": "db.lmdb"}[system])
    if system == "mpwal":
        MPWAL_DIRS.append(db)
    ready, ok, stop, count = ctx.Event(), ctx.RawValue("b", 0), ctx.Event(), ctx.RawValue("Q", 0)
    wout, out = ctx.Queue(), ctx.Queue()   # the writer's errors; the readers' messages
    rounds = {n: ctx.Event() for n in readers}
    procs = [ctx.Process(target=_writer_proc, args=(system, db, z.read_keys, ready, ok, stop, count, wout))]
    procs += [ctx.Process(target=_reader_proc, args=(system, db, z.read_keys, seconds, seed, ready,
                                                     [rounds[n] for n in readers if seed < n],
                                                     latency, out))
              for seed in range(max(readers))]
    for p in procs:
        p.start()

    def collect(n):
        msgs: list[list[Any]] = []
        while len(msgs) < n:
            tag, *rest = out.get(timeout=300 + 4 * seconds)
            if tag == "error":
                raise child_error(*rest)
            msgs.append(rest)
        return msgs

    result = {}
    try:
        if not ready.wait(300):
            raise RuntimeError("the writer process did not finish writing the keys within 300 s")
        if not ok.value:
            raise child_error(*wout.get(timeout=10)[1:])
        collect(max(readers))          # every reader has opened the store
        for nreaders in readers:
            c0, t0 = count.value, time.perf_counter()
            rounds[nreaders].set()
            msgs = collect(nreaders)
            result[nreaders] = (msgs, (count.value - c0) / (time.perf_counter() - t0))
    finally:
        for p in procs[1:]:
            p.join(5)
            if p.is_alive():
                p.kill()
        stop.set()
        procs[0].join(300)
        if procs[0].is_alive():
            procs[0].kill()
        if ok.value and not wout.empty():   # the writer failed after the keys were written
            raise child_error(*wout.get()[1:])
    return result


def reads_system(tmp: str, system: str, z: Sizes) -> dict[int, tuple]:
    """Figure 3's rounds: reader 0 alone, then both readers. Returns {readers: (single
    lookups/s per process, batched lookups/s per process, writer records/s meanwhile, wrong
    answers)}."""
    result = {}
    for n, (msgs, wrate) in read_rounds(tmp, system, z, (1, 2), z.read_s, latency=False).items():
        result[n] = (sum(m[0] for m in msgs) / n, sum(m[1] for m in msgs) / n, wrate,
                     sum(m[2] for m in msgs))
    return result


def each_reading_system(fn, z: Sizes) -> dict[str, Any]:
    """``measure(…, raw=True)`` of ``fn(tmp, system, z)`` for mpwal (on both backends when the
    native one runs), SQLite and LMDB: {row label: result, or the reason there is none}."""
    got = {"mpwal": measure("", "mpwal", fn, "mpwal", z, raw=True)}
    if mpwal.backend == "native":
        with _backend.python_backend():
            got["mpwal, Python backend"] = measure("", "mpwal, Python backend", fn, "mpwal", z, raw=True)
    got["SQLite WAL NORMAL"] = measure("", "SQLite WAL NORMAL", fn, "sqlite", z, raw=True)
    got["LMDB"] = measure("", "LMDB", fn, "lmdb", z, needs="lmdb", raw=True)
    return got


def figure_reads(z: Sizes):
    rows = []
    per_system = each_reading_system(reads_system, z)
    notes = [f"{z.read_keys:,} keys of 100 bytes written first; the writer process then keeps "
             "overwriting them in records of 100 (mpwal relaxed, SQLite NORMAL, LMDB sync off).",
             "Readers: mpwal r.value() / r.values(); SQLite SELECT … WHERE k = ? / k IN (100 keys); "
             "LMDB txn.get in a read transaction per lookup / per batch. Lookups/s per reader process."]
    for nreaders in (1, 2):
        for kind, idx in (("value()", 0), ("values() ×100", 1)):
            wl = f"{nreaders} reader{'s' if nreaders > 1 else ''}, {kind}"
            for label, got in per_system.items():
                if isinstance(got, str):
                    rows.append(Row(wl, label, None, got))
                    continue
                s = got[nreaders]
                rows.append(Row(wl, label, {"lookups/s/process": s[idx], "writer rec/s": s[2]}))
                if s[3]:
                    notes.append(f"{label}, {nreaders} reader(s): {s[3]} lookups returned "
                                 "a missing or wrong value")
    return Figure("3. Point reads per reader process while a writer process ingests",
                  ["lookups/s/process", "writer rec/s"], rows, notes=notes)


# -- figure 6: lookups with the writer idle --------------------------------------------------------

def _idle_lookups(get, get_many, keys, seconds: float) -> dict:
    rng = random.Random(6)
    order = [rng.choice(keys) for _ in range(20_000)]
    batches = [order[i:i + 100] for i in range(0, len(order), 100)]

    def single(i):
        j = (i * 100) % len(order)
        for k in order[j:j + 100]:
            get(k)

    n1, dt1 = run_for(seconds, single)
    n2, dt2 = run_for(seconds, lambda i: get_many(batches[i % len(batches)]))
    return {"value()/s": n1 * 100 / dt1, "values() ×100, lookups/s": n2 * 100 / dt2}


def lookups_mpwal(tmp: str, z: Sizes, enacted: bool = False) -> dict:
    """mpwal's idle lookups: every key in the overlay (enactor="none", no age rotation: as right
    after commits), or, with ``enacted``, every key in the table file (the writer closed, which
    enacts everything, and a new one open with an empty overlay: a reader's steady state)."""
    db = os.path.join(tmp, "db")
    MPWAL_DIRS.append(db)
    keys = list(range(z.read_keys))
    table = [mpwal.ValueTable(VALUE_TABLE, slot_size=256)]
    w = mpwal.Writer(db, tables=table, enactor="none", log_age=1e9)
    try:
        for k0 in range(0, len(keys), 1000):
            with w.record() as rec:
                rec.insert_values(VALUE_TABLE, [(k, val(k)) for k in keys[k0:k0 + 1000]])
        if enacted:
            w.close()
            w = mpwal.Writer(db, tables=table, enactor="none", log_age=1e9)
        with mpwal.Reader(db) as r:
            return _idle_lookups(lambda k: r.value(VALUE_TABLE, k),
                                 lambda ks: r.values(VALUE_TABLE, ks), keys, z.read_s)
    finally:
        w.close()


def lookups_sqlite(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "db.sqlite")
    keys = list(range(z.read_keys))
    conn = open_sqlite(db, "NORMAL")
    try:
        for k0 in range(0, len(keys), 1000):
            sqlite_put(conn, [(k, val(k)) for k in keys[k0:k0 + 1000]])
        return _idle_lookups(*sqlite_getters(conn), keys, z.read_s)
    finally:
        conn.close()


def lookups_lmdb(tmp: str, z: Sizes) -> dict:
    env = open_lmdb(os.path.join(tmp, "db.lmdb"), sync=False)
    keys = list(range(z.read_keys))
    try:
        for k0 in range(0, len(keys), 1000):
            lmdb_put(env, [(lkey(k), val(k)) for k in keys[k0:k0 + 1000]])
        return _idle_lookups(*lmdb_getters(env), keys, z.read_s)
    finally:
        env.close()


def figure_lookups(z: Sizes):
    wl = f"{z.read_keys:,} keys"
    rows = backends(wl, "mpwal (overlay)", lookups_mpwal, z)
    rows += backends(wl, "mpwal (table file)", lookups_mpwal, z, True)
    rows += [measure(wl, "SQLite WAL NORMAL", lookups_sqlite, z),
             measure(wl, "LMDB", lookups_lmdb, z, needs="lmdb")]
    return Figure("6. Lookups in one process with the writer idle (mpwal: every key in the overlay, "
                  "or every key enacted)",
                  ["value()/s", "values() ×100, lookups/s"], rows,
                  notes=["The reading process does nothing else. mpwal (overlay): the keys were "
                         "committed and not yet enacted, so each lookup is answered from shared "
                         "memory; mpwal (table file): every key enacted, each lookup misses the "
                         "overlay and reads the table file through the reader's mapping.",
                         "SQLite: SELECT by key / k IN (100 keys); LMDB: a read transaction per "
                         "lookup / per batch."])


# -- figure 4: large values ----------------------------------------------------------------------

def large_mpwal(tmp: str, z: Sizes) -> dict:
    w = open_mpwal(os.path.join(tmp, "db"), durability="relaxed")
    count = z.large_bytes // LARGE
    try:
        def step(i):
            with w.record() as rec:
                rec.insert_value(LARGE_TABLE, i % count, big_val(i))
        n, dt = run_bounded(count, z.large_s, step)
    finally:
        w.close()
    return {"MB/s": n * LARGE / dt / 1e6}


def large_file(tmp: str, z: Sizes) -> dict:
    """Appends to one file, fsynced as mpwal fsyncs its log with sync_wal: every 64 MiB
    (log_size) or once the unsynced part is a second old (log_age)."""
    fd = os.open(os.path.join(tmp, "plain.dat"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    unsynced, since = 0, time.perf_counter()
    try:
        def step(i):
            nonlocal unsynced, since
            unsynced += os.write(fd, big_val(i))
            if unsynced >= FILE_FSYNC_EVERY or time.perf_counter() - since >= FILE_FSYNC_AGE:
                os.fsync(fd)
                unsynced, since = 0, time.perf_counter()
        n, dt = run_bounded(z.large_bytes // LARGE, z.large_s, step)
    finally:
        os.close(fd)
    return {"MB/s": n * LARGE / dt / 1e6}


def large_sqlite(tmp: str, z: Sizes) -> dict:
    conn = open_sqlite(os.path.join(tmp, "db.sqlite"), "NORMAL")
    try:
        n, dt = run_bounded(z.large_bytes // LARGE, z.large_s, lambda i: sqlite_put(conn, [(i, big_val(i))]))
    finally:
        conn.close()
    return {"MB/s": n * LARGE / dt / 1e6}


def large_lmdb(tmp: str, z: Sizes) -> dict:
    env = open_lmdb(os.path.join(tmp, "db.lmdb"), sync=False)
    try:
        n, dt = run_bounded(z.large_bytes // LARGE, z.large_s, lambda i: lmdb_put(env, [(lkey(i), big_val(i))]))
    finally:
        env.close()
    return {"MB/s": n * LARGE / dt / 1e6}


def figure_large(z: Sizes):
    wl = "64 KiB values"
    rows = backends(wl, "mpwal (relaxed)", large_mpwal, z)
    rows += [measure(wl, f"plain file, fsync/{FILE_FSYNC_EVERY >> 20} MiB", large_file, z),
             measure(wl, "SQLite WAL NORMAL", large_sqlite, z),
             measure(wl, "LMDB sync off", large_lmdb, z, needs="lmdb")]
    return Figure(f"4. Large values: one 64 KiB value per record, up to {z.large_bytes >> 20} MiB "
                  f"or {z.large_s:g} s per system", ["MB/s"], rows,
                  notes=["MB = 10^6 bytes of values committed per second; timed: the commit loop only.",
                         "mpwal: durability=\"relaxed\", sync_wal and sync_data on (the log is fsynced "
                         "at rotation, every 64 MiB or 1 s; the enactor writes the values again into the "
                         "table file); SQLite: synchronous=NORMAL; LMDB: sync off."])


# -- figure 5: sustained ingestion with enactment ------------------------------------------------

SUSTAINED_PER = 100


def sustained_mpwal(tmp: str, z: Sizes, enactor: str | None = None) -> dict:
    db = os.path.join(tmp, "db")
    w = open_mpwal(db, durability="relaxed", enactor=enactor)
    try:
        rss0 = rss_mib()
        n, dt = run_for(z.sustained_s, lambda i: mpwal_put(w, key_block(i, SUSTAINED_PER, z.keyspace),
                                                           SUSTAINED_PER))
        rss1 = rss_mib()
        disk, (shm, shm_used) = dir_disk_bytes(tmp), shm_bytes(mpwal_shm_prefix(db))
        st = w.stats()
    finally:
        w.close()
    return {"records/s": n / dt, "values/s": n * SUSTAINED_PER / dt,
            "disk MiB": disk / 2**20, "shm MiB": shm / 2**20, "shm used MiB": shm_used / 2**20,
            **rss_columns(rss0, rss1),
            "stats": {k: st[k] for k in ("committed", "enacted", "pending_bytes", "rotations", "generation")}}


def sustained_note(r: Row) -> str:
    """A row's resident memory at the end by kind, and for mpwal what Writer.stats() said."""
    m = r.metrics or {}
    rss = m.get("rss end", {})
    note = f"{r.system} at the end: RSS " + (
        f"{rss['RssAnon']:.0f} MiB anonymous, {rss['RssShmem']:.0f} shared memory, "
        f"{rss['RssFile']:.0f} file pages" if len(rss) == len(RSS_FIELDS) else "unknown")
    if "stats" in m:
        st = m["stats"]
        note += (f"; committed record {st['committed']:,}, enacted {st['enacted']:,}, "
                 f"{st['pending_bytes'] / 2**20:.1f} MiB of log not yet enacted, "
                 f"{st['rotations']} rotations, overlay generation {st['generation']}")
    return note + "."


def sustained_sqlite(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "db.sqlite")
    conn = open_sqlite(db, "NORMAL")
    try:
        def step(i):
            k0 = key_block(i, SUSTAINED_PER, z.keyspace)
            sqlite_put(conn, [(k, val(k)) for k in range(k0, k0 + SUSTAINED_PER)])
        rss0 = rss_mib()
        n, dt = run_for(z.sustained_s, step)
        rss1 = rss_mib()
        disk = dir_disk_bytes(tmp)
    finally:
        conn.close()
    return {"records/s": n / dt, "values/s": n * SUSTAINED_PER / dt, "disk MiB": disk / 2**20,
            **rss_columns(rss0, rss1)}


def sustained_lmdb(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "db.lmdb")
    env = open_lmdb(db, sync=False)
    try:
        def step(i):
            k0 = key_block(i, SUSTAINED_PER, z.keyspace)
            lmdb_put(env, [(lkey(k), val(k)) for k in range(k0, k0 + SUSTAINED_PER)])
        rss0 = rss_mib()
        n, dt = run_for(z.sustained_s, step)
        rss1 = rss_mib()
        disk = dir_disk_bytes(tmp)
    finally:
        env.close()
    return {"records/s": n / dt, "values/s": n * SUSTAINED_PER / dt, "disk MiB": disk / 2**20,
            **rss_columns(rss0, rss1)}


def figure_sustained(z: Sizes):
    wl = f"{z.sustained_s:g} s"
    rows = backends(wl, "mpwal (relaxed)", in_own_process, sustained_mpwal, z)
    if z.enactor_process_row:   # the enactor in its own process, off the writer's GIL
        rows.append(measure(wl, "mpwal (relaxed, enactor=process)", in_own_process, sustained_mpwal, z,
                            "process"))
    rows += [measure(wl, "SQLite WAL NORMAL", in_own_process, sustained_sqlite, z),
             measure(wl, "LMDB sync off", in_own_process, sustained_lmdb, z, needs="lmdb")]
    return Figure(f"5. Sustained ingestion: records of {SUSTAINED_PER} values of 100 bytes for "
                  f"{z.sustained_s:g} s, keys cycling over {z.keyspace:,}",
                  ["records/s", "values/s", "disk MiB", "shm MiB", "shm used MiB", "RSS start MiB",
                   "RSS end MiB"], rows,
                  notes=["mpwal's enactor (default: a thread of the writer) applies rotated logs to the "
                         "table files meanwhile. Disk: allocated bytes of the directory at the end, "
                         "before closing; shm: size and allocated bytes of mpwal's /dev/shm segments "
                         "at the same moment.",
                         "Each system writes in a fresh process of its own; RSS: that process's VmRSS "
                         "just before and just after the timed loop, counting the pages of shared "
                         "memory and of mapped files (mpwal's overlay, LMDB's map) it has touched."]
                  + [sustained_note(r) for r in rows if r.metrics])


# -- figure 7: latency percentiles -------------------------------------------------------------

def commit_latency(step, z: Sizes, paced: bool) -> dict:
    """Percentiles of the durations of ``step(i)`` (a commit each) over ``z.latency_s``, and the
    calls/s: ``paced``, at half the peak rate that an unpaced run of ``z.latency_peak_s`` first
    measures; else back to back."""
    sample = Sample()
    if paced:
        n, dt = run_for(z.latency_peak_s, step)
        calls, dt = run_paced(n / dt / 2, z.latency_s, timed(step, sample.add))
    else:
        calls, dt = run_for(z.latency_s, timed(step, sample.add))
    return {**sample.summary(), "calls/s": calls / dt}


def latency_mpwal(tmp: str, per_record: int, z: Sizes, durability: str, paced: bool) -> dict:
    w = open_mpwal(os.path.join(tmp, "db"), durability=durability)
    try:
        return commit_latency(lambda i: mpwal_put(w, key_block(i, per_record, z.keyspace), per_record),
                              z, paced)
    finally:
        w.close()


def latency_sqlite(tmp: str, per_record: int, z: Sizes, sync: str, paced: bool) -> dict:
    conn = open_sqlite(os.path.join(tmp, "db.sqlite"), sync)
    try:
        def step(i):
            k0 = key_block(i, per_record, z.keyspace)
            sqlite_put(conn, [(k, val(k)) for k in range(k0, k0 + per_record)])
        return commit_latency(step, z, paced)
    finally:
        conn.close()


def latency_lmdb(tmp: str, per_record: int, z: Sizes, sync: bool, paced: bool) -> dict:
    env = open_lmdb(os.path.join(tmp, "db.lmdb"), sync)
    try:
        def step(i):
            k0 = key_block(i, per_record, z.keyspace)
            lmdb_put(env, [(lkey(k), val(k)) for k in range(k0, k0 + per_record)])
        return commit_latency(step, z, paced)
    finally:
        env.close()


def read_latency_system(tmp: str, system: str, z: Sizes) -> tuple[dict, dict, int]:
    """Figure 3's processes with one reader, timing each call for ``z.latency_s`` per phase.
    Returns (value() summary, values() ×100 summary, wrong answers), each summary with the
    writer's records/s meanwhile."""
    ((msgs, wrate),) = read_rounds(tmp, system, z, (1,), z.latency_s, latency=True).values()
    one, batch, bad = msgs[0]
    return {**one, "writer rec/s": wrate}, {**batch, "writer rec/s": wrate}, bad


def figure_latency(z: Sizes):
    rows = []
    for per in (1, 100):
        wl = f"commit, {per} value{'s' if per > 1 else ''}/record, half peak rate"
        rows += backends(wl, "mpwal (relaxed)", latency_mpwal, per, z, "relaxed", True)
        rows.append(measure(wl, "SQLite WAL NORMAL", latency_sqlite, per, z, "NORMAL", True))
        rows.append(measure(wl, "LMDB sync off", latency_lmdb, per, z, False, True, needs="lmdb"))
    wl = "durable commit, 1 value/record, back to back"
    rows += backends(wl, "mpwal (commit)", latency_mpwal, 1, z, "commit", False)
    rows.append(measure(wl, "SQLite WAL FULL", latency_sqlite, 1, z, "FULL", False))
    rows.append(measure(wl, "LMDB sync on", latency_lmdb, 1, z, True, False, needs="lmdb"))
    notes = ["Each call's own duration (time.perf_counter_ns around it): p50 and p99 by nearest rank "
             f"over every call of the phase (beyond {LATENCY_SAMPLE:,}, a uniform sample of that "
             "many), max over every call. mpwal/this: the row's p99 divided by mpwal's.",
             f"Half peak rate: an unpaced run of {z.latency_peak_s:g} s measures the system's own peak, "
             f"then one thread commits at half of it for {z.latency_s:g} s (calls/s), each commit "
             "at its scheduled time; mpwal durability=\"relaxed\" with its default enactor "
             "(a thread), SQLite synchronous=NORMAL, LMDB sync off. Durable: one thread, "
             f"{z.latency_s:g} s; mpwal durability=\"commit\", SQLite FULL, LMDB sync on.",
             f"Reads: figure 3's processes with one reader process, which times each value() of a "
             f"random key and each values() of 100 for {z.latency_s:g} s apiece, while the writer "
             f"process overwrites the {z.read_keys:,} keys in records of 100 (writer rec/s)."]
    per_system = each_reading_system(read_latency_system, z)
    for kind, idx in (("value()", 0), ("values() ×100", 1)):
        wl = f"{kind} while a writer process ingests"
        for label, got in per_system.items():
            if isinstance(got, str):
                rows.append(Row(wl, label, None, got))
                continue
            rows.append(Row(wl, label, got[idx]))
            if got[2] and idx == 0:
                notes.append(f"{label}: {got[2]} lookups returned a missing or wrong value")
    return Figure("7. Latency: percentiles of each commit's and each read's duration",
                  ["p50 µs", "p99 µs", "max µs", "calls/s", "writer rec/s"], rows, notes=notes,
                  ratio_on="p99 µs", lower_is_better=True)


# -- results and tables --------------------------------------------------------------------------

# -- figure 8: the key-value layer ---------------------------------------------------------------

_KV_KEYS: list[bytes] = []


def kv_keys(n: int) -> list[bytes]:
    """The first ``n`` of a fixed sequence of random-looking 16-byte keys."""
    import hashlib
    while len(_KV_KEYS) < n:
        i = len(_KV_KEYS)
        _KV_KEYS.append(hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest())
    return _KV_KEYS[:n]


def kv_ingest(tmp: str, z: Sizes, put_batch: Callable[[list[bytes]], None]) -> tuple[int, float]:
    keys = kv_keys(z.keyspace)
    return run_for(z.ingest_s, lambda i: put_batch(keys[(i * 100) % len(keys):(i * 100) % len(keys) + 100]))


def _kv_gets(tmp: str, system: str, db: str, nkeys: int, seconds: float) -> float:
    """gets/s of random written keys, in this (fresh) process."""
    keys = kv_keys(nkeys)
    rng = random.Random(8)
    order = [rng.choice(keys) for _ in range(10_000)]
    get: Callable[[bytes], Any]
    close: Callable[[], None]
    if system == "mpwal":
        r = mpwal.KVReader(db)
        get, close = r.get, r.close
    elif system == "sqlite":
        conn = sqlite3.connect(db)
        q = "SELECT v FROM kv WHERE k = ?"

        def get(k: bytes) -> Any:
            return conn.execute(q, (k,)).fetchone()
        close = conn.close
    elif system == "diskcache":
        cache = diskcache.Cache(db)
        get, close = cache.get, cache.close
    elif system == "UltraDict":
        ud = ultradict_mod.UltraDict(name=db)
        get, close = ud.get, ud.close
    else:
        env = open_lmdb(db, sync=False, readonly=True)

        def get(k: bytes) -> Any:
            with env.begin() as txn:
                return txn.get(k)
        close = env.close
    try:
        assert get(order[0]) is not None, "a written key is missing"
        n, dt = run_for(seconds, lambda i: [get(k) for k in order[(i * 100) % len(order):(i * 100) % len(order) + 100]])
    finally:
        close()
    return n * 100 / dt


def kv_row(tmp: str, z: Sizes, system: str, db: str, n: int, dt: float) -> dict:
    written = min(n * 100, z.keyspace)
    gets = in_own_process(tmp, _kv_gets, system, db, written, z.read_s)
    return {"ingest values/s": n * 100 / dt, "gets/s, another process": gets,
            "keys written": written, "disk bytes/key": dir_disk_bytes(tmp) / written}


def kv_mpwal(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "db")
    MPWAL_DIRS.append(db)
    with mpwal.KVWriter(db) as kv:
        def put_batch(keys):
            with kv.batch() as b:
                for k in keys:
                    b.put(k, FILL_KV)
        n, dt = kv_ingest(tmp, z, put_batch)
        kv.sync()
        return kv_row(tmp, z, "mpwal", db, n, dt)  # the writer stays open, as in use


def kv_sqlite(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "db.sqlite")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
    try:
        def put_batch(keys):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO kv(k, v) VALUES (?, ?)",
                             [(k, FILL_KV) for k in keys])
            conn.execute("COMMIT")
        n, dt = kv_ingest(tmp, z, put_batch)
    finally:
        conn.close()
    return kv_row(tmp, z, "sqlite", db, n, dt)


def kv_lmdb(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "db.lmdb")
    env = open_lmdb(db, sync=False)
    try:
        def put_batch(keys):
            with env.begin(write=True) as txn:
                for k in keys:
                    txn.put(k, FILL_KV)
        n, dt = kv_ingest(tmp, z, put_batch)
    finally:
        env.close()
    return kv_row(tmp, z, "lmdb", db, n, dt)


def kv_diskcache(tmp: str, z: Sizes) -> dict:
    db = os.path.join(tmp, "cache")
    cache = diskcache.Cache(db)
    try:
        def put_batch(keys):
            with cache.transact():
                for k in keys:
                    cache[k] = FILL_KV
        n, dt = kv_ingest(tmp, z, put_batch)
    finally:
        cache.close()
    return kv_row(tmp, z, "diskcache", db, n, dt)


def kv_ultradict(tmp: str, z: Sizes) -> dict:
    name = f"mpwal-bench-ud-{os.getpid()}"
    ud = ultradict_mod.UltraDict(name=name, create=True, buffer_size=64 << 20)
    try:
        def put_batch(keys):
            with ud.lock:  # one lock per batch: UltraDict has no atomic batch
                for k in keys:
                    ud[k] = FILL_KV
        n, dt = kv_ingest(tmp, z, put_batch)
        row = kv_row(tmp, z, "UltraDict", name, n, dt)
    finally:
        ud.unlink()
    row["disk bytes/key"] = None  # it lives in shared memory only
    return row


def figure_kv(z: Sizes):
    wl = f"{z.keyspace:,} keys"
    rows = backends(wl, "mpwal KV", kv_mpwal, z)
    rows += [measure(wl, "SQLite WITHOUT ROWID, WAL NORMAL", kv_sqlite, z),
             measure(wl, "LMDB sync off", kv_lmdb, z, needs="lmdb"),
             measure(wl, "diskcache", kv_diskcache, z, needs="diskcache"),
             measure(wl, "UltraDict (shared memory, no durability)", kv_ultradict, z,
                     needs="UltraDict")]
    return Figure("8. Key-value stores: 16-byte keys, 100-byte values, batches of 100",
                  ["ingest values/s", "gets/s, another process", "keys written",
                   "disk bytes/key"], rows,
                  notes=["Ingestion runs for the figure's time over the keyspace in batches of "
                         "100 (one record, transaction or write transaction each); then a fresh "
                         "process opens the store and gets random written keys, one call per get "
                         "(LMDB: a read transaction per get), the mpwal writer still open (its "
                         "readers in shared memory), SQLite's and LMDB's closed. Disk: allocated "
                         "bytes of the store's directory after the ingestion, per key written.",
                         "diskcache: a Cache (SQLite underneath), a transaction per batch; "
                         "UltraDict: a shared-memory dict, its lock held per batch (no atomic "
                         "batch, nothing on disk)."])


# -- figure 9: many writing processes: mpwal producers, SQLite and LMDB writers ---------------------

PRODUCER_PROCS = 4
LAT_KEEP = 50_000  # commit durations kept per process


def _many_proc(system: str, db: str, t: int, per_record: int, durable: bool, seconds: float,
               keyspace: int, ready, go, out) -> None:
    """One of the writing processes: commit records of ``per_record`` values (keys of its own
    range) for ``seconds`` once ``go`` is set; put (records, elapsed, durations in ns)."""
    try:
        base = t * (keyspace // PRODUCER_PROCS)
        span = keyspace // PRODUCER_PROCS - per_record
        if system == "mpwal":
            p = mpwal.Producer(db, timeout=60, durability="commit" if durable else "relaxed")

            def put(k0: int) -> None:
                with p.record() as rec:
                    rec.insert_values(VALUE_TABLE, [(k, val(k)) for k in range(k0, k0 + per_record)])
            close: Callable[[], None] = p.close
        elif system == "sqlite":
            conn = open_sqlite(db, "FULL" if durable else "NORMAL")

            def put(k0: int) -> None:
                sqlite_put(conn, [(k, val(k)) for k in range(k0, k0 + per_record)])
            close = conn.close
        else:
            env = open_lmdb(db, sync=durable)

            def put(k0: int) -> None:
                lmdb_put(env, [(lkey(k), val(k)) for k in range(k0, k0 + per_record)])
            close = env.close
        put(base)  # connected (an mpwal producer registered) before the clock starts
        ready.put(t)
        go.wait()
        lat = array("q")
        perf = time.perf_counter_ns

        def step(i: int) -> None:
            t0 = perf()
            put(base + (i * per_record) % span)
            if len(lat) < LAT_KEEP:
                lat.append(perf() - t0)
        n, dt = run_for(seconds, step)
        close()
        out.put((n, dt, lat.tobytes()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put(child_error(f"{system} process {t}", traceback.format_exc()))


def many_writers(tmp: str, system: str, per_record: int, durable: bool, z: Sizes) -> dict:
    """PRODUCER_PROCS processes commit at once (mpwal: producers of one Writer in this
    process); total records/s and values/s, and the commits' p50/p99 latency over them all."""
    ctx = mp.get_context("spawn")
    db = os.path.join(tmp, {"mpwal": "db", "sqlite": "db.sqlite", "lmdb": "db.lmdb"}[system])
    w = None
    if system == "mpwal":
        w = open_mpwal(db)
    elif system == "sqlite":
        open_sqlite(db, "NORMAL").close()  # the table, before the processes race to make it
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_many_proc, args=(system, db, t, per_record, durable, z.commit_s,
                                                   z.keyspace, ready, go, out))
             for t in range(PRODUCER_PROCS)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        go.set()
        results = [out.get(timeout=z.commit_s + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
        if w is not None:
            w.close()
    for got in results:
        if isinstance(got, BaseException):
            raise got
    n = sum(r[0] for r in results)
    dt = max(r[1] for r in results)
    lat = sorted(x for r in results for x in array("q", r[2]))
    return {"records/s": n / dt, "values/s": n * per_record / dt,
            "p50 µs": lat[len(lat) // 2] / 1e3 if lat else None,
            "p99 µs": lat[min(len(lat) - 1, int(0.99 * len(lat)))] / 1e3 if lat else None}


def writer_alone(tmp: str, per_record: int, durable: bool, z: Sizes) -> dict:
    """The writer's own commits, one thread, for the latency beside its producers'."""
    w = open_mpwal(os.path.join(tmp, "db"), durability="commit" if durable else "relaxed")
    lat = array("q")
    perf = time.perf_counter_ns
    try:
        def step(i: int) -> None:
            t0 = perf()
            mpwal_put(w, key_block(i, per_record, z.keyspace), per_record)
            if len(lat) < LAT_KEEP:
                lat.append(perf() - t0)
        n, dt = run_for(z.commit_s, step)
    finally:
        w.close()
    got = sorted(lat)
    return {"records/s": n / dt, "values/s": n * per_record / dt, "p50 µs": got[len(got) // 2] / 1e3,
            "p99 µs": got[min(len(got) - 1, int(0.99 * len(got)))] / 1e3}


def figure_producers(z: Sizes):
    rows = []
    for per, durable, sq, lm in ((100, False, "NORMAL", "off"), (1, True, "FULL", "on")):
        wl = f"{PRODUCER_PROCS} processes, {per} value{'s' if per > 1 else ''}/record" + \
            (", durable" if durable else "")
        rows += backends(wl, f"mpwal producers ({'commit' if durable else 'relaxed'})",
                         many_writers, "mpwal", per, durable, z)
        rows.append(measure(wl, f"SQLite WAL {sq}, a connection per process", many_writers,
                            "sqlite", per, durable, z))
        rows.append(measure(wl, f"LMDB sync {lm}, a writer per process", many_writers, "lmdb",
                            per, durable, z, needs="lmdb"))
        rows.append(measure(wl, "mpwal Writer alone (its own thread, for the latency)",
                            writer_alone, per, durable, z))
    return Figure(f"9. Many writing processes: {PRODUCER_PROCS} processes commit at once",
                  ["records/s", "values/s", "p50 µs", "p99 µs"], rows,
                  notes=["mpwal: one Writer (in the benchmark's process) and "
                         f"{PRODUCER_PROCS} mpwal.Producer processes; durable rows: "
                         "durability=\"commit\", one fsync for every record waiting from every "
                         "producer. SQLite: busy_timeout=30 s, BEGIN IMMEDIATE per record; LMDB: "
                         "its writer lock serialises the processes' write transactions.",
                         "Each process writes its own key range; the latency columns are each "
                         "commit's duration, over all processes. The last row of each workload "
                         "is one thread of the Writer itself, with no producers."])


# -- figure 10: shipping to NATS JetStream and a replica following it ------------------------------

SHIP_VALUE = 1024


def _nats_server(store: str) -> tuple[Any, str]:
    """A nats-server -js on a free loopback port (the caller stops it)."""
    import shutil as _sh
    import socket as _so
    import subprocess as _sp
    binary = _sh.which("nats-server") or "/usr/sbin/nats-server"
    with _so.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _sp.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                     stdout=_sp.DEVNULL, stderr=_sp.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with _so.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start") from None
            time.sleep(0.05)


def ship_throughput(tmp: str, count: int) -> dict:
    """Records of one 1 KiB value, committed first, then shipped by one ``mpwal ship`` run."""
    from ..shipping._ship import Shipper
    proc, url = _nats_server(os.path.join(tmp, "nats"))
    try:
        db = os.path.join(tmp, "db")
        w = mpwal.Writer(db, [mpwal.ValueTable(VALUE_TABLE, SHIP_VALUE)])
        MPWAL_DIRS.append(db)
        with mpwal.Reader(db) as r:
            r.cursor("ship:B", start=0)
        payload = random.Random(5).randbytes(SHIP_VALUE)
        for i in range(count):
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, i % 100_000, payload)
        w.sync()
        t0 = time.perf_counter()
        import asyncio
        sh = Shipper(os.path.realpath(db), url, "B", progress=None)
        asyncio.run(sh.run(idle_exit=0.0))
        dt = time.perf_counter() - t0
        w.close()
        return {"records/s": sh.shipped / dt, "MB/s": sh.shipped * SHIP_VALUE / dt / 1e6}
    finally:
        proc.terminate()
        proc.wait(10)


def _paced_writer(db: str, rate: float, seconds: float, ready, out) -> None:
    try:
        w = mpwal.Writer(db, [mpwal.ValueTable(VALUE_TABLE, SHIP_VALUE)], durability="commit")
        ready.put("open")
        pad = bytes(SHIP_VALUE - 8)

        def step(i: int) -> None:
            with w.record() as rec:
                rec.insert_value(VALUE_TABLE, i % 100_000, time.time_ns().to_bytes(8, "little") + pad)
        n, dt = run_paced(rate, seconds, step)
        w.close()
        out.put(n)
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put(child_error("paced writer", traceback.format_exc()))


def replication_lag(tmp: str, rate: float, seconds: float) -> dict:
    """A writer commits durable 1 KiB records at ``rate``/s; ``mpwal ship`` and ``mpwal follow``
    run as processes; a reader of the replica takes each record from its change feed and
    measures now minus the commit time the record carries."""
    import subprocess as _sp
    proc, url = _nats_server(os.path.join(tmp, "nats"))
    src, rep = os.path.join(tmp, "src"), os.path.join(tmp, "replica")
    MPWAL_DIRS.extend([src, rep])
    procs: list[Any] = []
    try:
        with mpwal.Writer(src, [mpwal.ValueTable(VALUE_TABLE, SHIP_VALUE)]):
            pass
        with mpwal.Reader(src) as r:
            r.cursor("ship:L", start=0)
        cmd = [sys.executable, "-m", "mpwal"]
        procs = [_sp.Popen(cmd + ["ship", src, "--nats", url, "--stream", "L"], stderr=_sp.DEVNULL),
                 _sp.Popen(cmd + ["follow", "--nats", url, "--stream", "L", rep], stderr=_sp.DEVNULL)]
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(rep, "mpwal.meta")):  # both running
            if time.monotonic() > deadline:
                raise RuntimeError("the follower made no replica")
            time.sleep(0.01)
        ctx = mp.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        writer = ctx.Process(target=_paced_writer, args=(src, rate, seconds, ready, out))
        writer.start()
        ready.get(timeout=60)
        lags = []
        with mpwal.Reader(rep) as rr:
            for ch in rr.changes(after=0, timeout=5.0, durable=False):
                data = next(iter(ch.values.values()), None)
                if data is not None and len(data) == SHIP_VALUE:
                    lags.append(time.time_ns() - int.from_bytes(data[:8], "little"))
        n = out.get(timeout=60)
        if isinstance(n, BaseException):
            raise n
        writer.join(30)
        lags.sort()
        return {"records": len(lags), "lag p50 ms": lags[len(lags) // 2] / 1e6 if lags else None,
                "lag p99 ms": lags[int(0.99 * len(lags))] / 1e6 if lags else None}
    finally:
        for p in procs:  # Ctrl-C: the follower closes its replica's writer (and its segment)
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except _sp.TimeoutExpired:
                p.kill()
                p.wait(10)
        proc.terminate()
        proc.wait(10)


def figure_shipping(z: Sizes):
    missing = None
    try:
        importlib.import_module("nats")
    except ImportError:
        missing = "nats-py not installed (pip install mpwal[nats])"
    if not (shutil.which("nats-server") or os.path.exists("/usr/sbin/nats-server")):
        missing = "nats-server not installed (apt-get install nats-server)"
    count = 5000 if z is QUICK else 50_000
    rows = []
    if missing:
        rows = [Row("ship", "mpwal ship", None, missing), Row("lag", "ship + follow", None, missing)]
    else:
        rows.append(measure(f"{count:,} records of 1 KiB", "mpwal ship (one process)", ship_throughput, count))
        rows.append(measure("1,000 records/s for 5 s" if z is not QUICK else "1,000 records/s for 2 s",
                            "mpwal ship + mpwal follow", replication_lag, 1000.0,
                            2.0 if z is QUICK else 5.0))
    return Figure("10. Shipping: to a local single-node JetStream stream, and a replica following it",
                  ["records/s", "MB/s", "lag p50 ms", "lag p99 ms"], rows,
                  notes=["Throughput: records committed (and synced) first, then one shipper run "
                         "from the first record until caught up, connection and stream creation "
                         "included. Lag: durable commits paced at 1,000/s in a writer process, "
                         "mpwal ship and mpwal follow as processes, and a reader of the replica "
                         "taking each record from the replica's change feed: now minus the commit "
                         "time the record carries (one clock: the same machine).",
                         "There is no SQLite or LMDB row: neither ships a log (Litestream does it "
                         "for SQLite, to object storage)."])


@dataclass
class Row:
    workload: str
    system: str
    metrics: dict | None
    note: str | None = None


@dataclass
class Figure:
    title: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    ratio_on: str | None = None    # the column mpwal/this compares (default: the first)
    lower_is_better: bool = False  # that column is a time: mpwal/this = the row's / mpwal's


def measure(workload: str, system: str, fn, *args, needs: str | None = None, raw: bool = False):
    """Run one workload on one system in a fresh temporary directory. Returns a Row (or, with
    ``raw``, ``fn``'s result); a missing system or an error becomes the row's note."""
    missing = {"lmdb": LMDB_MISSING, "diskcache": DISKCACHE_MISSING,
               "UltraDict": ULTRADICT_MISSING}.get(needs or "")
    if missing:
        return missing if raw else Row(workload, system, None, missing)
    print(f"  … {system}{', ' + workload if workload else ''}", file=sys.stderr, flush=True)
    tmp = tempfile.mkdtemp(prefix="mpwal-bench-", dir=ARGS.dir)
    t0 = time.perf_counter()
    try:
        got = fn(tmp, *args)
    except Exception as e:  # noqa: BLE001 - one failing row does not stop the others
        traceback.print_exc()
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return msg if raw else Row(workload, system, None, msg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"    {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return got if raw else Row(workload, system, got)


def backends(workload: str, system: str, fn, *args, **kw) -> list:
    """``measure`` on mpwal's default backend and, when that is the native one, again on the
    Python backend (the row "<system>, Python backend")."""
    rows = [measure(workload, system, fn, *args, **kw)]
    if mpwal.backend == "native":
        with _backend.python_backend():
            rows.append(measure(workload, f"{system}, Python backend", fn, *args, **kw))
    return rows


def fmt(x) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def render(fig: Figure, markdown: bool) -> str:
    """The figure as a table: one row per (workload, system); mpwal/this compares each row with
    the first mpwal row of its workload (the default configuration), on ``fig.ratio_on`` (the
    first column unless said): mpwal's value divided by the row's, or with
    ``fig.lower_is_better`` the row's divided by mpwal's; above 1 mpwal is faster."""
    head = ["workload", "system"] + fig.columns + ["mpwal/this"]
    col = fig.ratio_on or fig.columns[0]
    mp_row: dict = {}  # the first mpwal row of each workload (the default configuration)
    for r in fig.rows:
        if r.system.startswith("mpwal") and r.metrics:
            mp_row.setdefault(r.workload, r)
    body: list[list[str] | tuple[str, str, str]] = []  # cells, or (workload, system, note)
    for r in fig.rows:
        if r.metrics is None:
            assert r.note is not None  # a row without numbers says why
            body.append((r.workload, r.system, r.note))
            continue
        base_row = mp_row.get(r.workload)
        base, mine = base_row.metrics.get(col) if base_row else None, r.metrics.get(col)
        if fig.lower_is_better:
            base, mine = mine, base
        ratio = "" if base_row is r or not base or not mine else f"{base / mine:.2f}×"
        body.append([r.workload, r.system] + [fmt(r.metrics.get(c)) for c in fig.columns] + [ratio])
    out = [f"### {fig.title}" if markdown else fig.title, ""]
    if markdown:
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
        for b in body:
            cells = list(b) + [""] * (len(head) - 3) if isinstance(b, tuple) else b
            out.append("| " + " | ".join(cells) + " |")
    else:
        rows = [b for b in body if isinstance(b, list)]
        widths = [max([len(h)] + [len(b[i]) for b in rows]) for i, h in enumerate(head)]
        for i in (0, 1):
            widths[i] = max([widths[i]] + [len(b[i]) for b in body])

        def line(cells):
            return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells))
        out.append(line(head))
        out.append("-" * len(out[-1]))
        for b in body:
            out.append((line(b[:2]) + "  " + b[2] if isinstance(b, tuple) else line(b)).rstrip())
    out.append("")
    out += [("- " if markdown else "  ") + n for n in fig.notes]
    out.append("")
    return "\n".join(out)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"machine: {platform.platform()}", f"CPU: {cpu}, {os.cpu_count()} cores",
             f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
             f"LMDB {lmdb.version() if lmdb else '(not installed)'}, "
             f"mpwal {mpwal.__version__} ({mpwal.backend} backend)",
             f"temporary directories under {ARGS.dir or tempfile.gettempdir()}"]
    return "\n".join(parts)


FIGURES = {"ingest": figure_ingest, "commit": figure_commit, "reads": figure_reads,
           "large": figure_large, "sustained": figure_sustained, "lookups": figure_lookups,
           "latency": figure_latency, "kv": figure_kv, "producers": figure_producers,
           "shipping": figure_shipping}
ARGS = argparse.Namespace(dir=None)


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(prog="mpwal bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run in a minute or two")
    ap.add_argument("--only", default="",
                    help=f"comma-separated figures: {', '.join(FIGURES)} (or 1-{len(FIGURES)})")
    ap.add_argument("--dir", default=None, help="base directory for the temporary databases")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ARGS = ap.parse_args(argv)
    names = list(FIGURES)
    if ARGS.only:
        chosen = []
        for tok in ARGS.only.split(","):
            tok = tok.strip()
            name = names[int(tok) - 1] if tok.isdigit() and 1 <= int(tok) <= len(names) else tok
            if name not in FIGURES:
                ap.error(f"unknown figure {tok!r}; choose from {', '.join(names)} or 1-{len(names)}")
            chosen.append(name)
        names = [n for n in FIGURES if n in chosen]
    if ARGS.dir:
        os.makedirs(ARGS.dir, exist_ok=True)
    z = QUICK if ARGS.quick else FULL
    print(machine())
    print()
    t0 = time.perf_counter()
    for name in names:
        print(f"[{name}]", file=sys.stderr, flush=True)
        t1 = time.perf_counter()
        print(render(FIGURES[name](z), ARGS.markdown), flush=True)
        print(f"[{name}] {time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)
    left = []
    for db in MPWAL_DIRS:
        prefix = mpwal_shm_prefix(db)
        if prefix != "mpwal-":
            left += [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    if left:
        print(f"WARNING: shared-memory segments left in /dev/shm: {left}")
    print(f"total time {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
