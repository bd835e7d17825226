"""Injected I/O faults (``mpwal._fileio`` fault switch): the Nth write, fsync, truncate or rename
fails with EIO or ENOSPC, or a write stores only part of its bytes, for every N across a
workload (a spread sample of N in the quick run, every N with ``MPWAL_LONG=1``).

The documented behaviour under test: the failing call raises ``mpwal.StorageError`` (or, when it
failed after its record was committed, such as the rotation a commit makes past ``log_size``, the
commit returns and the next call raises ``WriterFailedError`` caused by that StorageError); the
writer then refuses commits (and ``sync()``) with ``WriterFailedError`` until it is closed and a
new one opened; the new writer's replay leaves exactly the state after a prefix of the committed records,
and that prefix holds every acknowledged record (no process died, so even records acknowledged
without durability are in the log). A fault inside an open makes the open raise an mpwal error and
leaves the logs for the next open.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import dataclass, field

import pytest

import mpwal
from mpwal import _fileio as fileio
from mpwal._fileio import FaultPlan
from mpwal._logs import read_logs
from mpwal._queues import log_path

from reliability import (describe_diff, drain, fill, make_records, make_template,
                         model_states, prefixes, read_state, scale, segments_left, tables)

RECORDS = make_records(40, seed=7)
STATES = model_states(RECORDS)
OPTS = dict(log_size=2048, log_age=3600)  # no age rotation: the calls are deterministic
SYNC_EVERY = 7
DRAIN_EVERY = 5
ERRORS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC, "short": 0}


@dataclass
class Run:
    """What the workload saw under one fault plan."""

    acked: int = 0  # records whose commit returned
    durable: int = 0  # records acknowledged durable (sync() returned, or durability="commit")
    attempted: int = 0  # records whose commit started (a failed commit may still be in the log)
    error: BaseException | None = None  # the StorageError of the failing call
    where: str = ""
    open_error: BaseException | None = None
    enactor_errors: list = field(default_factory=list)


def workload(path: str, durability: str, enactor: str) -> Run:
    """Commit RECORDS, with sync() every 7 and (enactor="none") a hand-run enactor every 5;
    stop at the first mpwal error and check that the writer then refuses commits; close."""
    run = Run()
    try:
        w = mpwal.Writer(path, tables(), durability=durability, enactor=enactor, **OPTS)
    except mpwal.Error as e:
        run.open_error = e
        return run
    try:
        for i, ops in enumerate(RECORDS, 1):
            run.attempted = i
            try:
                with w.record() as rec:
                    fill(rec, ops)
            except mpwal.Error as e:
                run.error, run.where = e, f"commit of record {i}"
                break
            assert rec.record_id == i, f"record {i} got id {rec.record_id}"
            run.acked = i
            if durability == "commit":
                run.durable = i
            if i % SYNC_EVERY == 0:
                try:
                    run.durable = max(run.durable, w.sync())
                except mpwal.Error as e:
                    run.error, run.where = e, f"sync() after record {i}"
                    run.attempted = i
                    break
            if enactor == "none" and i % DRAIN_EVERY == 0:
                try:
                    drain(path)
                except Exception as e:  # the enactor is not the writer: commits go on
                    run.enactor_errors.append(e)
        if run.error is not None:
            with pytest.raises(mpwal.WriterFailedError):
                with w.record() as rec:
                    rec.insert_value(3, 0, b"refused")
            with pytest.raises(mpwal.WriterFailedError):
                w.sync()
        if enactor == "thread" and run.error is None:
            run.enactor_errors.extend(w.stats()["enactor_errors"])
    finally:
        w.close()  # must not raise, failed writer or not
    return run


@dataclass
class Case:
    durability: str
    enactor: str
    kind: str
    error: int
    nth: int

    def __str__(self) -> str:
        err = "short" if not self.error else errno.errorcode[self.error]
        return f"{self.durability}/{self.enactor} {self.kind} #{self.nth} {err}"


def create(base: str) -> str:
    """An empty database under ``base``, made once per test with no fault armed (faults while
    creating a database are tested apart) and copied for each case."""
    path = os.path.join(base, "empty")
    if not os.path.exists(path):
        mpwal.Writer(path, tables(), enactor="none", **OPTS).close()
    return path


def run_case(base: str, case: Case) -> dict:
    """Run the workload and a first reopen with the fault armed, then a clean reopen; check
    every rule; return the counts of the plan."""
    path = shutil.copytree(create(base), os.path.join(base, f"{case.kind}-{case.error}-{case.nth}"))
    plan = FaultPlan(case.kind, case.nth, case.error)
    fileio.arm(plan)
    state2 = None
    try:
        run = workload(path, case.durability, case.enactor)
        fired_in_workload = plan.fired
        reopen_error = None
        try:  # the first reopen, fault still armed if it has not fired
            w = mpwal.Writer(path, tables(), enactor=case.enactor, **OPTS)
        except mpwal.Error as e:
            reopen_error = e
        else:
            try:
                state2 = read_state(w)
            finally:
                w.close()
    finally:
        fileio.arm(None)
    # -- the failing call --------------------------------------------------------------------
    if case.enactor != "thread":  # the calls are deterministic: N was counted beforehand
        assert plan.fired, f"{case}: the fault never fired ({plan.counts})"
    if run.open_error is not None:
        assert isinstance(run.open_error, mpwal.StorageError), \
            f"{case}: the open failed with {run.open_error!r}, not a StorageError"
        assert plan.fired
    if run.error is not None:
        err = run.error
        if isinstance(err, mpwal.WriterFailedError):  # an earlier call committed, then failed
            err = err.__cause__
        assert isinstance(err, mpwal.StorageError), \
            f"{case}: {run.where} failed with {run.error!r}, not a StorageError"
        assert fired_in_workload, f"{case}: {run.where} failed but the fault did not fire"
    if reopen_error is not None:
        assert isinstance(reopen_error, mpwal.StorageError), \
            f"{case}: the reopen failed with {reopen_error!r}, not a StorageError"
        assert not fired_in_workload, f"{case}: the reopen failed after the fault was spent"
    # -- the clean reopen --------------------------------------------------------------------
    try:
        w = mpwal.Writer(path, tables(), enactor="none", **OPTS)
    except Exception as e:
        raise AssertionError(f"{case}: the open after the fault failed: {e!r}") from e
    try:
        state = read_state(w)
        last = w.last_record_id
        with mpwal.Reader(path) as r:
            assert read_state(r) == state, f"{case}: a reader disagrees with the writer"
        ks = prefixes(state, STATES)
        assert ks, f"{case}: the state after reopen is no prefix of the records " \
                   f"({run}); vs all acked: {describe_diff(state, STATES[run.acked])}"
        lo, hi = run.acked, run.attempted
        assert any(k >= run.durable for k in ks), \
            f"{case}: durable-acknowledged records lost: state is prefix {ks}, " \
            f"{run.durable} were acknowledged durable ({run.where})"
        assert any(lo <= k <= hi for k in ks), \
            f"{case}: state is prefix {ks}, want {lo}..{hi} (every acknowledged record, at most " \
            f"the failed one more; {run.where or 'no commit failed'})"
        k = max(x for x in ks if lo <= x <= hi)
        assert last == k, f"{case}: last_record_id {last} after reopen, state is prefix {k}"
        if state2 is not None:
            assert state2 == state, f"{case}: state changed between the two reopens"
        with w.record() as rec:
            rec.insert_value(3, 0, b"after")
        assert rec.record_id == k + 1, f"{case}: the next record got id {rec.record_id}, want {k + 1}"
    finally:
        w.close()
    left = segments_left(path)
    assert not left, f"{case}: shared-memory segments left behind: {left}"
    shutil.rmtree(path, ignore_errors=True)
    return plan.counts


def pick(count: int, n: int | None, salt: int) -> list[int]:
    """All of 1..count when ``n`` is None or covers it, else ``n`` spread evenly (1 and count
    included, a salted offset in between so different sweeps hit different calls)."""
    if n is None or n >= count:
        return list(range(1, count + 1))
    if n == 1:
        return [1 + (salt * 7919) % count]
    picks = {1, count}
    step = (count - 1) / max(n - 1, 1)
    off = (salt * 0.37) % 1.0
    for i in range(n - 2):
        picks.add(1 + int((i + off) * step))
    return sorted(picks)


_COUNTS: dict = {}


def call_counts(base: str, durability: str, enactor: str) -> dict:
    """How many calls of each kind the workload and the first reopen make (no fault fires)."""
    key = (durability, enactor)
    if key not in _COUNTS:
        plan = FaultPlan("write", 1 << 60)
        path = shutil.copytree(create(base), os.path.join(base, "count"))
        fileio.arm(plan)
        try:
            workload(path, durability, enactor)
            mpwal.Writer(path, tables(), enactor=enactor, **OPTS).close()
        finally:
            fileio.arm(None)
        shutil.rmtree(path)
        _COUNTS[key] = dict(plan.counts)
    return _COUNTS[key]


# (durability, enactor, kind, error name, how many N in the quick run)
SWEEPS = [
    ("relaxed", "none", "write", "EIO", 8), ("relaxed", "none", "write", "short", 6),
    ("relaxed", "none", "write", "ENOSPC", 3), ("relaxed", "none", "fsync", "EIO", 7),
    ("relaxed", "none", "fsync", "ENOSPC", 2), ("relaxed", "none", "truncate", "EIO", 4),
    ("relaxed", "none", "truncate", "ENOSPC", 1), ("relaxed", "none", "rename", "EIO", 5),
    ("relaxed", "none", "rename", "ENOSPC", 2),
    ("commit", "none", "write", "EIO", 3), ("commit", "none", "write", "short", 2),
    ("commit", "none", "write", "ENOSPC", 1), ("commit", "none", "fsync", "EIO", 4),
    ("commit", "none", "fsync", "ENOSPC", 1), ("commit", "none", "truncate", "EIO", 1),
    ("commit", "none", "truncate", "ENOSPC", 1), ("commit", "none", "rename", "EIO", 2),
    ("commit", "none", "rename", "ENOSPC", 1),
    ("relaxed", "thread", "write", "EIO", 2), ("relaxed", "thread", "write", "short", 1),
    ("relaxed", "thread", "write", "ENOSPC", 1), ("relaxed", "thread", "fsync", "EIO", 2),
    ("relaxed", "thread", "fsync", "ENOSPC", 1), ("relaxed", "thread", "truncate", "EIO", 1),
    ("relaxed", "thread", "truncate", "ENOSPC", 1), ("relaxed", "thread", "rename", "EIO", 1),
    ("relaxed", "thread", "rename", "ENOSPC", 1),
]


def _sweep_id(s) -> str:
    n = scale(s[4], None)
    return f"{s[0]}-{s[1]}-{s[2]}-{s[3]}-" + (f"n{n}" if n else "all")


@pytest.mark.parametrize("durability,enactor,kind,err,n", SWEEPS, ids=[_sweep_id(s) for s in SWEEPS])
def test_fault_sweep(db, durability, enactor, kind, err, n):
    """The Nth call of one kind fails (N spread over every such call of the workload, its close
    and the next open): an mpwal StorageError, WriterFailedError until reopened, and after reopen
    a prefix of the committed records holding every acknowledged one."""
    os.makedirs(db)
    counts = call_counts(db, durability, enactor)
    total = counts[kind]
    assert total > 0, f"the workload makes no {kind} call: {counts}"
    # With enactor="thread" the enactor thread's calls vary from run to run: N may not fire.
    salt = sum(map(ord, f"{durability}{enactor}{kind}{err}"))
    for nth in pick(total, scale(n, None), salt):
        run_case(db, Case(durability, enactor, kind, ERRORS[err], nth))


# -- the error messages -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,durability", [("write", "relaxed"), ("fsync", "commit")])
def test_enospc_says_disk_full(db, kind, durability):
    """ENOSPC in a commit (its append, or its fsync with durability="commit") is a StorageError
    with errno ENOSPC whose message says the disk is full; the writer then refuses commits."""
    w = mpwal.Writer(db, tables(), durability=durability, enactor="none", **OPTS)
    try:
        with w.record() as rec:
            rec.insert_value(3, 1, b"before")
        plan = FaultPlan(kind, 1, errno.ENOSPC)
        fileio.arm(plan)
        try:
            with pytest.raises(mpwal.StorageError) as info:
                with w.record() as rec:
                    rec.insert_value(3, 2, b"x" * 60)
        finally:
            fileio.arm(None)
        assert plan.fired
        assert info.value.errno == errno.ENOSPC
        assert "disk is full" in str(info.value), str(info.value)
        with pytest.raises(mpwal.WriterFailedError) as again:
            with w.record() as rec:
                rec.insert_value(3, 3, b"y")
        assert "disk is full" in str(again.value)  # it names the first error
        with mpwal.Reader(db) as r:  # readers still see what was committed
            assert r.value(3, 1) == b"before"
            assert r.value(3, 3) is None
    finally:
        w.close()
    w = mpwal.Writer(db, tables(), enactor="none", **OPTS)
    try:
        assert w.value(3, 1) == b"before"
        assert w.value(3, 3) is None
    finally:
        w.close()


# -- faults inside replay ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def unenacted(tmp_path_factory):
    """120 records, 1..20 enacted, 21..120 in six logs left by a writer that died after sync();
    the logs' names are reversed so that name order is not record order (as pool reuse does)."""
    t = make_template(str(tmp_path_factory.mktemp("replay") / "db"), 120, 20, seed=3,
                      log_size=2048)
    ids = [lf.log_id for lf in t.logs]
    for a, b in zip(ids, reversed(ids)):
        if a < b:
            pa, pb = log_path(t.path, a), log_path(t.path, b)
            os.rename(pa, pa + ".x")
            os.rename(pb, pa)
            os.rename(pa + ".x", pb)
    assert read_logs(t.path).last_record_id == t.last
    return t


class TracingPlan(FaultPlan):
    """A fault plan that also records, for each call, its kind, its number and the names of
    the mpwal functions on the stack, so a sweep can tell the phases of an open apart."""

    def hit(self, kind: str) -> bool:
        if not hasattr(self, "calls"):
            self.calls: list[tuple[str, int, tuple[str, ...]]] = []
        fired = super().hit(kind)
        names = []
        f = sys._getframe(1)
        while f is not None:
            if os.sep + "mpwal" + os.sep in f.f_code.co_filename:
                names.append(f.f_code.co_name)
            f = f.f_back
        self.calls.append((kind, self.counts[kind], tuple(names)))
        return fired


def replay_phases(t, base: str) -> dict[str, dict[str, list[int]]]:
    """The calls of one open+close of the template, by phase: "apply" (replay up to the first
    log truncation), "cleanup" (replay from the first log truncation: truncating the logs, saving
    the queue state) and "close"; each {kind: [call numbers]}."""
    plan = TracingPlan("write", 1 << 60)
    path = t.copy(os.path.join(base, "count"))
    fileio.arm(plan)
    try:
        mpwal.Writer(path, tables(), enactor="none", **OPTS).close()
    finally:
        fileio.arm(None)
    shutil.rmtree(path)
    segments_left(path)
    phases: dict = {p: {k: [] for k in fileio.KINDS} for p in ("apply", "cleanup", "close")}
    cleaning = False
    for kind, n, names in plan.calls:
        if "replay" in names:
            cleaning = cleaning or "_truncate_all_logs" in names
            phases["cleanup" if cleaning else "apply"][kind].append(n)
        elif "close" in names:
            phases["close"][kind].append(n)
    assert phases["cleanup"]["truncate"] and phases["apply"]["write"], \
        f"cannot find the phases of replay (were mpwal's functions renamed?): {plan.calls[:5]}"
    return phases


def replay_with_fault(t, base: str, kind: str, err: str, nth: int) -> None:
    """Open (and close) a copy of ``t`` with the fault armed, then check that a clean open
    replays every durable record of ``t`` and continues its record ids."""
    what = f"{kind} #{nth} {err} during the open"
    path = t.copy(os.path.join(base, f"{kind}{nth}{err}"))
    plan = FaultPlan(kind, nth, ERRORS[err])
    fileio.arm(plan)
    try:
        try:
            w = mpwal.Writer(path, tables(), enactor="none", **OPTS)
        except mpwal.Error as e:
            assert isinstance(e, mpwal.StorageError), f"{what}: open raised {e!r}"
        else:
            w.close()
    finally:
        fileio.arm(None)
    assert plan.fired, f"{what}: the fault did not fire ({plan.counts})"
    w = mpwal.Writer(path, tables(), enactor="none", **OPTS)
    try:
        state = read_state(w)
        assert state == t.states[t.last], \
            f"{what}: durable records lost: state is prefix {prefixes(state, t.states)}, " \
            f"want {t.last}: {describe_diff(state, t.states[t.last])}"
        assert w.last_record_id == t.last, \
            f"{what}: last_record_id {w.last_record_id} after reopen, want {t.last} (record " \
            "ids would be reused)"
    finally:
        w.close()
    left = segments_left(path)
    assert not left, f"{what}: segments left: {left}"
    shutil.rmtree(path)


REPLAY_SWEEPS = [("write", "EIO", 6), ("write", "short", 4), ("fsync", "EIO", 3),
                 ("truncate", "EIO", 3), ("rename", "ENOSPC", 2)]


def _replay_id(s) -> str:
    n = scale(s[2], None)
    return f"{s[0]}-{s[1]}-" + (f"n{n}" if n else "all")


@pytest.mark.parametrize("kind,err,n", REPLAY_SWEEPS, ids=[_replay_id(s) for s in REPLAY_SWEEPS])
def test_fault_while_replay_applies(unenacted, db, kind, err, n):
    """The Nth call fails while a writer replays un-enacted durable logs into the tables (or
    while it closes): a failed open raises StorageError and keeps the logs, and the next open
    replays every durable record."""
    os.makedirs(db)
    phases = replay_phases(unenacted, db)
    calls = phases["apply"][kind] + phases["close"][kind]
    assert calls, f"no {kind} call while replaying or closing"
    for i in pick(len(calls), scale(n, None), len(kind)):
        replay_with_fault(unenacted, db, kind, err, calls[i - 1])


CLEANUP_KINDS = ["truncate", "fsync", "write", "rename"]


@pytest.mark.parametrize("kind", CLEANUP_KINDS)
def test_fault_while_replay_cleans_logs(unenacted, db, kind):
    """The Nth call fails after replay applied and fsynced the tables, while it saves the queue
    state and truncates the logs (every such call; the logs' names are in reverse record order,
    as pool reuse makes them): the next open neither re-applies a leftover older log over newer
    table data (losing durable records) nor reuses record ids."""
    os.makedirs(db)
    calls = replay_phases(unenacted, db)["cleanup"][kind]
    assert calls, f"no {kind} call while replay cleans the logs"
    for nth in calls:
        replay_with_fault(unenacted, db, kind, "EIO", nth)


# -- faults while creating a database ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["write", "fsync", "rename"])
def test_fault_creating_database(db, kind):
    """A fault while the first Writer creates a database: the open raises StorageError, and
    once the disk is healthy the next open creates the database as if nothing had happened."""
    plan = FaultPlan(kind, 1, errno.EIO)
    fileio.arm(plan)
    try:
        with pytest.raises(mpwal.StorageError):
            mpwal.Writer(db, tables(), enactor="none", **OPTS)
    finally:
        fileio.arm(None)
    assert plan.fired
    try:
        w = mpwal.Writer(db, tables(), enactor="none", **OPTS)
    except mpwal.Error as e:
        raise AssertionError(f"the open after a failed creation failed: {e!r}") from e
    try:
        with w.record() as rec:
            rec.insert_value(3, 0, b"ok")
        assert w.value(3, 0) == b"ok"
    finally:
        w.close()
    assert not [n for n in os.listdir(db) if ".tmp" in n], os.listdir(db)


# -- faults in the enactor --------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("spec", ["write:1:5", "fsync:1:28", "truncate:1:5"])
def test_fault_in_enactor_process(db, spec):
    """A fault (armed through MPWAL_FAULTS) in `mpwal enactor PATH` while it enacts a writer's
    rotated logs: the command reports an mpwal error and exits 2, no traceback; the writer is
    unharmed and a reopen holds every record."""
    import subprocess
    records = make_records(24, seed=5)
    w = mpwal.Writer(db, tables(), enactor="none", log_size=512, log_age=3600)
    try:
        for ops in records:
            with w.record() as rec:
                fill(rec, ops)
        w.sync()
        assert w.stats()["logs"]["read"], "no rotated log for the enactor"
        env = dict(os.environ, MPWAL_FAULTS=spec)
        proc = subprocess.run([sys.executable, "-m", "mpwal", "enactor", db], env=env,
                              capture_output=True, text=True, timeout=60)
        with w.record() as rec:  # the writer goes on
            rec.insert_value(3, 0, b"after")
    finally:
        w.close()
    w = mpwal.Writer(db, tables(), enactor="none", **OPTS)
    try:
        expect = dict(model_states(records)[-1])
        expect[("v", 3, 0)] = b"after"
        assert read_state(w) == expect
    finally:
        w.close()
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode == 2 and "mpwal enactor:" in proc.stderr, (proc.returncode, proc.stderr)
