"""The native backend's overlay (mpwal/_native.c) against its Python reference (DESIGN invariant 9).

Differential tests build overlays with the writer's own code, then ask both backends' lookups
(``_overlay._python_lookups`` and ``mpwal._native.Lookups``) the same questions at many
watermarks, and compare every answer byte for byte. Reference counts must not move over many
calls. The extension is also built with AddressSanitizer and UndefinedBehaviorSanitizer, and the
engine's overlay, reader and snapshot tests run against that build.
"""

from __future__ import annotations

import gc
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest
from native_checks import FORCED_PYTHON, assert_no_leaks, native, needs_native
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpwal
from mpwal import _backend, _overlay as overlay
from mpwal._overlay import MISS, RETRY, OverlayReader, OverlayWriter, Torn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_is_named_and_native_in_ci():
    """``mpwal.backend`` names the backend; CI must have built the native one (unless it forces
    the Python one)."""
    assert mpwal.backend in ("native", "python")
    assert (mpwal.backend == "python") == (native is None)
    if os.environ.get("CI") and not FORCED_PYTHON:
        assert mpwal.backend == "native", _backend.why_python


def both(seg, read_value=None, limits=None, slow=None):
    """(python (find_many, value_now), native (find_many, value_now)) of one segment."""
    ref = overlay._python_lookups(seg, read_value, limits, slow)
    lk = native.Lookups(seg.m, seg.shift, seg.slots_end, Torn, MISS, RETRY, read_value, limits,
                        slow)
    return ref, (lk.find_many, lk.value_now)


def table_file(table, index):
    """A stand-in for a table file: the same answer from both backends, from the key."""
    return b"file:%d:%d" % (table, index)


records = st.lists(
    st.tuples(
        st.lists(st.tuples(st.integers(1, 2), st.integers(0, 40),
                           st.one_of(st.none(), st.binary(max_size=40))), max_size=6),
        st.lists(st.integers(1, 3), max_size=1),  # drops
        st.booleans()),  # free what is enacted after this record
    min_size=1, max_size=25)


@needs_native
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=records, data=st.data())
def test_native_lookups_answer_as_the_python_reference(tmp_path, recs, data):
    """Random records (values, removals, drops) published and partly freed: at every watermark
    and for every key, find_many (with and without a table reader) and value_now give the same
    answers in both backends."""
    real = os.path.realpath(str(tmp_path))
    gen = data.draw(st.integers(1, 1 << 20))
    w = OverlayWriter(real, gen, 64, 1 << 16)
    try:
        rid = 0
        for items, drops, free in recs:
            kv = {}
            for t, i, d in items:
                kv[(t, i)] = d
            if not w.room_for(len(kv), OverlayWriter.blob_size(kv.values())) or \
                    len(w.pending_drops) + len(drops) > overlay.MAX_DROPS:
                break
            rid += 1
            w.publish(rid, kv.items(), drops=drops)
            if free and rid > 1:
                enacted = data.draw(st.integers(0, rid - 1))
                w.q[overlay.ENACTED] = w.q[overlay.ENACTING] = max(w.q[overlay.ENACTED], enacted)
                w.free_enacted(w.q[overlay.ENACTED])
        r = OverlayReader(w.name)
        try:
            limits = {1: 1000, 2: 1000, 3: 1000}
            slow_calls = []

            def slow(t, i):
                slow_calls.append((t, i))
                return "slow"

            (pf, pv), (nf, nv) = both(r, table_file, limits, slow)
            keys = list(range(41))
            for mark in range(0, rid + 2):
                for t in (1, 2, 3):
                    assert pf(t, keys, mark, None) == nf(t, keys, mark, None), (t, mark)
                    assert pf(t, keys, mark, table_file) == nf(t, keys, mark, table_file)
            for t in (1, 2, 3):
                for i in keys:
                    assert pv(t, i) == nv(t, i), (t, i)
            # arguments the fast path leaves to the slow one
            for t, i in ((9, 1), (1, -1), (1, 1000), (1, True), (True, 1), (1, 1 << 70), (1, 2.0)):
                assert pv(t, i) == nv(t, i) == "slow", (t, i)
        finally:
            r.release()
    finally:
        w.retire(overlay.CLOSED)


@needs_native
def test_native_lookups_raise_as_the_reference_on_freed_bytes(tmp_path):
    """A chain whose ids rise raises Torn; a node word past the segment raises IndexError;
    value_now turns both into its slow path."""
    real = os.path.realpath(str(tmp_path))
    w = OverlayWriter(real, 1, 16, 4096)
    try:
        w.publish(1, [((1, 1), b"a")])
        w.publish(2, [((1, 1), b"b")])
        head = w.q[w.slot(1, 1) + 2]
        older = w.q[head + 2]
        w.q[older] = 5  # a "newer" id below: rising along the chain
        (pf, pv), (nf, nv) = both(w, table_file, {1: 100}, lambda t, i: "slow")
        for f in (pf, nf):
            with pytest.raises(Torn):
                f(1, [1], 1, None)
        assert pv(1, 1) == nv(1, 1) == b"b"  # (the head is at the current watermark)
        w.q[head + 2] = len(w.m) // 8 + 5  # older points past the segment
        for f in (pf, nf):
            with pytest.raises(IndexError):
                f(1, [1], 1, None)
    finally:
        w.retire(overlay.CLOSED)


@needs_native
def test_native_lookups_keep_reference_counts(tmp_path):
    """Thousands of calls leave the reference counts of the sentinels, the arguments and the
    callbacks as they were, and no memory behind."""
    real = os.path.realpath(str(tmp_path))
    w = OverlayWriter(real, 1, 64, 1 << 16)
    try:
        w.publish(1, [((1, i), b"v%d" % i) for i in range(10)] + [((1, 10), None)], drops=[2])
        limits = {1: 1000, 2: 1000}

        def slow(t, i):
            return None

        lk = native.Lookups(w.m, w.shift, w.slots_end, Torn, MISS, RETRY, table_file, limits, slow)
        keys = list(range(20))
        watched = (MISS, RETRY, Torn, table_file, slow, limits, keys)

        def run(n):
            for _ in range(n):
                lk.find_many(1, keys, 1, None)
                lk.find_many(1, keys, 1, table_file)
                lk.find_many(2, keys, 1, table_file)
                for i in (0, 10, 15, 5000):
                    lk.value_now(1, i)
                lk.value_now(9, 1)

        assert_no_leaks(run, watched)
        lk = None
        gc.collect()
    finally:
        w.retire(overlay.CLOSED)


def _sanitizer_runtime(name: str) -> str | None:
    """The path of gcc's lib{name}.so, or None."""
    try:
        out = subprocess.run(["gcc", f"-print-file-name=lib{name}.so"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_engine_tests_pass_on_a_sanitizer_build(tmp_path):
    """_native.c built with AddressSanitizer and UndefinedBehaviorSanitizer (every report fatal),
    and the overlay, reader, snapshot and native tests run against that build."""
    if FORCED_PYTHON:
        pytest.skip("the Python backend's run (the native run builds and tests this)")
    asan = _sanitizer_runtime("asan")
    if shutil.which("gcc") is None or asan is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs gcc with AddressSanitizer to test the native backend")
        pytest.skip("no gcc with AddressSanitizer here")
    out = str(tmp_path / "_native_asan.so")
    include = sysconfig.get_paths()["include"]
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-fno-omit-frame-pointer", "-fPIC", "-shared",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", f"-I{include}",
                    *sorted(glob.glob(os.path.join(ROOT, "mpwal", "_native*.c"))), "-lz", "-o", out],
                   check=True, timeout=120)
    env = dict(os.environ, MPWAL_NATIVE_PATH=out, LD_PRELOAD=asan,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",  # CPython's own allocations
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    env.pop("MPWAL_BACKEND", None)
    tests = [os.path.join(ROOT, "tests", f) for f in
             ("test_native.py", "test_native_writer.py", "test_native_log.py", "test_applier.py",
              "test_overlay.py", "test_readers.py", "test_snapshots.py", "test_native_kv.py",
              "test_kv.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                           "-k", "not sanitizer and not fuzz_log_decoder", *tests],
                          cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True,
                          timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "passed" in proc.stdout and "ERROR: AddressSanitizer" not in proc.stderr, tail
    assert "runtime error" not in proc.stderr, tail


def test_sanitizer_build_is_the_one_loaded(tmp_path):
    """MPWAL_NATIVE_PATH loads the extension from that file (what the sanitizer test relies on);
    a missing file falls back to the Python backend with one warning that says why."""
    code = ("import warnings, mpwal; from mpwal import _backend; "
            "print(mpwal.backend, _backend.why_python is not None)")
    env = dict(os.environ, MPWAL_NATIVE_PATH=str(tmp_path / "missing.so"))
    env.pop("MPWAL_BACKEND", None)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["python", "True"], proc.stdout + proc.stderr
    assert proc.stderr.count("mpwal runs its Python backend") == 1, proc.stderr
    env = dict(os.environ, MPWAL_BACKEND="python")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.split() == ["python", "True"] and "Python backend" not in proc.stderr


def test_inspect_says_which_backend_runs(db, capsys):
    """``mpwal inspect`` names the backend, and why it is the Python one when it is."""
    import json

    from mpwal.tools import cli
    mpwal.Writer(db, [mpwal.ValueTable(1, slot_size=8)]).close()
    assert cli.main(["inspect", db]) == 0
    want = "backend: native" if native is not None else f"backend: python ({_backend.why_python})"
    assert want in capsys.readouterr().out
    assert cli.main(["inspect", "--json", db]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == {
        "name": mpwal.backend, "why_python": _backend.why_python}


@needs_native
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=records, data=st.data())
def test_native_publish_writes_the_same_bytes_as_the_python_reference(tmp_path, recs, data):
    """The same records (values, removals, drops, frees in between) published by the native
    loop and by the Python one: every byte of both segments, and the writer's ``where``,
    ``newer`` and ring bookkeeping, are the same."""
    real = os.path.realpath(str(tmp_path))
    gen = data.draw(st.integers(1, 1 << 20))
    frees = [data.draw(st.integers(0, 3)) for _ in recs]
    segs = []
    try:
        for use_python in (True, False):
            w = OverlayWriter(real, gen + use_python * (1 << 21), 64, 1 << 14)
            segs.append(w)
            ctx = _backend.python_backend() if use_python else _nullcontext()
            with ctx:
                rid = 0
                for (items, drops, free), back in zip(recs, frees):
                    kv = dict(((t, i), d) for t, i, d in items)
                    if not w.room_for(len(kv), OverlayWriter.blob_size(kv.values())) or \
                            len(w.pending_drops) + len(drops) > overlay.MAX_DROPS:
                        break
                    rid += 1
                    w.publish(rid, list(kv.items())[:2], list(kv.items())[2:], drops)
                    if free and rid > back:
                        w.q[overlay.ENACTED] = max(w.q[overlay.ENACTED], rid - back)
                        w.free_enacted(w.q[overlay.ENACTED])
        py, nat = segs
        assert py.m[overlay.HEADER_BYTES:] == nat.m[overlay.HEADER_BYTES:]
        header = [i for i in range(overlay.DROP_BASE + 2 * overlay.MAX_DROPS) if i != overlay.GENERATION]
        assert [py.q[i] for i in header] == [nat.q[i] for i in header]
        assert py.nkeys == nat.nkeys
        assert list(py.blobs) == list(nat.blobs) and py.used == nat.used
    finally:
        for w in segs:
            w.retire(overlay.CLOSED)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@needs_native
def test_native_value_reads_table_files_as_the_python_reference(db):
    """value() and values() of enacted slots (values of every length, removed, never written,
    past the file's end, in a table added later) are read by the native lookups from the
    reader's mapping of the table file: the same answers as the Python reference's read_value,
    and no reference count moves."""
    tables = [mpwal.ValueTable(3, slot_size=16), mpwal.ValueTable(4, slot_size=1)]
    want = {}
    with mpwal.Writer(db, tables) as w:
        for i in range(0, 300, 3):
            d = bytes([i % 251]) * (i % 17) if i % 17 < 17 else None
            with w.record() as rec:
                rec.insert_value(3, i, d)
                rec.insert_value(4, i, b"x" if i % 2 else b"")
            want[(3, i)], want[(4, i)] = d, (b"x" if i % 2 else b"")
        with w.record() as rec:
            rec.insert_value(3, 30, None)  # removed after being written
        want[(3, 30)] = None
    with mpwal.Writer(db, [mpwal.ValueTable(5, slot_size=8)], enactor="none") as w:  # live,
        with w.record() as rec:  # so readers use the segment; table 5 is new
            rec.insert_value(5, 2, b"new")
        keys = [(t, i) for t in (3, 4) for i in range(0, 320)] + [(3, 10**6), (5, 2), (5, 3)]
        with mpwal.Reader(db) as r:
            got = [r.value(t, i) for t, i in keys]
            batches = [r.values(t, list(range(0, 320))) for t in (3, 4)]
            with _backend.python_backend():
                with mpwal.Reader(db) as ref:
                    assert [ref.value(t, i) for t, i in keys] == got
                    assert [ref.values(t, list(range(0, 320))) for t in (3, 4)] == batches
            assert [got[k] for k, key in enumerate(keys) if key in want] == \
                [want[key] for key in keys if key in want]
            watched = (got[3], r._files.maps, r._strides)

            def run(n):
                for _ in range(n):
                    for t, i in keys[::7]:
                        r.value(t, i)
                    r.values(3, list(range(0, 320, 9)))

            assert_no_leaks(run, watched, rounds=300)
