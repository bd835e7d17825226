"""Every disk write mpwal makes goes through here, so that tests can make any of them fail.

The fault switch counts calls the way parity-db's test builds count down an I/O budget: a
``FaultPlan`` names the Nth call of a kind (``write``, ``fsync``, ``truncate``, ``rename``) and
what happens to it (an ``OSError`` such as EIO or ENOSPC, or a short write of part of the bytes).
Normal runs have no plan and pay one global lookup per call. ``MPWAL_FAULTS`` in the environment
(``kind:n:errno``, ``kind:n:short`` or ``kind:n:stall``) arms a plan in a process started by a
test. A stall (``STALL``) makes the Nth call wait ``STALL_SECONDS`` and then succeed: a slow
disk, so that a test can kill a process while, say, a group commit's fsync is under way.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass, field

KINDS = ("write", "fsync", "truncate", "rename")
_libc = ctypes.CDLL(None, use_errno=True)
_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h
STALL = -1  # a FaultPlan's error that stalls the call instead of failing it
STALL_SECONDS = 3.0


@dataclass
class FaultPlan:
    """Fail the ``nth`` call (1-based) of ``kind``; ``error`` is an errno, 0 for a short write,
    or STALL to make the call wait STALL_SECONDS and then succeed."""

    kind: str
    nth: int
    error: int = errno.EIO
    counts: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    fired: bool = False

    def hit(self, kind: str) -> bool:
        self.counts[kind] += 1
        if not self.fired and kind == self.kind and self.counts[kind] == self.nth:
            self.fired = True
            return True
        return False


_plan: FaultPlan | None = None


def arm(plan: FaultPlan | None) -> None:
    """Install (or with None remove) the fault plan of this process."""
    global _plan
    _plan = plan


def _arm_from_env() -> None:
    spec = os.environ.get("MPWAL_FAULTS")
    if spec:
        kind, nth, err = spec.split(":")
        codes = {"short": 0, "stall": STALL}
        arm(FaultPlan(kind, int(nth), codes[err] if err in codes else int(err)))


def _fail(kind: str) -> None:
    assert _plan is not None
    if _plan.error == STALL:
        time.sleep(STALL_SECONDS)
        return
    raise OSError(_plan.error, os.strerror(_plan.error) + f" (injected {kind} #{_plan.nth})")


def write_all(fd: int, data) -> None:
    """Write every byte of ``data`` at the file position, looping over short writes."""
    view = memoryview(data)
    while view:
        if _plan is not None and _plan.hit("write"):
            if not _plan.error:
                os.write(fd, view[: len(view) // 2])  # a torn write, then the process "dies"
                raise OSError(errno.EIO, "injected short write")
            _fail("write")  # raises, or stalls and goes on
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write every byte of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        if _plan is not None and _plan.hit("write"):
            if not _plan.error:
                os.pwrite(fd, view[: len(view) // 2], offset)
                raise OSError(errno.EIO, "injected short write")
            _fail("write")  # raises, or stalls and goes on
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def fsync(fd: int) -> None:
    if _plan is not None and _plan.hit("fsync"):
        _fail("fsync")
    os.fsync(fd)


def fdatasync(fd: int) -> None:
    if _plan is not None and _plan.hit("fsync"):
        _fail("fsync")
    os.fdatasync(fd)


def truncate(fd: int, length: int) -> None:
    if _plan is not None and _plan.hit("truncate"):
        _fail("truncate")
    os.ftruncate(fd, length)


def punch_hole(fd: int, length: int) -> None:
    """Make the first ``length`` bytes of a file read as zeros without changing its size
    (fallocate PUNCH_HOLE|KEEP_SIZE; zeros written where the file system cannot punch).
    Counted as a ``truncate`` by the fault switch."""
    if _plan is not None and _plan.hit("truncate"):
        _fail("truncate")
    if length <= 0:
        return
    if _libc.fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, ctypes.c_int64(0), ctypes.c_int64(length)):
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        zeros = bytes(1 << 20)
        for off in range(0, length, len(zeros)):
            pwrite_all(fd, zeros[:min(len(zeros), length - off)], off)


def rename(src: str, dst: str) -> None:
    if _plan is not None and _plan.hit("rename"):
        _fail("rename")
    os.replace(src, dst)


def create(path: str, flags: int = os.O_RDWR) -> int:
    """Open ``path``, creating it with mode 0600 if it is missing, owned as its directory is.

    The owner of a database directory must never be locked out of it by another user's open:
    root (the only other user who can open files of mode 0600) gives every file it creates in
    someone else's directory to that directory's owner and group. Returns the descriptor."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    try:
        give_to_dir_owner(fd, os.path.dirname(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def give_to_dir_owner(fd: int, directory: str) -> None:
    """fchown ``fd`` to ``directory``'s owner and group when this process is root and the
    directory belongs to another user (see ``create``); otherwise do nothing."""
    if os.geteuid() != 0:
        return
    st = os.stat(directory or ".")
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def write_file_atomic(path: str, data: bytes, sync: bool = False) -> None:
    """Replace ``path`` with ``data`` by writing a temporary file and renaming it over."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = create(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        try:
            write_all(fd, data)
            if sync:
                fsync(fd)
        finally:
            os.close(fd)
        rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:
        sync_dir(os.path.dirname(path))


def sync_dir(path: str) -> None:
    """fsync a directory so that a rename or a new file in it survives a power loss."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_arm_from_env()
