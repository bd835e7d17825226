"""`mpwal stress`: short real runs (plain and --chaos), and its checks catching broken data."""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import tempfile

import pytest

from mpwal.tools import stress
from mpwal._overlay import stale_segments
from mpwal.tools.stress import (HEADER, SLOT_BITS, Plan, Workload, check_chunk, check_snapshot,
                          last_writer, make_value, verify_value, writer_interval)

WL = Workload(seed=5, keys=1000, batch=10, value_size=40)


# -- the checks themselves ---------------------------------------------------------------------

def test_verify_value_accepts_the_written_value_and_none():
    v = make_value(5, 17, 3, 40)
    assert len(v) == HEADER.size + 40
    assert verify_value(5, 17, v, 40) == (3, None)
    assert verify_value(5, 17, memoryview(v), 40) == (3, None)
    assert verify_value(5, 17, None, 40) == (0, None)


def test_verify_value_catches_torn_foreign_and_wrong_values():
    a = make_value(5, 17, 3, 40)
    b = make_value(5, 17, 4, 40)
    torn = a[:HEADER.size + 20] + b[HEADER.size + 20:]  # half of one write, half of the next
    rid, err = verify_value(5, 17, torn, 40)
    assert err and "torn" in err
    torn2 = b[:HEADER.size] + a[HEADER.size:]  # header of one write, payload of the other
    assert verify_value(5, 17, torn2, 40)[1]
    assert "wrong slot" in verify_value(5, 18, a, 40)[1]
    assert verify_value(5, 17, a[:-1], 40)[1]  # short
    assert verify_value(5, 17, bytes(len(a)), 40)[1]  # zeros
    # a right CRC over the wrong payload is caught by the exact comparison
    fake = bytearray(a)
    fake[HEADER.size:] = bytes(40)
    struct.pack_into("<I", fake, 16, __import__("zlib").crc32(bytes(40)))
    assert "wrong payload" in verify_value(5, 17, bytes(fake), 40)[1]
    assert verify_value(5, 17, bytes(fake), 40, exact=False)[1] is None
    assert verify_value(6, 17, a, 40)[1]  # another seed's data


def test_ring_formulas_match_a_brute_force_replay():
    for n, b in ((10, 3), (12, 4), (7, 7), (5, 1)):
        state = [0] * n
        for last in range(0, 40):
            if last:
                for p in range((last - 1) * b, last * b):
                    state[p % n] = last
            for pos in range(n):
                assert last_writer(pos, last, n, b) == state[pos]
                lo, hi = writer_interval(pos, state[pos], n, b)
                assert lo <= last <= hi
                assert all(last_writer(pos, x, n, b) == state[pos] for x in range(lo, hi + 1))
                assert last_writer(pos, hi + 1, n, b) != state[pos]
        for pos in range(n):
            writers = {last_writer(pos, x, n, b) for x in range(60)}
            for rid in range(1, 50):
                assert (writer_interval(pos, rid, n, b) is not None) == (rid in writers)


def _state(plan: Plan, last: int) -> dict:
    out = {}
    for r in range(1, last + 1):
        for k, v in plan.record_values(r):
            out[k] = v
    return out


def test_check_snapshot_accepts_a_state_and_catches_a_partial_record():
    plan = Plan(WL)
    st = _state(plan, 150)
    keys = plan.record_keys(150)
    assert check_snapshot(plan, keys, [st.get(k) for k in keys], 150, 150) == []
    assert check_snapshot(plan, keys, [st.get(k) for k in keys], 140, 160) == []
    # record 150 only half visible: half its keys still show record 50 (the previous writer)
    old = _state(plan, 149)
    half = [st[k] if i < 5 else old.get(k) for i, k in enumerate(keys)]
    errs = check_snapshot(plan, keys, half, 149, 150)
    assert errs and "partly visible" in errs[0]
    # a stale single read: last_record_id was already 150 but the value is the older one
    errs = check_snapshot(plan, [keys[0]], [old.get(keys[0])], 150, 150)
    assert errs and "stale" in errs[0]
    # a value from the future: newer than last_record_id read after the lookup
    errs = check_snapshot(plan, [keys[0]], [st[keys[0]]], 140, 149)
    assert errs and "newer than last_record_id" in errs[0]
    # going back per key
    seen = [0] * WL.keys
    assert check_snapshot(plan, [keys[0]], [st[keys[0]]], 150, 150, seen) == []
    errs = check_snapshot(plan, [keys[0]], [old.get(keys[0])], 0, 150, seen)
    assert errs and "went back" in errs[0]


def test_check_chunk_catches_torn_and_partial_index_chunks():
    plan = Plan(WL)
    entries = [0] * WL.index_slots
    for r in range(1, 301):
        for c, e, v in plan.record_index(r):
            entries[c * 64 + e] = v
    chunk = 3
    good = struct.pack("<64Q", *entries[chunk * 64:chunk * 64 + 64])
    assert check_chunk(plan, chunk, good, 300, 300) == []
    bad = list(entries[chunk * 64:chunk * 64 + 64])
    bad[5] = (7 << SLOT_BITS) | (chunk * 64 + 6)  # an entry meant for another slot
    assert check_chunk(plan, chunk, struct.pack("<64Q", *bad), 300, 300)
    assert check_chunk(plan, chunk, good[:100], 300, 300)
    assert check_chunk(plan, chunk, good, 1300, 1300)  # stale: records 1073.. rewrote this chunk


# -- real runs ---------------------------------------------------------------------------------

def _run(argv: list[str], capsys=None) -> tuple[int, str]:
    rc = stress.main(argv)
    out = capsys.readouterr().out if capsys else ""
    return rc, out


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_plain_run_passes(db, capsys):
    rc, out = _run(["--dir", db, "--seconds", "2", "--readers", "2", "--keys", "10000",
                    "--seed", "1", "--log-size", "65536"], capsys)
    assert rc == 0, out
    assert "verdict" in out and "PASS" in out
    # the directory is a stress database: a second run continues it, with its parameters
    rc, out = _run(["--dir", db, "--records", "1", "--readers", "0"], capsys)
    assert rc == 0, out
    assert "10,000 keys" in out and "seed 1" in out
    # other parameters are refused rather than misread
    assert stress.main(["--dir", db, "--seconds", "1", "--keys", "999", "--seed", "1"]) == 2


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_records_with_commit_durability(db, capsys):
    rc, out = _run(["--dir", db, "--records", "150", "--readers", "1", "--keys", "5000",
                    "--batch", "20", "--durability", "commit", "--seed", "2"], capsys)
    assert rc == 0, out
    assert "150 (last record id 150)" in out


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_chaos_run_loses_nothing(db, capsys):
    rc, out = _run(["--dir", db, "--chaos", "--seconds", "4", "--readers", "1", "--keys", "10000",
                    "--enactor", "process", "--seed", "3", "--log-size", "65536"], capsys)
    assert rc == 0, out
    assert "lost acknowledged records" in out
    assert "killed the writer" in out  # the schedule kills within the first 2.5 s
    # the state check after each reopen is a pause of the run, counted apart
    assert re.search(r"verification pauses +[1-9][0-9]*, [0-9.]+ s", out), out


def test_bad_arguments_exit_2(capsys):
    assert stress.main(["--readers", "-1"]) == 2
    assert stress.main(["--seconds", "1", "--records", "5"]) == 2
    assert stress.main(["--batch", "20", "--keys", "10"]) == 2
    assert stress.main(["--help"]) == 0


def test_non_database_directory_is_refused(tmp_path):
    (tmp_path / "x").write_text("not mine")
    assert stress.main(["--dir", str(tmp_path), "--seconds", "1"]) == 2
    assert (tmp_path / "x").read_text() == "not mine"


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_summary_reports_failure_on_a_planted_error(db, monkeypatch):
    """A check that fails must turn the verdict to FAIL and the exit status to 1: plant a
    broken value verifier in the parent's final state check."""
    real = stress.verify_value

    def broken(seed, key, data, size, exact=True):
        rid, err = real(seed, key, data, size, exact)
        return (rid, "planted error") if key == 0 else (rid, err)

    monkeypatch.setattr(stress, "verify_value", broken)
    out = io.StringIO()
    parser = stress.build_parser()
    args = parser.parse_args(["--records", "3", "--readers", "0", "--keys", "100", "--batch", "5",
                              "--value-size", "10", "--seed", "4"])
    rc = stress.Stress(args, db, out=out).run()
    text = out.getvalue()
    assert rc == 1, text
    assert "planted error" in text and "FAIL" in text
    assert os.path.isdir(db)


WORKLOAD = ["--readers", "0", "--keys", "100", "--batch", "5", "--value-size", "10", "--seed", "7"]
SMALL = ["--records", "1"] + WORKLOAD


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_dir_is_0700_and_params_file_0600(db, capsys):
    old = os.umask(0o022)  # the usual umask, which leaves 0755 and 0644
    try:
        rc, out = _run(["--dir", db] + SMALL, capsys)
    finally:
        os.umask(old)
    assert rc == 0, out
    assert _mode(db) == 0o700
    assert _mode(os.path.join(db, stress.PARAMS_FILE)) == 0o600


def test_stress_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("mine")
    assert stress.main(["--dir", str(tmp_path / "f")] + SMALL) == 2
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_temporary_directory_is_removed_or_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes it
    rc, out = _run(SMALL, capsys)
    assert rc == 0, out
    (gone,) = re.findall(r"mpwal stress: removed the temporary directory (\S+)\n", out)
    assert out.startswith(f"mpwal stress: {gone}, ")
    assert gone.startswith(str(tmp_path)) and not os.path.exists(gone)

    rc, out = _run(SMALL + ["--keep"], capsys)
    assert rc == 0, out
    (kept,) = re.findall(r"mpwal stress: kept the database directory (\S+) \(--keep\)", out)
    assert out.startswith(f"mpwal stress: {kept}, ")
    assert {"mpwal.meta", stress.PARAMS_FILE} <= set(os.listdir(kept))
    assert _mode(kept) == 0o700
    assert stale_segments(os.path.realpath(kept)) == []


def test_summary_rate_excludes_verification_pauses(tmp_path):
    """10 s elapsed, 4 s of them the writer waiting on state checks: 600 records in 6 s."""
    out = io.StringIO()
    args = stress.build_parser().parse_args(["--records", "600"] + WORKLOAD)
    st = stress.Stress(args, str(tmp_path / "db"), out=out)
    st.run_started, st.run_ended = 100.0, 110.0
    st.pause_seconds = [1.5, 2.5]
    st.final_last = 600
    st._summary()
    text = out.getvalue()
    assert re.search(r"elapsed +10.0 s\n", text), text
    assert re.search(r"verification pauses +2, 4.0 s ", text), text
    assert re.search(r"commit throughput +100 records/s, 500 values/s, .* over 6.0 s ", text), text


# -- --kv: the key-value directory ---------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_kv_run_passes(db, capsys):
    rc, out = _run(["--kv", "--dir", db, "--seconds", "3", "--readers", "2", "--keys", "3000",
                    "--batch", "50", "--seed", "4", "--max-value", "100000"], capsys)
    assert rc == 0, out
    assert "PASS" in out and "every value checked alone" in out
    assert stress.main(["--kv", "--dir", db, "--seconds", "1"]) == 2  # not empty now


def test_stress_kv_checks_catch_torn_and_foreign_values():
    from mpwal.tools.stress_kv import check_value, make_value
    v = make_value(b"k", 7, 500)
    assert check_value(b"k", v) == (7, None)
    assert check_value(b"j", v)[1] and check_value(b"k", v[:-1])[1] and check_value(b"k", b"x")[1]
    assert check_value(b"k", v[:-1] + b"\0")[1]


# -- --producers: commits through producer processes ---------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_stress_producers_chaos_run_passes(db, capsys):
    """Two producers, the writer and producers SIGKILLed at random: every check passes (the
    count of record ids catches a record committed twice)."""
    rc, out = _run(["--producers", "2", "--dir", db, "--seconds", "4", "--readers", "1",
                    "--batch", "20", "--chaos", "--seed", "3"], capsys)
    assert rc == 0, out
    assert "PASS" in out and "SIGKILLs" in out
    assert stress.main(["--producers", "2", "--dir", db, "--seconds", "1"]) == 2  # not empty now
    assert stress.main(["--producers", "2", "--kv"]) == 2


def test_stress_producers_checks_catch_torn_and_foreign_values():
    from mpwal.tools.stress_producers import check_value, make_value
    v = make_value(3, 9, 1, 50)
    assert check_value(v, 3, 9, 1, 50) is None and check_value(v, 3, None, 1, 50) is None
    assert check_value(v, 3, 8, 1, 50) and check_value(v, 2, 9, 1, 50) and check_value(v[:-1], 3, 9, 1, 50)
    assert check_value(v[:-1] + b"\0", 3, 9, 1, 50) and check_value(None, 3, 9, 1, 50)
