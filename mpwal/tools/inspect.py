"""Inspection of a database directory: what ``mpwal inspect``, ``mpwal verify``, ``mpwal dump``
and ``mpwal cleanup`` print.

* ``inspect_db`` describes the directory: tables and their files, log files with their record
  ids and queue (appending, read, cleanup, pool), the queue state, the shared-memory segments of
  the directory (flagging those a writer that is gone left behind) and whether a writer is alive.
* ``verify`` reads every log as replay would (``logs.read_logs``), checks every CRC and the
  record-id sequence, and names the first bad record and what replay would discard after it.
* ``dump`` prints every record of the valid prefix, as text or as JSON lines.
* ``cleanup`` is the one that changes something: it removes the segments a dead writer left in
  /dev/shm (what the next writer's open would do), and refuses while a writer is alive.

Every log file the writer writes starts with a log header (``_format.py``) naming the database
and the epoch that wrote it: the three tools show each log's database id and epoch, and list the
logs ``read_logs`` ignores (another database's, stale, or without a header in a database that
has an id) with why. An ignored log is not part of the database (replay empties it): it is
reported, but it is no problem of the database's logs and changes no exit status. Byte offsets
count from the start of the file, header included.

``inspect_db``, ``verify`` and ``dump`` change nothing (DESIGN.md invariant 8): files are opened
read-only, shared memory is mapped read-only, and no lock is taken, so they run beside a live
writer and enactor and never make them wait. The price is that a live database can change while
it is being read; each function notices when a log or the queue state changed under it and says
so rather than print a mix of two moments as if it were one. ``inspect_db`` and ``verify`` can
print one JSON document instead of text (``as_json``); ``dump`` JSON lines.

Each function writes to the text stream ``out`` and returns the process exit status:

* 0: examined, nothing wrong;
* 1: a problem was found (``verify``, ``dump``): a torn, corrupt or out-of-sequence record, a
  gap in the record ids, a log header that does not verify, a log that does not start with a
  record, or a record that does not match the tables in ``mpwal.meta``; for ``cleanup``: a
  writer is alive, nothing was removed;
* 2: the directory could not be examined: it does not exist, is not a directory or not an mpwal
  database, an I/O error, or (for ``verify`` and ``dump``) the logs changed while they were read
  so that the answer may mix two moments (a log cleaned or reused under us, or the queue state
  moving while a problem was seen); run again.

``inspect_db`` returns 0 whenever it could read the directory, problems or not; it points to
``verify`` for them.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TextIO

import posix_ipc

from .. import _backend, _fileio as fileio
from .. import _overlay as ov
from .._errors import Error, WriterLockedError
from .._format import (
    BEGIN_RECORD,
    DROP_TABLE,
    INSERT_INDEX,
    LOG_HEADER,
    LOG_HEADER_SIZE,
    LogScan,
    Record,
    decode_log_header,
    entries_of,
    first_record_id,
)
from .._logs import LogFile, LogSet, Problem, log_identity, read_logs
from .._pins import read_pins
from .._queues import QueueState, WriterLock, load_queues, log_ids, log_path, writer_alive
from .._tables import META_FILE, Table, is_database, layer_of, load_catalog, op_problem
from ..kv import KVReader
from .. import _retention as retention
from ..kv._describe import Describer, check_columns, columns_report

PREVIEW_BYTES = 16  # bytes of a value shown by the text dump
MAX_LISTED = 10  # table mismatches listed by verify before it only counts them

WHY = {
    "torn": "the record is cut short (a write that did not finish, or a truncated file)",
    "crc": "the CRC-32 stored in the record does not match its bytes",
    "bad type": "a byte where a record or entry type belongs is not one",
    "out of sequence": "its record id does not follow the previous record's",
    "gap": "the log does not continue the record ids of the one before it: a log file is missing",
    "no first record": "the file does not start with a BEGIN_RECORD (after its log header)",
    "bad header": "the log header (database id, epoch) does not match its CRC-32",
}


# -- reading ---------------------------------------------------------------------------------

@dataclass
class _Stats:
    """What one log file holds, read on its own (not as part of the prefix)."""

    count: int = 0  # whole records (CRC verified)
    first: int | None = None
    last: int | None = None

    def add(self, rec: Record) -> None:
        self.count += 1
        if self.first is None:
            self.first = rec.record_id
        self.last = rec.record_id

    def ids(self) -> str:
        return _ids(self.first, self.last)


def _ids(first: int | None, last: int | None) -> str:
    return "-" if first is None else f"{first}..{last}"


def _read_log(path: str, log_id: int) -> bytes | None:
    try:
        return fileio.read_file(log_path(path, log_id))
    except FileNotFoundError:
        return None


def _read_head(path: str, log_id: int) -> bytes:
    """The first LOG_HEADER_SIZE bytes of a log (fewer if it is shorter; none if it is gone)."""
    try:
        with open(log_path(path, log_id), "rb") as f:
            return f.read(LOG_HEADER_SIZE)
    except FileNotFoundError:
        return b""


def _hex(ident: bytes | None) -> str | None:
    return None if ident is None else ident.hex()


def _salvage(buf, pos: int) -> _Stats:
    """Whole records found in ``buf`` from ``pos`` on, stepping over damage: what replay would
    throw away past a problem. Resynchronises on the next BEGIN_RECORD byte whose record then
    verifies (a false match needs a CRC-32 collision)."""
    stats = _Stats()
    buf = bytes(buf)
    n = len(buf)
    begin = bytes([BEGIN_RECORD])
    while pos < n:
        scan = LogScan(buf, start=pos)
        for rec in scan.records():
            stats.add(rec)
        if scan.problem is None:
            break
        if scan.problem == "out of sequence":  # a whole record: count on from it
            pos = scan.end
            continue
        nxt = buf.find(begin, scan.end + 1)
        if nxt < 0:
            break
        pos = nxt
    return stats


class _Db:
    """One read-only look at a database: catalog, queue state and the set of logs.

    ``prefix()`` streams the records of the valid prefix a second time, one log at a time, so a
    large database is never held in memory as decoded records; each log is checked to be the
    one ``read_logs`` saw (same first record id, and its valid bytes still verify up to the
    same end), else ``changed`` says so.
    """

    def __init__(self, path: str):
        self.path = path
        self.catalog: dict[int, Table] = load_catalog(path)
        self.queues: QueueState | None = load_queues(path)
        q = self.queues
        self.identity = log_identity(path)  # which logs are the database's
        self.logs: LogSet = read_logs(path, keep_records=False,
                                      start=q.last_cleaned_record + 1 if q else None,
                                      identity=self.identity)
        self.ignored: dict[int, str] = dict(self.logs.ignored)  # log id -> why it is not ours
        self._headers: dict[int, tuple[bytes, int] | None] = {}
        self.changed: list[str] = []
        self.stats: dict[int, _Stats] = {}  # valid logs, filled by prefix()
        self.last_id: int | None = None  # last record of the prefix, once prefix() ran

    def prefix(self) -> Iterator[tuple[LogFile, Record]]:
        expect = None
        for lf in self.logs.valid:
            stats = self.stats[lf.log_id] = _Stats()
            data = _read_log(self.path, lf.log_id)
            if data is None or len(data) < lf.end or (
                    lf.end and first_record_id(data) != lf.first_record):
                self.changed.append(f"log{lf.log_id} was cleaned or reused while it was read")
                return
            scan = LogScan(memoryview(data)[:lf.end], expect)
            for rec in scan.records():
                stats.add(rec)
                self.last_id = rec.record_id
                yield lf, rec
            if scan.problem is not None or scan.end != lf.end:
                self.changed.append(f"log{lf.log_id} changed while it was read")
                return
            expect = scan.expect_id

    def header(self, log_id: int) -> tuple[bytes, int] | None:
        """(database id, epoch) of a log's header; None if it has none that verifies."""
        if log_id not in self._headers:
            self._headers[log_id] = decode_log_header(_read_head(self.path, log_id))
        return self._headers[log_id]

    def header_info(self, log_id: int) -> dict:
        """A log's ``database_id`` (hex) and ``epoch``, None when it has no valid header."""
        h = self.header(log_id)
        return {"database_id": None if h is None else h[0].hex(),
                "epoch": None if h is None else h[1]}

    def problem_offset(self, p: Problem) -> int:
        """The byte where the problem is. ``read_logs`` names a log whose first record does not
        verify at offset 0 (the log); that record starts after the log's header."""
        if p.offset == 0 and p.why not in ("gap", "bad header") and \
                self.header(p.log_id) is not None:
            return LOG_HEADER_SIZE
        return p.offset

    def run_prefix(self) -> None:
        for _ in self.prefix():
            pass

    def expected_id(self) -> int | None:
        """The record id that should have stood where the problem is (after ``prefix()``)."""
        if self.last_id is not None:
            return self.last_id + 1
        return None

    def queues_moved(self) -> bool:
        """Whether the queue state changed since it was first read (a live writer/enactor)."""
        try:
            now = load_queues(self.path)
        except Error:
            return True
        before = self.queues
        if before is None or now is None:
            return (before is None) != (now is None)
        return (now.version, now.epoch) != (before.version, before.epoch)


def _error(out: TextIO, msg: str, as_json: bool = False) -> None:
    print(json.dumps({"error": msg}) if as_json else f"error: {msg}", file=out)


def _path_error(path: str) -> str | None:
    """Why ``path`` cannot be a database directory at all, or None."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    return None


def _open(path: str, out: TextIO, as_json: bool = False) -> _Db | None:
    why = _path_error(path)
    if why is not None:
        _error(out, why, as_json)
        return None
    try:
        return _Db(path)
    except Error as e:
        _error(out, str(e), as_json)
    except OSError as e:  # listing the directory, say
        _error(out, f"cannot read {path}: {e.strerror or e}", as_json)
    return None


def _no_records_note(db: _Db) -> str | None:
    """After ``prefix()``: why there is no record to show when the logs hold none and nothing is
    wrong (a cleanly closed database has every record in its tables), else None."""
    if db.last_id is not None or db.logs.problem is not None or db.changed:
        return None
    q = db.queues
    if q is not None and q.last_cleaned_record:
        return ("no log records: every committed record has been enacted into the tables "
                f"(last record {q.last_cleaned_record})")
    if q is None:
        return "no log records (and no queue file to say which record the tables end at)"
    return "no log records: nothing has been committed"


def _problem_text(db: _Db, p: Problem) -> str:
    """One line naming the first bad record: log, byte offset, record id, why."""
    exp = db.expected_id()
    if p.why == "gap":
        where = f"log{p.log_id} at byte 0"
        if exp is not None:
            return (f"{where}: gap: expected record {exp}, but the next log starts at record "
                    f"{p.record_id} ({WHY['gap']})")
        return f"{where}: gap: the log starts at record {p.record_id} ({WHY['gap']})"
    offset = db.problem_offset(p)
    if p.why == "bad header":  # (the id after a header that does not verify is not to be trusted)
        rec = ""
    elif p.record_id is not None:
        rec = f", record {p.record_id}"
        if p.why in ("out of sequence", "crc") and exp is not None and p.record_id != exp:
            rec += f" (expected {exp})"
    elif exp is not None and p.why != "no first record":
        rec = f", record {exp} by sequence"
    else:
        rec = ""
    return f"log{p.log_id} at byte {offset}{rec}: {p.why} ({WHY.get(p.why, p.why)})"


def _problem_json(db: _Db, p: Problem) -> dict:
    return {"log": f"log{p.log_id}", "offset": db.problem_offset(p),
            "record_id": None if p.why == "bad header" else p.record_id,
            "expected_record_id": db.expected_id() if p.why != "no first record" else None,
            "why": p.why, "message": _problem_text(db, p)}


def _queue_of(qs: QueueState | None, log_id: int) -> str:
    if qs is None:
        return "unknown"
    if qs.appending == log_id:
        return "appending"
    for name in ("read", "cleanup", "pool"):
        if log_id in getattr(qs, name):
            return name
    return "unknown"


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _table(out: TextIO, header: list[str], rows: list[list], indent: str = "  ") -> None:
    """Print rows in columns: text left-aligned, numbers right-aligned."""
    cells = [header] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], int) or r[i] is None for r in rows) and rows != []
               for i in range(len(header))]
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        print(indent + "  ".join(parts).rstrip(), file=out)


# -- inspect ---------------------------------------------------------------------------------

def inspect_db(path: str, out: TextIO, as_json: bool = False) -> int:
    """Describe the database at ``path``: tables, log files and their queues, record ids, queue
    state, shared-memory segments and writer liveness, as text or (``as_json``) one JSON
    document. Exit 0, or 2 if it cannot be read."""
    db = _open(path, out, as_json)
    if db is None:
        return 2
    try:
        report = _inspect_report(db)
    except OSError as e:
        _error(out, f"cannot read {path}: {e.strerror or e}", as_json)
        return 2
    if as_json:
        print(json.dumps(report, indent=2), file=out)
    else:
        _print_inspect(report, out)
    return 0


def _inspect_report(db: _Db) -> dict:
    """Everything ``inspect`` shows, as plain data (the JSON document; the text is made from it)."""
    db.run_prefix()
    salvaged = _salvaged(db)
    realpath = os.path.realpath(db.path)
    qs = db.queues
    p = db.logs.problem
    # (an ignored log's records are not the database's: another database's, or stale)
    every = list(db.stats.values()) + [st for lid, st in salvaged.items()
                                       if lid not in db.ignored]
    alive = writer_alive(db.path)
    return {
        "database": realpath,
        "database_id": _hex(db.identity.database_id),
        "tables": [_table_info(db.path, tid, db.catalog[tid]) for tid in sorted(db.catalog)],
        "logs": _logs_info(db, salvaged),
        "ignored": _ignored_info(db, salvaged),
        "record_ids_on_disk": _span(every),
        "valid_prefix": _span(db.stats.values()),
        "problem": _problem_json(db, p) if p is not None else None,
        "queue_state": asdict(qs) if qs is not None else None,
        "writer": {"alive": alive},
        "segments": _segments_info(realpath, alive),
        "snapshots": read_pins(db.path),
        "backend": {"name": _backend.BACKEND, "why_python": _backend.why_python},
        "layer": _layer_info(db.path),
        "cursors": _cursors_info(db.path),
        "changed": bool(db.changed or db.queues_moved()),
    }


def _cursors_info(path: str) -> dict:
    """The change feed's cursors and the logs kept for them (``mpwal/_retention.py``)."""
    segs = retention.segments(path)
    return {"cursors": [{"name": n, **c} for n, c in sorted(retention.load_cursors(path).items())],
            "retained": [{"first": s.first, "last": s.last, "bytes": s.size} for s in segs],
            "retained_bytes": sum(s.size for s in segs)}


def _layer_info(path: str) -> dict | None:
    """A key-value directory's columns (read with a KVReader, which changes nothing), or None
    for a raw directory."""
    layer = layer_of(path)
    if layer is None:
        return None
    info: dict = {"kind": layer.get("kind")}
    if layer.get("kind") == "kv":
        try:
            with KVReader(path) as r:
                info["columns"] = columns_report(r)
        except Error as e:
            info["error"] = str(e)
    return info


def _print_snapshots(pins: list[dict], out) -> None:
    if not pins:
        print("snapshots: none pinned", file=out)
        return
    live = [p for p in pins if p["live"]]
    print(f"snapshots: {len(live)} pinned by live readers"
          + (f", oldest at record {min(p['record_id'] for p in live)}" if live else "")
          + (f"; {len(pins) - len(live)} left by dead readers (they hold nothing)"
             if len(pins) > len(live) else ""), file=out)
    for p in pins:
        who = f"pid {p['pid']}" if p["live"] else f"pid {p['pid']}, dead"
        print(f"  slot {p['slot']}: record {p['record_id']}, {p['age']:.1f} s old ({who})", file=out)


def _salvaged(db: _Db) -> dict[int, _Stats]:
    """Whole records in the logs replay does not apply (ignored logs included), and past the
    problem in a valid log."""
    salvaged = {}
    valid = {lf.log_id for lf in db.logs.valid}
    p = db.logs.problem
    for lid in log_ids(db.path):
        data = _read_log(db.path, lid)
        if not data:
            continue
        if lid not in valid:
            salvaged[lid] = _salvage(data, 0)
        elif p is not None and p.log_id == lid:  # what follows the problem in a valid log
            salvaged[lid] = _salvage(data, p.offset)
    return salvaged


def _span(stats) -> dict | None:
    """The record ids covered by some ``_Stats``: {"first", "last"}, or None if none."""
    firsts = [s.first for s in stats if s.first is not None]
    lasts = [s.last for s in stats if s.last is not None]
    return {"first": min(firsts), "last": max(lasts)} if firsts else None


def _span_ids(span: dict) -> str:
    return _ids(span["first"], span["last"])


def _table_info(path: str, tid: int, t: Table) -> dict:
    return {"id": tid, "kind": t.kind, "slot_size": getattr(t, "slot_size", None),
            "file": t.file_name, "bytes": _size(os.path.join(path, t.file_name))}


def _log_info(db: _Db, lid: int, st: _Stats | None, queue: str, state: str) -> dict:
    """One log's row; ``st`` None for a log the queue state lists but the disk does not hold."""
    return {"log": f"log{lid}", "bytes": _size(log_path(db.path, lid)),
            "records": None if st is None else st.count,
            "first_record": None if st is None else st.first,
            "last_record": None if st is None else st.last, "queue": queue,
            **(db.header_info(lid) if st is not None else {"database_id": None, "epoch": None}),
            "state": state}


def _ignored_info(db: _Db, salvaged: dict[int, _Stats]) -> list[dict]:
    """The logs ``read_logs`` does not take as the database's, with why and what they hold."""
    out = []
    for lid, why in db.logs.ignored:
        st = salvaged.get(lid, _Stats())
        out.append({"log": f"log{lid}", "why": why, **db.header_info(lid), "records": st.count,
                    "first_record": st.first, "last_record": st.last})
    return out


def _ignored_text(log: str, why: str) -> str:
    return f"{log} is ignored: {why}; it is not part of the database (replay empties it)"


def _logs_info(db: _Db, salvaged: dict[int, _Stats]) -> list[dict]:
    """A row per log file: the valid ones, the discarded ones, the empty ones, then the logs the
    queue state lists that are not on disk."""
    ls, qs = db.logs, db.queues
    valid = {lf.log_id for lf in ls.valid}
    order = [lf.log_id for lf in ls.valid] + list(ls.discarded) + \
        [lid for lid, _ in ls.ignored] + list(ls.empty)
    problem = ls.problem
    rows = []
    for lid in order:
        if lid in valid:
            st = db.stats.get(lid, _Stats())
            state = "valid"
            if problem is not None and lid == problem.log_id:
                after = salvaged.get(lid, _Stats())
                state = f"valid up to byte {problem.offset}, then {problem.why}"
                if after.count:
                    state += f" ({_n(after.count, 'whole record')} {after.ids()} after it)"
        elif lid in ls.empty:
            st, state = _Stats(), "empty"
        elif lid in db.ignored:
            st, state = salvaged.get(lid, _Stats()), "ignored"  # why: in "ignored"
        else:
            st, state = salvaged.get(lid, _Stats()), "discarded by replay"
        rows.append(_log_info(db, lid, st, _queue_of(qs, lid), state))
    if qs is not None:
        listed = ([qs.appending] if qs.appending is not None else []) + list(qs.read) + \
            list(qs.cleanup) + list(qs.pool)
        on_disk = set(order)
        for lid in listed:
            if lid not in on_disk:
                rows.append(_log_info(db, lid, None, _queue_of(qs, lid), "missing on disk"))
    return rows


def _print_inspect(r: dict, out: TextIO) -> None:
    print(f"database {r['database']}", file=out)
    print(f"database id: {_id_text(r['database_id'])}", file=out)

    print("tables:", file=out)
    trows = [[t["id"], t["kind"], t["slot_size"], t["file"], t["bytes"]] for t in r["tables"]]
    if trows:
        _table(out, ["id", "kind", "slot_size", "file", "bytes"], trows)
    else:
        print("  (none)", file=out)

    print("logs:", file=out)
    rows = [[lg["log"], lg["bytes"], lg["records"], _ids(lg["first_record"], lg["last_record"]),
             lg["queue"], lg["epoch"], lg["database_id"], lg["state"]] for lg in r["logs"]]
    if rows:
        _table(out, ["log", "bytes", "records", "ids", "queue", "epoch", "database", "state"],
               rows)
    else:
        print("  (none)", file=out)
    for ig in r["ignored"]:
        print(f"note: {_ignored_text(ig['log'], ig['why'])}", file=out)

    on_disk, prefix = r["record_ids_on_disk"], r["valid_prefix"]
    print(f"record ids on disk: {_span_ids(on_disk) if on_disk else 'none'}", file=out)
    print(f"valid prefix: {'records ' + _span_ids(prefix) if prefix else 'empty'}", file=out)
    if r["problem"] is not None:
        print(f"problem: {r['problem']['message']}; run `mpwal verify` for details", file=out)

    alive = r["writer"]["alive"]
    qs = r["queue_state"]
    if qs is None:
        print("queue state: none (no queue file; a writer rebuilds it from the logs on open)",
              file=out)
    else:
        print(f"last cleaned record: {qs['last_cleaned_record']}", file=out)
        print(f"queue state: version {qs['version']}, epoch {qs['epoch']}, generation "
              f"{qs['generation']}, appending {_name(qs['appending'])}, "
              f"read [{_names(qs['read'])}], cleanup [{_names(qs['cleanup'])}], "
              f"pool [{_names(qs['pool'])}], next log {qs['next_log']}, "
              f"sync_data {qs['sync_data']}, log epoch floor {qs['log_epoch_floor']}", file=out)
        if not alive:
            print("  (written by the last writer; the next writer rebuilds it from the logs)",
                  file=out)
    print(f"writer: {'alive' if alive else 'not alive'} (writer.lock "
          f"{'held' if alive else 'not held'})", file=out)

    _print_segments(r["database"], r["segments"], out)
    _print_snapshots(r["snapshots"], out)
    b = r["backend"]
    print(f"backend: {b['name']}" + (f" ({b['why_python']})" if b["why_python"] else ""), file=out)
    layer = r.get("layer")
    if layer is not None:
        print(f"layer: {layer['kind']}" + (f" (cannot read it: {layer['error']})"
                                           if "error" in layer else ""), file=out)
        for c in layer.get("columns", []):
            moving = "" if c["reindexing_from_chunks"] is None else \
                f", reindexing from {c['reindexing_from_chunks']} chunks (at chunk {c['reindex_at']})"
            print(f"  column {c['name']!r}: {c['keys']} keys, index of {c['index_chunks']} chunks"
                  f"{moving}", file=out)
    cur = r["cursors"]
    if cur["cursors"] or cur["retained"]:
        span = (f"records {cur['retained'][0]['first']}..{cur['retained'][-1]['last']}"
                if cur["retained"] else "none")
        print(f"cursors: {len(cur['cursors'])}; logs kept for them: {len(cur['retained'])} "
              f"({cur['retained_bytes']} bytes, {span})", file=out)
        for c in cur["cursors"]:
            state = f"LOST: {c['lost']}" if c["lost"] else "live"
            print(f"  cursor {c['name']!r}: at record {c['position']}, {state}", file=out)
    if r["changed"]:
        print("note: the database changed while it was read (a live writer or enactor); "
              "the numbers above may mix two moments", file=out)


def _id_text(ident: str | None) -> str:
    return ident if ident is not None else "none (format 1: its logs have no log header)"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _name(lid) -> str:
    return "-" if lid is None else f"log{lid}"


def _names(ids) -> str:
    return ", ".join(f"log{i}" for i in ids)


_STATE_NAMES = {0: "new", 1: "live", 2: "superseded", 3: "closed"}


def _segment_header(name: str) -> dict | str:
    """The header words of a segment, read between two equal loads of its struct word; a str says why not."""
    try:
        r = ov.OverlayReader(name)
    except FileNotFoundError as e:
        return f"unreadable ({e})"
    except (posix_ipc.Error, OSError, ValueError) as e:
        return f"cannot open ({e})"
    try:
        q = r.q
        words = ("GENERATION", "STATE", "NEXT_GEN", "WRITER_PID", "COMMITTED", "DURABLE",
                 "ENACTED", "ENACTOR_PID", "NSLOTS", "HEAP_BYTES", "ENTRIES", "HEAP_USED", "NDROPS")
        snap: dict = {}
        for _attempt in range(200):
            s1 = q[ov.STRUCT]
            if s1 & 1 and s1 != ov.SUPERSEDED:
                time.sleep(0.0005)
                continue
            snap = {w.lower(): q[getattr(ov, w)] for w in words}
            if q[ov.STRUCT] == s1:
                snap["consistent"] = True
                break
        else:
            snap = {w.lower(): q[getattr(ov, w)] for w in words}
            snap["consistent"] = False  # the writer kept it busy (or died mid-change)
        snap["bytes"] = len(r.m)
        return snap
    finally:
        r.release()


def _segment_names(realpath: str) -> list[str]:
    """The directory's segments in /dev/shm, oldest generation first."""
    def gen(n: str) -> int:
        try:
            return int(n.rsplit("-", 1)[1], 16)
        except (IndexError, ValueError):
            return -1

    return sorted(ov.stale_segments(realpath), key=gen)


def _segments_info(realpath: str, alive: bool) -> list[dict]:
    """Each segment's header (or ``error``: why it could not be read) and whether it is
    ``stale``: left by a writer that is gone (a writer that closes removes its segment)."""
    out = []
    for name in _segment_names(realpath):
        h = _segment_header(name)
        info = {"name": name, "error": h} if isinstance(h, str) else dict(
            name=name, state_name=_STATE_NAMES.get(h["state"], f"state {h['state']}"), **h)
        info["stale"] = not alive
        out.append(info)
    return out


def _print_segments(realpath: str, segments: list[dict], out: TextIO) -> None:
    if not segments:
        print("shared memory: no segments", file=out)
        return
    print("shared memory:", file=out)
    for h in segments:
        name = h["name"] + (" (STALE)" if h["stale"] else "")
        if "error" in h:
            print(f"  {name}: {h['error']}", file=out)
            continue
        state = h["state_name"]
        if h["state"] == ov.SUPERSEDED_STATE:
            state += f" by generation {h['next_gen']}"
        print(f"  {name}: generation {h['generation']}, {state}, writer pid {h['writer_pid']}, "
              f"enactor pid {h['enactor_pid']}", file=out)
        print(f"    committed {h['committed']}, durable {h['durable']}, enacted {h['enacted']}; "
              f"entries {h['entries']} of {h['nslots']} slots, heap {h['heap_used']} of "
              f"{h['heap_bytes']} bytes, pending drops {h['ndrops']}, segment {h['bytes']} bytes"
              + ("" if h["consistent"] else "; header was changing while read"), file=out)
    stale = sum(h["stale"] for h in segments)
    if stale:
        print(f"  {_n(stale, 'stale segment')}: left by a writer that is gone; remove with "
              f"`mpwal cleanup {shlex.quote(realpath)}` (the next writer to open removes "
              f"{'it' if stale == 1 else 'them'} too)", file=out)


# -- verify ----------------------------------------------------------------------------------

TORN_LIVE_NOTE = ("a writer is alive and appends to this log; a record being written looks torn "
                  "until its write completes: run verify again")
MOVED_NOTE = "the queue state changed while the logs were read; every record read verified"


@dataclass
class _Verdict:
    """What ``verify`` found, before it is printed as text or JSON."""

    status: int = 0  # the exit status: 0 ok, 1 problem, 2 inconclusive
    records: int = 0  # records of the valid prefix, each checked
    mismatches: list[dict] = field(default_factory=list)  # the first MAX_LISTED
    n_mismatch: int = 0
    missing: list[str] = field(default_factory=list)  # table files not on disk
    tail: dict = field(default_factory=dict)  # _discarded_tail
    ignored: dict = field(default_factory=dict)  # ignored log id: (whole records in it, size)
    torn_live: bool = False  # the problem may be a record still being written
    moved: bool = False  # the queue state changed while the logs were read
    kv_keys: int | None = None  # a key-value directory: keys whose layout was checked
    kv_problems: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return ("ok", "PROBLEM", "inconclusive")[self.status]


def verify(path: str, out: TextIO, as_json: bool = False) -> int:
    """Check every log of ``path`` as replay would: CRCs, record-id sequence, record types, and
    that records fit the tables. Print a line per log, then the first problem (log, byte offset,
    record id, why) and what replay would discard after it; or (``as_json``) one JSON document.
    Exit 0 clean, 1 problem, 2 cannot examine."""
    db = _open(path, out, as_json)
    if db is None:
        return 2
    try:
        v = _check(db)
    except OSError as e:
        _error(out, f"cannot read {path}: {e.strerror or e}", as_json)
        return 2
    if as_json:
        print(json.dumps(_verify_json(db, v), indent=2), file=out)
    else:
        _print_verify(db, v, out)
    return v.status


def _check(db: _Db) -> _Verdict:
    v = _Verdict()
    for lf, rec in db.prefix():
        for op in rec.ops:
            why = op_problem(db.catalog, op)
            if why is not None:
                v.n_mismatch += 1
                if len(v.mismatches) < MAX_LISTED:
                    v.mismatches.append({
                        "why": "does not fit the tables", "log": f"log{lf.log_id}",
                        "offset": rec.start, "record_id": rec.record_id,
                        "message": f"record {rec.record_id} (log{lf.log_id} at byte "
                                   f"{rec.start}): {why}"})
    v.tail = _discarded_tail(db)
    for lid in db.ignored:
        data = _read_log(db.path, lid) or b""
        v.ignored[lid] = (_salvage(data, 0), len(data))
    v.records = sum(s.count for s in db.stats.values())
    v.missing = [t.file_name for t in db.catalog.values()
                 if not os.path.exists(os.path.join(db.path, t.file_name))]
    p = db.logs.problem
    v.torn_live = (p is not None and p.why == "torn" and writer_alive(db.path)
                   and db.queues is not None and db.queues.appending == p.log_id)
    layer = layer_of(db.path)
    if layer is not None and layer.get("kind") == "kv" and p is None and not v.missing:
        try:
            with KVReader(db.path) as r:
                v.kv_keys, v.kv_problems = check_columns(r)
        except Error as e:
            v.kv_problems = [f"cannot read the key-value layer: {e}"]
    found = p is not None or v.n_mismatch or v.missing or v.kv_problems
    v.moved = db.queues_moved()
    if db.changed or (v.moved and found):
        v.status = 2
    elif found:
        v.status = 1
    return v


def _missing_text(f: str) -> str:
    return f"table file {f} is missing (readers and the enactor cannot open it)"


def _print_verify(db: _Db, v: _Verdict, out: TextIO) -> None:
    ls = db.logs
    print(f"verify {os.path.realpath(db.path)}", file=out)
    print(f"database id: {_id_text(_hex(db.identity.database_id))}", file=out)
    rows = [[lg["log"], lg["bytes"], lg["records"], _ids(lg["first_record"], lg["last_record"]),
             lg["epoch"], lg["database_id"], lg["state"]] for lg in _verify_logs(db, v)]
    if rows:
        _table(out, ["log", "bytes", "records", "ids", "epoch", "database", "state"], rows)
    else:
        print("  no log files", file=out)

    for f in v.missing:
        print(f"problem: {_missing_text(f)}", file=out)

    if db.last_id is not None:
        first = next(s.first for s in db.stats.values() if s.first is not None)
        print(f"valid prefix: {_n(v.records, 'record')}, {first}..{db.last_id}, in "
              f"{_n(len(ls.valid), 'log')}", file=out)
    else:
        print("valid prefix: no records", file=out)
    note = _no_records_note(db)
    if note is not None:
        print(note, file=out)
    for lid, why in ls.ignored:
        print(f"note: {_ignored_text(f'log{lid}', why)}", file=out)

    p = ls.problem
    if p is not None:
        print(f"problem: {_problem_text(db, p)}", file=out)
        if v.torn_live:
            print(f"  note: {TORN_LIVE_NOTE}", file=out)
        _print_discarded(db, v.tail, out)
    if v.n_mismatch:
        print(f"problem: {_n(v.n_mismatch, 'change')} in the valid prefix "
              f"{'does' if v.n_mismatch == 1 else 'do'} not fit the tables of {META_FILE} "
              "(the enactor would fail on them):", file=out)
        for m in v.mismatches:
            print(f"  {m['message']}", file=out)
        if v.n_mismatch > len(v.mismatches):
            print(f"  ... and {v.n_mismatch - len(v.mismatches)} more", file=out)
    if v.kv_keys is not None or v.kv_problems:
        print(f"key-value layout: {_n(v.kv_keys or 0, 'key')} checked "
              f"({'ok' if not v.kv_problems else 'PROBLEM'})", file=out)
        for msg in v.kv_problems:
            print(f"problem: {msg}", file=out)

    if v.status == 2:
        for c in db.changed:
            print(f"note: {c}", file=out)
        print("result: inconclusive: the logs changed while they were read (a live writer or "
              "enactor rotated or cleaned one); run verify again", file=out)
        return
    if v.moved:
        print(f"note: {MOVED_NOTE}", file=out)
    print(f"result: {v.result}", file=out)


def _verify_logs(db: _Db, v: _Verdict) -> list[dict]:
    """A row per log: the valid ones, the discarded ones, the empty ones."""
    ls = db.logs
    p = ls.problem
    rows = []
    for lf in ls.valid:
        st = db.stats.get(lf.log_id, _Stats())
        state = "ok"
        if p is not None and p.log_id == lf.log_id:
            state = f"{p.why} at byte {p.offset}"
        rows.append(_verify_row(db, lf.log_id, lf.size, st, state))
    for lid in ls.discarded:
        st, size, why = v.tail[lid]
        rows.append(_verify_row(db, lid, size, st, why))
    for lid in db.ignored:
        st, size = v.ignored[lid]
        rows.append(_verify_row(db, lid, size, st, "ignored"))  # why: in the notes
    for lid in ls.empty:
        rows.append(_verify_row(db, lid, 0, _Stats(), "empty"))
    return rows


def _verify_row(db: _Db, lid: int, size: int, st: _Stats, state: str) -> dict:
    return {"log": f"log{lid}", "bytes": size, "records": st.count, "first_record": st.first,
            "last_record": st.last, **db.header_info(lid), "state": state}


def _verify_json(db: _Db, v: _Verdict) -> dict:
    p = db.logs.problem
    problems = ([_problem_json(db, p)] if p is not None else []) + [
        {"why": "missing table file", "file": f, "message": _missing_text(f)} for f in v.missing
    ] + v.mismatches
    notes = [_no_records_note(db), TORN_LIVE_NOTE if v.torn_live else None,
             MOVED_NOTE if v.moved and v.status != 2 else None] + list(db.changed) + [
        _ignored_text(f"log{lid}", why) for lid, why in db.logs.ignored]
    return {
        "database": os.path.realpath(db.path),
        "database_id": _hex(db.identity.database_id),
        "log_epoch_floor": db.identity.epoch_floor,
        "ok": v.status == 0,
        "result": v.result.lower(),
        "records_checked": v.records,
        "valid_prefix": _span(db.stats.values()),
        "last_cleaned_record": db.queues.last_cleaned_record if db.queues else None,
        "problem": problems[0] if problems else None,
        "table_mismatches": v.n_mismatch,
        "missing_table_files": v.missing,
        "kv_keys_checked": v.kv_keys,
        "kv_problems": v.kv_problems,
        "logs": _verify_logs(db, v),
        "ignored": [{"log": f"log{lid}", "why": why, **db.header_info(lid),
                     "records": v.ignored[lid][0].count} for lid, why in db.logs.ignored],
        "notes": [n for n in notes if n is not None],
    }


def _discarded_tail(db: _Db) -> dict:
    """For each discarded log: (whole records found in it, size, state text); and under key
    None, for the problem log: (whole records found past the problem, bytes past it)."""
    ls = db.logs
    res: dict = {}
    p = ls.problem
    if p is not None and any(lf.log_id == p.log_id for lf in ls.valid):
        data = _read_log(db.path, p.log_id) or b""
        res[None] = (_salvage(data, p.offset), max(0, len(data) - p.offset))
    for lid in ls.discarded:
        data = _read_log(db.path, lid) or b""
        st = _salvage(data, 0)
        if data[:1] == bytes((LOG_HEADER,)) and decode_log_header(data) is None:
            why = "discarded: its log header does not verify"
        elif first_record_id(data) is None:
            why = "discarded: does not start with a record"
        elif p is not None and p.log_id == lid and p.why == "gap":
            why = "discarded: gap before it"
        else:
            why = "discarded: after the problem"
        res[lid] = (st, len(data), why)
    return res


def _print_discarded(db: _Db, tail: dict, out: TextIO) -> None:
    parts = []
    records = 0
    nbytes = 0
    ids: list[int] = []
    if None in tail:
        st, n = tail[None]
        p = db.logs.problem
        assert p is not None  # _discarded_tail keeps None only for a problem
        parts.append(f"log{p.log_id} from byte {p.offset} ({n} bytes, "
                     f"{_n(st.count, 'whole record')})")
        records += st.count
        nbytes += n
        ids += [i for i in (st.first, st.last) if i is not None]
    for lid in db.logs.discarded:
        st, n, _ = tail[lid]
        parts.append(f"log{lid} ({n} bytes, {_n(st.count, 'whole record')})")
        records += st.count
        nbytes += n
        ids += [i for i in (st.first, st.last) if i is not None]
    span = f", ids {min(ids)}..{max(ids)}" if ids else ""
    print(f"replay discards {_n(records, 'whole record')} after the problem "
          f"({nbytes} bytes{span}):", file=out)
    for part in parts:
        print(f"  {part}", file=out)


# -- dump ------------------------------------------------------------------------------------

def _preview(data: bytes) -> str:
    head = data[:PREVIEW_BYTES]
    more = "..." if len(data) > PREVIEW_BYTES else ""
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in head)
    return f"{head.hex()}{more} |{text}{more}|"


def _kv_meaning(kv: Describer | None, op) -> str | None:
    """What a change means in a key-value directory's layout (None: raw, or not the layer's)."""
    if kv is None or op.kind == DROP_TABLE:
        return None
    if op.kind == INSERT_INDEX:
        return kv.entries_text(op.table, op.key, list(entries_of(op.mask, op.data)))
    return kv.value_text(op.table, op.key, op.data)


def _op_text(op, kv: Describer | None = None) -> str:
    if op.kind == DROP_TABLE:
        text = f"drop_table table {op.table}"
    elif op.kind == INSERT_INDEX:
        entries = ", ".join(f"{e}: 0x{v:x}" for e, v in entries_of(op.mask, op.data))
        text = f"insert_index table {op.table} chunk {op.key} {{{entries}}}"
    elif op.data is None:
        text = f"insert_value table {op.table} index {op.key} removed"
    else:
        text = (f"insert_value table {op.table} index {op.key} {len(op.data)} bytes "
                f"{_preview(op.data)}")
    meaning = _kv_meaning(kv, op)
    return text if meaning is None else f"{text}\n    = {meaning}"


def _op_json(op, kv: Describer | None = None) -> dict:
    if op.kind == DROP_TABLE:
        out: dict = {"op": "drop_table", "table": op.table}
    elif op.kind == INSERT_INDEX:
        out = {"op": "insert_index", "table": op.table, "chunk": op.key,
               "entries": {str(e): v for e, v in entries_of(op.mask, op.data)}}
    else:
        out = {"op": "insert_value", "table": op.table, "index": op.key,
               "value_hex": None if op.data is None else op.data.hex()}
    meaning = _kv_meaning(kv, op)
    if meaning is not None:
        out["kv"] = meaning
    return out


def dump(path: str, out: TextIO, json_lines: bool = False) -> int:
    """Print every record of the valid prefix in record-id order, then the problem that ends it,
    if any. Text: a ``log log{N} database ID epoch E`` line before each log's records (``-`` for
    a log without a header), a ``record ID log{N} byte OFFSET`` line, then one indented line per
    change; a ``note:`` line per ignored log; when the logs hold no record, one line saying why
    (``_no_records_note``). ``json_lines``: one JSON object per record, ``{"record_id", "log",
    "offset", "database_id", "epoch", "ops"}`` (the last two from its log's header, null without
    one), then an ``{"ignored": {"log", "why"}}`` object per ignored log, and a last
    ``{"problem": {...}}`` (or ``{"note": ...}``) object, so every line parses. Exit 0 clean, 1
    if a problem ends the prefix, 2 cannot examine."""
    db = _open(path, out, json_lines)
    if db is None:
        return 2
    try:
        layer = layer_of(path)
        kv = Describer(layer) if layer is not None and layer.get("kind") == "kv" else None
        shown = None  # the log whose header was shown last
        for lf, rec in db.prefix():
            head = db.header_info(lf.log_id)
            if json_lines:
                print(json.dumps({"record_id": rec.record_id, "log": f"log{lf.log_id}",
                                  "offset": rec.start, **head,
                                  "ops": [_op_json(op, kv) for op in rec.ops]}),
                      file=out)
            else:
                if shown != lf.log_id:
                    shown = lf.log_id
                    print(f"log log{lf.log_id} database {head['database_id'] or '-'} epoch "
                          f"{'-' if head['epoch'] is None else head['epoch']}", file=out)
                print(f"record {rec.record_id} log{lf.log_id} byte {rec.start}", file=out)
                for op in rec.ops:
                    print(f"  {_op_text(op, kv)}", file=out)
        for lid, why in db.logs.ignored:
            print(json.dumps({"ignored": {"log": f"log{lid}", "why": why}}) if json_lines
                  else f"note: {_ignored_text(f'log{lid}', why)}", file=out)
    except BrokenPipeError:
        raise  # whoever read the output went away (``| head``): not a problem of the database
    except OSError as e:
        _error(out, f"cannot read {path}: {e.strerror or e}", json_lines)
        return 2
    if db.changed:
        for c in db.changed:
            msg = f"{c}; the dump stops here: run it again"
            print(json.dumps({"note": msg}) if json_lines else f"note: {msg}", file=out)
        return 2
    p = db.logs.problem
    if p is not None:
        if json_lines:
            print(json.dumps({"problem": _problem_json(db, p)}), file=out)
        else:
            print(f"problem: {_problem_text(db, p)}; replay stops here", file=out)
        return 1
    note = _no_records_note(db)
    if note is not None and not json_lines:  # JSON lines stay records (verify --json has it)
        print(note, file=out)
    return 0


# -- cleanup: the one command that changes something -------------------------------------------

def cleanup(path: str, out: TextIO) -> int:
    """Remove the shared-memory segments of ``path`` that a writer that is gone left in /dev/shm,
    as the next writer's open would: mark each superseded (a reader still mapping it moves on at
    its next lookup) and unlink it. Refuses while a writer is alive, and holds ``writer.lock``
    meanwhile so no writer opens (and makes a new segment) under it. Exit 0 done (also when
    there was nothing to remove), 1 a writer is alive (nothing removed), 2 ``path`` is not an
    mpwal database or a segment could not be removed."""
    why = _path_error(path)
    if why is None and not is_database(path):
        why = f"{path} is not an mpwal database (no {META_FILE})"
    if why is not None:
        _error(out, why)
        return 2
    alive = (f"error: a writer of {path} is alive (it holds writer.lock): its shared memory is in "
             "use, nothing removed; closing the writer removes its segment")
    if writer_alive(path):
        print(alive, file=out)
        return 1
    try:
        lock = WriterLock(path)
    except WriterLockedError:  # a writer opened since the check
        print(alive, file=out)
        return 1
    except Error as e:
        _error(out, str(e))
        return 2
    try:
        return _remove_segments(path, out)
    finally:
        lock.release()


def _remove_segments(path: str, out: TextIO) -> int:
    realpath = os.path.realpath(path)
    names = _segment_names(realpath)
    if not names:
        print(f"no shared-memory segments of {realpath}: nothing to remove", file=out)
        return 0
    # the generation the next writer will make, as its own open does (readers look for it)
    try:
        qs = load_queues(path)
    except Error:
        qs = None
    next_gen = (qs.generation if qs is not None else 0) + 1
    for name in names:
        h = _segment_header(name)
        try:
            ov.supersede_segment(name, next_gen)
        except (posix_ipc.Error, OSError) as e:  # another user's segment, say
            print(f"error: cannot remove {name}: {e}", file=out)
            continue
        what = "" if isinstance(h, str) else (
            f" (generation {h['generation']}, {_STATE_NAMES.get(h['state'], 'state ?')}, "
            f"left by writer pid {h['writer_pid']})")
        print(f"removed {name}{what}", file=out)
    left = ov.stale_segments(realpath)
    if left:
        print(f"error: still in /dev/shm: {', '.join(sorted(left))}", file=out)
        return 2
    return 0


__all__ = ["cleanup", "dump", "inspect_db", "verify"]
