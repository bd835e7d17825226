"""Reading the set of log files in a directory: the longest valid prefix, in record-id order.

Used by replay (the writer, on open), by readers that find no live writer, and by
``mpwal verify`` and ``mpwal dump``. It only reads. Logs are ordered by their first record id,
not by file name (the pool reuses names). Reading stops for good at the first record that is
torn, fails its CRC, has a bad type byte, or does not follow the previous record's id (a gap:
a log went missing); nothing after that point is part of the prefix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import fileio
from .errors import storage_error
from .format import LogScan, Record, first_record_id
from .queues import log_ids, log_path


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

    @property
    def last_record_id(self) -> int | None:
        for lf in reversed(self.valid):
            if lf.last_record is not None:
                return lf.last_record
        return None

    def records(self):
        for lf in self.valid:
            yield from lf.records


def read_logs(path: str, keep_records: bool = True) -> LogSet:
    """Scan every ``log{N}`` file of ``path``. An I/O error raises StorageError (replay must
    fail and keep the logs); corruption only ends the prefix."""
    heads = []
    empty = []
    discarded = []
    problem = None
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
        first = first_record_id(data)
        if first is None:
            discarded.append(lid)
            problem = problem or Problem(lid, 0, "no first record", None)
            continue
        heads.append((first, lid))
        datas[lid] = data
    heads.sort()
    valid = []
    expect = None
    stopped = False
    for first, lid in heads:
        data = datas.pop(lid)
        if stopped:
            discarded.append(lid)
            continue
        if expect is not None and first != expect:
            stopped = True
            discarded.append(lid)
            problem = Problem(lid, 0, "gap", first)
            continue
        lf = LogFile(lid, first, len(data))
        scan = LogScan(data, expect)
        if keep_records:
            lf.records = list(scan.records())
        else:
            for _ in scan.records():
                pass
        lf.end = scan.end
        if scan.end:
            lf.last_record = scan.expect_id - 1
        expect = scan.expect_id
        valid.append(lf)
        if scan.problem:
            stopped = True
            problem = Problem(lid, scan.end, scan.problem, scan.problem_record)
    return LogSet(valid, empty, discarded, problem)


def log_size(path: str, log_id: int) -> int:
    try:
        return os.path.getsize(log_path(path, log_id))
    except OSError:
        return 0
