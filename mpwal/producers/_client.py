"""The producer's side of the protocol (``_wire.py``): a connection to the directory's writer
that submits, resubmits after the writer changes, and gives each caller its answer.

One ``Client`` per producer object, and no thread of its own: the callers (any thread) do the
work. A caller sends its submission under ``_send_lock`` (so the writer receives, and commits,
a producer's records in the order they were submitted), then waits for its answer: one caller at
a time holds ``_recv_lock`` and reads the connection, handing every answer it finds to its
waiter, while the others wait for theirs. With one thread there is no hand-off at all. The
caller that finds no connection makes one: it connects (waiting for a writer), says HELLO with
the submissions still unanswered, learns which of them committed, and sends the others again
in order. A socket that ended is only shut down where it is found; the reader closes it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import Any

from .. import _errors, _wire as wire
from .._errors import ClosedError, Error, ForkedError, NoWriterError, WriterFailedError

RETRY_FIRST, RETRY_MOST = 0.002, 0.1  # seconds between tries to connect
POLL_MOST = 0.1  # a reader looks up from the socket this often (for its deadline)


class _Submission:
    __slots__ = ("seq", "frame", "done", "record_id", "error", "sent")

    def __init__(self, seq: int, frame: bytes) -> None:
        self.seq = seq
        self.frame = frame
        self.done = threading.Event()
        self.record_id = 0
        self.error: BaseException | None = None
        self.sent = False  # to some connection (then it may have committed)


class Client:
    """Submissions of one producer to the writer of ``path`` (see the module comment)."""

    def __init__(self, path: str, database_id: bytes, timeout: float) -> None:
        self.path = path
        self.database_id = database_id
        self.timeout = timeout
        self.name = wire.socket_name(path, database_id)
        self.producer = 0  # the id the writer gave (0 until the first WELCOME)
        self._pid = os.getpid()
        self._lock = threading.Condition(threading.Lock())  # the state below
        self._send_lock = threading.Lock()  # what goes on the socket, in seq order; connecting
        self._recv_lock = threading.Lock()  # reading answers (and closing dead sockets)
        self._sock: socket.socket | None = None
        self._frames = wire.Frames()  # the connection's answers, read and not yet framed
        self._dead: list[socket.socket] = []  # shut down, to be closed by the reader
        self._next_seq = 1
        self._inflight: dict[int, _Submission] = {}  # unanswered, in seq order
        self._fatal: BaseException | None = None
        self._closed = False
        self._retry = RETRY_FIRST

    # -- callers ----------------------------------------------------------------------------
    def check_usable(self, what: str) -> None:
        if os.getpid() != self._pid:
            raise ForkedError(f"this {what} was inherited through fork(); open a new one in "
                              "this process")
        if self._closed:
            raise ClosedError(f"this {what} is closed; open a new one")

    def submit(self, kind: int, body: bytes, durable: bool) -> int:
        """Submit and wait for the answer; the record id. Raises the writer's error, or
        NoWriterError when no writer answered within the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self._lock:  # a window slot first, holding no socket lock: a reader that
                self._wait_for_room(deadline)  # connects again needs _send_lock meanwhile
            with self._send_lock:
                with self._lock:
                    if len(self._inflight) >= wire.WINDOW:
                        continue  # another caller took the slot
                    if self._fatal is not None:
                        raise self._fatal
                    seq = self._next_seq
                    self._next_seq += 1
                    sub = _Submission(seq, wire.submit(seq, durable, kind, body))
                    self._inflight[seq] = sub
                    sock = self._sock
                if sock is not None:  # (else the first reader connects, and sends it then)
                    self._send(sock, sub)
                break
        self._await(sub, deadline)
        if sub.error is not None:
            raise sub.error
        return sub.record_id

    def _wait_for_room(self, deadline: float) -> None:
        """Until fewer than WINDOW submissions are unanswered (``_lock`` held)."""
        if self._fatal is not None:
            raise self._fatal
        while len(self._inflight) >= wire.WINDOW:
            left = deadline - time.monotonic()
            if left <= 0 or self._closed:
                raise NoWriterError(f"the writer of {self.path} answered none of this "
                                    f"producer's last {wire.WINDOW} submissions within "
                                    f"{self.timeout} s; nothing was sent for this one")
            self._lock.wait(left)

    def _send(self, sock: socket.socket, sub: _Submission) -> None:
        """Send one submission (``_send_lock`` held); a failed send ends the connection, and
        the submission goes again on the next one."""
        try:
            sock.sendall(sub.frame)
            sub.sent = True
        except OSError:
            sub.sent = True  # part of it may have gone: the writer may have it whole
            self._drop(sock)

    def _await(self, sub: _Submission, deadline: float) -> None:
        """Wait for ``sub``'s answer, reading the connection whenever no other caller does."""
        while not sub.done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                self._give_up(sub)
                return
            if not self._recv_lock.acquire(timeout=min(left, POLL_MOST)):
                continue  # another caller reads; it hands our answer over
            try:
                if not sub.done.is_set():
                    self._read_once(min(left, POLL_MOST))
            finally:
                self._recv_lock.release()

    def _give_up(self, sub: _Submission) -> None:
        with self._lock:
            if sub.done.is_set():
                return
            self._inflight.pop(sub.seq, None)  # never sent again
            self._lock.notify_all()
        raise NoWriterError(
            f"no writer of {self.path} answered within {self.timeout} s"
            + ("; the submission was sent and may have committed (the writer stopped or died "
               "before answering)" if sub.sent else ": start a Writer on it (nothing was sent)"))

    def _read_once(self, timeout: float) -> None:
        """One step of the reader (``_recv_lock`` held): close dead sockets, connect if there
        is no connection, else wait up to ``timeout`` for answers and hand them over."""
        while self._dead:
            self._dead.pop().close()
        sock = self._sock
        if sock is None:
            with self._send_lock:
                if self._sock is None and not self._closed:
                    self._connect()
            if self._sock is None:
                time.sleep(min(self._retry, timeout))
                self._retry = min(2 * self._retry, RETRY_MOST)
            else:
                self._retry = RETRY_FIRST
            return
        try:
            ready = select.select([sock], [], [], timeout)[0]
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT) if ready else None
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError):
            data = b""
        if data is None:
            return
        if not data:
            self._drop(sock)
            return
        self._frames.feed(data)
        try:
            self._answers(self._frames.pop())
        except (wire.ProtocolError, ValueError):
            self._drop(sock)

    def close(self) -> None:
        """Fail what waits with ClosedError and close the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for sub in self._inflight.values():
                sub.error = ClosedError("the producer was closed while this submission waited; "
                                        "it may have committed")
                sub.done.set()
            self._inflight.clear()
            sock = self._sock
            self._lock.notify_all()
        if sock is not None:
            self._drop(sock)
        if self._recv_lock.acquire(timeout=1.0):  # a reader sees the shut-down socket at once
            try:
                while self._dead:
                    self._dead.pop().close()
            finally:
                self._recv_lock.release()

    # -- the connection -------------------------------------------------------------------------
    def _connect(self) -> None:
        """Connect and HELLO; resolve what committed, send the rest (``_send_lock`` and
        ``_recv_lock`` held). Leaves ``_sock`` None when no writer answers now."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.name)
            with self._lock:
                asked = [s for s, sub in self._inflight.items() if sub.sent]
            sock.sendall(wire.hello(self.database_id, self.producer, asked))
            frames = wire.Frames()
            while True:
                got = frames.pop()
                if got:
                    break
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "closed before WELCOME")
                frames.feed(data)
            kind, payload = got[0]
            if kind == wire.REFUSED:
                self._refused_hello(payload)
                sock.close()
                return
            if kind != wire.WELCOME:
                raise wire.ProtocolError(f"frame {kind} instead of WELCOME")
            self.producer, committed = wire.parse_welcome(payload)
            with self._lock:
                for seq, rid in committed.items():
                    sub = self._inflight.pop(seq, None)
                    if sub is not None:
                        sub.record_id = rid
                        sub.done.set()
                again = list(self._inflight.values())
                self._lock.notify_all()
            for sub in again:
                sock.sendall(sub.frame)
                sub.sent = True
            self._frames = frames
            with self._lock:
                self._sock = sock
            self._answers(got[1:])  # answers that came with the WELCOME
        except (OSError, wire.ProtocolError):
            sock.close()

    def _refused_hello(self, payload: bytes) -> None:
        """The writer will not take this producer (another database, an unknown id): every
        submission fails with its reason, and so will later ones."""
        _, _, name, message = wire.parse_refused(payload)
        err = _error(name, message, 0)
        with self._lock:
            self._fatal = err
            for sub in self._inflight.values():
                sub.error = err
                sub.done.set()
            self._inflight.clear()
            self._lock.notify_all()

    def _answers(self, got: list[tuple[int, bytes]]) -> None:
        with self._lock:
            for kind, payload in got:
                if kind == wire.ACK:
                    seq, rid = wire.PAIR.unpack(payload)
                    err = None
                elif kind == wire.REFUSED:
                    seq, rid, name, message = wire.parse_refused(payload)
                    err = _error(name, message, rid)
                else:
                    raise wire.ProtocolError(f"frame {kind} from the writer")
                sub = self._inflight.pop(seq, None)
                if sub is not None:
                    sub.record_id = rid
                    sub.error = err
                    sub.done.set()
            self._lock.notify_all()

    def _drop(self, sock: socket.socket) -> None:
        """End a connection (any thread): shut it down now, close it in the reader; the next
        reader connects again."""
        with self._lock:
            if self._sock is sock:
                self._sock = None
                self._dead.append(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _error(name: str, message: str, record_id: int) -> BaseException:
    """The mpwal error a REFUSED names (WriterFailedError for a name that is not one)."""
    cls: Any = getattr(_errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Error)):
        cls = WriterFailedError
    if issubclass(cls, OSError):  # StorageError: (errno, message)
        err = cls(errno.EIO, message)
    else:
        err = cls(message)
    if record_id:
        err.record_id = record_id
    return err
