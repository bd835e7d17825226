"""Processes of the producer tests (``test_producers.py``): a writer that serves producers until
told to stop, producers that report each acknowledged commit, and a reader that checks what it
sees against the producers' order."""

from __future__ import annotations

import time

import mpwal

DATA = 3  # the value table producers write: slot number * SPAN + i holds payload(number, i)
SPAN = 100_000
TABLES = [mpwal.ValueTable(DATA, 64)]


def payload(number: int, i: int) -> bytes:
    return b"%d:%d" % (number, i)


def serving_writer(path: str, out, stop, options: dict) -> None:
    """A writer that serves producers until ``stop`` is set (or it is killed)."""
    w = mpwal.Writer(path, TABLES, log_size=1 << 16, log_age=0.05, **options)
    out.put(("open", w.last_record_id))
    stop.wait()
    w.close()
    out.put(("closed", w.last_record_id))


def producing(path: str, number: int, count: int, conn, durability: str, per_record: int = 1,
              start=None) -> None:
    """Commit ``count`` records, record i writing slot number*SPAN+i (and ``per_record`` - 1
    more slots after the producers' range); send ("ack", i, record id) after each. ``start``:
    an event to wait for first."""
    if start is not None:
        start.wait()
    try:
        with mpwal.Producer(path, timeout=60, durability=durability) as p:
            for i in range(count):
                with p.record() as rec:
                    rec.insert_value(DATA, number * SPAN + i, payload(number, i))
                    for j in range(1, per_record):
                        rec.insert_value(DATA, 10 * SPAN + number * SPAN + j, b"x" * 60)
                conn.send(("ack", i, rec.record_id))
        conn.send(("done", count, 0))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}", 0))


def checking_reader(path: str, producers: int, out, stop) -> None:
    """Until ``stop``: in one snapshot, each producer's visible records must be a prefix of its
    submissions (they commit in order, each whole) with the right bytes."""
    errors: list[str] = []
    reads = 0
    seen = [0] * producers
    r = mpwal.Reader(path)
    try:
        while not stop.is_set() and not errors:
            with r.snapshot() as snap:
                for number in range(producers):
                    keys = [number * SPAN + i for i in range(seen[number] + 64)]
                    got = snap.values(DATA, keys)
                    n = 0
                    while n < len(got) and got[n] is not None:
                        n += 1
                    if any(v is not None for v in got[n:]):
                        errors.append(f"producer {number}: record {n} missing before later ones")
                    for i in range(n):
                        if got[i] != payload(number, i):
                            errors.append(f"producer {number} record {i}: {got[i]!r}")
                            break
                    if n < seen[number]:
                        errors.append(f"producer {number}: {seen[number]} records seen, now {n}")
                    seen[number] = n
                    reads += len(keys)
            time.sleep(0.001)
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        r.close()
    out.put((reads, errors))


def serving_kv_writer(path: str, out, stop, options: dict) -> None:
    """A KVWriter that serves KV producers until ``stop`` is set (or it is killed)."""
    kv = mpwal.KVWriter(path, log_size=1 << 16, log_age=0.05, **options)
    out.put(("open", kv.last_record_id))
    stop.wait()
    kv.close()
    out.put(("closed", 0))


def kv_key(number: int, i: int) -> bytes:
    return b"producer-%d-key-%d" % (number, i)


def kv_producing(path: str, number: int, count: int, conn, durability: str) -> None:
    """Batch i puts kv_key(number, i) (and deletes the key of batch i - 2, so a batch committed
    twice would also show as a wrong count of keys); ("ack", i, record id) after each."""
    try:
        with mpwal.KVProducer(path, timeout=60, durability=durability) as p:
            for i in range(count):
                with p.batch() as b:
                    b.put(kv_key(number, i), payload(number, i) * 50)
                    if i >= 2:
                        b.delete(kv_key(number, i - 2))
                conn.send(("ack", i, b.record_id))
        conn.send(("done", count, 0))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}", 0))
