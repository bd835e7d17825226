"""``mpwal stress --producers N``: the main job with N producer processes besides the writer.

A writer process serves producers and commits nothing itself; N producer processes
(``mpwal.Producer``) commit records; ``--readers`` reader processes check what they see.

The workload. Producers are numbered; each number is one producer process's life (a producer
started again after ``--chaos`` killed one takes a new number, so no two processes ever write
as one). Record ``i`` of producer ``n`` writes ``--batch`` data slots, ``data_slot(n, i, j)``,
and slot ``n`` (its *head*), each with a self-describing value: ``n u32  i u64  j u32
crc32 u32`` and a payload derived from them (``j = HEAD_J`` for the head).

Checks, all exact:

* readers: in one snapshot, for every producer, the head names record ``i`` and the slots of
  record ``i`` hold exactly what it wrote (a record is visible whole or not at all, and a
  producer's records in order), and no value is torn; a producer's head never goes back;
* at the end, with a fresh Reader: every record a producer reported acknowledged is there
  (its head is at or past it), and the record ids count exactly the producers' registrations
  plus the records their heads name (a record committed twice would be an extra id);
* ``--chaos``: the writer and the producers are SIGKILLed at random moments and started again.

Exit status 0 when every check passed, 1 when one failed.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import random
import struct
import sys
import time
import zlib
from typing import Any

import mpwal

TABLE = 1
HEAD_J = 0xFFFFFFFF
MAX_PRODUCERS = 4096  # producer numbers of one run (heads are slots 0..MAX_PRODUCERS-1)
_HEAD = struct.Struct("<IQII")  # n, i, j, crc32 of the payload
RESERVED = 0xFFFF  # the producers' table: slot 0 holds the next producer id


def make_value(n: int, i: int, j: int, size: int) -> bytes:
    seed = zlib.crc32(_HEAD.pack(n, i, j, 0)).to_bytes(4, "little") * 16
    payload = (seed * (size // 64 + 1))[:size]
    return _HEAD.pack(n, i, j, zlib.crc32(payload)) + payload


def check_value(data: bytes | None, n: int, i: int | None, j: int, size: int) -> str | None:
    """Why ``data`` is not the value of (n, i, j) (any i when None), or None."""
    if data is None or len(data) != _HEAD.size + size:
        return f"producer {n}: a value of {None if data is None else len(data)} bytes"
    got_n, got_i, got_j, _ = _HEAD.unpack_from(data)
    if (got_n, got_j) != (n, j) or (i is not None and got_i != i) or data != make_value(n, got_i, j, size):
        return f"producer {n} record {i} slot {j}: read ({got_n}, {got_i}, {got_j}) or damaged bytes"
    return None


def data_slot(cfg: dict, n: int, i: int, j: int) -> int:
    per = cfg["slots_per_producer"]
    return MAX_PRODUCERS + n * per + (i * cfg["batch"] + j) % per


def _writer(path: str, cfg: dict, out: Any, stop: Any) -> None:
    try:
        w = mpwal.Writer(path, [mpwal.ValueTable(TABLE, _HEAD.size + cfg["value_size"])],
                         durability="relaxed", log_size=4 << 20, log_age=0.5, enactor=cfg["enactor"])
        out.send(("open", os.getpid()))
        stop.wait()
        st = w.stats()
        w.close()
        out.send(("closed", st["producer_submissions"], st["committed"]))
    except BaseException as e:  # reported to the parent, which fails the run
        out.send(("error", f"writer: {type(e).__name__}: {e}"))


def _producer(path: str, cfg: dict, n: int, out: Any, stop: Any) -> None:
    lat: list[int] = []
    i = -1
    try:
        with mpwal.Producer(path, timeout=60, durability=cfg["durability"]) as p:
            size = cfg["value_size"]
            last_report = time.monotonic()
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter_ns()
                with p.record() as rec:
                    rec.insert_values(TABLE, [(data_slot(cfg, n, i, j), make_value(n, i, j, size))
                                              for j in range(cfg["batch"])])
                    rec.insert_value(TABLE, n, make_value(n, i, HEAD_J, size))
                if len(lat) < 200_000:
                    lat.append(time.perf_counter_ns() - t0)
                i += 1
                if time.monotonic() - last_report > 0.1:
                    out.send(("acked", n, i - 1))
                    last_report = time.monotonic()
        out.send(("producer", n, i - 1, lat, None))
    except BaseException as e:
        out.send(("producer", n, i - 1, lat, f"producer {n}: {type(e).__name__}: {e}"))


def _check_once(r: mpwal.Reader, cfg: dict, heads: dict[int, int], errors: list[str]) -> int:
    """One snapshot's check of every producer's newest record; the reads it made."""
    size = cfg["value_size"]
    reads = 0
    with r.snapshot() as s:
        got = s.values(TABLE, list(range(cfg["numbers"])))
        for n, head in enumerate(got):
            if head is None:
                continue
            why = check_value(head, n, None, HEAD_J, size)
            if why:
                errors.append(why)
                continue
            i = _HEAD.unpack_from(head)[1]
            if i < heads.get(n, -1):
                errors.append(f"producer {n}: head {i} after {heads[n]} (went back)")
            heads[n] = i
            vals = s.values(TABLE, [data_slot(cfg, n, i, j) for j in range(cfg["batch"])])
            for j, v in enumerate(vals):
                why = check_value(v, n, i, j, size)
                if why:
                    errors.append(f"{why} (a record seen in part)")
                    break
            reads += len(vals) + 1
    return reads


def _reader(idx: int, path: str, cfg: dict, out: Any, stop: Any) -> None:
    errors: list[str] = []
    reads = 0
    heads: dict[int, int] = {}
    try:
        with mpwal.Reader(path) as r:
            while not stop.is_set() and len(errors) < 10:
                try:
                    reads += _check_once(r, cfg, heads, errors)
                except mpwal.SnapshotExpiredError:
                    pass  # a writer restarted by --chaos replayed past it: take a new one
    except BaseException as e:
        errors.append(f"reader {idx}: {type(e).__name__}: {e}")
    out.send(("reader", idx, reads, errors))


class _Run:
    def __init__(self, path: str, cfg: dict) -> None:
        self.path = path
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.conns: list[Any] = []  # a pipe per process (a killed process cannot jam a pipe
        # of another, as it could a shared queue's lock)
        self.errors: list[str] = []
        self.acked: dict[int, int] = {}  # producer number -> last record it reported acked
        self.finished: set[int] = set()  # producer numbers that sent their last message
        self.readers_done = 0
        self.reads = 0
        self.lat: list[int] = []
        self.numbers = 0
        self.kills = {"writer": 0, "producer": 0}
        self.producers: dict[int, tuple[Any, Any]] = {}  # number -> (process, stop event)
        self.writer: Any = None
        self.writer_stop: Any = None
        self.submitted = 0

    def start_writer(self) -> None:
        self.writer_stop = self.ctx.Event()
        self.writer = self.ctx.Process(target=_writer, args=(self.path, self.cfg, self.pipe(),
                                                             self.writer_stop))
        self.writer.start()
        self.wait_for("open")

    def start_producer(self) -> None:
        n = self.numbers
        self.numbers += 1
        if n >= self.cfg["numbers"]:
            raise RuntimeError("too many producer restarts for one run")
        stop = self.ctx.Event()
        p = self.ctx.Process(target=_producer, args=(self.path, self.cfg, n, self.pipe(), stop))
        p.start()
        self.producers[n] = (p, stop)

    def pipe(self) -> Any:
        ours, theirs = self.ctx.Pipe(duplex=False)
        self.conns.append(ours)
        return theirs

    def messages(self, timeout: float) -> list[tuple]:
        """What the processes sent within ``timeout`` (a dead one's pipe is dropped)."""
        out: list[tuple] = []
        ready: list[Any] = mp.connection.wait(self.conns, timeout)  # (our pipes)
        for conn in ready:
            try:
                out.append(conn.recv())
            except (EOFError, OSError):
                self.conns.remove(conn)
        for msg in out:
            self.take(msg)
        return out

    def wait_for_producers(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not set(self.producers) <= self.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"producers {set(self.producers) - self.finished} did not end")
            self.messages(0.1)

    def wait_for(self, tag: str, timeout: float = 120) -> tuple:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.messages(0.1):
                if msg[0] == tag:
                    return msg
        raise TimeoutError(f"no {tag!r} message within {timeout} s")

    def take(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "acked":
            self.acked[msg[1]] = max(self.acked.get(msg[1], -1), msg[2])
        elif kind == "producer":
            _, n, last, lat, err = msg
            self.acked[n] = max(self.acked.get(n, -1), last)
            self.finished.add(n)
            self.lat += lat
            if err:
                self.errors.append(err)
        elif kind == "reader":
            self.readers_done += 1
            self.reads += msg[2]
            self.errors += msg[3]
        elif kind == "closed":
            self.submitted += msg[1]
        elif kind == "error":
            self.errors.append(msg[1])

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.messages(max(0.0, deadline - time.monotonic()))

    def kill_writer(self) -> None:
        os.kill(self.writer.pid, 9)
        self.writer.join(30)
        self.kills["writer"] += 1
        self.start_writer()

    def kill_producer(self, rng: random.Random) -> None:
        n = rng.choice(sorted(self.producers))
        p, _ = self.producers.pop(n)
        os.kill(p.pid, 9)
        p.join(30)
        self.kills["producer"] += 1
        self.start_producer()


def run(path: str, seconds: float, producers: int, readers: int, batch: int, value_size: int,
        durability: str, enactor: str, chaos: bool, seed: int) -> int:
    """Run the stress on ``path`` (a new directory); 0 when every check passed."""
    cfg = {"batch": batch, "value_size": value_size, "durability": durability, "enactor": enactor,
           "numbers": MAX_PRODUCERS, "slots_per_producer": max(batch, 4096)}
    print(f"mpwal stress --producers {producers}: {path}; {seconds:g} s, {readers} readers, "
          f"records of {batch} values of {value_size} bytes, durability {durability}"
          f"{', chaos' if chaos else ''}, seed {seed}, backend {mpwal.backend}", flush=True)
    rng = random.Random(seed)
    run_ = _Run(path, cfg)
    reader_stop = run_.ctx.Event()
    readers_ = []
    t0 = time.monotonic()
    try:
        run_.start_writer()
        for _ in range(producers):
            run_.start_producer()
        for i in range(readers):
            rp = run_.ctx.Process(target=_reader, args=(i, path, cfg, run_.pipe(), reader_stop))
            rp.start()
            readers_.append(rp)
        end = t0 + seconds
        while time.monotonic() < end and not run_.errors and run_.readers_done == 0:
            run_.pump(min(rng.uniform(0.3, 1.5) if chaos else 0.5, max(0.0, end - time.monotonic())))
            if chaos and time.monotonic() < end - 0.5:
                if rng.random() < 0.5:
                    run_.kill_writer()
                else:
                    run_.kill_producer(rng)
        for _, stop in run_.producers.values():
            stop.set()
        run_.wait_for_producers()
        reader_stop.set()
        while run_.readers_done < len(readers_):
            run_.wait_for("reader")
        run_.writer_stop.set()
        run_.wait_for("closed")
    except Exception as e:
        run_.errors.append(f"the run: {type(e).__name__}: {e}")
    finally:
        reader_stop.set()
        if run_.writer_stop is not None:
            run_.writer_stop.set()
        for _, stop in run_.producers.values():
            stop.set()
        for proc in [*readers_, *(p for p, _ in run_.producers.values()), run_.writer]:
            if proc is not None:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()
    elapsed = time.monotonic() - t0
    records = _verify(path, cfg, run_)
    lat = sorted(run_.lat)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e3) if lat else (lambda q: 0.0)
    print(f"producers: {records:,} records ({records / elapsed:,.0f}/s, "
          f"{records * batch / elapsed:,.0f} values/s) from {run_.numbers} producer processes; "
          f"commit latency p50 {pct(0.5):,.0f} us, p99 {pct(0.99):,.0f} us")
    reads = run_.reads
    print(f"readers: {reads:,} checked reads ({reads / max(elapsed, 1e-9):,.0f}/s)"
          + (f"; chaos: {run_.kills['writer']} writer and {run_.kills['producer']} producer "
             "SIGKILLs" if chaos else ""))
    for problem in run_.errors[:20]:
        print(f"ERROR {problem}", file=sys.stderr)
    print(f"mpwal stress --producers: {'PASS' if not run_.errors else 'FAIL'} "
          f"({len(run_.errors)} errors)", flush=True)
    return 0 if not run_.errors else 1


def _verify(path: str, cfg: dict, run_: _Run) -> int:
    """The end's checks (module comment); the number of producer records committed."""
    size = cfg["value_size"]
    total = 0
    try:
        with mpwal.Reader(path) as r:
            heads = r.values(TABLE, list(range(run_.numbers)))
            for n, head in enumerate(heads):
                i = _HEAD.unpack_from(head)[1] if head is not None else -1
                if head is not None and check_value(head, n, None, HEAD_J, size):
                    run_.errors.append(f"at the end: producer {n}'s head is damaged")
                if i < run_.acked.get(n, -1):
                    run_.errors.append(f"at the end: producer {n} acknowledged record {run_.acked[n]}, "
                                       f"the directory has {i}")
                total += i + 1
            counter = r.value(RESERVED, 0)
            registrations = struct.unpack("<Q", counter)[0] - 1 if counter else 0
            if r.last_record_id != registrations + total:
                run_.errors.append(
                    f"at the end: {r.last_record_id} records, but {registrations} registrations and "
                    f"{total} producer records: {r.last_record_id - registrations - total} committed twice")
    except mpwal.Error as e:
        run_.errors.append(f"at the end: {type(e).__name__}: {e}")
    return total
