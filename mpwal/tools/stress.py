"""``mpwal stress``: one writer, several reader processes and the enactor, checked exactly.

With no arguments it runs for 10 s on a temporary directory, removed at the end (``--keep``
keeps it)::

    mpwal stress                                  # 10 s, 2 readers, enactor thread
    mpwal stress --chaos --seconds 60 --enactor process
    mpwal stress --dir /tmp/st --records 20000 --durability commit

A ``--dir`` it creates gets mode 0700 and its ``stress.json`` (the workload parameters) 0600,
as a Writer makes its own files.

The workload (deterministic from ``--seed``, so every process can recompute it):

* Key space: ``--keys`` slots of value table 1, laid out on a ring by a seeded permutation
  ``ring`` (``pos`` = a key's place on the ring). Record ``r`` writes the ``--batch`` keys at ring
  positions ``(r-1)*batch .. r*batch-1`` (mod keys), so the records' keys look random, every key
  is rewritten every ``keys/batch`` records, and the record that last wrote a key at any record id
  ``L`` is a closed formula (``last_writer``): no process needs a log of what was written.
* The value of key ``k`` written by record ``r`` is self-describing: a header ``k:u64 r:u64
  crc32(payload):u32`` and a payload of ``--value-size`` bytes derived from ``(seed, k, r)``
  (BLAKE2b, repeated). A reader checks the value whole (key, CRC and the exact payload).
* Index table 2: record ``r`` sets ``INDEX_PER_RECORD`` entries, on a ring of ``INDEX_SLOTS``
  entries (64 chunks) in the same way, to ``r << 20 | slot``.

Checks, all exact:

* Readers (``--readers`` processes, spawned) read one value at a time, a whole record's keys in
  one ``values()`` call, or a whole index chunk, between two reads of ``last_record_id`` (``L1``
  before, ``L2`` after), or a record's keys one ``value()`` call at a time inside a snapshot
  (``L1 = L2 =`` its record id, which never goes back either). Every value must decode and be
  one that record ``rid`` wrote; the state it belongs to, the record ids ``L`` at which
  ``last_writer(key, L) == rid``, must meet ``[L1, L2]`` (nothing stale, nothing from the
  future); a ``values()`` batch, an index chunk or a snapshot's reads must belong to one such
  ``L`` for all their keys (no record partly visible); per key the record id never goes back,
  and neither does ``last_record_id``.
* The parent verifies the whole state (every key and index entry) equals the prefix through
  the writer's ``last_record_id`` after every writer open and at the end.
* ``--chaos``: the writer process is SIGKILLed at random moments (a quarter of the restarts are
  killed again at a random point of their open: replay, log truncation, new segment), and with
  ``--enactor process`` the enactor process too; a new writer replays. Every record the writer
  acknowledged as durable (``durability="commit"`` commits, or ``sync()`` every 50 ms) and
  every record reported committed must be there after the restart; readers keep running. The
  next writer process is spawned ahead (a warm standby) so a restart does not wait for Python.
* At the end no shared-memory segment of the directory may be left in /dev/shm.

The writer runs in a child process in every mode (so chaos and plain runs share the code); the
parent shows progress, kills, verifies and prints the summary. The writer waits while the parent
checks the state after a restart; the summary counts those verification pauses apart and leaves
them out of the commit throughput. mpwal's warnings in the writer process are shown as events,
its errors count as failed checks. Exit status 0 when every check passed, 1 when one failed, 2
for bad arguments, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from typing import Any

VALUE_TABLE = 1
INDEX_TABLE = 2
INDEX_PER_RECORD = 4
INDEX_SLOTS = 64 * 64  # 64 chunks of 64 entries
SLOT_BITS = 20  # index entry value: record id << SLOT_BITS | slot
HEADER = struct.Struct("<QQI")  # key, record id, crc32 of the payload
_SEED = struct.Struct("<QQQ")
PARAMS_FILE = "stress.json"
MAX_MESSAGES = 20  # error descriptions kept per process
MAX_SAMPLES = 100_000  # latency samples kept per process (decimated past this)
READ_SAMPLE_EVERY = 16
WRITER_REPORT_SECONDS = 0.25
CHAOS_SYNC_SECONDS = 0.05


# -- the workload: pure functions of the parameters -------------------------------------------

@dataclass(frozen=True)
class Workload:
    seed: int
    keys: int
    batch: int
    value_size: int
    index_per_record: int = INDEX_PER_RECORD
    index_slots: int = INDEX_SLOTS


def make_payload(seed: int, key: int, rid: int, size: int) -> bytes:
    d = hashlib.blake2b(_SEED.pack(seed, key, rid), digest_size=64).digest()
    if size <= 64:
        return d[:size]
    return (d * (size // 64 + 1))[:size]


def make_value(seed: int, key: int, rid: int, size: int) -> bytes:
    """The value record ``rid`` writes to ``key``: header + deterministic payload."""
    p = make_payload(seed, key, rid, size)
    return HEADER.pack(key, rid, zlib.crc32(p)) + p


def verify_value(seed: int, key: int, data, size: int, exact: bool = True) -> tuple[int, str | None]:
    """Decode a value read for ``key``: (record id, None) if it is whole and right, else
    (record id or -1, what is wrong). ``None`` (no value) decodes as record 0. ``exact``
    also compares the payload with the one record ``rid`` wrote (else the CRC vouches for it)."""
    if data is None:
        return 0, None
    data = bytes(data)
    if len(data) != HEADER.size + size:
        return -1, f"key {key}: value has {len(data)} bytes, expected {HEADER.size + size} (torn or foreign)"
    k, rid, crc = HEADER.unpack_from(data)
    p = data[HEADER.size:]
    if k != key:
        return -1, f"key {key}: value carries key {k} (record {rid}): read the wrong slot"
    if zlib.crc32(p) != crc:
        return -1, f"key {key}: value of record {rid} fails its CRC (torn value)"
    if exact and p != make_payload(seed, key, rid, size):
        return -1, f"key {key}: value of record {rid} has a wrong payload"
    if rid == 0:
        return -1, f"key {key}: value claims record 0"
    return rid, None


def last_writer(pos: int, last: int, n: int, b: int) -> int:
    """Record id that last wrote ring position ``pos`` among records 1..``last`` (0: none),
    on a ring of ``n`` positions where record r covers positions (r-1)*b .. r*b-1."""
    top = last * b - 1
    if top < pos:
        return 0
    return (pos + ((top - pos) // n) * n) // b + 1


def writer_interval(pos: int, rid: int, n: int, b: int) -> tuple[int, int] | None:
    """The record ids ``L`` (inclusive range) at which ``last_writer(pos, L) == rid``; None if
    record ``rid`` never writes ``pos``. ``rid == 0`` (never written) gives ``[0, first-1]``."""
    if rid == 0:
        return 0, pos // b
    start = (rid - 1) * b
    p = pos + max(0, -((pos - start) // n)) * n
    if p >= rid * b or p < start:
        return None
    return rid, (p + n) // b


class Plan:
    """The workload with its ring: what each record writes, and what any state must hold."""

    def __init__(self, wl: Workload):
        self.wl = wl
        self.seed = wl.seed
        self.keys = wl.keys
        self.batch = wl.batch
        self.value_size = wl.value_size
        ring = list(range(wl.keys))
        random.Random(wl.seed).shuffle(ring)
        self.ring = ring
        pos = [0] * wl.keys
        for i, k in enumerate(ring):
            pos[k] = i
        self.pos = pos
        self.chunks = wl.index_slots // 64

    # writes
    def record_keys(self, rid: int) -> list[int]:
        s = ((rid - 1) * self.batch) % self.keys
        e = s + self.batch
        if e <= self.keys:
            return self.ring[s:e]
        return self.ring[s:] + self.ring[:e - self.keys]

    def record_values(self, rid: int) -> list[tuple[int, bytes]]:
        seed, size = self.seed, self.value_size
        return [(k, make_value(seed, k, rid, size)) for k in self.record_keys(rid)]

    def record_index(self, rid: int) -> list[tuple[int, int, int]]:
        m, n = self.wl.index_per_record, self.wl.index_slots
        out = []
        for j in range(m):
            slot = ((rid - 1) * m + j) % n
            out.append((slot // 64, slot % 64, (rid << SLOT_BITS) | slot))
        return out

    # expectations
    def expected_rid(self, key: int, last: int) -> int:
        return last_writer(self.pos[key], last, self.keys, self.batch)

    def value_interval(self, key: int, rid: int):
        return writer_interval(self.pos[key], rid, self.keys, self.batch)

    def expected_index(self, slot: int, last: int) -> int:
        rid = last_writer(slot, last, self.wl.index_slots, self.wl.index_per_record)
        return (rid << SLOT_BITS) | slot if rid else 0

    def index_interval(self, slot: int, v: int):
        """(interval, None) or (None, what is wrong) for entry value ``v`` at ``slot``."""
        if v == 0:
            return writer_interval(slot, 0, self.wl.index_slots, self.wl.index_per_record), None
        rid, s = v >> SLOT_BITS, v & ((1 << SLOT_BITS) - 1)
        if s != slot or rid == 0:
            return None, (f"index slot {slot}: entry {v:#x} is not a stress entry for this slot "
                          "(torn or misplaced)")
        iv = writer_interval(slot, rid, self.wl.index_slots, self.wl.index_per_record)
        if iv is None:
            return None, f"index slot {slot}: record {rid} never writes this slot"
        return iv, None


def check_snapshot(plan: Plan, keys: list[int], vals: list, l1: int, l2: int,
                   seen: list | None = None) -> list[str]:
    """Errors of one consistent read (``values()``) of ``keys`` between ``last_record_id``
    ``l1`` (before) and ``l2`` (after): each value whole and right, and one record id ``L`` in
    [l1, l2] at which every key holds exactly what was read (no record partly visible)."""
    errs = []
    lo, hi = l1, l2
    seed, size = plan.seed, plan.value_size
    for k, v in zip(keys, vals):
        rid, err = verify_value(seed, k, v, size)
        if err:
            errs.append(err)
            continue
        iv = plan.value_interval(k, rid)
        if iv is None:
            errs.append(f"key {k}: holds record {rid}, which never writes this key")
            continue
        if seen is not None:
            if rid < seen[k]:
                errs.append(f"key {k}: record {rid} read after record {seen[k]} (went back)")
            else:
                seen[k] = rid
        lo = max(lo, iv[0])
        hi = min(hi, iv[1])
    if not errs and lo > hi:
        if len(keys) == 1:
            k = keys[0]
            rid = verify_value(seed, k, vals[0], size)[0]
            if rid > l2:
                errs.append(f"key {k}: holds record {rid}, newer than last_record_id {l2} read after it")
            else:
                errs.append(f"key {k}: holds record {rid} but last_record_id was already {l1} "
                            f"(record {plan.expected_rid(k, l1)} wrote it by then): stale read")
        else:
            errs.append(f"values() of {len(keys)} keys between last_record_id {l1} and {l2} fits no "
                        "single record id (a record partly visible, or a stale/future value)")
    return errs


def check_chunk(plan: Plan, chunk: int, data: bytes, l1: int, l2: int,
                seen: list | None = None) -> list[str]:
    """Errors of one ``index_chunk`` read, as ``check_snapshot`` for values."""
    errs = []
    if len(data) != 512:
        return [f"index chunk {chunk}: {len(data)} bytes, expected 512"]
    lo, hi = l1, l2
    ents = struct.unpack("<64Q", data)
    for e, v in enumerate(ents):
        slot = chunk * 64 + e
        iv, err = plan.index_interval(slot, v)
        if err:
            errs.append(err)
            continue
        if seen is not None:
            if v < seen[slot]:
                errs.append(f"index slot {slot}: record {v >> SLOT_BITS} read after record "
                            f"{seen[slot] >> SLOT_BITS} (went back)")
            else:
                seen[slot] = v
        lo, hi = max(lo, iv[0]), min(hi, iv[1])
    if not errs and lo > hi:
        errs.append(f"index chunk {chunk} between last_record_id {l1} and {l2} fits no single record "
                    "id (a record partly visible, or a stale/future entry)")
    return errs


def verify_state(path: str, plan: Plan, expect_last: int | None) -> tuple[int, list[str], int]:
    """Read every key and index entry: the state must be exactly records 1..last. Returns
    (last_record_id seen, errors, error count). Meant for when no record is being committed."""
    from .._reader import Reader
    errs: list[str] = []
    count = 0

    def err(msg: str) -> None:
        nonlocal count
        count += 1
        if len(errs) < MAX_MESSAGES:
            errs.append(msg)

    seed, size = plan.seed, plan.value_size
    with Reader(path) as r:
        last = r.last_record_id
        if expect_last is not None and last != expect_last:
            err(f"a reader sees last_record_id {last}, the writer reported {expect_last}")
        step = 2048
        for start in range(0, plan.keys, step):
            keys = list(range(start, min(plan.keys, start + step)))
            for k, v in zip(keys, r.values(VALUE_TABLE, keys)):
                want = plan.expected_rid(k, last)
                rid, e = verify_value(seed, k, v, size, exact=False)
                if e:
                    err(f"state check at record {last}: {e}")
                elif rid != want:
                    err(f"state check at record {last}: key {k} holds record {rid}, expected "
                        f"{want or 'no value'}")
        for c in range(plan.chunks):
            ents = struct.unpack("<64Q", r.index_chunk(INDEX_TABLE, c))
            for ent, v in enumerate(ents):
                slot = c * 64 + ent
                want = plan.expected_index(slot, last)
                if v != want:
                    err(f"state check at record {last}: index slot {slot} holds {v:#x}, expected {want:#x}")
        again = r.last_record_id
        if again != last:
            err(f"state check: last_record_id moved from {last} to {again} while checking")
    return last, errs, count


# -- latency samples ---------------------------------------------------------------------------

class Samples:
    """Latency samples (ns), decimated to at most MAX_SAMPLES by doubling the stride."""

    def __init__(self):
        self.a = array.array("q")
        self.stride = 1
        self.n = 0

    def add(self, ns: int) -> None:
        self.n += 1
        if self.n % self.stride == 0:
            self.a.append(ns)
            if len(self.a) >= MAX_SAMPLES:
                self.a = self.a[::2]
                self.stride *= 2

    def take(self) -> bytes:
        """The samples since the last take, as bytes (for a pipe)."""
        out = self.a
        self.a = array.array("q")
        return out.tobytes()


def percentiles(values) -> tuple[float, float, float] | None:
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[min(n - 1, int(n * 0.50))], s[min(n - 1, int(n * 0.99))], s[-1]


# -- reader processes --------------------------------------------------------------------------

def _reader_main(idx: int, path: str, wl: dict, stop, counts, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out: dict[str, Any] = {"idx": idx, "reads": 0, "errors": 0, "recoveries": 0, "lat": b"",
                           "ops": {"value": 0, "values": 0, "chunk": 0, "snapshot": 0,
                                   "snapshot_expired": 0}}
    try:
        _reader_loop(idx, path, Workload(**wl), stop, counts, out, results)
    except BaseException:  # noqa: BLE001 - any crash is reported to the parent as a failed check
        out["errors"] += 1
        results.put(("error", f"reader {idx} crashed:\n{traceback.format_exc()}"))
    results.put(("result", out))


def _reader_loop(idx: int, path: str, wl: Workload, stop, counts, out: dict, results) -> None:
    """Read and check until ``stop``; error descriptions go to the parent as they happen (the
    first MAX_MESSAGES), the counts and latency samples at the end in ``out``."""
    from .._errors import SnapshotExpiredError
    from .._reader import Reader
    plan = Plan(wl)
    rng = random.Random((wl.seed << 8) + idx + 1)
    seen = [0] * wl.keys
    seen_index = [0] * wl.index_slots
    lat = Samples()
    nerr = 0
    reads = 0
    ops = out["ops"]
    seed, size, keys, batch = wl.seed, wl.value_size, wl.keys, wl.batch
    pos = plan.pos
    perf = time.perf_counter_ns
    randrange = rng.randrange

    def error(msg: str) -> None:
        nonlocal nerr
        nerr += 1
        if nerr <= MAX_MESSAGES:
            try:
                where = f"{r.mode}, generation {r.stats().get('generation', '-')}"
            except Exception as e:  # noqa: BLE001 - only for the message
                where = f"{r.mode}, stats() raised {e!r}"
            results.put(("error", f"reader {idx} ({where}): {msg}"))

    r = Reader(path)
    counts[idx] = 0  # ready
    try:
        last = r.last_record_id
        i = 0
        failures = 0
        while True:
            try:
                while True:
                    i += 1
                    if not i & 255:
                        counts[idx] = reads
                        if stop.is_set() or nerr > 10_000:
                            break
                    kind = i & 63
                    if kind == 0 and last:
                        # a whole record's keys in one snapshot (a recent record, or any)
                        q = max(1, last - randrange(min(last, max(1, keys // batch))))
                        ks = plan.record_keys(q)
                        vals = r.values(VALUE_TABLE, ks)
                        l2 = r.last_record_id
                        ops["values"] += 1
                        reads += len(ks)
                        if l2 < last:
                            error(f"last_record_id went back from {last} to {l2}")
                        for why in check_snapshot(plan, ks, vals, last, max(l2, last), seen):
                            error(why)
                        last = max(last, l2)
                    elif kind == 16 and last:
                        # a snapshot: a record's keys one call at a time, all at its record id
                        q = max(1, last - randrange(min(last, max(1, keys // batch))))
                        ks = plan.record_keys(q)
                        try:
                            with r.snapshot() as snap:
                                at = snap.record_id
                                vals = [snap.value(VALUE_TABLE, k) for k in ks]
                        except SnapshotExpiredError:  # a new writer replayed past it (chaos)
                            ops["snapshot_expired"] += 1
                            continue
                        ops["snapshot"] += 1
                        reads += len(ks)
                        if at < last:
                            error(f"snapshot at record {at} went back from {last}")
                        for why in check_snapshot(plan, ks, vals, at, at, seen):
                            error(f"snapshot at record {at}: {why}")
                        last = max(last, at)
                    elif kind == 32:
                        c = randrange(plan.chunks)
                        data = r.index_chunk(INDEX_TABLE, c)
                        l2 = r.last_record_id
                        ops["chunk"] += 1
                        reads += 1
                        if l2 < last:
                            error(f"last_record_id went back from {last} to {l2}")
                        for why in check_chunk(plan, c, data, last, max(l2, last), seen_index):
                            error(why)
                        last = max(last, l2)
                    else:
                        k = randrange(keys)
                        if not i % READ_SAMPLE_EVERY:
                            t0 = perf()
                            v = r.value(VALUE_TABLE, k)
                            lat.add(perf() - t0)
                        else:
                            v = r.value(VALUE_TABLE, k)
                        l2 = r.last_record_id
                        reads += 1
                        ops["value"] += 1
                        if l2 < last:
                            error(f"last_record_id went back from {last} to {l2}")
                            l2 = last
                        # inline check_snapshot for one key (the hot path)
                        rid, e = verify_value(seed, k, v, size)
                        if e:
                            error(e)
                        else:
                            iv = writer_interval(pos[k], rid, keys, batch)
                            if iv is None:
                                error(f"key {k}: holds record {rid}, which never writes this key")
                            elif iv[1] < last or iv[0] > l2:
                                for e in check_snapshot(plan, [k], [v], last, l2):
                                    error(e)
                            if rid < seen[k]:
                                error(f"key {k}: record {rid} read after record {seen[k]} (went back)")
                            else:
                                seen[k] = rid
                        last = l2
                break  # stopped
            except Exception:  # noqa: BLE001 - an error in a reader is a failed check; read on
                failures += 1
                error(f"lookup raised:\n{traceback.format_exc()}")
                if failures >= 20:
                    break
                last = r.last_record_id
    finally:
        counts[idx] = reads
        out["reads"] = reads
        out["errors"] += nerr
        out["recoveries"] = r.recoveries
        out["lat"] = lat.a.tobytes()
        out["lat_stride"] = lat.stride
        r.close()


# -- the writer process ------------------------------------------------------------------------

def _writer_stats(w) -> dict:
    s = w.stats()
    logs = s["logs"]
    return {"committed": s["committed"], "durable": s["durable"], "enacted": s["enacted"],
            "generation": s["generation"], "read": len(logs["read"]), "cleanup": len(logs["cleanup"]),
            "pool": len(logs["pool"]), "overlay_entries": s["overlay_entries"],
            "overlay_bytes": s["overlay_bytes"], "overlay_capacity_bytes": s["overlay_capacity_bytes"],
            "enactor_pid": s["enactor_pid"], "enactor_restarts": s["enactor_restarts"],
            "enactor_errors": s["enactor_errors"], "rotations": s.get("rotations", 0)}


class _LogToParent:
    """A logging handler that keeps mpwal's warnings for the parent (sent with progress), so
    they appear in the stress output in order instead of on the child's stderr."""

    def __init__(self):
        import logging

        class H(logging.Handler):
            def emit(h, record):
                text = record.getMessage()
                if record.exc_info:
                    text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
                self.pending.append((record.levelno, record.levelname.lower(), text))

        self.pending: list[tuple[int, str, str]] = []  # (level, level name, text)
        self.handler = H(logging.WARNING)
        lg = logging.getLogger("mpwal")
        lg.addHandler(self.handler)
        lg.propagate = False

    def take(self) -> list[tuple[int, str, str]]:
        out, self.pending = self.pending, []
        return out


def _writer_main(conn, path: str, wl: dict, cfg: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _writer_loop(conn, path, Workload(**wl), cfg)
    except BaseException:  # noqa: BLE001 - any crash is reported to the parent as an error
        try:
            conn.send(("error", f"writer process (pid {os.getpid()}):\n{traceback.format_exc()}"))
        except OSError:
            pass
        os._exit(1)


def _writer_loop(conn, path: str, wl: Workload, cfg: dict) -> None:
    from .. import IndexTable, ValueTable, Writer
    logs = _LogToParent()
    plan = Plan(wl)
    conn.send(("ready",))  # a warm standby: imported and planned; open only when told
    if conn.recv()[0] != "open":
        return
    conn.send(("opening", os.getpid()))
    w = Writer(path, tables=[ValueTable(VALUE_TABLE, slot_size=HEADER.size + wl.value_size),
                             IndexTable(INDEX_TABLE)],
               durability=cfg["durability"], enactor=cfg["enactor"], log_size=cfg["log_size"],
               log_age=cfg["log_age"])
    try:
        conn.send(("open", w.last_record_id, _writer_stats(w), logs.take()))
        if conn.recv()[0] == "stop":
            return _writer_close(conn, w, Samples(), logs)
        target = cfg["records"]
        ack_each = cfg["durability"] == "commit"
        sync_every = CHAOS_SYNC_SECONDS if cfg["chaos"] and not ack_each else 0.0  # 0: never
        lat = Samples()
        mono = time.monotonic
        perf = time.perf_counter_ns
        next_report = mono() + WRITER_REPORT_SECONDS
        next_sync = mono() + sync_every if sync_every else None
        rid = w.last_record_id + 1
        while True:
            if target is not None and rid > target:
                conn.send(("done", rid - 1))
                while conn.recv()[0] != "stop":
                    pass
                break
            rec = w.record()
            rec.insert_values(VALUE_TABLE, plan.record_values(rid))
            for c, e, v in plan.record_index(rid):
                rec.insert_index(INDEX_TABLE, c, e, v)
            t0 = perf()
            got = rec.commit()
            lat.add(perf() - t0)
            if got != rid:
                raise AssertionError(f"commit returned record id {got}, expected {rid}: record ids "
                                     "must be contiguous after the last one")
            if ack_each:
                conn.send(("a", rid))
            rid += 1
            now = mono()
            if next_sync is not None and now >= next_sync:
                conn.send(("a", w.sync()))
                next_sync = now + sync_every
            if now >= next_report:
                conn.send(("p", rid - 1, _writer_stats(w), lat.take(), logs.take()))
                next_report = now + WRITER_REPORT_SECONDS
            if conn.poll() and conn.recv()[0] == "stop":
                break
        _writer_close(conn, w, lat, logs)
    finally:
        w.close()


def _writer_close(conn, w, lat: Samples, logs: _LogToParent) -> None:
    stats = _writer_stats(w)
    last = w.last_record_id
    t0 = time.monotonic()
    w.close()
    conn.send(("closed", last, stats, lat.take(), logs.take(), time.monotonic() - t0))


# -- the parent: schedule, progress, verification, summary -----------------------------------

def _fmt_int(n) -> str:
    return f"{int(n):,}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt_lat(p) -> str:
    if p is None:
        return "-"
    return " / ".join(_fmt_ns(x) for x in p)


def _fmt_ns(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def _proc_cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class Stress:
    def __init__(self, args, path: str, out=None):
        self.args = args
        self.path = path
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.wl = Workload(seed=args.seed, keys=args.keys, batch=args.batch,
                           value_size=args.value_size)
        self.plan: Plan | None = None
        self.ctx = mp.get_context("spawn")
        self.rng = random.Random(args.seed ^ 0x5EED)
        self.errors: list[str] = []
        self.error_count = 0
        # progress and results
        self.start_last = 0
        self.committed = 0  # newest record id reported committed by any writer
        self.acked = 0  # newest record id acknowledged durable
        self.lost = 0
        self.rolled_back = 0
        self.writer_restarts = 0
        self.enactor_kills = 0
        self.enactor_restarts = 0  # summed over writer incarnations
        self.enactor_pids: set[int] = set()
        self.kills_during_open = 0
        self.verifications = 0
        self.stats: dict = {}
        self.commit_lat: list[int] = []
        self.final_last: int | None = None
        self.readers: list = []
        self.reader_results: list[dict] = []
        self.early_results: list[dict] = []
        self.stop_readers = self.ctx.Event()
        self.counts = self.ctx.Array("q", [-1] * max(1, args.readers), lock=False)
        self.results = self.ctx.Queue()
        self.run_started: float | None = None
        self.run_ended: float | None = None
        self.deadline: float | None = None
        self.done = False
        self.interrupted = False
        self._last_show = 0.0
        self._line_shown = False
        self._last_rates: tuple[float, int, int] | None = None  # (time, records, reads)
        self._rate_values = 0.0
        self._rate_reads = 0.0
        self.close_seconds = 0.0
        self.warnings = 0
        self.open_seconds: list[float] = []
        self.verify_seconds: list[float] = []  # state checks after each writer open
        self.pause_seconds: list[float] = []  # those made during the run: the writer waited

    # -- errors ----------------------------------------------------------------------------
    def error(self, msg: str, count: int = 1) -> None:
        self.error_count += count
        if len(self.errors) < MAX_MESSAGES:
            self.errors.append(msg)
        self._clear_line()
        t = time.monotonic() - self.run_started if self.run_started else 0.0
        print(f"{t:6.1f}s  ERROR: {msg}", file=self.out, flush=True)
        if self.tty:
            self._last_show = 0.0

    def event(self, msg: str) -> None:
        """One line about the run (a kill, a restart, a warning of the writer)."""
        self._clear_line()
        t = time.monotonic() - self.run_started if self.run_started else 0.0
        print(f"{t:6.1f}s  {msg}", file=self.out, flush=True)
        if self.tty:
            self._last_show = 0.0  # redraw the progress line at once

    def _clear_line(self) -> None:
        if self._line_shown:
            print("\r\033[K", end="", file=self.out, flush=True)
            self._line_shown = False

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        if not self._prepare_dir():
            return 2
        self.plan = Plan(self.wl)
        mode = f"--records {a.records}" if a.records is not None else f"{a.seconds:g} s"
        readers = f"{a.readers} reader{'' if a.readers == 1 else 's'}"
        print(f"mpwal stress: {self.path}, {mode}, {readers}, value {a.value_size} B, "
              f"batch {a.batch}, {a.keys:,} keys, durability {a.durability}, enactor {a.enactor}"
              f"{', chaos' if a.chaos else ''}, seed {a.seed}", file=self.out, flush=True)
        try:
            try:
                self._writers()
            except KeyboardInterrupt:
                self.interrupted = True
                self.error("aborted (Ctrl-C)")
            finally:
                self._stop_readers()
            self._final_checks()
        finally:
            self._cleanup_processes()
            self._check_segments()
        self._summary()
        if self.interrupted:
            return 130
        return 0 if self.passed else 1

    @property
    def passed(self) -> bool:
        return not self.error_count and not self.lost and not self.rolled_back

    def _make_dir(self) -> bool:
        """Create the directory with mode 0700 as a Writer would, unless it exists."""
        try:
            os.makedirs(self.path, mode=0o700)
        except FileExistsError:
            if os.path.isdir(self.path):
                return True
            print(f"mpwal stress: {self.path} exists and is not a directory", file=sys.stderr)
            return False
        os.chmod(self.path, 0o700)  # makedirs' mode is masked by the umask
        return True

    def _prepare_dir(self) -> bool:
        from .._tables import META_FILE
        if not self._make_dir():
            return False
        names = set(os.listdir(self.path))
        pfile = os.path.join(self.path, PARAMS_FILE)
        if not names:
            return True
        if META_FILE in names and PARAMS_FILE in names:
            with open(pfile) as f:
                old = json.load(f)
            if old != asdict(self.wl):
                diff = ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in asdict(self.wl).items()
                                 if old.get(k) != v)
                print(f"mpwal stress: {self.path} holds a stress database of other parameters "
                      f"({diff}); give the same --seed/--keys/--batch/--value-size, or an empty "
                      "or new directory", file=sys.stderr)
                return False
            return True
        print(f"mpwal stress: {self.path} is not empty and is not a stress database: give an "
              "empty or new directory", file=sys.stderr)
        return False

    def _spawn_writer(self):
        a = self.args
        parent, child = self.ctx.Pipe(duplex=True)
        cfg = {"durability": a.durability, "enactor": a.enactor, "log_size": a.log_size,
               "log_age": a.log_age, "records": a.records, "chaos": a.chaos}
        p = self.ctx.Process(target=_writer_main, args=(child, self.path, asdict(self.wl), cfg),
                             name="mpwal-stress-writer", daemon=True)
        p.start()
        child.close()
        return p, parent

    def _writers(self) -> None:
        """Writer processes one after the other; with --chaos the next one is spawned (and
        waits, imported) while the current one runs, so a restart does not wait for Python."""
        first = True
        nxt = self._spawn_writer()
        try:
            while True:
                proc, conn = nxt
                nxt = None
                self.proc = proc
                try:
                    conn.send(("open",))
                    if self.args.chaos:
                        nxt = self._spawn_writer()
                        self.standby = nxt[0]
                    how = self._incarnation(proc, conn, first)
                finally:
                    conn.close()
                first = False
                if how != "killed":
                    return
                self.writer_restarts += 1
        finally:
            if nxt is not None:
                try:
                    nxt[1].send(("exit",))
                except OSError:
                    pass
                nxt[0].join(10)
                nxt[1].close()

    def _time_up(self, now: float) -> bool:
        return (self.done or self.interrupted
                or (self.deadline is not None and now >= self.deadline))

    def _incarnation(self, proc, conn, first: bool) -> str:
        """Drive one writer process: 'killed' (restart it), 'stopped' or 'failed'."""
        a = self.args
        phase = "starting"
        opening_at = time.monotonic()
        kill_at = None
        ekill_at = None
        stop_sent = 0.0
        open_deadline = time.monotonic() + 120
        while True:
            now = time.monotonic()
            if phase == "running" and self._time_up(now):
                self._end_running(now)
                conn.send(("stop",))
                phase, stop_sent = "stopping", now
                kill_at = ekill_at = None
            if kill_at is not None and now >= kill_at:
                self._kill_writer(proc, conn, during_open=phase != "running")
                return "killed"
            if ekill_at is not None and now >= ekill_at:
                if self._kill_enactor():
                    ekill_at = now + self.rng.uniform(0.3, 2.0)
                else:  # none running yet (starting, or being restarted): try again soon
                    ekill_at = now + 0.1
            if phase == "stopping" and now - stop_sent > 120:
                self.error("the writer did not close within 120 s of being told to stop")
                self._kill_writer(proc, conn, during_open=False)
                return "failed"
            if phase == "starting" and now > open_deadline:
                self.error("the writer did not open within 120 s")
                self._kill_writer(proc, conn, during_open=True)
                return "failed"
            self._reader_errors()
            self._show(now)
            wake = [now + 0.1]
            if kill_at is not None:
                wake.append(kill_at)
            if ekill_at is not None:
                wake.append(ekill_at)
            if self.deadline is not None and phase == "running":
                wake.append(self.deadline)
            timeout = max(0.0, min(wake) - now)
            try:
                if not conn.poll(timeout):
                    if not proc.is_alive() and not conn.poll(0):
                        return self._writer_died(proc)
                    continue
                msg = conn.recv()
            except (EOFError, OSError):
                return self._writer_died(proc)
            except KeyboardInterrupt:
                if self.interrupted:
                    raise  # a second Ctrl-C: give up at once
                self.interrupted = True
                kill_at = ekill_at = None
                self.event("interrupted (Ctrl-C): stopping the writer cleanly and checking; "
                           "Ctrl-C again to abort")
                continue
            kind = msg[0]
            if kind == "ready":
                pass
            elif kind == "opening":
                opening_at = time.monotonic()
                if (a.chaos and not first and not self._time_up(opening_at)
                        and self.rng.random() < 0.25):
                    # anywhere in the open: replay, truncating the logs, the new segment
                    recent = self.open_seconds[-5:]
                    span = max(0.05, 1.2 * sum(recent) / len(recent)) if recent else 0.15
                    kill_at = opening_at + self.rng.uniform(0.0, span)
            elif kind == "open":
                kill_at = None
                last, stats = msg[1], msg[2]
                self.stats = stats
                self.open_seconds.append(time.monotonic() - opening_at)
                self._writer_logs(msg[3])
                self._after_open(last, first)
                if not self.readers and not self._time_up(time.monotonic()):
                    self._start_readers()
                now = time.monotonic()
                if self.run_started is None:
                    self.run_started = self._last_show = now
                    self._last_rates = (now, 0, 0)
                    if a.records is None:
                        self.deadline = now + a.seconds
                if self._time_up(now) or (a.records is not None and last >= a.records):
                    self._end_running(now)
                    conn.send(("stop",))
                    phase, stop_sent = "stopping", now
                else:
                    conn.send(("go",))
                    phase = "running"
                    if a.chaos:
                        kill_at = now + self.rng.uniform(0.5, 2.5)
                        if a.enactor == "process":
                            ekill_at = now + self.rng.uniform(0.3, 2.0)
            else:
                self._handle(msg)
                if kind == "closed":
                    proc.join(30)
                    return "stopped"
                if kind == "done":
                    self.done = True

    def _end_running(self, now: float) -> None:
        if self.run_ended is None:
            self.run_ended = now
        self.stop_readers.set()

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "a":
            self.acked = max(self.acked, msg[1])
            self.committed = max(self.committed, msg[1])
        elif kind == "p":
            self.committed = max(self.committed, msg[1])
            self.stats = msg[2]
            self._add_lat(msg[3])
            self._writer_logs(msg[4])
            pid = msg[2].get("enactor_pid")
            if pid:
                self.enactor_pids.add(pid)
        elif kind == "error":
            self.error(msg[1])
        elif kind == "done":
            self.committed = max(self.committed, msg[1])
        elif kind == "closed":
            self.final_last = msg[1]
            self.committed = max(self.committed, msg[1])
            self.stats = msg[2]
            self._add_lat(msg[3])
            self._writer_logs(msg[4])
            self.close_seconds = msg[5]
            self.enactor_restarts += msg[2]["enactor_restarts"]
            self._check_enactor_errors(msg[2]["enactor_errors"])

    def _check_enactor_errors(self, errs: list[str]) -> None:
        for e in errs:
            if self.enactor_kills and "exited with -9" in e:
                continue  # our SIGKILL
            self.error(f"enactor: {e}")

    def _writer_logs(self, lines: list) -> None:
        """mpwal's log lines in the writer process: warnings are events (a replay that stops
        at a torn record is expected after a kill), errors are errors."""
        import logging
        for level, name, text in lines:
            if level >= logging.ERROR:
                self.error(f"the writer logged an {name}: {text}")
            else:
                self.warnings += 1
                self.event(f"writer {name}: {text}")

    def _add_lat(self, data: bytes) -> None:
        a = array.array("q")
        a.frombytes(data)
        self.commit_lat.extend(a)

    def _writer_died(self, proc) -> str:
        proc.join(10)
        self.error(f"the writer process exited unexpectedly (exit code {proc.exitcode})")
        return "failed"

    def _kill_writer(self, proc, conn, during_open: bool) -> None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.join(30)
        if during_open:
            self.kills_during_open += 1
        what = "while it opened" if during_open else f"near record {self.committed}"
        self.event(f"killed the writer (pid {proc.pid}) {what}; acknowledged durable through "
                   f"record {self.acked}")
        # what the writer sent before it died was acknowledged all the same
        while True:
            try:
                if not conn.poll(0):
                    break
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] in ("a", "p", "error"):
                self._handle(msg)
        # the killed writer's last known enactor restarts
        if self.stats:
            self.enactor_restarts += self.stats.get("enactor_restarts", 0)
            self._check_enactor_errors(self.stats.get("enactor_errors", []))
            self.stats = dict(self.stats, enactor_restarts=0, enactor_errors=[])

    def _kill_enactor(self) -> bool:
        pid = self.stats.get("enactor_pid") if self.stats else None
        if not pid or b"mpwal._enactor" not in _proc_cmdline(pid):
            return False  # none running right now (just killed, or restarting)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.enactor_kills += 1
        self.event(f"killed the enactor process (pid {pid})")
        return True

    def _after_open(self, last: int, first: bool) -> None:
        """A writer opened (replayed) at record ``last``: nothing acknowledged may be lost, and
        the state must be exactly records 1..last."""
        if first:
            self.start_last = last
            self.committed = max(self.committed, last)
            self._write_params()
        if last < self.acked:
            self.lost += self.acked - last
            self.error(f"LOST: the writer acknowledged record {self.acked} as durable, but after "
                       f"the restart the log ends at record {last}")
        elif last < self.committed:
            self.rolled_back += self.committed - last
            self.error(f"records {last + 1}..{self.committed} were committed (visible to readers) "
                       f"but are gone after the writer process was killed (the log ends at {last})")
        self.committed = max(self.committed, last)
        t0 = time.monotonic()
        self._verify(last, "after the writer opened" if first else "after a restart")
        self.verify_seconds.append(time.monotonic() - t0)
        if self.run_started is not None:  # the run's clock is going: not time spent committing
            self.pause_seconds.append(self.verify_seconds[-1])
        if not first:
            self.event(f"writer reopened at record {last} (opening and replay "
                       f"{self.open_seconds[-1]:.2f} s); state verified in {self.verify_seconds[-1]:.2f} s")

    def _verify(self, last: int | None, when: str) -> int:
        assert self.plan is not None  # run() made it before any writer opened
        seen, errs, count = verify_state(self.path, self.plan, last)
        self.verifications += 1
        for e in errs:
            self.error(f"{when}: {e}")
        if count > len(errs):
            self.error_count += count - len(errs)
        return seen

    def _write_params(self) -> None:
        from .._fileio import write_file_atomic
        p = os.path.join(self.path, PARAMS_FILE)
        if not os.path.exists(p):
            write_file_atomic(p, json.dumps(asdict(self.wl)).encode())  # mode 0600

    # -- readers ---------------------------------------------------------------------------
    def _start_readers(self) -> None:
        for i in range(self.args.readers):
            p = self.ctx.Process(target=_reader_main, name=f"mpwal-stress-reader-{i}",
                                 args=(i, self.path, asdict(self.wl), self.stop_readers,
                                       self.counts, self.results), daemon=True)
            p.start()
            self.readers.append(p)
        # wait until every reader has opened, so the run starts with them reading
        deadline = time.monotonic() + 120
        while (any(self.counts[i] < 0 for i in range(len(self.readers)))
               and any(p.is_alive() for p in self.readers) and time.monotonic() < deadline):
            time.sleep(0.01)

    def _reader_errors(self) -> None:
        """Show the readers' error descriptions as they come (their counts come at the end)."""
        while True:
            try:
                kind, res = self.results.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                self.error(res, count=0)
            else:  # a reader that ended early (crashed): keep its result
                self.early_results.append(res)

    def _stop_readers(self) -> None:
        self.stop_readers.set()
        if self.run_ended is None:
            self.run_ended = time.monotonic()
        got = len(self.early_results)
        for res in self.early_results:
            self.reader_results.append(res)
            self.error_count += res["errors"]
        deadline = time.monotonic() + 60
        while got < len(self.readers) and time.monotonic() < deadline:
            try:
                kind, res = self.results.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in self.readers):
                    try:
                        kind, res = self.results.get(timeout=1)
                    except queue.Empty:
                        break
                else:
                    continue
            if kind == "error":
                self.error(res, count=0)
                continue
            got += 1
            self.reader_results.append(res)
            self.error_count += res["errors"]
        for p in self.readers:
            p.join(10)
        if got < len(self.readers):
            self.error(f"{len(self.readers) - got} reader process(es) ended without a report "
                       f"(exit codes {[p.exitcode for p in self.readers]})")

    # -- the end ---------------------------------------------------------------------------
    def _final_checks(self) -> None:
        if self.final_last is None:
            return  # the writer failed; already an error
        if self.final_last < self.acked:
            self.lost += self.acked - self.final_last
            self.error(f"LOST: record {self.acked} was acknowledged; the writer closed at {self.final_last}")
        if self.args.records is not None and not self.interrupted and self.final_last < self.args.records:
            self.error(f"the run ended at record {self.final_last}, before --records {self.args.records}")
        self._verify(self.final_last, "after the writer closed")

    def _cleanup_processes(self) -> None:
        for proc in (getattr(self, "proc", None), getattr(self, "standby", None)):
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
        for p in self.readers:
            if p.is_alive():
                p.terminate()
                p.join(5)
        # enactor processes of killed writers let go on their own within a fraction of a second
        deadline = time.monotonic() + 10
        for pid in self.enactor_pids:
            while b"mpwal._enactor" in _proc_cmdline(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if b"mpwal._enactor" in _proc_cmdline(pid):
                self.error(f"enactor process {pid} still runs after its writer closed")

    def _check_segments(self) -> None:
        from .._overlay import stale_segments, unlink_segment
        from .._queues import writer_alive
        left = stale_segments(os.path.realpath(self.path))
        if left and not writer_alive(self.path):
            self.error(f"shared-memory segments left in /dev/shm after the run: {left} (removed now)")
            for name in left:
                unlink_segment(name)

    # -- display ---------------------------------------------------------------------------
    def _show(self, now: float, force: bool = False) -> None:
        every = 0.5 if self.tty else 2.0
        if self.run_started is None or (not force and now - self._last_show < every):
            return
        reads = sum(max(0, c) for c in self.counts[:len(self.readers)])
        recs = self.committed - self.start_last
        if self._last_rates is not None:
            t, r0, d0 = self._last_rates
            dt = now - t
            if dt > 0:
                self._rate_values = (recs - r0) * self.args.batch / dt
                self._rate_reads = (reads - d0) / dt
        self._last_rates = (now, recs, reads)
        s = self.stats or {}
        line = (f"{now - self.run_started:6.1f}s  records {_fmt_int(recs)}  "
                f"values/s {_fmt_int(self._rate_values)}  reads/s {_fmt_int(self._rate_reads)}  "
                f"queues read/cleanup/pool {s.get('read', 0)}/{s.get('cleanup', 0)}/{s.get('pool', 0)}  "
                f"overlay {_fmt_int(s.get('overlay_entries', 0))} entries "
                f"{_fmt_bytes(s.get('overlay_bytes', 0))}/{_fmt_bytes(s.get('overlay_capacity_bytes', 0))}")
        if self.args.chaos:
            line += f"  restarts {self.writer_restarts}"
            if self.args.enactor == "process":
                line += f" enactor kills {self.enactor_kills}"
        if self.error_count:
            line += f"  ERRORS {self.error_count}"
        if self.tty:
            print("\r\033[K" + line, end="", file=self.out, flush=True)
            self._line_shown = True
        else:
            print(line, file=self.out, flush=True)
        self._last_show = now

    def _summary(self) -> None:
        a = self.args
        if self._line_shown:
            print(file=self.out)
            self._line_shown = False
        end = self.run_ended or time.monotonic()
        elapsed = (end - self.run_started) if self.run_started else 0.0
        paused = sum(self.pause_seconds)
        committing = max(0.0, elapsed - paused)  # the writer waits while the state is checked
        last = self.final_last if self.final_last is not None else self.committed
        records = max(0, last - self.start_last)
        values = records * a.batch
        reads = sum(r["reads"] for r in self.reader_results)
        rlat: list[int] = []
        for r in self.reader_results:
            x = array.array("q")
            x.frombytes(r["lat"])
            rlat.extend(x)
        recov = sum(r["recoveries"] for r in self.reader_results)
        per = [r["reads"] / elapsed if elapsed else 0
               for r in sorted(self.reader_results, key=lambda r: r["idx"])]
        el = elapsed or float("nan")
        cl = committing or float("nan")
        vbytes = HEADER.size + a.value_size
        rows = [
            ("records committed", f"{_fmt_int(records)} (last record id {last})"),
            ("values written", _fmt_int(values)),
            ("elapsed", f"{elapsed:.1f} s"),
            ("verification pauses", (f"{len(self.pause_seconds)}, {paused:.1f} s (state checks "
                                     "after restarts; the writer waits)")),
            ("commit throughput", (f"{records / cl:,.0f} records/s, {values / cl:,.0f} values/s, "
                                   f"{_fmt_bytes(values * vbytes / cl)}/s over {committing:.1f} s "
                                   "(elapsed less pauses)")),
            ("reads", f"{_fmt_int(reads)}: {reads / el:,.0f}/s total, per reader "
                      + (", ".join(f"{p:,.0f}" for p in per) or "-")),
            ("commit latency p50/p99/max", _fmt_lat(percentiles(self.commit_lat))),
            ("read latency p50/p99/max", _fmt_lat(percentiles(rlat))),
            ("state verifications", (f"{self.verifications} (every key and index entry), "
                                     f"{sum(self.verify_seconds):.1f} s")),
            ("writer restarts", f"{self.writer_restarts}" + (
                f" ({self.kills_during_open} while opening)" if self.kills_during_open else "")),
            ("writer open (replay) max", f"{max(self.open_seconds, default=0):.2f} s"),
            ("reader recoveries", _fmt_int(recov)),
            ("enactor restarts", f"{self.enactor_restarts}" + (
                f" ({self.enactor_kills} enactor kills)" if a.chaos and a.enactor == "process" else "")),
        ]
        if a.chaos or a.durability == "commit":
            rows.append(("acknowledged durable", f"through record {self.acked}"))
        if a.chaos:
            rows.append(("lost acknowledged records", _fmt_int(self.lost)))
            rows.append(("committed records rolled back", _fmt_int(self.rolled_back)))
        rows.append(("errors", _fmt_int(self.error_count)))
        verdict = "PASS" if self.passed else "FAIL"
        if self.interrupted:
            verdict += " (interrupted: exit status 130)"
        rows.append(("verdict", verdict))
        w = max(len(k) for k, _ in rows)
        print(file=self.out)
        print("mpwal stress summary", file=self.out)
        print("-" * (w + 40), file=self.out)
        for k, v in rows:
            print(f"{k:<{w}}  {v}", file=self.out)
        print("-" * (w + 40), file=self.out)
        if self.errors:
            print(f"first {len(self.errors)} of {self.error_count} errors:", file=self.out)
            for e in self.errors:
                print(f"  {e}", file=self.out)
        self.out.flush()


# -- command line ------------------------------------------------------------------------------

def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpwal stress",
        description="Run one writer, several reader processes and the enactor against a database "
                    "and check every read exactly; exit status 1 when any check fails.")
    p.add_argument("--dir", help="database directory (created with mode 0700 if absent; must be "
                                 "empty or a stress database of the same parameters); default: a "
                                 "temporary directory removed at the end")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory at the end and print where it is (a --dir "
                        "is always kept)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seconds", type=_positive_float, default=None,
                   help="run this long (default 10)")
    g.add_argument("--records", type=_positive_int, default=None,
                   help="run until this record id is committed")
    p.add_argument("--readers", type=_nonneg_int, default=2, help="reader processes (default 2)")
    p.add_argument("--value-size", type=_nonneg_int, default=None,
                   help=f"payload bytes per value (default 100; plus a {HEADER.size}-byte header)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="values per record (default 100)")
    p.add_argument("--keys", type=_positive_int, default=None,
                   help="key space of the value table (default 100000)")
    p.add_argument("--durability", choices=("relaxed", "commit"), default="relaxed",
                   help="writer durability (default relaxed)")
    p.add_argument("--enactor", choices=("thread", "process"), default="thread",
                   help="run the enactor as a thread of the writer or as its own process")
    p.add_argument("--chaos", action="store_true",
                   help="kill (SIGKILL) and restart the writer, and the enactor process, at "
                        "random moments; check that nothing acknowledged is lost")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the workload and the chaos schedule (default: random, printed; "
                        "with --dir on an earlier stress database, the workload options it was "
                        "made with)")
    p.add_argument("--log-size", type=_positive_int, default=4 << 20,
                   help="writer log_size in bytes (default 4 MiB, so logs rotate often)")
    p.add_argument("--log-age", type=float, default=0.5, help="writer log_age in seconds (default 0.5)")
    p.add_argument("--kv", action="store_true",
                   help="run on a key-value directory (mpwal.KVWriter/KVReader; see stress_kv.py): "
                        "batches of puts and deletes, readers checking every value, the index "
                        "growing from 64 chunks; --dir must then be new or empty")
    p.add_argument("--max-value", type=_positive_int, default=300_000,
                   help="with --kv: the largest value, in bytes (default 300000: multipart)")
    p.add_argument("--producers", type=_positive_int, default=None, metavar="N",
                   help="commit through N producer processes (mpwal.Producer; see "
                        "stress_producers.py) instead of the writer's own thread; --chaos also "
                        "kills producers; --dir must then be new or empty")
    return p


def _stored_workload(path: str) -> dict:
    """The workload parameters of an earlier stress run in ``path`` (empty if none)."""
    try:
        with open(os.path.join(path, PARAMS_FILE)) as f:
            got = json.load(f)
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    """``mpwal stress``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.records is None and args.seconds is None:
        args.seconds = 10.0
    stored = _stored_workload(args.dir) if args.dir is not None else {}
    for name, default in (("seed", None), ("keys", 100_000), ("batch", 100), ("value_size", 100)):
        if getattr(args, name) is None:
            setattr(args, name, stored.get(name, default))
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    args.seed &= (1 << 64) - 1
    if args.batch > args.keys:
        parser.print_usage(sys.stderr)
        print(f"mpwal stress: --batch {args.batch} is more than --keys {args.keys} (a record "
              "writes distinct keys)", file=sys.stderr)
        return 2
    if args.log_age < 0:
        print("mpwal stress: --log-age must be >= 0", file=sys.stderr)
        return 2
    if args.kv and args.producers:
        print("mpwal stress: --kv and --producers are separate jobs; give one", file=sys.stderr)
        return 2
    if args.kv:
        return _run_kv(args)
    if args.producers:
        return _run_producers(args)
    if args.dir is not None:
        return Stress(args, os.path.abspath(args.dir)).run()
    return _run_in_temp_dir(args)


def _run_kv(args) -> int:
    """``--kv``: stress_kv.run on --dir or on a temporary directory."""
    from . import stress_kv
    return _in_new_dir(args, "--kv", lambda path: stress_kv.run(
        path, args.seconds or 10.0, args.readers, args.keys, args.batch, args.seed, args.enactor,
        args.max_value))


def _run_producers(args) -> int:
    """``--producers N``: stress_producers.run on --dir or on a temporary directory."""
    from . import stress_producers
    return _in_new_dir(args, "--producers", lambda path: stress_producers.run(
        path, args.seconds or 10.0, args.producers, args.readers, args.batch, args.value_size,
        args.durability, args.enactor, args.chaos, args.seed))


def _in_new_dir(args, job: str, go) -> int:
    """Run ``go(path)`` on a new or empty --dir, or on a temporary directory removed after."""
    if args.dir is not None:
        path = os.path.abspath(args.dir)
        if os.path.exists(path) and os.listdir(path):
            print(f"mpwal stress {job}: {path} is not empty; give a new or empty directory",
                  file=sys.stderr)
            return 2
        return go(path)
    tmp = tempfile.mkdtemp(prefix="mpwal-stress-")
    try:
        return go(os.path.join(tmp, "db"))
    finally:
        if args.keep:
            print(f"mpwal stress {job}: kept {tmp} (--keep)", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_in_temp_dir(args) -> int:
    """Run on a new temporary directory (mode 0700); remove it at the end unless ``--keep``."""
    tmp = tempfile.mkdtemp(prefix="mpwal-stress-")
    try:
        return Stress(args, tmp).run()
    finally:
        if args.keep:
            print(f"mpwal stress: kept the database directory {tmp} (--keep); remove it when "
                  "done", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            gone = not os.path.exists(tmp)
            print(f"mpwal stress: {'removed' if gone else 'could not remove'} the temporary "
                  f"directory {tmp}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
