"""Reading the set of log files in a directory: the longest valid prefix, in record-id order.

Used by replay (the writer, on open), by readers that find no live writer, and by
``mpwal verify`` and ``mpwal dump``. It only reads. Logs are ordered by their first record id,
not by file name (the pool reuses names). Reading stops for good at the first record that is
torn, fails its CRC, has a bad type byte, or does not follow the previous record's id (a gap:
a log went missing); nothing after that point is part of the prefix.

A log whose header (``_format.py``) names another database, or an epoch below the queue state's
``log_epoch_floor``, or that has no header in a database with an id, is not part of the
database at all: it is listed in ``ignored`` and ends nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from . import _fileio as fileio
from ._errors import DatabaseError, storage_error
from ._format import BEGIN_RECORD, LogScan, Record, first_record_id
from ._queues import load_queues, log_ids, log_path
from ._tables import database_id, epoch_floor, is_database


@dataclass
class LogIdentity:
    """Which logs belong to a database: its id (None: format 1, whose logs have no header) and
    the oldest epoch still current."""

    database_id: bytes | None
    epoch_floor: int = 0


def log_identity(path: str) -> LogIdentity:
    """The identity the directory's metadata and queue state give (a directory whose metadata
    is missing or damaged has none to check against: its logs are read as format 1)."""
    st = load_queues(path)
    ident, floor = None, 0
    try:
        if is_database(path):
            ident, floor = database_id(path), epoch_floor(path)
    except DatabaseError:
        pass
    return LogIdentity(ident, max(floor, st.log_epoch_floor if st else 0))


@dataclass
class LogFile:
    log_id: int
    first_record: int
    size: int
    records: list[Record] = field(default_factory=list)
    end: int = 0  # bytes of valid records from the start
    last_record: int | None = None  # id of the last valid record


@dataclass
class Problem:
    log_id: int
    offset: int
    why: str  # "torn", "crc", "bad type", "out of sequence", "no first record", "gap"
    record_id: int | None

    def __str__(self) -> str:
        rec = f" in record {self.record_id}" if self.record_id is not None else ""
        return f"log{self.log_id} at byte {self.offset}{rec}: {self.why}"


@dataclass
class LogSet:
    valid: list[LogFile]  # in record-id order, each with its good records
    empty: list[int]  # empty log files (the pool)
    discarded: list[int]  # logs wholly past the first problem, or with no first record
    problem: Problem | None
    ignored: list[tuple[int, str]] = field(default_factory=list)  # (log id, why not ours)

    @property
    def last_record_id(self) -> int | None:
        for lf in reversed(self.valid):
            if lf.last_record is not None:
                return lf.last_record
        return None

    def records(self) -> Iterator[Record]:
        for lf in self.valid:
            yield from lf.records


def read_logs(path: str, keep_records: bool = True, start: int | None = None,
              identity: LogIdentity | None = None) -> LogSet:
    """Scan every ``log{N}`` file of ``path``. An I/O error raises StorageError (replay must
    fail and keep the logs); corruption only ends the prefix.

    ``start`` is the first record id the prefix must begin with (``last_cleaned_record + 1``
    from the queue state): records below it are already in the tables and are skipped, and a
    prefix that does not reach it is a gap. A log is ordered by its first record only once that
    record verifies, so a damaged id cannot move a log to the front. ``identity`` (read from
    the directory when None) says which logs are the database's."""
    if identity is None:
        identity = log_identity(path)
    ignored: list[tuple[int, str]] = []
    heads = []
    empty = []
    discarded = []
    head_problem = None
    datas = {}
    for lid in log_ids(path):
        p = log_path(path, lid)
        try:
            data = fileio.read_file(p)
        except FileNotFoundError:
            continue  # cleaned and deleted while we listed
        except OSError as e:
            raise storage_error(e, f"reading {p}") from None
        if not data:
            empty.append(lid)
            continue
        head = LogScan(data)
        why = _not_ours(head, identity)
        if why is not None:
            ignored.append((lid, why))
            continue
        head_rec = next(head.records(), None)
        if head_rec is None and head.problem is None:
            empty.append(lid)  # a header and no record (a crash right after it): empty
            continue
        if head_rec is None:  # torn, crc, bad type: the first record does not verify
            discarded.append(lid)
            rid = first_record_id(data)  # None: the file does not even start with a BEGIN
            assert head.problem is not None  # a scan that yields nothing says why
            head_problem = head_problem or Problem(
                lid, 0, head.problem if rid is not None else "no first record", rid)
            continue
        heads.append((head_rec.record_id, lid))
        datas[lid] = data
    heads.sort()
    valid = []
    expect = start
    problem = None
    for first, lid in heads:
        data = datas.pop(lid)
        if problem:
            discarded.append(lid)
            continue
        # a log may start below ``expect`` only while nothing is kept yet (it holds records the
        # tables already have); otherwise it must continue the chain exactly
        if expect is not None and (first > expect or (first < expect and expect != start)):
            discarded.append(lid)
            problem = head_problem or Problem(lid, 0, "gap", first)
            continue
        lf = LogFile(lid, first, len(data))
        scan = LogScan(data, first)
        skip = expect if expect is not None and first < expect else None
        if keep_records:
            lf.records = [r for r in scan.records() if skip is None or r.record_id >= skip]
        else:
            for _ in scan.records():
                pass
        lf.end = scan.end
        nxt = scan.expect_id  # the id after the last good record
        assert nxt is not None  # the scan was given one, ``first``
        if scan.end and (skip is None or nxt > skip):
            lf.last_record = nxt - 1
        expect = nxt if expect is None else max(expect, nxt)
        valid.append(lf)
        if scan.problem and (skip is None or nxt > skip):
            # (damage among records the tables already hold ends nothing: the next log may
            # still continue the chain at ``expect``)
            problem = Problem(lid, scan.end, scan.problem, scan.problem_record)
    return LogSet(valid, empty, discarded, problem or head_problem, ignored)


def _not_ours(scan: LogScan, identity: LogIdentity) -> str | None:
    """Why a log is not one of the database's current logs, or None if it is."""
    if scan.header is None:
        if scan.problem == "bad header" or identity.database_id is None:
            return None  # damage ends the prefix as a bad first record does; format 1: no header
        if scan.buf[:1] != bytes((BEGIN_RECORD,)):
            return None  # neither a header nor a record: damage, which ends the prefix
        return "it has no log header (not written by this database's writers)"
    ident, epoch = scan.header
    if ident != identity.database_id:
        return f"its header names database {ident.hex()}, not this one"
    if epoch < identity.epoch_floor:
        return (f"it is stale: epoch {epoch}, older than {identity.epoch_floor}, whose logs "
                "were all replayed")
    return None
