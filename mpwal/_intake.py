"""The intake of producers: the writer's stage that takes records from other processes.

The protocol is ``_wire.py``. Two threads of the writer process:

* ``mpwal-intake`` accepts connections and reads them (non-blocking, one ``selectors`` loop),
  and commits each complete submission in the order its connection sent it, through the same
  intake as the writer's own records (``Writer._commit``, which also writes the submission's
  producer slot in the record). It answers relaxed submissions at once; it never blocks on a
  producer (its sends are non-blocking, what does not fit waits in the connection's buffer).
* ``mpwal-intake-sync`` answers durable submissions: it takes every one waiting, runs one group
  commit for the newest (``GroupCommit.wait``: one fsync for all of them, from every producer
  and every thread of the writer), then answers them all. While it fsyncs the first thread
  goes on committing, and the next fsync covers what came meanwhile.

A submission that does not decode or validate is refused with the error the writer's own API
would raise (the producer raised it first: its checks are the same, against the same catalog);
a frame that breaks the protocol closes its connection and is logged. Nothing a producer sends
reaches the log unless it is a whole, valid record.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from . import _wire as wire
from ._durability import GroupCommit
from ._errors import (DatabaseError, Error, WriterFailedError)
from ._record import ChangeSet, change_set_of
from ._tables import Table

log = logging.getLogger("mpwal")
LayerHandler = Callable[[bytes, tuple[int, int]], int]


class Host(Protocol):
    """What the intake needs of the writer."""

    _catalog: dict[int, Table]
    _group: GroupCommit
    _lock: threading.RLock
    _layer_handler: LayerHandler | None

    @property
    def last_record_id(self) -> int: ...

    def _commit(self, rec: ChangeSet, *, intake: bool = False) -> int: ...

    def _flush(self) -> None: ...

    def _reserved_value(self, index: int) -> bytes | None: ...


class _Conn:
    """One producer connection: its socket, the bytes read and not yet framed, the answers not
    yet sent, and the producer it speaks for (after its HELLO)."""

    __slots__ = ("sock", "frames", "out", "lock", "producer", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = wire.Frames()
        self.out = bytearray()
        self.lock = threading.Lock()  # out and sends: both threads answer
        self.producer = 0
        self.closed = False


class Intake:
    """The writer's producer socket and its two threads; ``close`` answers what is waiting."""

    def __init__(self, host: Host, realpath: str, database_id: bytes, serve: bool) -> None:
        self.host = host
        self.database_id = database_id
        self.serve = serve  # False: a directory whose table 65535 is a user's (no slots)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(wire.socket_name(realpath, database_id))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        self.conns: dict[int, _Conn] = {}
        self.by_producer: dict[int, _Conn] = {}
        self.last_seq: dict[int, int] = {}  # producer -> its newest committed seq
        self.backlog: set[_Conn] = set()  # connections with answers left to send
        self.backlog_lock = threading.Lock()
        self.durable: list[tuple[_Conn, int, int]] = []  # (conn, seq, record id) to answer
        self.cond = threading.Condition()
        self.stopping = False
        self.submitted = 0  # submissions committed (stats)
        self.registered = 0  # the record of a registration the WELCOME must wait for
        self._serve_thread = threading.Thread(target=self._serve, name="mpwal-intake", daemon=True)
        self._sync_thread = threading.Thread(target=self._sync, name="mpwal-intake-sync", daemon=True)
        self._serve_thread.start()
        self._sync_thread.start()

    # -- the serving loop ------------------------------------------------------------------
    def _serve(self) -> None:
        while not self.stopping:
            try:
                self._serve_once()
            except Exception:  # never let the intake die silently: producers would hang
                if self.stopping:
                    return
                log.exception("producer intake")
                time.sleep(0.01)

    def _serve_once(self) -> None:
        """One turn of the loop: pending answers out, then what the sockets have."""
        with self.backlog_lock:
            waiting = list(self.backlog)
        for c in waiting:
            self._flush_out(c)
        events = self.sel.select(0.5)
        for key, mask in events:
            obj = key.fileobj
            if obj is self.listener:
                self._accept()
            elif obj == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            else:
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    self._flush_out(conn)
                if mask & selectors.EVENT_READ and not conn.closed:
                    self._read(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: do not spin on the listener
                log.warning("producer intake: accept failed: %s", e)
                time.sleep(0.05)
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        """Read what the connection has, then act on each complete frame in order."""
        eof = False
        try:
            while True:
                data = conn.sock.recv(1 << 20)
                if not data:
                    eof = True
                    break
                conn.frames.feed(data)
                if len(data) < 1 << 20:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            eof = True
        try:
            for kind, payload in conn.frames.pop():
                if conn.closed:
                    break
                self._frame(conn, kind, payload)
        except (wire.ProtocolError, struct.error) as e:
            log.error("producer intake: closing a connection that broke the protocol (%s)", e)
            eof = True
        if eof:
            self._close(conn)  # a torn frame left in the buffer is dropped: never committed

    def _frame(self, conn: _Conn, kind: int, payload: bytes) -> None:
        if kind == wire.HELLO:
            self._hello(conn, payload)
        elif kind == wire.SUBMIT and conn.producer:
            self._submit(conn, payload)
        else:
            raise wire.ProtocolError(f"frame type {kind} {'before HELLO' if not conn.producer else ''}")

    # -- HELLO: who the producer is, and what of its unanswered submissions committed -------
    def _hello(self, conn: _Conn, payload: bytes) -> None:
        dbid, producer, seqs = wire.parse_hello(payload)
        if conn.producer:
            raise wire.ProtocolError("a second HELLO")
        if dbid != self.database_id:
            self._refuse(conn, 0, 0, DatabaseError(
                "the producer belongs to another database of the same path (the directory was "
                "made again): open a new Producer"))
            return
        if not self.serve:
            self._refuse(conn, 0, 0, DatabaseError(
                f"this directory defines table {wire.PRODUCER_TABLE} itself, which producers "
                "need: it cannot take producers"))
            return
        try:
            with self.host._lock:
                if producer == 0:
                    producer = self._register()
                elif producer >= self._next_producer():
                    raise DatabaseError(f"producer id {producer} is not one this database gave "
                                        "(a power loss undid its registration?): open a new Producer")
                old = self.by_producer.get(producer)
                if old is not None:  # everything sent there is committed or never will be
                    self._drain_and_close(old)
                slots = [self._slot(producer, s) for s in range(wire.WINDOW)]
        except Error as e:
            self._refuse(conn, 0, 0, e)
            return
        committed = [(s, slots[s % wire.WINDOW][1]) for s in seqs
                     if slots[s % wire.WINDOW][0] == s]
        # outside the writer's lock (the group commit's flush takes it): a new id is durable
        # before it is given (after a power loss no writer may give it again), and what the
        # WELCOME reports committed may have been durable submissions
        upto = max([r for _, r in committed] + [self.registered])
        self.registered = 0
        if upto:
            try:
                self.host._group.wait(upto, self.host._flush)
            except (Error, OSError) as e:
                self._refuse(conn, 0, 0, WriterFailedError(f"the fsync failed: {e}"))
                return
        self.last_seq[producer] = max(s for s, _ in slots)
        conn.producer = producer
        self.by_producer[producer] = conn
        self._send(conn, wire.welcome(producer, committed))

    def _next_producer(self) -> int:
        got = self.host._reserved_value(0)
        return wire.COUNTER.unpack(got)[0] if got else 1

    def _register(self) -> int:
        """Give a new producer its id: a record that moves the counter of slot 0 on (so no
        later writer gives the id again)."""
        producer = self._next_producer()
        cs = ChangeSet({})
        cs._values[(wire.PRODUCER_TABLE, 0)] = wire.COUNTER.pack(producer + 1)
        self.registered = self.host._commit(cs, intake=True)  # (made durable before the WELCOME)
        return producer

    def _slot(self, producer: int, seq: int) -> tuple[int, int]:
        """(seq, record id) of the producer slot of ``seq``, (0, 0) if it is empty."""
        got = self.host._reserved_value(wire.slot_of(producer, seq))
        return wire.PAIR.unpack(got) if got else (0, 0)

    def _drain_and_close(self, conn: _Conn) -> None:
        """Commit the complete submissions an old connection of a producer still holds (its
        producer closed it, so they are all in the socket), then close it: nothing sent there
        can commit after the new connection's WELCOME."""
        if not conn.closed:
            self._read(conn)
            self._close(conn)

    # -- SUBMIT ------------------------------------------------------------------------------
    def _submit(self, conn: _Conn, payload: bytes) -> None:
        seq, flags, kind = wire.SUBMIT_HEAD.unpack_from(payload)
        body = payload[wire.SUBMIT_HEAD.size:]
        producer = conn.producer
        durable = bool(flags & wire.DURABLE_FLAG)
        host = self.host
        if kind == wire.SYNC:
            self._answer(conn, seq, host.last_record_id, True)
            return
        if seq <= self.last_seq.get(producer, 0):  # sent before, to an earlier connection
            with host._lock:
                got_seq, rid = self._slot(producer, seq)
            if got_seq == seq:
                self._answer(conn, seq, rid, durable)
            else:
                self._refuse(conn, seq, 0, WriterFailedError(
                    f"submission {seq} was not committed, and later ones of this producer were: "
                    "it is not committed now, so that the producer's order holds; submit it again"))
            return
        tag = (wire.slot_of(producer, seq), seq)
        try:
            if kind == wire.RECORD:
                cs = change_set_of(body, 0, host._catalog)
                cs._tag = tag
                rid = host._commit(cs, intake=True)
            elif kind == wire.LAYER:
                handler = host._layer_handler
                if handler is None:
                    raise DatabaseError("this directory's writer has no layer (a raw Writer): "
                                        "use mpwal.Producer, not a layer's producer")
                rid = handler(body, tag)
            else:
                raise wire.ProtocolError(f"submission kind {kind}")
        except Error as e:
            self._refuse(conn, seq, getattr(e, "record_id", 0), e)
            return
        except wire.ProtocolError:
            raise
        except Exception as e:  # a bug: the producer learns of it, the writer goes on
            log.exception("producer intake: submission %d of producer %d", seq, producer)
            self._refuse(conn, seq, 0, WriterFailedError(f"the writer failed on it: {e!r}"))
            return
        self.last_seq[producer] = seq
        self.submitted += 1
        self._answer(conn, seq, rid, durable)

    # -- answers ---------------------------------------------------------------------------
    def _answer(self, conn: _Conn, seq: int, rid: int, durable: bool) -> None:
        if durable:
            with self.cond:
                self.durable.append((conn, seq, rid))
                self.cond.notify()
        else:
            self._send(conn, wire.ack(seq, rid))

    def _refuse(self, conn: _Conn, seq: int, rid: int, e: Error) -> None:
        self._send(conn, wire.refused(seq, rid or 0, type(e).__name__, str(e)))

    def _sync(self) -> None:
        """Answer durable submissions: one group commit for everything waiting."""
        while True:
            with self.cond:
                while not self.durable and not self.stopping:
                    self.cond.wait()
                batch, self.durable = self.durable, []
            if not batch:
                return
            try:
                self.host._group.wait(max(r for _, _, r in batch), self.host._flush)
                failed: Error | None = None
            except Error as e:
                failed = e
            except Exception as e:  # (OSError, or a bug: the thread must not die)
                if not isinstance(e, OSError):
                    log.exception("producer intake: the group commit")
                failed = WriterFailedError(f"the fsync failed: {e}")
            for conn, seq, rid in batch:
                if failed is None:
                    self._send(conn, wire.ack(seq, rid))
                else:
                    self._refuse(conn, seq, rid, type(failed)(
                        f"record {rid} is committed and visible to readers, but the fsync that "
                        f"would make it durable failed ({failed}); the writer must be reopened"))

    def _send(self, conn: _Conn, data: bytes) -> None:
        """Send now what the socket takes; keep the rest for the serving loop. Never blocks."""
        with conn.lock:
            if conn.closed:
                return
            if not conn.out:
                try:
                    n = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    return  # the producer is gone: its EOF closes the connection
                if n == len(data):
                    return
                data = data[n:]
            conn.out += data
        with self.backlog_lock:
            self.backlog.add(conn)
        self._wake()

    def _flush_out(self, conn: _Conn) -> None:
        """Send what a connection has waiting (serving thread); watch for room if some stays."""
        with conn.lock:
            if not conn.closed and conn.out:
                try:
                    n = conn.sock.send(conn.out)
                    del conn.out[:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    conn.out.clear()
            left = bool(conn.out) and not conn.closed
        if not conn.closed:
            self.sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if left else 0), conn)
        if not left:
            with self.backlog_lock:
                self.backlog.discard(conn)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already woken, or closing

    def _close(self, conn: _Conn) -> None:
        with conn.lock:
            if conn.closed:
                return
            conn.closed = True
        fd = conn.sock.fileno()
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(fd, None)
        if conn.producer and self.by_producer.get(conn.producer) is conn:
            del self.by_producer[conn.producer]
        with self.backlog_lock:
            self.backlog.discard(conn)
        conn.sock.close()

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking submissions, answer the durable ones committed, close every connection
        (its producers wait for the next writer and learn there what committed)."""
        if self.stopping:
            return
        self.stopping = True
        self._wake()
        self._serve_thread.join()
        with self.cond:
            self.cond.notify_all()
        self._sync_thread.join()
        for conn in list(self.conns.values()):
            with conn.lock:
                data = bytes(conn.out)
            if data:  # a last try, blocking a moment at most
                try:
                    conn.sock.settimeout(0.2)
                    conn.sock.sendall(data)
                except OSError:
                    pass
            self._close(conn)
        self.listener.close()
        self.sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited sockets (a child must not keep the writer's
        name bound, nor its producers' connections open) without touching the parent's."""
        for s in [self.listener, *(c.sock for c in self.conns.values())]:
            try:
                os.close(s.detach())
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

