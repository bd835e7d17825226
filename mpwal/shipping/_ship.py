"""``mpwal ship``: every durable record of a directory, once and in order, to a JetStream stream.

Exactly once, from any point where the shipper was killed:

1. The stream is the truth. At the start, and after any failure, the shipper reads what the
   stream holds of this database (``_stream.py``'s records subject) from the last message it
   knows to be good, and keeps the longest run of record ids that follow one another: a message
   after a gap (an earlier one of the same window was lost while a later one was stored, say
   across a leader change) is deleted, since no follower applies past a gap. Shipping goes on
   after the last record of that run: not after the cursor's position, which moves only once
   the stream acknowledged, so a shipper killed in between would ship a record again.
2. The record the stream holds last must be this database's record of that id: its bytes are
   compared with the local one (the cursor stays one record behind, so it is kept). Another
   record under the same id (a power loss lost records and a later epoch reused their ids)
   stops the shipper with an error instead of passing for it.
3. Records are published in order, ``WINDOW`` at a time without waiting (``publish_async``),
   then every acknowledgement is awaited; the cursor ``ship:<stream>`` then moves on. A failure
   anywhere goes back to step 1. The message id header makes JetStream drop a repeat within
   its duplicate window too: a second line of defence.

Only durable records are shipped (``Reader.changes(durable=True)``): one the machine could
still lose never leaves it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

from .._errors import CursorLostError, DatabaseError, Error
from .._feed import Feed
from .._reader import Reader
from .._tables import database_id, layer_of
from . import _stream as S

WINDOW = 512  # records published before their acknowledgements are awaited
IDLE_POLL = 0.005


class Shipper:
    def __init__(self, path: str, url: str, stream: str, replicas: int = 1,
                 progress: TextIO | None = sys.stderr) -> None:
        self.path = path
        self.url = url
        self.stream = stream
        self.replicas = replicas
        self.progress = progress
        ident = database_id(path)
        if ident is None:
            raise DatabaseError(f"{path} is of format 1: open a Writer on it once, then ship it")
        self.dbid = ident.hex()
        self.subject = S.records_subject(self.dbid)
        layer = layer_of(path)
        self.reader = Reader(path, layer=None if layer is None else layer["kind"])
        self.cursor = self.reader.cursor(f"ship:{stream}", start=0)
        self.shipped = 0  # records published and acknowledged by this run
        self.last_good: tuple[int, int] = (0, 0)  # (record id, stream sequence) verified

    async def run(self, idle_exit: float | None) -> int:
        nc, js = await S.connect(self.url)
        try:
            while True:  # a cluster electing a leader answers nothing for a moment
                try:
                    await S.ensure_stream(js, self.stream, self.dbid, self.replicas)
                    await self._publish_meta(js)
                    break
                except (TimeoutError, S.nats.errors.Error) as e:
                    self._say(f"setting up the stream failed ({type(e).__name__}: {e}); again")
                    await asyncio.sleep(0.2)
            last_report = time.monotonic()
            while True:
                try:
                    done = await self._ship(js, idle_exit)
                except (TimeoutError, S.nats.errors.Error) as e:
                    self._say(f"publishing failed ({type(e).__name__}: {e}); resuming from the stream")
                    await asyncio.sleep(0.2)
                    continue
                if done:
                    return 0
                if self.progress is not None and time.monotonic() - last_report > 1:
                    self._say(f"shipped {self.shipped} records, through record {self.last_good[0]}")
                    last_report = time.monotonic()
        finally:
            await nc.close()
            self.reader.close()

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            print(f"mpwal ship: {msg}", file=self.progress, flush=True)

    async def _publish_meta(self, js: Any) -> None:
        body = S.meta_of(self.path)
        last = await S.last_message(js, self.stream, S.meta_subject(self.dbid))
        if last is None or last.data != body:
            await js.publish(S.meta_subject(self.dbid), body, stream=self.stream)

    async def _resume_point(self, js: Any) -> int:
        """Step 1: the last record id of the contiguous run the stream holds (deleting any
        message after a gap), and step 2's check of it; the record id to ship after."""
        last = await S.last_message(js, self.stream, self.subject)
        if last is None:
            return 0
        rid, seq = self.last_good
        if self.last_good == (0, 0):  # no message known good: the stream's first of ours
            first = await self._next_msg(js, 1)
            if first is None:
                return 0
            rid, seq = S.record_id_of(first)[0] - 1, first.seq - 1
        while True:  # walk the run after the last good message
            nxt = await self._next_msg(js, seq + 1)
            if nxt is None:
                break
            nrid = S.record_id_of(nxt)[0]
            if nxt.seq <= seq or nrid <= rid or nrid > rid + WINDOW:
                # not what a lost message in one window can leave: a read served from a
                # server that is behind (a cluster electing a leader); look again later
                raise TimeoutError(f"the stream answered record {nrid} at sequence {nxt.seq} "
                                   f"after record {rid} at {seq}")
            if nrid != rid + 1:
                self._say(f"the stream has record {nrid} after record {rid}: deleting it (a gap "
                          "left by a message lost in the last window)")
                await js.delete_msg(self.stream, nxt.seq)
                seq = nxt.seq
                continue
            rid, seq = nrid, nxt.seq
            self.last_good = (rid, seq)
        if rid:
            await self._check_same(js, rid, seq)
        return rid

    async def _next_msg(self, js: Any, seq: int) -> Any | None:
        try:
            return await js.get_msg(self.stream, seq, subject=self.subject, next=True)
        except S.NotFoundError:
            return None

    async def _check_same(self, js: Any, rid: int, seq: int) -> None:
        msg = await js.get_msg(self.stream, seq)
        if self.reader.last_record_id < rid:
            raise DatabaseError(
                f"the stream {self.stream} holds record {rid} of this database, which has only "
                f"{self.reader.last_record_id}: it lost records (a power loss?) and would reuse "
                "their ids; ship it to a new stream")
        try:
            mine = next(Feed(self.reader, rid - 1, True, self.cursor.name).follow(0.0), None)
        except CursorLostError:
            return  # not kept here any more: nothing to compare with
        if mine is not None and mine.record_id == rid and mine.data != msg.data:
            raise DatabaseError(
                f"the stream {self.stream} holds record {rid} of epoch {S.record_id_of(msg)[1]}, "
                f"but this database's record {rid} (epoch {mine.epoch}) differs: it lost records "
                "(a power loss?) and reused their ids; ship it to a new stream")

    async def _ship(self, js: Any, idle_exit: float | None) -> bool:
        """Ship until a failure (raised) or, with ``idle_exit``, until caught up and idle that
        long (True)."""
        after = await self._resume_point(js)
        if after > self.cursor.position + 1:
            self.cursor.advance(after - 1)
        feed = Feed(self.reader, after, True, self.cursor.name)
        idle_since = time.monotonic()
        while True:
            batch = feed.poll()
            if not batch:
                if idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                    return True
                await asyncio.sleep(IDLE_POLL)
                continue
            for i in range(0, len(batch), WINDOW):
                part = batch[i:i + WINDOW]
                futures = [await js.publish_async(
                    self.subject, c.data, stream=self.stream,
                    headers={S.MSG_ID: f"{self.dbid}:{c.epoch}:{c.record_id}",
                             S.RECORD_ID: str(c.record_id), S.EPOCH: str(c.epoch)}) for c in part]
                acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
                self.last_good = (part[-1].record_id, acks[-1].seq)
                self.shipped += len(part)
                self.cursor.advance(part[-1].record_id - 1)  # the last one stays, for step 2
            idle_since = time.monotonic()


def ship(path: str, url: str, stream: str, idle_exit: float | None = None,
         progress: TextIO | None = sys.stderr) -> int:
    """``mpwal ship``; the exit status."""
    try:
        shipper = Shipper(path, url, stream, progress=progress)
        return asyncio.run(shipper.run(idle_exit))
    except Error as e:
        print(f"mpwal ship: {e}", file=sys.stderr)
        return 1
