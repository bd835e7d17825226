"""Workers for the key-value multi-process tests, importable by spawned processes.

Values are self-describing: ``kv_value(key, version, size)`` is a header of the key's CRC, the
version and the size, then filler derived from all three, so a reader can tell alone that a
value is whole and belongs to its key.
"""

from __future__ import annotations

import os
import random
import struct
import zlib

import mpwal

_HEAD = struct.Struct("<IQQ")


def kv_value(key: bytes, version: int, size: int) -> bytes:
    size = max(size, _HEAD.size)
    head = _HEAD.pack(zlib.crc32(key), version, size)
    seed = random.Random(zlib.crc32(key) ^ version).randbytes(64)
    body = (seed * (size // 64 + 1))[:size - _HEAD.size]
    return head + body


def check_kv_value(key: bytes, data: bytes) -> int:
    """The version of a value made by ``kv_value`` for ``key``; AssertionError if it is not
    whole or not the key's."""
    assert len(data) >= _HEAD.size, f"value of {key!r} is {len(data)} bytes: torn"
    crc, version, size = _HEAD.unpack_from(data)
    assert crc == zlib.crc32(key), f"the value read for {key!r} belongs to another key"
    assert len(data) == size and data == kv_value(key, version, size), \
        f"the value read for {key!r} (version {version}) is torn"
    return version


def checking_reader(path: str, requests, replies) -> None:
    """Answer each expected {column: {key: value}} on ``requests`` with the mismatches a
    KVReader sees (get, get_many, keys, items, len, and a snapshot's), until None."""
    r = None
    while True:
        want = requests.get()
        if want is None:
            break
        errors = []
        try:
            if r is None:
                r = mpwal.KVReader(path)
            for column, model in want.items():
                keys = sorted(model)
                for k in keys:
                    if r.get(k, column=column) != model[k]:
                        errors.append(f"{column}: get({k!r}) differs")
                if r.get_many(keys, column=column) != [model[k] for k in keys]:
                    errors.append(f"{column}: get_many differs")
                if sorted(r.keys(column)) != keys:
                    errors.append(f"{column}: keys() differ")
                if dict(r.items(column)) != model:
                    errors.append(f"{column}: items() differ")
                if r.count(column) != len(model):
                    errors.append(f"{column}: count {r.count(column)} != {len(model)}")
                with r.snapshot() as s:
                    if dict(s.items(column)) != model or len(s) != len(want.get("default", {})):
                        errors.append(f"{column}: a snapshot differs")
                missing = b"\xff" * 201  # no model key is this long
                if r.get(missing, column=column) is not None or missing in model:
                    errors.append(f"{column}: a missing key was found")
        except Exception as e:  # reported to the test, which fails on it
            errors.append(f"{type(e).__name__}: {e}")
        replies.put(errors)
    if r is not None:
        r.close()


def multipart_putter(path: str, conn, seed: int, nkeys: int = 40, index_bits: int = 12) -> None:
    """Put (or delete) values of 10 B to 1 MiB (many multipart) with durability "commit",
    sending ("begin", key, version or None) before each change and ("ack",) once it is
    durable, through a pipe (each send is in the kernel when it returns: a SIGKILL loses
    none); runs until killed."""
    rng = random.Random(seed)
    with mpwal.KVWriter(path, durability="commit", log_size=1 << 20, log_age=0.05,
                        index_bits=index_bits) as kv:
        version = seed << 32  # versions of later runs on the directory stay apart
        while True:
            version += 1
            key = b"k%d" % rng.randrange(nkeys)
            size = rng.choice((10, 200, 5000, 40000, 300000, 1 << 20))
            if rng.random() < 0.15:
                conn.send(("begin", key, None))
                kv.delete(key)
            else:
                conn.send(("begin", key, version))
                kv.put(key, kv_value(key, version, size))
            conn.send(("ack",))


def ingesting_writer(path: str, out, stop, nkeys: int) -> None:
    """Rewrite ``nkeys`` keys in batches of 100 (values of 50-3000 bytes) until ``stop``."""
    rng = random.Random(os.getpid())
    with mpwal.KVWriter(path, log_size=256 << 10, log_age=0.02) as kv:
        out.put(("open",))
        version = 0
        while not stop.is_set():
            version += 1
            with kv.batch() as b:
                for _ in range(100):
                    key = b"key-%d" % rng.randrange(nkeys)
                    b.put(key, kv_value(key, version, rng.choice((50, 120, 700, 3000))))
        out.put(("done", version, kv.last_record_id))


def read_and_check(r: mpwal.KVReader, keys: list[bytes], must_exist: bool) -> list[str]:
    """Read ``keys`` (the first few with get, the native kv_get where it serves, the rest with
    one get_many): each value found must be whole and its key's, and with ``must_exist`` every
    key must be found. The problems."""
    problems = []
    for k, v in zip(keys, [r.get(k) for k in keys[:5]] + r.get_many(keys[5:])):
        if v is None:
            if must_exist:
                problems.append(f"acknowledged key {k!r} missing")
            continue
        try:
            check_kv_value(k, v)
        except AssertionError as e:
            problems.append(str(e))
    return problems


def watching_reader(path: str, out, stop, nkeys: int) -> None:
    """Read random keys until ``stop``: every value found must be whole and its key's; report
    (reads, errors)."""
    rng = random.Random(os.getpid())
    errors: list[str] = []
    reads = 0
    with mpwal.KVReader(path) as r:
        out.put(("reading",))
        while not stop.is_set() and len(errors) <= 5:
            keys = [b"key-%d" % rng.randrange(nkeys) for _ in range(20)]
            errors += read_and_check(r, keys, must_exist=False)
            reads += len(keys)
    out.put(("result", reads, errors))


def growing_writer(path: str, out, stop, total: int, index_bits: int) -> None:
    """Put keys 0 .. total-1 in batches of 200 into an index of ``index_bits`` (so it reindexes
    again and again), then rewrite random ones until ``stop``; ``out`` gets each count of keys
    acknowledged."""
    rng = random.Random(os.getpid())
    with mpwal.KVWriter(path, index_bits=index_bits, log_size=1 << 20, log_age=0.05) as kv:
        n = 0
        while n < total and not stop.is_set():
            with kv.batch() as b:
                for i in range(n, min(n + 200, total)):
                    key = b"g%d" % i
                    b.put(key, kv_value(key, 1, 20 + i % 200))
            n = min(n + 200, total)
            out.put(("acked", n))
        while not stop.is_set():
            i = rng.randrange(total)
            kv.put(b"g%d" % i, kv_value(b"g%d" % i, 2, 20 + i % 200))
        out.put(("done", n))


def growth_checker(path: str, acked, out, stop) -> None:
    """Read random keys below the acknowledged count (a shared int) until ``stop``: each must be
    there and whole; report (reads, errors)."""
    rng = random.Random(os.getpid())
    errors: list[str] = []
    reads = 0
    with mpwal.KVReader(path) as r:
        out.put(("reading",))
        while not stop.is_set() and len(errors) <= 5:
            n = acked.value
            if not n:
                continue
            keys = [b"g%d" % rng.randrange(n) for _ in range(20)]
            errors += read_and_check(r, keys, must_exist=True)
            reads += len(keys)
    out.put(("result", reads, errors))


def reindexing_putter(path: str, conn) -> None:
    """Put keys in batches of 50 into an index of 16 chunks, with durability "commit", sending
    each count acknowledged through a pipe; runs until killed (it reindexes all the time)."""
    with mpwal.KVWriter(path, index_bits=4, durability="commit", log_size=1 << 20,
                        log_age=0.05) as kv:
        n = 0
        while True:
            with kv.batch() as b:
                for i in range(n, n + 50):
                    b.put(b"r%d" % i, kv_value(b"r%d" % i, 1, 30 + i % 90))
            n += 50
            conn.send(n)


def atomic_writer(path: str, out, stop) -> None:
    """Batches that each put version v into all of GROUP keys (and a few hundred other keys, so
    the 16-chunk index reindexes), until ``stop``."""
    with mpwal.KVWriter(path, index_bits=4, log_size=256 << 10, log_age=0.02) as kv:
        out.put(("open",))
        v = 0
        while not stop.is_set():
            v += 1
            with kv.batch() as b:
                for g in range(GROUP):
                    key = b"group-%d" % g
                    b.put(key, kv_value(key, v, 40 + 300 * (g % 3)))
                for j in range(20):
                    key = b"filler-%d" % ((v * 20 + j) % 4000)
                    b.put(key, kv_value(key, v, 30))
        out.put(("done", v))


GROUP = 12


def atomic_reader(path: str, out, stop) -> None:
    """get_many and one-at-a-time gets in a snapshot of the GROUP keys: every read must see one
    batch's version in all of them; report (reads, errors)."""
    errors: list[str] = []
    reads = 0
    keys = [b"group-%d" % g for g in range(GROUP)]
    with mpwal.KVReader(path) as r:
        out.put(("reading",))
        while not stop.is_set() and len(errors) < 5:
            try:
                got = r.get_many(keys)
                if reads % 7 == 0:
                    with r.snapshot() as s:
                        got2 = [s.get(k) for k in keys]
                    vs2 = {None if v is None else check_kv_value(k, v) for k, v in zip(keys, got2)}
                    if len(vs2) != 1:
                        errors.append(f"a snapshot's gets saw versions {sorted(map(str, vs2))}")
                vs = {None if v is None else check_kv_value(k, v) for k, v in zip(keys, got)}
                if len(vs) != 1:
                    errors.append(f"get_many saw versions {sorted(map(str, vs))}: part of a batch")
            except AssertionError as e:
                errors.append(str(e))
            reads += 1
    out.put(("result", reads, errors))
