"""The ``mpwal`` command: ``stress`` (the main job), ``inspect``, ``verify``, ``dump``, ``bench``,
and ``enactor`` (run the enactor/cleaner of a directory as its own process)."""

from __future__ import annotations

import argparse
import logging
import sys

USAGE = """mpwal COMMAND [options]

commands:
  stress            run a writer, reader processes and the enactor, checking every read
  inspect PATH      tables, log files and queues, shared memory, writer liveness
  verify PATH       check every CRC and the record-id sequence; exit 1 at the first bad record
  dump PATH         print every record (--json for JSON lines)
  bench             compare with SQLite (WAL) and LMDB
  enactor PATH      enact and clean PATH's logs in this process (Writer(enactor="none"))

'mpwal COMMAND --help' for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "stress":
        from .stress import main as stress_main
        return stress_main(rest)
    if cmd == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    if cmd in ("inspect", "verify", "dump", "enactor"):
        p = argparse.ArgumentParser(prog=f"mpwal {cmd}")
        p.add_argument("path", help="database directory")
        if cmd == "dump":
            p.add_argument("--json", action="store_true", help="one JSON object per record")
        if cmd == "enactor":
            p.add_argument("-v", "--verbose", action="store_true", help="log each enactment")
        args = p.parse_args(rest)
        from . import inspect
        if cmd == "inspect":
            return inspect.inspect_db(args.path, sys.stdout)
        if cmd == "verify":
            return inspect.verify(args.path, sys.stdout)
        if cmd == "dump":
            return inspect.dump(args.path, sys.stdout, json_lines=args.json)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s")
        from .enactor import run_process
        from .errors import Error
        try:
            run_process(args.path)
        except Error as e:
            print(f"mpwal enactor: {e}", file=sys.stderr)
            return 2
        return 0
    print(f"mpwal: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
