"""The producer protocol: how a producer process hands records to the writer, and how the
writer answers. This module is its specification; ``_intake.py`` is the writer's side,
``producers/`` the producers'.

Transport: a Unix stream socket in Linux's abstract namespace, named from the directory's real
path and its database id (``socket_name``). The writer binds it while it holds ``writer.lock``,
so at most one process answers; the name disappears with the socket when the writer exits or
dies, so a stale name can never be found. The kernel tells each side at once when the other
dies (end of stream), which is most of what a crash-safe protocol needs: there is no shared
state to repair, nothing a dead producer holds, and a producer that dies half-way through a
frame leaves a torn frame that the writer discards with the connection. (A shared-memory ring
would save the two system calls per record but needs claim/fill/consume states that survive
either side's death; with group commit the socket is not what limits a producer: see
``mpwal bench``'s producers figure.)

Every message is a frame: ``length u32`` (of what follows, at most ``MAX_FRAME``), ``type
u8``, then the payload. Integers are little-endian.

Producer to writer:

* ``HELLO``: ``magic "MPWP"  version u16  database_id[16]  producer u64  n u32  seq u64 × n``.
  The first frame of every connection. ``producer`` is 0 for a new producer (the writer gives
  it an id) or the id the producer had; the seqs are its submissions sent to an earlier
  connection and not answered, which the writer reports on.
* ``SUBMIT``: ``seq u64  flags u8  kind u8  body``. ``seq`` counts the producer's submissions
  from 1, each connection's in increasing order. ``flags`` bit 0: answer once the record is on
  disk (``durability="commit"``). ``kind``: ``RECORD`` (the body is one log record, as
  ``_format.py`` lays it out, under record id 0: the writer gives it its id), ``LAYER`` (the
  body is changes of the layer the directory belongs to, ``kv/_ops.py``, planned by the writer)
  or ``SYNC`` (no body: answer once everything committed so far is on disk).

Writer to producer:

* ``WELCOME``: ``producer u64  n u32  (seq u64, record_id u64) × n``: the producer's id and
  which of the seqs its HELLO named were committed, with their record ids. The others were not
  and never will be: the producer sends them again.
* ``ACK``: ``seq u64  record_id u64``: committed (and on disk, if the flag asked for it).
* ``REFUSED``: ``seq u64  record_id u64  name_len u8  name  message``: the submission raised
  the ``mpwal`` error ``name`` in the writer (``message`` in UTF-8). ``record_id`` is 0, or,
  when only the fsync failed, the id of the record that did commit.

Exactly once. A record committed for (producer, seq) also writes, in the same record, slot
``producer * WINDOW + seq % WINDOW`` of the reserved value table ``PRODUCER_TABLE`` with
``seq u64  record_id u64``; slot 0 holds the next producer id to give. A producer has at most
``WINDOW`` submissions unanswered, so the slot of an unanswered seq names it or an older seq,
never a newer one, and a writer (this one or the next, after replay) knows from the tables alone
whether a seq committed. Before a WELCOME the writer closes the producer's earlier connection,
so nothing sent there can commit after the answer.
"""

from __future__ import annotations

import hashlib
import struct

HELLO, SUBMIT, WELCOME, ACK, REFUSED = 1, 2, 3, 4, 5
RECORD, LAYER, SYNC = 0, 1, 2
DURABLE_FLAG = 1
MAGIC = b"MPWP"
VERSION = 1
MAX_FRAME = 1 << 30  # the largest frame either side accepts
WINDOW = 64  # a producer's unanswered submissions at most
PRODUCER_TABLE = 0xFFFF  # the reserved value table of (seq, record id) slots
PRODUCER_SLOT_SIZE = 16
MAX_MESSAGE = 2000  # characters of a REFUSED message

FRAME = struct.Struct("<IB")
HELLO_HEAD = struct.Struct("<4sH16sQI")
SUBMIT_HEAD = struct.Struct("<QBB")
WELCOME_HEAD = struct.Struct("<QI")
PAIR = struct.Struct("<QQ")  # (seq, record id): WELCOME's pairs, ACK, a producer slot
REFUSED_HEAD = struct.Struct("<QQB")
COUNTER = struct.Struct("<Q")  # slot 0: the next producer id


class ProtocolError(Exception):
    """A frame that does not follow this protocol (the connection is closed)."""


def socket_name(realpath: str, database_id: bytes) -> bytes:
    """The writer's abstract socket address (a leading NUL byte: Linux's abstract namespace)."""
    digest = hashlib.blake2b(realpath.encode() + database_id, digest_size=12).hexdigest()
    return b"\0mpwal-" + digest.encode()


def frame(kind: int, payload: bytes) -> bytes:
    return FRAME.pack(len(payload) + 1, kind) + payload


def slot_of(producer: int, seq: int) -> int:
    """The PRODUCER_TABLE slot that records a producer's submission ``seq``."""
    return producer * WINDOW + seq % WINDOW


def hello(database_id: bytes, producer: int, seqs: list[int]) -> bytes:
    return frame(HELLO, HELLO_HEAD.pack(MAGIC, VERSION, database_id, producer, len(seqs))
                 + struct.pack(f"<{len(seqs)}Q", *seqs))


def parse_hello(payload: bytes) -> tuple[bytes, int, list[int]]:
    """(database_id, producer, seqs) of a HELLO; ProtocolError if it is not one of ours."""
    if len(payload) < HELLO_HEAD.size:
        raise ProtocolError("short HELLO")
    magic, version, dbid, producer, n = HELLO_HEAD.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"HELLO of another protocol ({magic!r} version {version})")
    if n > WINDOW or len(payload) != HELLO_HEAD.size + 8 * n:
        raise ProtocolError(f"HELLO naming {n} seqs in {len(payload)} bytes")
    return dbid, producer, list(struct.unpack_from(f"<{n}Q", payload, HELLO_HEAD.size))


def submit(seq: int, durable: bool, kind: int, body: bytes) -> bytes:
    return frame(SUBMIT, SUBMIT_HEAD.pack(seq, DURABLE_FLAG if durable else 0, kind) + body)


def welcome(producer: int, committed: list[tuple[int, int]]) -> bytes:
    return frame(WELCOME, WELCOME_HEAD.pack(producer, len(committed))
                 + b"".join(PAIR.pack(s, r) for s, r in committed))


def parse_welcome(payload: bytes) -> tuple[int, dict[int, int]]:
    producer, n = WELCOME_HEAD.unpack_from(payload)
    if len(payload) != WELCOME_HEAD.size + PAIR.size * n:
        raise ProtocolError("WELCOME of the wrong length")
    return producer, dict(PAIR.unpack_from(payload, WELCOME_HEAD.size + PAIR.size * i)
                          for i in range(n))


def ack(seq: int, record_id: int) -> bytes:
    return frame(ACK, PAIR.pack(seq, record_id))


def refused(seq: int, record_id: int, name: str, message: str) -> bytes:
    n = name.encode()[:255]
    return frame(REFUSED, REFUSED_HEAD.pack(seq, record_id, len(n)) + n
                 + message[:MAX_MESSAGE].encode("utf-8", "replace"))


def parse_refused(payload: bytes) -> tuple[int, int, str, str]:
    seq, rid, n = REFUSED_HEAD.unpack_from(payload)
    at = REFUSED_HEAD.size
    return (seq, rid, payload[at:at + n].decode("ascii", "replace"),
            payload[at + n:].decode("utf-8", "replace"))


class Frames:
    """Splits a byte stream into frames: ``feed`` bytes, then take the complete ``(type,
    payload)`` frames from ``pop``. ProtocolError on a length past MAX_FRAME or of 0."""

    __slots__ = ("buf", "limit")

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> None:
        self.buf += data

    def pop(self) -> list[tuple[int, bytes]]:
        out = []
        buf = self.buf
        at = 0
        while len(buf) - at >= FRAME.size:
            length, kind = FRAME.unpack_from(buf, at)
            if not 1 <= length <= self.limit:
                raise ProtocolError(f"a frame of {length} bytes (at most {self.limit})")
            end = at + 4 + length
            if end > len(buf):
                break
            out.append((kind, bytes(buf[at + FRAME.size:end])))
            at = end
        if at:
            del buf[:at]
        return out
