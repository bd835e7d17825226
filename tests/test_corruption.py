"""Replay of damaged logs written by real workloads: flipped bytes, truncation at every offset,
appended garbage, swapped log names, a missing log.

Each template directory holds records ``1..first-1`` already enacted into the table files and
records ``first..last`` left un-enacted in several log files by a writer that died without
closing. A mutation hits a copy; then a private Reader (no writer alive), ``read_logs`` and a
Writer's replay must all agree with the model: the state is exactly the records before the first
damaged one, nothing after it is applied, nothing uncommitted is returned, and no exception but
an ``mpwal.Error`` escapes (replay of damaged logs does not fail at all: damage ends the prefix).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpwal
from mpwal._format import BEGIN_RECORD, LOG_HEADER_SIZE, LogScan
from mpwal._logs import read_logs
from mpwal._queues import load_queues
from mpwal._queues import log_path
from procs import log_header_for

from reliability import (Template, describe_diff, dir_bytes, fill, make_records, make_template,
                         model_states, prefixes, read_state, scale, segments_left, tables)

HEADER = 9  # BEGIN_RECORD type byte + u64 record id: what read_logs sorts the logs by
# Every log starts with a LOG_HEADER_SIZE-byte log header (type byte, database id, epoch, CRC),
# then its first record. A flipped byte of the log header makes the header fail its CRC, and a
# cut inside it leaves a header that does not verify either: that ends the prefix at the log,
# as a bad first record does, and read_logs names the log at offset 0 ("bad header" for a
# flip; "no first record" for a cut, after which no record follows). A flip of the header's
# type byte instead leaves a log without a header, which a database with an id does not take
# as its own: it is ignored, and the next log, if any, is a gap (check_log_header_damage).


# -- templates and checks ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Template:
    """10 records: 1..4 enacted, 5..10 in three small logs (~900 bytes in all)."""
    return make_template(str(tmp_path_factory.mktemp("small") / "db"), 10, 4, seed=1, log_size=200)


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Template:
    """300 records: 1..40 enacted, 41..300 in nine logs of ~4 KiB."""
    return make_template(str(tmp_path_factory.mktemp("large") / "db"), 300, 40, seed=2,
                         log_size=4096)


@pytest.fixture
def scratch(tmp_path):
    """A directory for the many mutated copies of one test (one hypothesis example each)."""
    return str(tmp_path)


def fresh_copy(t: Template, base: str) -> str:
    d = tempfile.mkdtemp(dir=base)
    return t.copy(os.path.join(d, "db"))


def replay_logs(path: str):
    """``read_logs`` as replay calls it: starting after the queue file's last cleaned record."""
    st = load_queues(path)
    return read_logs(path, start=st.last_cleaned_record + 1 if st else None)


def done_with(path: str) -> None:
    left = segments_left(path)
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    assert not left, f"shared-memory segments left behind: {left}"


def check_private(t: Template, path: str, k: int, what: str) -> None:
    """``read_logs`` and a private Reader see exactly the first ``k`` records; the read-only open
    changes nothing on disk (invariant 8)."""
    before = dir_bytes(path)
    try:
        ids = [r.record_id for r in replay_logs(path).records()]
        with mpwal.Reader(path) as r:
            mode = r.mode
            state = read_state(r)
            last = r.last_record_id
    except (mpwal.Error, AssertionError):
        raise
    except Exception as e:  # pragma: no cover - the point of the test
        raise AssertionError(f"{what}: a non-mpwal exception escaped: {e!r}") from e
    assert ids == list(range(t.first, k + 1)), \
        f"{what}: read_logs gives records {ids[:3]}..{ids[-3:]}, want {t.first}..{k}"
    assert mode == "private", f"{what}: no writer is alive, yet the reader is {mode}"
    assert state == t.states[k], \
        f"{what}: private reader state is prefixes {prefixes(state, t.states)}, want {k}: " \
        f"{describe_diff(state, t.states[k])}"
    assert last == k, f"{what}: private reader last_record_id {last}, want {k}"
    assert dir_bytes(path) == before, f"{what}: a Reader changed files on disk"


def check_replay(t: Template, path: str, k: int, what: str) -> None:
    """A Writer's replay applies exactly the first ``k`` records, the next commit is ``k+1``,
    and after close the tables alone hold the same state."""
    try:
        w = mpwal.Writer(path, tables(), enactor="none", log_age=3600)
    except mpwal.Error as e:
        raise AssertionError(f"{what}: replay of damaged logs failed the open: {e!r}") from e
    except Exception as e:  # pragma: no cover
        raise AssertionError(f"{what}: a non-mpwal exception escaped the open: {e!r}") from e
    try:
        state = read_state(w)
        assert state == t.states[k], \
            f"{what}: replayed state is prefixes {prefixes(state, t.states)}, want {k}: " \
            f"{describe_diff(state, t.states[k])}"
        assert w.last_record_id == k, f"{what}: last_record_id {w.last_record_id} after replay, want {k}"
        with mpwal.Reader(path) as r:
            assert r.mode == "shared-memory"
            assert read_state(r) == state, f"{what}: a reader beside the writer disagrees"
        with w.record() as rec:
            rec.insert_value(3, 0, b"after replay")
        assert rec.record_id == k + 1, f"{what}: the first record after replay got id {rec.record_id}"
    finally:
        w.close()
    expect = dict(t.states[k])
    expect[("v", 3, 0)] = b"after replay"
    with mpwal.Reader(path) as r:
        assert read_state(r) == expect, f"{what}: state after close differs"


def check_all(t: Template, path: str, k: int, what: str) -> None:
    check_private(t, path, k, what)
    check_replay(t, path, k, what)


def record_start(t: Template, log_id: int, rid: int) -> int:
    info = next(lf for lf in t.logs if lf.log_id == log_id)
    return next(s for r, s, _ in info.records if r == rid)


def offsets(t: Template):
    """(log position in record order, log id, offset) of every log byte."""
    for pos, lf in enumerate(t.logs):
        for o in range(lf.size):
            yield pos, lf.log_id, o


def sample(seq, n: int, seed: int):
    """Every item when ``n`` is None or covers them, else ``n`` spread evenly (seeded offset)."""
    seq = list(seq)
    if n is None or n >= len(seq):
        return seq
    step = len(seq) / n
    off = random.Random(seed).random() * step
    return [seq[int(off + i * step)] for i in range(n)]


def mutate(path: str, log_id: int, fn) -> bytes:
    """Replace the bytes of a log by ``fn(its bytes)``; returns the old bytes. Rewrites in place
    and shortens with ftruncate (``open(.., "wb")`` makes ext4 flush on close: slow)."""
    p = log_path(path, log_id)
    with open(p, "r+b") as f:
        data = f.read()
        new = fn(bytearray(data))
        f.seek(0)
        f.write(new)
        f.truncate(len(new))
    return data


def restore(path: str, log_id: int, data: bytes) -> None:
    mutate(path, log_id, lambda _: data)


def flipped(o: int, mask: int):
    def fn(b: bytearray) -> bytes:
        b[o] ^= mask
        return bytes(b)
    return fn


def problem_offset(t: Template, log_id: int, rid: int) -> int:
    """Where read_logs names damage in record ``rid`` of ``log_id``: at the record's start, but
    at offset 0 (the log) when it is the log's first record: a log whose first record does not
    verify is not ordered at all."""
    info = next(lf for lf in t.logs if lf.log_id == log_id)
    return 0 if rid == info.records[0][0] else record_start(t, log_id, rid)


def check_log_header_damage(t: Template, path: str, log_id: int, o: int, what: str,
                            cut: bool = False) -> None:
    """What read_logs reports for byte ``o`` of ``log_id``'s log header damaged (see HEADER);
    ``cut``: the log was cut at ``o``, inside its header, so no first record follows it."""
    ls = replay_logs(path)
    pr = ls.problem
    with open(log_path(path, log_id), "rb") as f:
        first = f.read(1)
    if o == 0 and first != bytes((BEGIN_RECORD,)):  # the type byte: neither header nor record
        assert not ls.ignored, f"{what}: read_logs ignores {ls.ignored}"
        assert pr is not None and (pr.log_id, pr.offset, pr.why) == (log_id, 0, "no first record"), \
            f"{what}: read_logs reports {pr}, want log{log_id} at byte 0: no first record"
    elif o == 0:  # the type byte became a record's: a log without a header
        assert [lid for lid, _ in ls.ignored] == [log_id], \
            f"{what}: read_logs ignores {ls.ignored}, want log{log_id}"
        pos = next(i for i, lf in enumerate(t.logs) if lf.log_id == log_id)
        if pos + 1 < len(t.logs):
            assert pr is not None and (pr.log_id, pr.why) == (t.logs[pos + 1].log_id, "gap"), \
                f"{what}: read_logs reports {pr}, want the gap at the next log"
        else:
            assert pr is None, f"{what}: read_logs reports {pr}"
    else:
        assert not ls.ignored, f"{what}: read_logs ignores {ls.ignored}"
        why = "no first record" if cut else "bad header"
        assert pr is not None and (pr.log_id, pr.offset, pr.why) == (log_id, 0, why), \
            f"{what}: read_logs reports {pr}, want log{log_id} at byte 0: {why}"


def check_problem(t: Template, path: str, log_id: int, start: int, what: str, rid=None) -> None:
    pr = replay_logs(path).problem
    assert pr is not None, f"{what}: read_logs reports no problem"
    assert (pr.log_id, pr.offset) == (log_id, start), \
        f"{what}: read_logs reports {pr}, want log{log_id} at byte {start}"
    if rid is not None:
        assert pr.record_id == rid, f"{what}: read_logs names record {pr.record_id}, want {rid}"


# -- byte flips -------------------------------------------------------------------------------

MASKS = scale((0xFF,), (0xFF, 0x01, 0x80, 0x10))


@pytest.mark.parametrize("masks", [MASKS], ids=[f"masks{len(MASKS)}"])
def test_flip_every_byte_private(small, scratch, masks):
    """Every byte of every log of the small template flipped: read_logs and a private Reader
    see exactly the records before the damaged one, and read_logs names its log and offset
    (log headers and first record headers included: a log is ordered only by a first record
    that verifies, after a log header that verifies)."""
    path = fresh_copy(small, scratch)
    cases = 0
    for _pos, lid, o in offsets(small):
        rid = small.locate(lid, o)  # a byte of the log header: the log's first record
        start = record_start(small, lid, rid)
        for mask in masks:
            orig = mutate(path, lid, flipped(o, mask))
            try:
                what = f"log{lid} byte {o} ^ {mask:#x} (record {rid})"
                check_private(small, path, rid - 1, what)
                field = o - start
                if o < LOG_HEADER_SIZE:
                    check_log_header_damage(small, path, lid, o, what)
                else:
                    check_problem(small, path, lid, problem_offset(small, lid, rid), what,
                                  rid=None if field < HEADER else rid)
            finally:
                restore(path, lid, orig)
            cases += 1
    assert cases == sum(lf.size for lf in small.logs) * len(masks)
    done_with(path)


REPLAY_FLIPS = scale(15, None)


@pytest.mark.parametrize("n", [REPLAY_FLIPS], ids=[f"offsets-{REPLAY_FLIPS or 'all'}"])
def test_flip_bytes_replay(small, scratch, n):
    """Flipped bytes of the small template (a spread sample; every byte in long mode): a
    Writer's replay applies exactly the records before the damaged one."""
    for _pos, lid, o in sample(offsets(small), n, 1):
        rid = small.locate(lid, o)
        path = fresh_copy(small, scratch)
        mutate(path, lid, flipped(o, 0xFF))
        check_replay(small, path, rid - 1, f"log{lid} byte {o} ^ 0xff (record {rid})")
        done_with(path)


def positions(t: Template):
    """A strategy for (log position, offset) anywhere in a template's logs."""
    return st.integers(0, len(t.logs) - 1).flatmap(
        lambda pos: st.tuples(st.just(pos), st.integers(0, t.logs[pos].size - 1)))


@settings(max_examples=scale(10, 300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_flips_large(large, scratch, data):
    """One to three random bytes of the large template's logs flipped with random masks: every
    reader and the replay see exactly the records before the first damaged one; a flip in a
    first header included."""
    flips = data.draw(st.lists(st.tuples(positions(large), st.integers(1, 255)), min_size=1,
                               max_size=3, unique_by=lambda f: f[0]))
    path = fresh_copy(large, scratch)
    hit = []
    for (pos, o), mask in flips:
        lid = large.logs[pos].log_id
        mutate(path, lid, flipped(o, mask))
        hit.append(large.locate(lid, o))
    k = min(hit) - 1
    what = f"flips {flips} (records {hit})"
    check_all(large, path, k, what)
    done_with(path)


# -- truncation -------------------------------------------------------------------------------

def boundary_before(t: Template, lid: int, o: int) -> int:
    """The newest record wholly before offset ``o`` of ``lid`` (records of earlier logs count)."""
    pos = next(i for i, lf in enumerate(t.logs) if lf.log_id == lid)
    last = t.logs[pos - 1].records[-1][0] if pos else t.first - 1
    for rid, _, end in t.logs[pos].records:
        if end <= o:
            last = rid
    return last


def truncated(o: int):
    return lambda b: bytes(b[:o])


def test_truncate_every_offset_private(small, scratch):
    """Each log of the small template cut at every offset: read_logs and a private Reader see
    exactly the records wholly before the cut, and read_logs names the cut log and the torn
    record (or, for a cut inside the log header, the log at offset 0)."""
    path = fresh_copy(small, scratch)
    cases = 0
    for pos, lid, o in offsets(small):
        if o == LOG_HEADER_SIZE:  # the log header alone: test_log_cut_right_after_its_header
            cases += 1
            continue
        orig = mutate(path, lid, truncated(o))
        try:
            k = boundary_before(small, lid, o)
            what = f"log{lid} cut at {o} of {len(orig)}"
            check_private(small, path, k, what)
            rec = [(r, s) for r, s, e in small.logs[pos].records if s < o < e]
            if 0 < o < LOG_HEADER_SIZE:  # a torn log header, and no first record after it
                check_log_header_damage(small, path, lid, o, what, cut=True)
            elif rec and o - rec[0][1] >= HEADER:  # cut inside a record whose id was read
                check_problem(small, path, lid, problem_offset(small, lid, rec[0][0]), what,
                              rid=rec[0][0])
        finally:
            restore(path, lid, orig)
        cases += 1
    assert cases == sum(lf.size for lf in small.logs)
    done_with(path)


@pytest.mark.parametrize("pos", [0, 1, -1])
def test_log_cut_right_after_its_header(small, scratch, pos):
    """A log cut right after its log header (the header written, its first record lost, say by
    a crash): it holds no record; readers and replay see exactly the records before it."""
    path = fresh_copy(small, scratch)
    try:
        lid = small.logs[pos].log_id
        mutate(path, lid, truncated(LOG_HEADER_SIZE))
        check_all(small, path, boundary_before(small, lid, LOG_HEADER_SIZE), f"log{lid} header only")
    finally:
        done_with(path)


REPLAY_CUTS = scale(12, None)


@pytest.mark.parametrize("n", [REPLAY_CUTS], ids=[f"offsets-{REPLAY_CUTS or 'all'}"])
def test_truncate_replay(small, scratch, n):
    """Logs of the small template cut at a spread of offsets (every offset in long mode): a
    Writer's replay applies exactly the records wholly before the cut."""
    for _pos, lid, o in sample(offsets(small),
                               n, 2):
        path = fresh_copy(small, scratch)
        mutate(path, lid, truncated(o))
        check_replay(small, path, boundary_before(small, lid, o), f"log{lid} cut at {o}")
        done_with(path)


@settings(max_examples=scale(8, 200), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.data())
def test_random_truncation_large(large, scratch, where):
    """A random log of the large template cut at a random offset: readers and replay see exactly
    the records wholly before the cut."""
    pos, o = where.draw(positions(large))
    lid = large.logs[pos].log_id
    path = fresh_copy(large, scratch)
    mutate(path, lid, truncated(o))
    check_all(large, path, boundary_before(large, lid, o), f"log{lid} cut at {o}")
    done_with(path)


# -- garbage ----------------------------------------------------------------------------------

@settings(max_examples=scale(8, 200), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, 8), garbage=st.binary(min_size=1, max_size=600))
def test_append_garbage(large, scratch, pos, garbage):
    """Garbage appended to a log: replay ends at that log's last record (so the last log loses
    nothing), and read_logs names the log and the offset where the garbage starts."""
    pos = pos % len(large.logs)
    info = large.logs[pos]
    path = fresh_copy(large, scratch)
    mutate(path, info.log_id, lambda b: bytes(b) + garbage)
    k = info.records[-1][0]
    what = f"{len(garbage)} bytes of garbage after log{info.log_id}"
    check_problem(large, path, info.log_id, info.size, what)
    check_all(large, path, k, what)
    done_with(path)


@pytest.mark.parametrize("with_header", [True, False], ids=["log-header", "no-header"])
def test_garbage_log_file_is_ignored(small, scratch, with_header):
    """A new log file holding only garbage that looks like the start of a record (a pool log
    hit by garbage; after a valid log header, or with none, which read_logs ignores) must not
    end replay before the real records."""
    path = fresh_copy(small, scratch)
    try:
        head = log_header_for(path) if with_header else b""
        with open(log_path(path, 99), "wb") as f:
            f.write(head + b"\x01" + bytes(8) + b"\x03garbage")
        assert (99 in [lid for lid, _ in replay_logs(path).ignored]) == (not with_header)
        check_all(small, path, small.last, "garbage log99")
    finally:
        done_with(path)


@pytest.mark.parametrize("with_header", [True, False], ids=["log-header", "no-header"])
def test_garbage_log_file_past_the_end(small, scratch, with_header):
    """A new log file holding garbage that does not start like a record, or starts like a record
    past the last one (after a valid log header, or with none), leaves every committed record in
    place."""
    for name, blob in (("zeros", bytes(64)), ("text", b"hello world\n"),
                       ("late-id", b"\x01" + (small.last + 1).to_bytes(8, "little") + b"\x09"),
                       ("far-id", b"\x01" + (1 << 40).to_bytes(8, "little"))):
        path = fresh_copy(small, scratch)
        head = log_header_for(path) if with_header else b""
        with open(log_path(path, 99), "wb") as f:
            f.write(head + blob)
        check_all(small, path, small.last, f"garbage log99 ({name})")
        done_with(path)


# -- whole files ------------------------------------------------------------------------------

def swap(path: str, a: int, b: int) -> None:
    pa, pb = log_path(path, a), log_path(path, b)
    os.rename(pa, pa + ".swap")
    os.rename(pb, pa)
    os.rename(pa + ".swap", pb)


SWAPS = scale(3, None)


@pytest.mark.parametrize("n", [SWAPS], ids=[f"large-pairs-{SWAPS or 'all'}"])
def test_swap_log_names(small, large, scratch, n):
    """Two log files' names swapped (every pair of the small template, a sample of the large
    one's): logs are ordered by first record id, so every committed record is replayed."""
    cases = [(small, a, b) for a, b in itertools.combinations([lf.log_id for lf in small.logs], 2)]
    cases += [(large, a, b) for a, b in sample(
        itertools.combinations([lf.log_id for lf in large.logs], 2), n, 3)]
    for t, a, b in cases:
        path = fresh_copy(t, scratch)
        swap(path, a, b)
        assert replay_logs(path).problem is None
        check_all(t, path, t.last, f"log{a} <-> log{b}")
        done_with(path)


DROPS = scale(3, None)


@pytest.mark.parametrize("n", [DROPS], ids=[f"large-logs-{DROPS or 'all'}"])
def test_drop_middle_log(small, large, scratch, n):
    """A log missing from the middle (every later log of the small template, a sample of the
    large one's; the small one's last included): replay stops at the gap, and read_logs reports the gap at
    the log after the missing one."""
    cases = [(small, pos) for pos in range(1, len(small.logs))]
    cases += [(large, pos) for pos in sample(range(1, len(large.logs)), n, 4)]
    for t, pos in cases:
        path = fresh_copy(t, scratch)
        os.unlink(log_path(path, t.logs[pos].log_id))
        k = t.logs[pos - 1].records[-1][0]
        what = f"log{t.logs[pos].log_id} (position {pos}) missing"
        pr = replay_logs(path).problem
        if pos + 1 < len(t.logs):
            assert pr is not None and pr.why == "gap" and pr.log_id == t.logs[pos + 1].log_id, \
                f"{what}: read_logs reports {pr}"
        else:
            assert pr is None, f"{what}: read_logs reports {pr}"
        check_all(t, path, k, what)
        done_with(path)


# -- known bugs: the first record header of a log ---------------------------------------------

@pytest.mark.parametrize("damage", [
    "flip-type", "flip-id", "cut-head", "empty", "missing",
    "flip-log-header-type", "flip-log-header-id", "flip-log-header-crc", "cut-log-header"])
def test_damaged_head_of_earliest_log(small, scratch, damage):
    """Damage to the first record's header of the earliest un-enacted log (a flipped type or id
    byte, a cut inside it, the file emptied or deleted), or to its log header (a flipped type,
    id or CRC byte, a cut inside it): nothing of the logs may be applied."""
    path = fresh_copy(small, scratch)
    try:
        lid = small.logs[0].log_id
        if damage == "flip-type":
            mutate(path, lid, flipped(LOG_HEADER_SIZE, 0xFF))
        elif damage == "flip-id":
            mutate(path, lid, flipped(LOG_HEADER_SIZE + 1, 0xFF))
        elif damage == "cut-head":
            mutate(path, lid, truncated(LOG_HEADER_SIZE + 5))
        elif damage == "flip-log-header-type":
            mutate(path, lid, flipped(0, 0xFF))
        elif damage == "flip-log-header-id":
            mutate(path, lid, flipped(1, 0xFF))
        elif damage == "flip-log-header-crc":
            mutate(path, lid, flipped(LOG_HEADER_SIZE - 1, 0xFF))
        elif damage == "cut-log-header":
            mutate(path, lid, truncated(5))
        elif damage == "empty":
            mutate(path, lid, truncated(0))
        else:
            os.unlink(log_path(path, lid))
        check_all(small, path, small.first - 1, f"log{lid}: {damage}")
    finally:
        done_with(path)


def test_damaged_head_id_of_later_log_keeps_earlier_logs(small, scratch):
    """The first record id of the second log damaged to a small value: the earliest log's
    records are still replayed (the longest valid prefix)."""
    path = fresh_copy(small, scratch)
    try:
        lid = small.logs[1].log_id
        first = small.logs[1].records[0][0]
        mutate(path, lid, flipped(LOG_HEADER_SIZE + 1, first ^ 1))  # id becomes 1
        check_all(small, path, small.logs[0].records[-1][0], f"log{lid} first id -> 1")
    finally:
        done_with(path)


def test_problem_names_log_with_damaged_head(small, scratch):
    """A flipped byte in the first record's header of the second log: read_logs names that log
    at offset 0 (not the next log's gap). A flipped byte of its log header: see
    check_log_header_damage."""
    lid = small.logs[1].log_id
    for o in range(LOG_HEADER_SIZE + HEADER):
        path = fresh_copy(small, scratch)
        try:
            mutate(path, lid, flipped(o, 0xFF))
            what = f"log{lid} byte {o} ^ 0xff"
            if o < LOG_HEADER_SIZE:
                check_log_header_damage(small, path, lid, o, what)
            else:
                check_problem(small, path, lid, 0, what)
        finally:
            done_with(path)


def test_damaged_head_of_later_log_is_safe(small, scratch):
    """Every byte of a later log's log header and first record header flipped: the state is
    still exactly the records of the logs before it."""
    cases = 0
    heads = LOG_HEADER_SIZE + HEADER
    for pos in range(1, len(small.logs)):
        lid = small.logs[pos].log_id
        k = small.logs[pos - 1].records[-1][0]
        for o in range(heads):
            path = fresh_copy(small, scratch)
            mutate(path, lid, flipped(o, 0xFF))
            check_private(small, path, k, f"log{lid} byte {o} ^ 0xff")
            if o in (0, 1, LOG_HEADER_SIZE - 1, LOG_HEADER_SIZE, LOG_HEADER_SIZE + 1, heads - 1):
                check_replay(small, path, k, f"log{lid} byte {o} ^ 0xff")
            done_with(path)
            cases += 1
    assert cases == heads * (len(small.logs) - 1)


def test_template_replays_whole(small, large, scratch):
    """Sanity: the undamaged templates replay to the model state after every record."""
    for t in (small, large):
        assert read_logs(t.path).problem is None
        path = fresh_copy(t, scratch)
        check_all(t, path, t.last, "undamaged")
        done_with(path)


def test_damaged_rotated_log_under_live_writer(db):
    """A byte of a rotated, not yet enacted log flipped while its writer lives: readers still see
    every committed record (the overlay holds them), close() raises nothing but an mpwal error,
    and the next open replays exactly the records before the damaged one."""
    records = make_records(24, seed=5)
    states = model_states(records)
    w = mpwal.Writer(db, tables(), enactor="none", log_size=512, log_age=3600)
    closed = False
    try:
        for ops in records:
            with w.record() as rec:
                fill(rec, ops)
        lid = w.stats()["logs"]["read"][0]
        scan = list(LogScan(open(log_path(db, lid), "rb").read()).records())
        victim = scan[len(scan) // 2]
        mutate(db, lid, flipped(victim.start + HEADER + 2, 0x40))
        with mpwal.Reader(db) as r:
            assert read_state(r) == states[-1]
        try:
            w.close()
        except mpwal.Error:
            pass
        except Exception as e:
            raise AssertionError(f"close() raised a non-mpwal exception: {e!r}") from e
        closed = True
    finally:
        if not closed:
            w.close()
    w = mpwal.Writer(db, tables(), enactor="none", log_age=3600)
    try:
        assert read_state(w) == states[victim.record_id - 1]
    finally:
        w.close()
