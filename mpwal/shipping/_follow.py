"""``mpwal follow``: a replica directory that applies a JetStream stream of records.

The follower is the replica's one writer (an ordinary ``Writer``, so its readers are ordinary
``Reader``s and ``KVReader``s, and see a prefix of the source, never a torn record). It builds
the replica's tables and layer from the stream's meta subject (``_stream.py``), then commits each
record of the records subject as it comes, under the same record id: the replica's record ids
are the source's. After a crash it resumes from the replica's own last record id: messages at or
below it are skipped, and a record id that does not follow it is a gap, which stops the
follower with an error (the shipper never leaves one in the stream).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

from .. import _wire as wire
from .._errors import DatabaseError, Error
from .._record import change_set_of
from .._tables import table_from
from .. import _fileio as fileio
from .._writer import REPLICA_FILE, Writer
from . import _stream as S

SYNC_EVERY = 1.0  # seconds between the replica's fsyncs while records flow


class Follower:
    def __init__(self, url: str, stream: str, path: str, database: str | None = None,
                 progress: TextIO | None = sys.stderr) -> None:
        self.url = url
        self.stream = stream
        self.path = os.path.realpath(path)
        self.database = database
        self.progress = progress
        self.applied = 0

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            print(f"mpwal follow: {msg}", file=self.progress, flush=True)

    async def _database(self, js: Any) -> str:
        if self.database is not None:
            return self.database
        info = await js.stream_info(self.stream, subjects_filter="mpwal.*.meta")
        ids = sorted({s.split(".")[1] for s in (info.state.subjects or {})})
        if len(ids) != 1:
            if not ids:
                raise S.NotFoundError  # no database shipped to it yet
            raise DatabaseError(f"the stream {self.stream} holds {len(ids)} databases "
                                f"({', '.join(ids)}): give the one to follow with --database")
        return ids[0]

    async def run(self, idle_exit: float | None) -> int:
        nc, js = await S.connect(self.url)
        try:
            doc, dbid = await self._wait_for_meta(js, idle_exit)
            tables = [table_from(d) for d in doc["tables"] if d["id"] != wire.PRODUCER_TABLE]
            w = Writer(self.path, tables, layer=doc.get("layer"), replica=True)
            try:
                mark = os.path.join(self.path, REPLICA_FILE)
                if not os.path.exists(mark):
                    fileio.write_file_atomic(
                        mark, f"of database {dbid}, stream {self.stream}\n".encode(), sync=True)
                while True:
                    try:
                        return await self._apply_all(js, dbid, w, idle_exit)
                    except (TimeoutError, S.nats.errors.Error) as e:
                        self._say(f"reading the stream failed ({type(e).__name__}: {e}); "
                                  "resuming from the replica's last record")
                        await asyncio.sleep(0.2)
            finally:
                w.close()
        finally:
            await nc.close()

    async def _wait_for_meta(self, js: Any, idle_exit: float | None) -> tuple[dict, str]:
        """The stream's database and its newest meta message, waiting for a shipper to make
        them (with ``idle_exit``, at most that long)."""
        start = time.monotonic()
        while True:
            try:
                dbid = await self._database(js)
                meta = await S.last_message(js, self.stream, S.meta_subject(dbid))
                if meta is not None:
                    return json.loads(meta.data), dbid
            except S.NotFoundError:
                pass  # no stream yet
            except (TimeoutError, S.nats.errors.Error) as e:  # a cluster electing a leader
                self._say(f"reading the stream failed ({type(e).__name__}: {e}); again")
            if idle_exit is not None and time.monotonic() - start > idle_exit:
                raise DatabaseError(f"the stream {self.stream} holds no database's meta message: "
                                    "ship one to it with mpwal ship first")
            await asyncio.sleep(0.1)

    async def _apply_all(self, js: Any, dbid: str, w: Writer, idle_exit: float | None) -> int:
        last = w.last_record_id
        catalog = dict(w._files.catalog)
        sub = await js.subscribe(S.records_subject(dbid), stream=self.stream, ordered_consumer=True)
        idle_since = last_sync = time.monotonic()
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.1)
                except TimeoutError:
                    if time.monotonic() - last_sync > 0.05:
                        w.sync()
                        last_sync = time.monotonic()
                    if idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                        self._say(f"caught up at record {last}; idle for {idle_exit:g} s")
                        return 0
                    continue
                idle_since = time.monotonic()
                rid, _epoch = S.record_id_of(msg)
                if rid <= last:
                    continue
                if rid != last + 1:
                    raise DatabaseError(f"the stream has record {rid} after record {last}: a gap "
                                        "(the replica cannot go on; ship the source again)")
                if w.last_record_id != last:
                    raise DatabaseError(f"the replica is at record {w.last_record_id}, not the "
                                        f"stream's {last}: something else wrote it")
                got = w._commit(change_set_of(msg.data, rid, catalog), intake=True)
                if got != rid:
                    raise DatabaseError(f"the replica committed record {got} for the source's {rid}")
                last = rid
                self.applied += 1
                if time.monotonic() - last_sync > SYNC_EVERY:
                    w.sync()
                    last_sync = time.monotonic()
        finally:
            try:
                await sub.unsubscribe()
            except (TimeoutError, S.nats.errors.Error):
                pass


def follow(url: str, stream: str, path: str, idle_exit: float | None = None,
           database: str | None = None, progress: TextIO | None = sys.stderr) -> int:
    """``mpwal follow``; the exit status."""
    try:
        return asyncio.run(Follower(url, stream, path, database, progress).run(idle_exit))
    except Error as e:
        print(f"mpwal follow: {e}", file=sys.stderr)
        return 1
