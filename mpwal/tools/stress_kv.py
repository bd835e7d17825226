"""``mpwal stress --kv``: the main job on a key-value directory.

One writer process commits batches of puts and deletes over ``--keys`` keys (values of 10 B to
``--max-value`` bytes, so some are multipart), starting from a small index so that it reindexes
as it grows; ``--readers`` reader processes read random keys one at a time, in ``get_many``
batches and in snapshots, and check every value alone: it is self-describing (its key's CRC, its
version, its length, and bytes derived from them), so a torn, misplaced or half-written value is
caught. A reader also checks that a key's version never goes back (watermarks never do). At the
end, the directory read by a fresh KVReader must equal the writer's own model exactly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import struct
import sys
import time
import zlib
from typing import Any

import mpwal

_HEAD = struct.Struct("<IQQ")  # key crc, version, length


def make_value(key: bytes, version: int, size: int) -> bytes:
    size = max(size, _HEAD.size)
    seed = random.Random(zlib.crc32(key) ^ (version << 32)).randbytes(64)
    return _HEAD.pack(zlib.crc32(key), version, size) + (seed * (size // 64 + 1))[:size - _HEAD.size]


def check_value(key: bytes, data: bytes) -> tuple[int, str | None]:
    """(version, problem or None) of a value read for ``key``."""
    if len(data) < _HEAD.size:
        return 0, f"{key!r}: a {len(data)}-byte value (torn)"
    crc, version, size = _HEAD.unpack_from(data)
    if crc != zlib.crc32(key):
        return version, f"{key!r}: read a value of another key"
    if len(data) != size or data != make_value(key, version, size):
        return version, f"{key!r}: version {version} is torn or damaged"
    return version, None


def key_of(i: int) -> bytes:
    return b"stress-key-%d" % i


def _writer(path: str, cfg: dict, out: Any, stop: Any) -> None:
    rng = random.Random(cfg["seed"])
    model: dict[bytes, int] = {}  # key -> version (absent: deleted)
    sizes = [10, 100, 100, 100, 1000, 5000, cfg["max_value"]]
    batches = puts = deletes = 0
    try:
        with mpwal.KVWriter(path, index_bits=6, log_size=4 << 20, log_age=0.5,
                            enactor=cfg["enactor"]) as kv:
            out.put(("open", None))
            t_end = time.monotonic() + cfg["seconds"]
            version = 0
            while time.monotonic() < t_end and not stop.is_set():
                version += 1
                changes: dict[bytes, int | None] = {}
                with kv.batch() as b:
                    for _ in range(cfg["batch"]):
                        key = key_of(rng.randrange(cfg["keys"]))
                        if rng.random() < 0.1:
                            b.delete(key)
                            changes[key] = None
                            deletes += 1
                        else:
                            size = rng.choice(sizes) if rng.random() < 0.05 else 100
                            b.put(key, make_value(key, version, size))
                            changes[key] = version
                            puts += 1
                for k, v in changes.items():
                    if v is None:
                        model.pop(k, None)
                    else:
                        model[k] = v
                batches += 1
            stats = kv.stats()
        out.put(("done", {"model": model, "batches": batches, "puts": puts, "deletes": deletes,
                          "rotations": stats["rotations"], "last": stats["committed"]}))
    except BaseException as e:  # reported to the parent, which fails the run
        out.put(("error", f"writer: {type(e).__name__}: {e}"))


def _reader(idx: int, path: str, cfg: dict, out: Any, stop: Any) -> None:
    rng = random.Random(cfg["seed"] * 31 + idx)
    seen: dict[bytes, int] = {}
    errors: list[str] = []
    reads = 0
    try:
        with mpwal.KVReader(path) as r:
            while not stop.is_set() and len(errors) < 10:
                mode = rng.random()
                keys = [key_of(rng.randrange(cfg["keys"])) for _ in range(20)]
                if mode < 0.4:
                    got = [r.get(k) for k in keys]
                elif mode < 0.9:
                    got = r.get_many(keys)
                else:
                    with r.snapshot() as s:
                        got = s.get_many(keys)
                        again = [s.get(k) for k in keys]
                        if again != got:
                            errors.append("a snapshot answered twice differently")
                for k, v in zip(keys, got):
                    reads += 1
                    if v is None:
                        continue
                    version, problem = check_value(k, v)
                    if problem:
                        errors.append(problem)
                    elif version < seen.get(k, 0):
                        errors.append(f"{k!r}: version {version} after {seen[k]} (went back)")
                    else:
                        seen[k] = version
        out.put(("reader", idx, reads, errors))
    except BaseException as e:
        out.put(("reader", idx, reads, errors + [f"reader {idx}: {type(e).__name__}: {e}"]))


def run(path: str, seconds: float, readers: int, keys: int, batch: int, seed: int,
        enactor: str, max_value: int) -> int:
    """Run the stress on ``path`` (a new directory); 0 when every check passed."""
    cfg = {"seconds": seconds, "keys": keys, "batch": batch, "seed": seed, "enactor": enactor,
           "max_value": max_value}
    print(f"mpwal stress --kv: {path}; {seconds:g} s, {readers} readers, {keys:,} keys, batches "
          f"of {batch}, values up to {max_value:,} bytes, seed {seed}, backend {mpwal.backend}",
          flush=True)
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    w = ctx.Process(target=_writer, args=(path, cfg, out, stop))
    w.start()
    procs = [w]
    errors: list[str] = []
    done: dict | None = None
    reads = 0
    t0 = time.monotonic()
    try:
        tag, info = out.get(timeout=120)
        if tag != "open":
            errors.append(str(info))
        else:
            for i in range(readers):
                p = ctx.Process(target=_reader, args=(i, path, cfg, out, stop))
                p.start()
                procs.append(p)
            while done is None:
                msg = out.get(timeout=seconds + 300)
                if msg[0] == "done":
                    done = msg[1]
                elif msg[0] == "error":
                    errors.append(msg[1])
                    break
        stop.set()
        for _ in range(len(procs) - 1):
            _, _, n, errs = out.get(timeout=120)
            reads += n
            errors += errs
    finally:
        stop.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    elapsed = time.monotonic() - t0
    if done is not None:
        model = {k: v for k, v in done["model"].items()}
        with mpwal.KVReader(path) as r:
            found = dict(r.items())
            if len(r) != len(model):
                errors.append(f"the directory holds {len(r)} keys, the writer's model {len(model)}")
        for k, v in found.items():
            version, problem = check_value(k, v)
            if problem:
                errors.append(f"at the end: {problem}")
            elif model.get(k) != version:
                errors.append(f"at the end: {k!r} is version {version}, the model says {model.get(k)}")
        missing = [k for k in model if k not in found]
        if missing:
            errors.append(f"at the end: {len(missing)} keys missing, such as {missing[0]!r}")
        values = done["puts"] + done["deletes"]
        print(f"writer: {done['batches']:,} batches ({values / seconds:,.0f} changes/s), "
              f"{done['puts']:,} puts, {done['deletes']:,} deletes, {done['rotations']} "
              f"rotations, last record {done['last']:,}; {len(model):,} keys at the end")
        print(f"readers: {reads:,} reads ({reads / max(elapsed, 1e-9):,.0f}/s), every value "
              "checked alone, versions never going back")
    for e in errors[:20]:
        print(f"ERROR {e}", file=sys.stderr)
    print(f"mpwal stress --kv: {'PASS' if not errors else 'FAIL'} ({len(errors)} errors)",
          flush=True)
    return 0 if not errors else 1


def default_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")
