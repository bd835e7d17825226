"""The ``mpwal`` command: ``stress`` (the main job), ``inspect``, ``verify``, ``dump``,
``cleanup``, ``bench``, and ``enactor`` (run the enactor/cleaner of a directory as its own
process).

Every command exits quietly when its standard output is a pipe closed early (``mpwal dump PATH |
head``), with status 141 as a process killed by SIGPIPE would (see the Python documentation's
"Note on SIGPIPE")."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__

USAGE = """mpwal COMMAND [options]

commands:
  stress            run a writer, reader processes and the enactor, checking every read
  inspect PATH      tables, log files and queues, shared memory, writer liveness (--json)
  verify PATH       check every CRC and the record-id sequence; exit 1 at the first bad record
  dump PATH         print every record (--json for JSON lines)
  cleanup PATH      remove the shared memory a writer that is gone left behind
  bench             compare with SQLite (WAL) and LMDB
  enactor PATH      enact and clean PATH's logs in this process (Writer(enactor="none"))
  ship PATH --nats URL --stream NAME     publish every durable record to NATS JetStream
  follow --nats URL --stream NAME PATH   apply a stream to the replica directory PATH

'mpwal COMMAND --help' for a command's options; 'mpwal --version' for the version."""

EXIT_SIGPIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE

READ_ONLY = """\
Read-only: it opens files and shared memory read-only, takes no lock and changes nothing on
disk or in /dev/shm, so it can run beside a live writer and enactor (if they change the
database meanwhile, it says so)."""

# command: (description, exit statuses)
HELP = {
    "inspect": (f"""\
Describe the database directory PATH: its tables and their files; every log file with its
size, record ids, queue (appending, read, cleanup, pool) and state (valid, damaged, discarded
by replay, empty, missing); the record ids on disk and the valid prefix replay would apply;
the queue state; whether a writer is alive; and the directory's shared-memory segments, with
those left by a writer that is gone flagged STALE (remove them with `mpwal cleanup PATH`).

{READ_ONLY}""", """\
exit status:
  0  PATH was read (problems or not: `mpwal verify PATH` checks the logs)
  2  PATH does not exist, is not a directory or not an mpwal database, or could not be read"""),
    "verify": (f"""\
Check every log of PATH as replay would: each record's CRC-32, the record-id sequence within
and across logs, the record and entry types, and that every change fits the tables of
mpwal.meta; check every table file exists. Print a line per log, the valid prefix, and the
first bad record (log, byte offset, record id, why) with what replay would discard after it.
When the logs hold no record, say why (a cleanly closed database has enacted every record
into its tables).

{READ_ONLY}""", """\
exit status:
  0  every record checked out
  1  a problem was found
  2  PATH could not be examined (missing, not a directory, not an mpwal database, I/O error),
     or the logs changed while they were read (a live writer or enactor): run verify again"""),
    "dump": (f"""\
Print every record of PATH's valid prefix in record-id order, with each change (index entries,
values as hex and text previews, removals, table drops), then the problem that ends the prefix,
if any. Records already enacted into the tables and cleaned from the logs are not in the logs
any more; when none is left, dump says so.

{READ_ONLY}""", """\
exit status:
  0  every record was printed
  1  a problem (torn, corrupt or out-of-sequence record, gap) ends the valid prefix
  2  PATH could not be examined, or a log changed while it was read: run dump again"""),
    "cleanup": ("""\
Remove the shared-memory segments (in /dev/shm) that a writer of PATH which is gone (killed,
crashed) left behind: mark each superseded, so a reader still mapping it moves on, and unlink
it. The next writer to open PATH does the same; this is for when none will open soon. Refuses
while a writer is alive, and holds writer.lock while it works so that none opens meanwhile.
Changes nothing else.""", """\
exit status:
  0  the segments were removed (or there were none)
  1  a writer is alive: nothing was removed
  2  PATH is not an mpwal database, or a segment could not be removed"""),
    "enactor": ("""\
Enact and clean PATH's rotated logs in this process until SIGTERM or Ctrl-C (for a Writer
opened with enactor="none").""", """\
exit status:
  0  stopped by SIGTERM or Ctrl-C
  2  PATH is not an mpwal database, or the enactor failed"""),
}


def main(argv: list[str] | None = None) -> int:
    """``mpwal``; returns the exit status."""
    try:
        try:
            return _run(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # so a closed pipe shows here, not in Python's flush at exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_SIGPIPE


def _stdout_to_devnull() -> None:
    """Point the standard output at /dev/null, so that the flush at exit of what is still
    buffered does not raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mpwal {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "stress":
        from .stress import main as stress_main
        return stress_main(rest)
    if cmd == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    if cmd in ("ship", "follow"):
        return _shipping(cmd, rest)
    if cmd in HELP:
        args = _parser(cmd).parse_args(rest)
        if cmd == "enactor":
            return _enactor(args)
        from . import inspect
        if cmd == "inspect":
            return inspect.inspect_db(args.path, sys.stdout, as_json=args.json)
        if cmd == "verify":
            return inspect.verify(args.path, sys.stdout, as_json=args.json)
        if cmd == "dump":
            return inspect.dump(args.path, sys.stdout, json_lines=args.json)
        return inspect.cleanup(args.path, sys.stdout)
    print(f"mpwal: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _parser(cmd: str) -> argparse.ArgumentParser:
    description, epilog = HELP[cmd]
    p = argparse.ArgumentParser(prog=f"mpwal {cmd}", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="the database directory")
    if cmd in ("inspect", "verify"):
        p.add_argument("--json", action="store_true",
                       help="print one JSON document instead of text")
    if cmd == "dump":
        p.add_argument("--json", action="store_true",
                       help="one JSON object per line: a record each, then the problem if any")
    if cmd == "enactor":
        p.add_argument("-v", "--verbose", action="store_true", help="log each enactment")
    return p


def _shipping(cmd: str, argv: list[str]) -> int:
    """``mpwal ship`` and ``mpwal follow`` (``mpwal/shipping/``; the ``nats`` extra)."""
    if cmd == "ship":
        desc = ("Publish every durable record of PATH, once and in order, to the JetStream stream "
                "NAME (created if missing; one subject per database), resuming after the "
                "stream's last record: killed at any moment and started again, it neither skips "
                "nor repeats one. Progress on stderr.")
    else:
        desc = ("Apply the JetStream stream NAME to the replica directory PATH as its writer "
                "(created if missing; readers of it use mpwal.Reader or KVReader), resuming "
                "from the replica's last record.")
    p = argparse.ArgumentParser(prog=f"mpwal {cmd}", description=desc)
    p.add_argument("path", metavar="PATH", help="the database directory" if cmd == "ship"
                   else "the replica directory")
    p.add_argument("--nats", required=True, metavar="URL", help="the NATS server, nats://HOST:PORT")
    p.add_argument("--stream", required=True, metavar="NAME", help="the JetStream stream")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit 0 once caught up and idle for S seconds (default: run until stopped)")
    if cmd == "follow":
        p.add_argument("--database", default=None, metavar="ID",
                       help="the source's database id, when the stream holds several")
    args = p.parse_args(argv)
    if cmd == "ship":
        from ..shipping._ship import ship
        return ship(os.path.realpath(args.path), args.nats, args.stream, args.idle_exit)
    from ..shipping._follow import follow
    return follow(args.nats, args.stream, args.path, args.idle_exit, args.database)


def _enactor(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    from .._enactor import run_process
    from .._errors import Error
    try:
        run_process(args.path)
    except Error as e:
        print(f"mpwal enactor: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
