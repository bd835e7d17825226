"""The ``mpwal`` command line: --version, the commands' help and --json, a closed stdout pipe,
and ``mpwal cleanup`` of the segment a SIGKILLed writer left behind (the messages themselves are
tested on mpwal.tools.inspect in test_inspect.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
from procs import TABLES, write_log, writer_process

import mpwal
from mpwal.tools import cli
from mpwal.tools import inspect as mi
from mpwal._format import encode_record
from mpwal._overlay import segment_prefix, stale_segments
from mpwal._queues import QueueState, save_queues
from mpwal._tables import ValueTable, merge_catalog

spawn = multiprocessing.get_context("spawn")
READ_ONLY = ("inspect", "verify", "dump")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().out


def segments_in_dev_shm(path: str) -> list[str]:
    prefix = segment_prefix(os.path.realpath(path))[1:]
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


# -- --version and help ------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(capsys, flag):
    assert run_cli(capsys, flag) == (0, f"mpwal {mpwal.__version__}\n")


def test_usage_lists_cleanup_and_version(capsys):
    rc, out = run_cli(capsys, "--help")
    assert rc == 0 and "cleanup PATH" in out and "--version" in out


@pytest.mark.parametrize("cmd", READ_ONLY + ("cleanup",))
def test_help_says_what_the_command_does_and_its_exit_statuses(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "\n  0  " in out and "\n  2  " in out
    if cmd in READ_ONLY:
        assert "Read-only" in out and "changes nothing on" in out
    if cmd != "dump":
        assert ("--json" in out) == (cmd != "cleanup")


# -- --json and the messages of the read-only commands ------------------------------------------

def _hand_made_db(tmp_path, records: int = 3, empty_logs: int = 0) -> str:
    """A database with ``records`` records in log0 and ``empty_logs`` empty logs in the pool."""
    path = str(tmp_path / "db")
    os.makedirs(path)
    merge_catalog(path, [ValueTable(3, 64)])
    write_log(path, 0, b"".join(encode_record(r, [], {}, {(3, r): b"value %d" % r})
                                for r in range(1, records + 1)))
    for lid in range(1, empty_logs + 1):
        open(os.path.join(path, f"log{lid}"), "wb").close()
    save_queues(path, QueueState(epoch=1, generation=1, appending=0,
                                 pool=list(range(1, empty_logs + 1)), next_log=empty_logs + 1))
    return path


def test_inspect_and_verify_json_from_the_command_line(tmp_path, capsys):
    path = _hand_made_db(tmp_path)
    rc, out = run_cli(capsys, "inspect", "--json", path)
    doc = json.loads(out)
    assert rc == 0 and doc["logs"][0]["queue"] == "appending"
    assert doc["valid_prefix"] == {"first": 1, "last": 3} and doc["writer"] == {"alive": False}
    rc, out = run_cli(capsys, "verify", path, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] is True and doc["records_checked"] == 3
    assert doc["problem"] is None


def test_closed_database_says_every_record_is_in_the_tables(db, capsys):
    with mpwal.Writer(db, TABLES) as w:
        for i in range(5):
            with w.record() as rec:
                rec.insert_value(3, i, b"x")
    note = ("no log records: every committed record has been enacted into the tables "
            "(last record 5)")
    assert run_cli(capsys, "dump", db) == (0, note + "\n")
    rc, out = run_cli(capsys, "verify", db)
    assert rc == 0 and f"\n{note}\nresult: ok\n" in out


# -- a closed stdout pipe ----------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
@pytest.mark.parametrize("argv", [["dump"], ["dump", "--json"], ["verify"], ["inspect"]])
def test_closed_stdout_pipe_exits_quietly(tmp_path, argv):
    """``mpwal dump PATH | head``: the reader closes the pipe after a line; the command stops
    without a BrokenPipeError traceback. The output is far larger than a pipe's buffer, so the
    command is still writing when the pipe closes."""
    path = _hand_made_db(tmp_path, records=3000, empty_logs=2000)
    proc = subprocess.Popen([sys.executable, "-m", "mpwal", *argv, path], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline()
        proc.stdout.close()
        rc = proc.wait(timeout=60)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert err == ""  # no traceback, no "Exception ignored" at exit
    assert rc == cli.EXIT_SIGPIPE


# -- cleanup -----------------------------------------------------------------------------------

@pytest.mark.multiprocess
@pytest.mark.xdist_group("multiprocess")
def test_cleanup_removes_the_segment_of_a_killed_writer(db, capsys):
    acks = spawn.Queue()
    p = spawn.Process(target=writer_process, args=(db, 1, 10**6, 200, 4, acks),
                      kwargs={"durability": "commit"})
    p.start()
    try:
        assert acks.get(timeout=60)[0] == "open"
        while acks.get(timeout=60)[1] < 5:  # committing
            pass
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    (name,) = stale_segments(os.path.realpath(db))

    rc, out = run_cli(capsys, "inspect", db)
    assert rc == 0 and "writer: not alive" in out
    assert f"  {name} (STALE): generation " in out
    assert "1 stale segment: left by a writer that is gone; remove with `mpwal cleanup " in out

    rc, out = run_cli(capsys, "cleanup", db)
    assert rc == 0, out
    assert out.startswith(f"removed {name} (generation ") and f"writer pid {p.pid})" in out
    assert segments_in_dev_shm(db) == []
    assert run_cli(capsys, "inspect", db)[1].count("shared memory: no segments") == 1
    assert run_cli(capsys, "cleanup", db) == (
        0, f"no shared-memory segments of {os.path.realpath(db)}: nothing to remove\n")
    with mpwal.Reader(db) as r:  # what was committed is all there, read from the logs
        assert r.mode == "private" and r.last_record_id >= 5


def test_cleanup_refuses_while_a_writer_lives(db, capsys, monkeypatch):
    with mpwal.Writer(db, TABLES, enactor="none") as w:
        rc, out = run_cli(capsys, "cleanup", db)
        assert rc == 1 and out.startswith(f"error: a writer of {db} is alive")
        assert "nothing removed" in out
        # a writer that opens between the liveness check and the removal: writer.lock says so
        monkeypatch.setattr(mi, "writer_alive", lambda path: False)
        rc, out = run_cli(capsys, "cleanup", db)
        assert rc == 1 and "is alive" in out
        assert stale_segments(os.path.realpath(db)) == [w.stats()["segment"]]
        with w.record() as rec:  # the writer is unharmed
            rec.insert_value(3, 1, b"still here")
