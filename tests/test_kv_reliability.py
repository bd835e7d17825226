"""The engine's fault and corruption sweeps on a key-value workload: whatever I/O call fails, or
whatever byte of a log is damaged, a key-value directory reopens to the state after a prefix of
its batches that holds every acknowledged one (the layer's records are ordinary records, so
replay's rules carry over; this checks that nothing in the layer breaks them)."""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest

import mpwal
from mpwal import _fileio as fileio
from mpwal._fileio import FaultPlan
from mpwal._queues import log_ids, log_path

from reliability import scale

OPTS = dict(log_size=4096, log_age=3600, enactor="none")


def make_batches(n: int, seed: int) -> list[list[tuple[bytes, bytes | None]]]:
    """``n`` batches over 40 keys, each with at least one put; a few values are multipart."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ops: list[tuple[bytes, bytes | None]] = []
        for j in range(rng.randint(1, 6)):
            key = b"key%d" % rng.randrange(40)
            if j and rng.random() < 0.25:
                ops.append((key, None))
            else:
                size = rng.choice((0, 5, 90, 700, 40000)) if rng.random() < 0.3 else 30
                ops.append((key, rng.randbytes(size)))
        out.append(ops)
    return out


BATCHES = make_batches(30, seed=11)


def model_states() -> list[dict[bytes, bytes]]:
    states = [{}]
    for ops in BATCHES:
        s = dict(states[-1])
        for k, v in ops:
            if v is None:
                s.pop(k, None)
            else:
                s[k] = v
        states.append(s)
    return states


STATES = model_states()


def apply_batch(kv: mpwal.KVWriter, ops: list[tuple[bytes, bytes | None]]) -> int | None:
    """One batch of puts (and deletes: value None); its record id."""
    with kv.batch() as b:
        for k, v in ops:
            if v is None:
                b.delete(k)
            else:
                b.put(k, v)
    return b.record_id


def run_batches(path: str) -> tuple[int, int, BaseException | None]:
    """(acknowledged, attempted, the mpwal error that stopped it)."""
    acked = attempted = 0
    try:
        kv = mpwal.KVWriter(path, **OPTS)
    except mpwal.Error as e:
        return 0, 0, e
    err = None
    try:
        for i, ops in enumerate(BATCHES, 1):
            attempted = i
            try:
                rid = apply_batch(kv, ops)
            except mpwal.Error as e:
                err = e
                break
            assert rid == i
            acked = i
            if i % 7 == 0:
                try:
                    kv.sync()
                except mpwal.Error as e:
                    err = e
                    break
    finally:
        kv.close()
    return acked, attempted, err


def state_of(path: str) -> dict[bytes, bytes]:
    with mpwal.KVWriter(path, **OPTS) as kv:
        with mpwal.KVReader(path) as r:
            got = dict(r.items())
            assert len(r) == len(got), "the count disagrees with the index"
            assert kv.count() == len(got)
    return got


def prefixes_of(state: dict) -> list[int]:
    return [k for k, s in enumerate(STATES) if s == state]


def empty_dir(base: str) -> str:
    path = os.path.join(base, "empty")
    if not os.path.exists(path):
        mpwal.KVWriter(path, **OPTS).close()
    return path


def count_calls(base: str) -> dict:
    plan = FaultPlan("write", 1 << 60)
    path = shutil.copytree(empty_dir(base), os.path.join(base, "count"))
    fileio.arm(plan)
    try:
        run_batches(path)
    finally:
        fileio.arm(None)
    shutil.rmtree(path)
    return dict(plan.counts)


@pytest.mark.parametrize("kind,err,n", [("write", errno.EIO, 6), ("write", 0, 4),
                                        ("write", errno.ENOSPC, 2), ("fsync", errno.EIO, 4),
                                        ("rename", errno.EIO, 3), ("truncate", errno.EIO, 2)])
def test_kv_fault_sweep(tmp_path, kind, err, n):
    """The Nth call of one kind fails: the failing call raises an mpwal error, and the reopened
    directory holds a prefix of the batches with every acknowledged one."""
    base = str(tmp_path)
    total = count_calls(base)[kind]
    assert total > 0
    count = scale(n, None)
    picks = range(1, total + 1) if count is None or count >= total else \
        sorted({1, total, *(1 + (i * (total - 1)) // max(count - 1, 1) for i in range(count))})
    for nth in picks:
        path = shutil.copytree(empty_dir(base), os.path.join(base, f"{kind}-{nth}"))
        plan = FaultPlan(kind, nth, err)
        fileio.arm(plan)
        try:
            acked, attempted, error = run_batches(path)
        finally:
            fileio.arm(None)
        if error is not None:
            cause = error.__cause__ if isinstance(error, mpwal.WriterFailedError) else error
            assert isinstance(cause, mpwal.StorageError), f"{kind} #{nth}: {error!r}"
        ks = prefixes_of(state_of(path))
        assert any(acked <= k <= max(attempted, acked) for k in ks), \
            f"{kind} #{nth}: the state is prefix {ks}, want {acked}..{attempted} ({error!r})"
        shutil.rmtree(path)


def template(base: str) -> str:
    """A directory whose logs hold every batch (none enacted: the writer was never closed
    cleanly; its logs are copied while it is open)."""
    path = os.path.join(base, "template")
    if os.path.exists(path):
        return path
    src = os.path.join(base, "src")
    kv = mpwal.KVWriter(src, **OPTS)
    try:
        for ops in BATCHES:
            apply_batch(kv, ops)
        kv.sync()
        shutil.copytree(src, path, ignore=shutil.ignore_patterns("writer.lock"))
    finally:
        kv.close()
    return path


@pytest.mark.parametrize("where", range(scale(12, 60)))
def test_kv_damaged_log_reopens_to_a_prefix(tmp_path, where):
    """A byte of a log flipped (at a spread of offsets over every log): the directory reopens,
    to the state after a prefix of the batches."""
    base = str(tmp_path)
    src = template(base)
    path = shutil.copytree(src, os.path.join(base, "case"))
    logs = [log_path(path, i) for i in log_ids(path) if os.path.getsize(log_path(path, i))]
    sizes = [os.path.getsize(p) for p in logs]
    pos = (where * 7919) % sum(sizes)
    for p, size in zip(logs, sizes):
        if pos < size:
            with open(p, "r+b") as f:
                f.seek(pos)
                b = f.read(1)
                f.seek(pos)
                f.write(bytes([b[0] ^ 0x5A]))
            break
        pos -= size
    assert prefixes_of(state_of(path)), "the state after reopen is no prefix of the batches"
