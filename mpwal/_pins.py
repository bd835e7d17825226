"""The reader table: where snapshots pin their watermark (LMDB's reader table, in a file).

``readers`` in the database directory, created by the writer at open (mode 0600, owned as the
directory is) and mapped ``MAP_SHARED`` by the processes that take snapshots and by the
enactor. Little-endian u64 words::

    header, 64 words (512 bytes)
      0  magic            PINS_MAGIC
      1  version          1
      2  nslots           SLOTS
      3  max_age_ns       the writer's ``max_snapshot_age``, in ns (written at every writer open)
    slots, SLOTS × 8 words (64 bytes each), from byte 512:
      0  pin              the snapshot's record id; 0 = free
      1  pinned_at        CLOCK_MONOTONIC ns when it was pinned (one clock for the machine)
      2  pid              the reader's process id, for ``mpwal inspect``
      3..7 reserved

Protocol:

* A snapshot claims a slot with a non-blocking ``F_OFD_SETLK`` write lock on its 64 bytes,
  taken on a descriptor of its own (OFD locks of two descriptors conflict even in one process;
  the next slot if taken). It stores ``pinned_at``, ``pid``, then ``pin``; releasing stores
  ``pin = 0`` and closes the descriptor, which drops the lock. The kernel drops the lock of a
  dead process, so a dead reader's pin holds nothing: the enactor finds its slot unlocked
  (it can take the lock itself), clears it and lets go.
* The enactor applies no record past the oldest live pin younger than ``max_age_ns``. Both sides
  store, then load the other's word, with a full barrier between (Dekker): the reader stores
  ``pin`` and loads the overlay's ``enacting``; the enactor stores ``enacting`` and loads the
  pins. The barrier is an ``fcntl`` call, which takes a kernel lock (a locked instruction on
  x86-64). So either the reader sees ``enacting`` past its pin and pins again higher, or the
  enactor sees the pin and stays at or below it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time

from . import _fileio as fileio
from ._queues import _FLOCK

READERS_FILE = "readers"
PINS_MAGIC = 0x5350_4E49_5057_4D01  # "\x01MWPINPS" little-endian
PINS_VERSION = 1
HEADER_WORDS = 64
SLOT_WORDS = 8
SLOTS = 256
FILE_BYTES = HEADER_WORDS * 8 + SLOTS * SLOT_WORDS * 8
MAGIC_W, VERSION_W, NSLOTS_W, MAX_AGE_W = range(4)
DEFAULT_MAX_AGE = 60.0


def _slot_word(i: int) -> int:
    return HEADER_WORDS + i * SLOT_WORDS


def _lock(fd: int, kind: int, i: int) -> bool:
    """Take (F_WRLCK) or drop (F_UNLCK) the OFD lock on slot ``i``; False if another holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    _FLOCK.pack(kind, os.SEEK_SET, _slot_word(i) * 8, SLOT_WORDS * 8, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def barrier(fd: int) -> None:
    """A full memory barrier between this process's stores and later loads: an F_OFD_GETLK
    (a kernel lock, taken and released)."""
    fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 1, 0))


def create(path: str, max_age: float, header_only_if_new: bool = False) -> None:
    """Create the reader table if it is missing (the writer, at open) and store ``max_age``
    (with ``header_only_if_new``, only in a table that has no header yet)."""
    fd = fileio.create(os.path.join(path, READERS_FILE))
    try:
        if os.fstat(fd).st_size < FILE_BYTES:
            os.ftruncate(fd, FILE_BYTES)
        m = mmap.mmap(fd, FILE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        q = memoryview(m).cast("Q")
        if not (header_only_if_new and q[MAGIC_W] == PINS_MAGIC):
            q[NSLOTS_W] = SLOTS
            q[VERSION_W] = PINS_VERSION
            q[MAX_AGE_W] = int(max_age * 1e9)
            q[MAGIC_W] = PINS_MAGIC
        q.release()
        m.close()
    finally:
        os.close(fd)


def read_pins(path: str) -> list[dict]:
    """The pinned slots of ``path``'s reader table, read only (for ``mpwal inspect``): slot,
    record id, age in seconds, pid, and whether a live reader holds it (a dead reader's pin
    holds nothing; the enactor clears it). An empty list if there is no table."""
    try:
        fd = os.open(os.path.join(path, READERS_FILE), os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        raw = os.pread(fd, FILE_BYTES, 0)
        if len(raw) < FILE_BYTES:
            return []
        words = memoryview(raw).cast("Q")
        if words[MAGIC_W] != PINS_MAGIC:
            return []
        now = time.monotonic_ns()
        out = []
        for i in range(SLOTS):
            w = _slot_word(i)
            if words[w]:
                probe = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, w * 8, SLOT_WORDS * 8, 0)
                held = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK
                out.append({"slot": i, "record_id": words[w], "age": (now - words[w + 1]) / 1e9,
                            "pid": words[w + 2], "live": held})
        return out
    finally:
        os.close(fd)


class ReaderTable:
    """A mapping of ``readers``; raises FileNotFoundError if the table is missing or not one
    (a directory no writer of this version opened yet)."""

    def __init__(self, path: str) -> None:
        self.file = os.path.join(path, READERS_FILE)
        self.fd = os.open(self.file, os.O_RDWR)
        try:
            if os.fstat(self.fd).st_size < FILE_BYTES:
                raise FileNotFoundError(f"{self.file} is not a reader table")
            self.m = mmap.mmap(self.fd, FILE_BYTES, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.q = memoryview(self.m).cast("Q")
        if self.q[MAGIC_W] != PINS_MAGIC:
            self.close()
            raise FileNotFoundError(f"{self.file} is not a reader table")

    @classmethod
    def open_or_create(cls, path: str) -> ReaderTable:
        """The directory's reader table; a directory that no writer of this version opened yet
        gets one (with the default ``max_snapshot_age``; the next writer sets its own)."""
        try:
            return cls(path)
        except FileNotFoundError:
            create(path, DEFAULT_MAX_AGE, header_only_if_new=True)
            return cls(path)

    @property
    def max_age(self) -> float:
        return self.q[MAX_AGE_W] / 1e9

    # -- the reader's side -------------------------------------------------------------------
    def claim(self) -> tuple[int, int]:
        """A free slot, locked: (slot, descriptor holding its lock). OSError EAGAIN if all are
        taken."""
        fd = os.open(self.file, os.O_RDWR)
        try:
            for i in range(SLOTS):
                if _lock(fd, fcntl.F_WRLCK, i):
                    return i, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        raise OSError(errno.EAGAIN, f"all {SLOTS} snapshot slots of {self.file} are taken")

    def pin(self, i: int, fd: int, record_id: int) -> int:
        """Store the pin of slot ``i`` and pass the barrier; returns ``pinned_at`` (ns)."""
        w = _slot_word(i)
        q = self.q
        now = time.monotonic_ns()
        q[w + 1] = now
        q[w + 2] = os.getpid()
        q[w] = record_id
        barrier(fd)
        return now

    def unpin(self, i: int, fd: int) -> None:
        self.q[_slot_word(i)] = 0
        os.close(fd)  # the last descriptor of its open file description: the lock goes

    # -- the enactor's side ------------------------------------------------------------------
    def oldest(self) -> int | None:
        """The oldest live pin younger than ``max_age``, or None. Clears dead readers' slots."""
        q = self.q
        pins = q[HEADER_WORDS::SLOT_WORDS].tolist()
        if not any(pins):
            return None
        now = time.monotonic_ns()
        max_age = q[MAX_AGE_W]
        best = None
        for i, p in enumerate(pins):
            if not p:
                continue
            if now - q[_slot_word(i) + 1] > max_age:
                continue  # expired: it holds nothing back; its next read raises
            if _lock(self.fd, fcntl.F_WRLCK, i):  # nobody holds it: the reader died
                if q[_slot_word(i)] == p:
                    q[_slot_word(i)] = 0
                _lock(self.fd, fcntl.F_UNLCK, i)
                continue
            if best is None or p < best:
                best = p
        return best

    def barrier(self) -> None:
        barrier(self.fd)

    def close(self) -> None:
        try:
            self.q.release()
            self.m.close()
        except (BufferError, ValueError):
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
