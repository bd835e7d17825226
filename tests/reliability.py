"""Shared helpers of test_faults.py and test_corruption.py: a deterministic workload of records,
the model state after every prefix of it, reading a database's whole state back, and making
directories of un-enacted logs from a writer that dies without closing.

Counts scale with ``MPWAL_LONG`` (unset or 0: the quick default run; 1: about 10-20x more).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import traceback
from dataclasses import dataclass, field

import mpwal
from mpwal._enactor import Enactor
from mpwal._format import LogScan
from mpwal._overlay import stale_segments, unlink_segment
from mpwal._queues import ENACTOR_LOCK, file_lock, log_ids, log_path

LONG = os.environ.get("MPWAL_LONG", "0") not in ("", "0")


def scale(default, long):
    """``default`` in the quick run, ``long`` when ``MPWAL_LONG`` is set."""
    return long if LONG else default


# -- the workload -----------------------------------------------------------------------------

VALUE_A = 3  # value table, slot_size 64
VALUE_B = 4  # value table, slot_size 16 (dropped now and then)
INDEX = 1  # index table
A_SLOTS = 12
B_SLOTS = 8
CHUNKS = 3


def tables():
    return [mpwal.IndexTable(INDEX), mpwal.ValueTable(VALUE_A, slot_size=64),
            mpwal.ValueTable(VALUE_B, slot_size=16)]


def make_records(n: int, seed: int = 0) -> list[list[tuple]]:
    """``n`` records of ops: ("drop", t), ("value", t, i, bytes|None), ("index", t, c, e, u64).

    Every record writes at least one value that names its own number, so the states after
    different prefixes differ. Drops come first in a record (as the format stores them)."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        ops: list[tuple] = []
        if i % 11 == 0:
            ops.append(("drop", VALUE_B))
        if i % 17 == 0:
            ops.append(("drop", INDEX))
        idx = rng.randrange(A_SLOTS)
        tag = f"r{i}s{idx}:".encode()
        ops.append(("value", VALUE_A, idx, tag + rng.randbytes(rng.randint(0, 64 - len(tag)))))
        for _ in range(rng.randint(0, 2)):
            j = rng.randrange(A_SLOTS)
            roll = rng.random()
            data = None if roll < 0.15 else b"" if roll < 0.2 else rng.randbytes(rng.randint(1, 64))
            ops.append(("value", VALUE_A, j, data))
        if rng.random() < 0.5:
            j = rng.randrange(B_SLOTS)
            ops.append(("value", VALUE_B, j, None if rng.random() < 0.2 else f"{i}.{j}".encode()))
        for _ in range(rng.randint(0, 3)):
            ops.append(("index", INDEX, rng.randrange(CHUNKS), rng.randrange(64),
                        rng.getrandbits(64)))
        out.append(ops)
    return out


def fill(rec, ops) -> None:
    """Make the changes ``ops`` in an open ``mpwal.Record``."""
    for op in ops:
        if op[0] == "drop":
            rec.drop_table(op[1])
        elif op[0] == "value":
            rec.insert_value(op[1], op[2], op[3])
        else:
            rec.insert_index(op[1], op[2], op[3], op[4])


def model_states(records) -> list[dict]:
    """``states[k]``: the whole database after the first ``k`` records (k = 0..len)."""
    values: dict = {}
    chunks: dict = {}
    states = [snapshot(values, chunks)]
    for ops in records:
        for op in ops:
            if op[0] == "drop":
                for key in [k for k in values if k[0] == op[1]]:
                    del values[key]
                for key in [k for k in chunks if k[0] == op[1]]:
                    del chunks[key]
            elif op[0] == "value":
                values[(op[1], op[2])] = op[3]
            else:
                c = chunks.setdefault((op[1], op[2]), bytearray(512))
                c[op[3] * 8:op[3] * 8 + 8] = op[4].to_bytes(8, "little")
        states.append(snapshot(values, chunks))
    return states


def snapshot(values: dict, chunks: dict) -> dict:
    s = {}
    for t, n in ((VALUE_A, A_SLOTS), (VALUE_B, B_SLOTS)):
        for i in range(n):
            s[("v", t, i)] = values.get((t, i))
    for c in range(CHUNKS):
        s[("c", INDEX, c)] = bytes(chunks.get((INDEX, c), bytes(512)))
    return s


def read_state(src) -> dict:
    """The whole database as ``src`` (a Writer or a Reader) sees it."""
    s = {}
    for t, n in ((VALUE_A, A_SLOTS), (VALUE_B, B_SLOTS)):
        for i in range(n):
            v = src.value(t, i)
            s[("v", t, i)] = None if v is None else bytes(v)
    for c in range(CHUNKS):
        s[("c", INDEX, c)] = bytes(src.index_chunk(INDEX, c))
    if isinstance(src, mpwal.Reader):  # the batch lookup must agree with single lookups
        many = src.values(VALUE_A, range(A_SLOTS))
        assert [None if v is None else bytes(v) for v in many] == \
            [s[("v", VALUE_A, i)] for i in range(A_SLOTS)]
    return s


def prefixes(state: dict, states: list[dict]) -> list[int]:
    """Every k such that ``state`` is the model state after the first k records."""
    return [k for k, s in enumerate(states) if s == state]


def describe_diff(state: dict, expect: dict) -> str:
    diff = [f"{key}: got {state.get(key)!r} want {expect.get(key)!r}"
            for key in expect if state.get(key) != expect.get(key)]
    return "; ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")


# -- enacting by hand (Writer(enactor="none")) -------------------------------------------------

def drain(path: str) -> None:
    """Enact and clean everything queued, in this thread, as ``mpwal enactor`` would."""
    lock = file_lock(os.path.realpath(path), ENACTOR_LOCK)
    lock.acquire(timeout=10)
    try:
        e = Enactor(path)
        e.detach_on_new_writer = False
        try:
            e.drain()
        finally:
            e.close()
    finally:
        lock.release()


# -- directories ------------------------------------------------------------------------------

def segments_left(path: str) -> list[str]:
    """Remove and return the shared-memory segments of ``path`` still in /dev/shm."""
    left = stale_segments(os.path.realpath(path))
    for name in left:
        unlink_segment(name)
    return left


def dir_bytes(path: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[name] = f.read()
    return out


@dataclass
class LogInfo:
    log_id: int
    size: int
    records: list  # (record_id, start, end), in file order


@dataclass
class Template:
    """A directory whose logs hold records ``first..last`` un-enacted (records before ``first``
    are in the table files), with the model to judge any mutation of it."""

    path: str
    records: list
    states: list  # states[k] after the first k records
    first: int  # first record id in the logs
    logs: list = field(default_factory=list)  # LogInfo, in record-id order

    @property
    def last(self) -> int:
        return len(self.records)

    def copy(self, dest: str) -> str:
        shutil.copytree(self.path, dest)
        return dest

    def locate(self, log_id: int, offset: int) -> int:
        """The record id whose bytes hold ``offset`` of ``log_id`` (or the next one past the
        end of the file). A byte of the log header (before the first record) counts as the
        log's first record: damage there loses the whole log, as a bad first record does."""
        info = next(lf for lf in self.logs if lf.log_id == log_id)
        if offset < info.records[0][1]:
            return info.records[0][0]
        for rid, start, end in info.records:
            if start <= offset < end:
                return rid
        return info.records[-1][0] + 1


def _child(path: str, records, start: int, opts: dict) -> None:
    try:
        w = mpwal.Writer(path, tables(), enactor="none", log_age=3600, **opts)
        for ops in records[start:]:
            with w.record() as rec:
                fill(rec, ops)
        w.sync()
        os._exit(0)  # no close: the logs stay un-enacted, the segment stays behind
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def make_template(path: str, n: int, enacted: int, seed: int, log_size: int) -> Template:
    """Commit records 1..``enacted`` and close (they reach the tables, their logs are cleaned),
    then commit ``enacted+1..n`` in a forked child that exits without closing."""
    records = make_records(n, seed)
    w = mpwal.Writer(path, tables(), enactor="none", log_age=3600, log_size=log_size)
    try:
        for ops in records[:enacted]:
            with w.record() as rec:
                fill(rec, ops)
    finally:
        w.close()
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_child, args=(path, records, enacted, {"log_size": log_size}))
    p.start()
    p.join(60)
    assert p.exitcode == 0, f"workload child failed with exit code {p.exitcode}"
    segments_left(path)
    t = Template(path, records, model_states(records), enacted + 1)
    infos = []
    for lid in log_ids(path):
        with open(log_path(path, lid), "rb") as f:
            data = f.read()
        if not data:
            continue
        scan = LogScan(data)
        recs = [(r.record_id, r.start, r.end) for r in scan.records()]
        assert scan.problem is None and scan.end == len(data), f"log{lid}: {scan.problem}"
        infos.append(LogInfo(lid, len(data), recs))
    infos.sort(key=lambda lf: lf.records[0][0])
    ids = [rid for lf in infos for rid, _, _ in lf.records]
    assert ids == list(range(enacted + 1, n + 1)), "the template's logs do not hold its records"
    assert len(infos) >= 3, "the template should span several log files"
    t.logs = infos
    return t
