"""Cursors and the logs kept for them: what the change feed (``_feed.py``) may still read.

Files:

* ``cursors``: JSON ``{"cursors": {name: {"position": N, "lost": null | "why"}}}``, replaced
  atomically (write then rename, fsynced) and changed only under ``queue.lock``. A cursor's
  ``position`` is the last record id it has passed.
* ``feed/{first:020d}-{last:020d}.log``: a retained log, records ``first..last``. When a log is
  about to be emptied (the enactor cleaning it, or replay at a writer's open) and a live cursor
  has not passed its last record, the log file is renamed here instead (a new empty file takes
  its name in the pool) and stays untouched until every cursor has passed it. Its bytes are the
  log's own (its header names the database and the epoch that wrote it); ``last`` is where the
  records known to be committed end (replay keeps only its valid prefix). Replay and the
  readers' log views never look in ``feed/``, so a retained log is never replayed again.

Bound: when the retained logs exceed the writer's ``max_retained_bytes`` (in the queue state, so
that enactor processes know it too), the slowest cursor is dropped (``lost`` says how far it got
and why), a warning is logged, and its logs go; its next read raises ``CursorLostError``.
Everything here runs under ``queue.lock`` (the callers hold it), so cursors, cleaning and
replay see one another whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from . import _fileio as fileio
from ._errors import storage_error
from ._format import LogScan

log = logging.getLogger("mpwal")
CURSORS_FILE = "cursors"
FEED_DIR = "feed"
_SEGMENT = re.compile(r"(\d{20})-(\d{20})\.log")


@dataclass(frozen=True)
class Segment:
    """A retained log: records ``first..last`` in the file ``path``."""

    first: int
    last: int
    path: str
    size: int


def load_cursors(path: str) -> dict[str, dict]:
    """{name: {"position": N, "lost": None or why}}; empty when there is no cursor file."""
    try:
        raw = fileio.read_file(os.path.join(path, CURSORS_FILE))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise storage_error(e, f"reading {CURSORS_FILE}") from None
    try:
        doc = json.loads(raw)
        cursors = doc["cursors"]
        assert isinstance(cursors, dict)
        return {str(k): {"position": int(v["position"]), "lost": v.get("lost")} for k, v in cursors.items()}
    except (ValueError, KeyError, TypeError, AssertionError):
        log.warning("%s of %s is damaged: its cursors are lost", CURSORS_FILE, path)
        return {}


def save_cursors(path: str, cursors: dict[str, dict]) -> None:
    try:
        fileio.write_file_atomic(os.path.join(path, CURSORS_FILE),
                                 json.dumps({"cursors": cursors}, sort_keys=True).encode(), sync=True)
    except OSError as e:
        raise storage_error(e, f"writing {CURSORS_FILE}") from None


def needed_from(path: str) -> int | None:
    """The oldest position of a live cursor (records after it must stay), or None."""
    live = [c["position"] for c in load_cursors(path).values() if c["lost"] is None]
    return min(live) if live else None


def segments(path: str) -> list[Segment]:
    """The retained logs, oldest first."""
    d = os.path.join(path, FEED_DIR)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = _SEGMENT.fullmatch(name)
        if m:
            p = os.path.join(d, name)
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:
                continue
            out.append(Segment(int(m[1]), int(m[2]), p, size))
    return sorted(out, key=lambda s: s.first)


def keep_if_needed(path: str, log_file: str, upto: int | None = None) -> bool:
    """Before ``log_file`` is emptied: if a live cursor has not passed its last record (at most
    ``upto``), move it into ``feed/`` and leave an empty file in its place. Whether it moved."""
    need = needed_from(path)
    if need is None:
        return False
    try:
        data = fileio.read_file(log_file)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise storage_error(e, f"reading {log_file}") from None
    scan = LogScan(data)
    first = last = None
    for rec in scan.records():
        if upto is not None and rec.record_id > upto:
            break
        first = rec.record_id if first is None else first
        last = rec.record_id
    if first is None or last is None or last <= need:
        return False
    d = os.path.join(path, FEED_DIR)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        dest = os.path.join(d, f"{first:020d}-{last:020d}.log")
        os.rename(log_file, dest)
        os.close(fileio.create(log_file))  # the pool keeps its name
        fileio.sync_dir(d)
        fileio.sync_dir(path)
    except OSError as e:
        raise storage_error(e, f"keeping {log_file} for the cursors") from None
    log.debug("kept records %d..%d for the cursors", first, last)
    return True


def prune(path: str, max_bytes: int) -> None:
    """Delete the retained logs every live cursor has passed; past ``max_bytes``, drop the
    slowest cursor (loudly) until what is left fits."""
    segs = segments(path)
    if not segs:
        return
    cursors = load_cursors(path)
    changed = False
    while True:
        live = {n: c for n, c in cursors.items() if c["lost"] is None}
        need = min((c["position"] for c in live.values()), default=None)
        kept = [s for s in segs if need is not None and s.last > need]
        if sum(s.size for s in kept) <= max_bytes or not live:
            break
        slowest = min(live, key=lambda n: live[n]["position"])
        pos = live[slowest]["position"]
        cursors[slowest]["lost"] = (
            f"dropped at record {pos}: the logs kept for it passed max_retained_bytes="
            f"{max_bytes}")
        log.warning("cursor %r of %s %s", slowest, path, cursors[slowest]["lost"])
        changed = True
    if changed:
        save_cursors(path, cursors)
    for s in segs:
        if s not in kept:
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise storage_error(e, f"deleting {s.path}") from None


def retained_bytes(path: str) -> int:
    return sum(s.size for s in segments(path))
