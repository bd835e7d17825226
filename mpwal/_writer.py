"""The writer: the one process that appends records to the log and publishes them to readers.

A thin wiring of stages, each in its own module, run under one lock of the writer process:

* intake (``Writer._commit``): a ``Record`` (a change set, ``_record.py``) is validated and
  encoded, then goes through the stages below;
* room (``_publisher.py``): free what the enactor applied; if the overlay or the un-enacted log
  bytes are over their limits, grow the overlay into a new generation or wait (backpressure);
* append (``_appender.py``): the record's id and bytes go to the appending log (invariant 1:
  bytes in the log first); it rotates into the read queue past ``log_size``;
* publish (``_publisher.py``): the versions, then the watermark (``_overlay.py``); readers see
  all of the record or none of it and never wait for it;
* durability (``_durability.py``): with ``durability="commit"`` the commit waits, outside the
  lock, until an fsync covers it; one thread fsyncs for every commit waiting (group commit).
  ``sync()`` does the same for everything committed so far.

Open: the writer takes ``writer.lock`` (the directory's one writer), checks the directory is an
mpwal database or empty, merges the table definitions, creates the reader table (``_pins.py``),
replays the logs (``_replay.py``), upgrades a format-1 directory, and starts the enactor
(``_supervisor.py``). A housekeeping thread frees enacted versions, rotates logs older than
``log_age`` and keeps an enactor running.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import filelock

from . import _fileio as fileio, _pins as pins, _wire as wire
from ._durability import GroupCommit
from ._appender import Appender
from ._enactor import Enactor, Handoff
from ._intake import Intake, LayerHandler
from ._publisher import Publisher
from ._supervisor import EnactorSupervisor
from ._errors import (ArgumentRangeError, ArgumentTypeError, BackpressureError, ClosedError,
                     DatabaseError, Error, ForkedError, StorageError, WriterFailedError, storage_error)
from ._format import encode_log_header
from ._overlay import COMMITTED, DURABLE, ENACTED, ENACTING, ENACTOR_PID, IMAGE_BYTES, OverlayWriter
from ._platform import check_machine
from ._queues import ENACTOR_LOCK, QueueState, QueueStore, WriterLock, file_lock
from ._replay import replay
from ._record import ChangeSet, Record
from ._tables import (META_FILE, TableError, TableFiles, check_key, check_layer, database_id,
                      is_database, load_catalog, merge_catalog, upgrade_meta)
from ._tables import IndexTable, ValueTable

log = logging.getLogger("mpwal")

_live_writers: weakref.WeakSet[Writer] = weakref.WeakSet()
FREE_PER_COMMIT = 256  # overlay versions a commit frees at least, when the enactor applied them
FREE_PER_TICK = 8192  # and the housekeeping thread every 20 ms
_LEFT_BY_FAILED_OPEN = re.compile(r"(writer|queue|enactor)\.lock|readers|(index|value)\d+\.tbl|"
                                  r"(mpwal\.meta|queues)\.tmp\d+")


class Writer:
    """The one writer of a database directory. Thread-safe; a context manager.

    Options (all keyword-only):

    * ``sync_wal`` (True): fsync each log when it is rotated.
    * ``sync_data`` (True): fsync the tables before a log holding their data is truncated.
    * ``durability``: ``"relaxed"`` (default; commits return once the record is in the log file
      and visible to readers) or ``"commit"`` (each commit returns once it is on disk; threads
      share fsyncs).
    * ``log_size`` (64 MiB) and ``log_age`` (1 s): rotate the appending log past this size, or
      when it is this old and not empty.
    * ``enactor``: ``"thread"`` (default), ``"process"``, or ``"none"`` (run ``mpwal enactor PATH``
      yourself).
    * ``overlay_slots`` / ``overlay_bytes`` (2**20, 256 MiB): first shared-memory capacity
      (hash slots, half of them usable; data bytes). Pages are allocated only when touched and
      given back when the overlay empties; capacity doubles up to ``max_overlay_bytes``.
    * ``max_pending_bytes`` (1 GiB): un-enacted log bytes allowed before commits wait.
    * ``backpressure_timeout`` (30 s): how long a commit waits for room before
      ``BackpressureError``.
    * ``max_snapshot_age`` (60 s): a reader's snapshot holds enactment back for at most this
      long; after it, its reads raise ``SnapshotExpiredError``.
    * ``max_retained_bytes`` (1 GiB): logs kept for the change feed's cursors at most; past it
      the slowest cursor is dropped (``_retention.py``).
    * ``replica``: only for ``mpwal follow``, the one writer of a replica directory (any other
      Writer refuses one with ``DatabaseError``).
    """

    # set while __init__ opens; a Writer that __init__ returned has all four
    _wlock: WriterLock
    _files: TableFiles
    _publisher: Publisher
    _appender: Appender

    def __init__(self, path: str | os.PathLike[str], tables: Iterable[IndexTable | ValueTable] = (), *,
                 sync_wal: bool = True, sync_data: bool = True, durability: str = "relaxed",
                 log_size: int = 64 << 20, log_age: float = 1.0, enactor: str = "thread",
                 overlay_slots: int = 1 << 20, overlay_bytes: int = 256 << 20,
                 max_overlay_bytes: int = 1 << 30, max_pending_bytes: int = 1 << 30,
                 backpressure_timeout: float = 30.0, max_snapshot_age: float = 60.0,
                 max_retained_bytes: int = 1 << 30, layer: dict[str, Any] | None = None,
                 replica: bool = False) -> None:
        check_machine()
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if durability not in ("relaxed", "commit"):
            raise ArgumentRangeError(f"durability must be 'relaxed' or 'commit', not {durability!r}")
        if enactor not in ("thread", "process", "none"):
            raise ArgumentRangeError(f"enactor must be 'thread', 'process' or 'none', not {enactor!r}")
        for name, v, lo in (("log_size", log_size, 1), ("overlay_slots", overlay_slots, 16),
                            ("overlay_bytes", overlay_bytes, 4096),
                            ("max_overlay_bytes", max_overlay_bytes, 4096),
                            ("max_pending_bytes", max_pending_bytes, 1),
                            ("max_retained_bytes", max_retained_bytes, 0)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ArgumentTypeError(f"{name} must be an int, not {type(v).__name__}")
            if v < lo:
                raise ArgumentRangeError(f"{name} must be at least {lo}, got {v}")
        if overlay_slots & (overlay_slots - 1):
            raise ArgumentRangeError(f"overlay_slots must be a power of two, got {overlay_slots}")
        for name, secs in (("log_age", log_age), ("backpressure_timeout", backpressure_timeout),
                           ("max_snapshot_age", max_snapshot_age)):
            if not isinstance(secs, (int, float)) or isinstance(secs, bool) or not secs >= 0:
                raise ArgumentRangeError(f"{name} must be a number of seconds >= 0, got {secs!r}")
        self.path = os.path.realpath(os.fspath(path))
        self.sync_wal = bool(sync_wal)
        self.sync_data = bool(sync_data)
        self.durability = durability
        self.log_size = log_size
        self.log_age = float(log_age)
        self.enactor_mode = enactor
        self.max_overlay_bytes = max(max_overlay_bytes, overlay_bytes)
        self.max_pending_bytes = max_pending_bytes
        self.backpressure_timeout = float(backpressure_timeout)
        self.max_snapshot_age = float(max_snapshot_age)
        self.max_retained_bytes = max_retained_bytes
        self._pid = os.getpid()
        self._closed = False
        self._forked = False
        self._failed: BaseException | None = None
        self._lock = threading.RLock()
        self._group = GroupCommit(self._publish_durable)
        # the enactor thread takes rotated logs' records from here instead of parsing the file
        self._handoff: Handoff | None = Handoff() if enactor == "thread" else None
        self._handing: list | None = None  # the appending log's list in _handoff
        self._intake: Intake | None = None  # producers' submissions (``_intake.py``)
        # a layer's own submissions from producers (KVWriter sets it): (body, tag) -> record id
        self._layer_handler: LayerHandler | None = None

        self._open_dir()
        self._check_is_ours()  # before creating anything in a stranger's directory
        self._wlock = WriterLock(self.path)
        try:
            self._check_is_ours()  # again under the lock: no other writer can change it now
            if is_database(self.path):  # a layer's directory opens only through that layer
                check_layer(self.path, None if layer is None else layer["kind"])
                if not replica:
                    _check_not_replica(self.path)
            everything, serve = self._merge_tables(tables, layer)
            # what records of this process may change: the reserved table is the intake's
            self._catalog = {t: d for t, d in everything.items() if t != wire.PRODUCER_TABLE or not serve}
            self._files = TableFiles(self.path, everything, writable=False, mapped=True)
            self._queues = QueueStore(self.path)
            pins.create(self.path, self.max_snapshot_age)
            last = self._replay(overlay_slots, overlay_bytes)
            # format 1 is upgraded here, once replay emptied its headerless logs
            header = encode_log_header(upgrade_meta(self.path), self._queues.epoch())
            self._appender = Appender(
                self.path, self._queues, header, last + 1, sync_wal=self.sync_wal,
                sync_new_names=self.sync_wal or durability == "commit", log_size=log_size,
                fail=self._fail, stop=self._stop_for, log_started=self._log_started,
                rotated=self._group.advance)
            self._supervisor = EnactorSupervisor(self.path, enactor, self._handoff)
            self._supervisor.start()
            self._intake = self._start_intake(serve)
        except BaseException:  # leave no lock, descriptor or segment behind
            if hasattr(self, "_supervisor"):
                self._supervisor.stop()
            if hasattr(self, "_publisher"):
                self._publisher.retire()
            if hasattr(self, "_files"):
                self._files.close()
            self._wlock.release()
            raise
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="mpwal-housekeeping",
                                             daemon=True)
        _live_writers.add(self)
        self._housekeeper.start()

    # -- opening -----------------------------------------------------------------------------
    def _open_dir(self) -> None:
        """Create the database directory (its last component only, mode 0700) if it is new."""
        try:
            os.mkdir(self.path, 0o700)
            os.chmod(self.path, 0o700)  # mkdir's mode is masked by the umask
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise DatabaseError(
                f"cannot create the database directory {self.path}: its parent "
                f"{os.path.dirname(self.path)} does not exist; create it first") from None
        except OSError as e:
            raise storage_error(e, f"creating the database directory {self.path}") from None
        if not os.path.isdir(self.path):
            raise DatabaseError(f"{self.path} is not a directory; give a directory path")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageError(errno.EACCES, f"no write permission on {self.path} (permission "
                                             "denied: check the directory's owner and mode)")

    def _check_is_ours(self) -> None:
        """Refuse a directory that holds something other than an mpwal database. What a first
        open that failed half-way leaves is not a stranger's data. Only a writer creates files
        here, so once this process holds writer.lock the answer cannot change under it; before
        that, the order of the two looks keeps it right while another writer creates it."""
        names = os.listdir(self.path)  # listed before the test: a writer creating this
        # directory meanwhile writes mpwal.meta before any other file that is not in the regex
        if is_database(self.path):
            return
        stray = [n for n in names if not _LEFT_BY_FAILED_OPEN.fullmatch(n)]
        if stray:
            raise DatabaseError(
                f"{self.path} is not empty and is not an mpwal database (no {META_FILE}; it "
                f"holds {', '.join(sorted(stray)[:3])}{' ...' if len(stray) > 3 else ''}): "
                "give an empty or new directory")

    def _merge_tables(self, tables: Iterable[IndexTable | ValueTable],
                      layer: dict[str, Any] | None) -> tuple[dict, bool]:
        """Record the tables in the metadata (``merge_catalog``), with the producers' reserved
        table (``_wire.py``); the catalog, and whether producers can be served (not when an
        older directory defined that table id itself)."""
        reserved = ValueTable(wire.PRODUCER_TABLE, wire.PRODUCER_SLOT_SIZE)
        try:
            tables = list(tables)
        except TypeError:
            raise TableError(f"tables must be a list of IndexTable and ValueTable, not "
                             f"{type(tables).__name__}") from None
        existing = load_catalog(self.path).get(wire.PRODUCER_TABLE) if is_database(self.path) else None
        serve = existing is None or existing == reserved
        if serve and any(getattr(t, "id", None) == wire.PRODUCER_TABLE for t in tables):
            raise TableError(f"table {wire.PRODUCER_TABLE} is reserved (it records producers' "
                             "submissions): use another id")
        return merge_catalog(self.path, [*tables, reserved] if serve else tables, layer), serve

    def _start_intake(self, serve: bool) -> Intake | None:
        """Open the producers' socket (``_wire.py``); without it the writer still works."""
        ident = database_id(self.path)
        assert ident is not None  # upgrade_meta gave it one
        try:
            return Intake(self, self.path, ident, serve)
        except OSError as e:
            log.warning("producers cannot reach this writer: binding its socket failed (%s)", e)
            return None

    def _replay(self, overlay_slots: int, overlay_bytes: int) -> int:
        """Replay the logs (``_replay.py``) and start the new generation's overlay; returns the
        last record id replayed."""

        def start_generation(generation: int, last: int) -> None:
            ov = OverlayWriter(self.path, generation, overlay_slots, overlay_bytes)
            q = ov.q
            q[COMMITTED] = q[DURABLE] = q[ENACTED] = q[ENACTING] = last
            self._publisher = Publisher(self.path, self._queues, self._files, ov,
                                        self.max_overlay_bytes)
            self._group.durable = last

        return replay(self.path, self._queues, self._pid, self.sync_data, start_generation,
                      self.max_retained_bytes)

    # -- the public API ----------------------------------------------------------------------
    def record(self) -> Record:
        """Start one atomic record; use it as a context manager."""
        self._check_usable()
        return Record(self)

    def value(self, table: int, index: int) -> bytes | None:
        """The newest committed value of a slot (overlay first, then the table file)."""
        self._check_usable()
        check_key(self._catalog, table, index, "value")
        with self._lock:
            return self._publisher.value(table, index)

    def index_chunk(self, table: int, chunk: int) -> bytes:
        """The newest committed 512 bytes of an index chunk."""
        self._check_usable()
        check_key(self._catalog, table, chunk, "index")
        with self._lock:
            return self._publisher.chunk(table, chunk)

    def index_entry(self, table: int, chunk: int, entry: int) -> int:
        """One u64 entry (0..63) of an index chunk."""
        if type(entry) is not int or not 0 <= entry < 64:
            if not isinstance(entry, int) or isinstance(entry, bool):
                raise ArgumentTypeError(f"entry must be an int, not {type(entry).__name__}")
            raise ArgumentRangeError(f"entry {entry} is outside 0..63")
        data = self.index_chunk(table, chunk)
        return int.from_bytes(data[entry * 8:entry * 8 + 8], "little")

    @property
    def last_record_id(self) -> int:
        """The newest committed record id (0 before the first)."""
        return self._appender.next_id - 1

    def sync(self) -> int:
        """Return once every record committed before this call is on disk; returns its id."""
        self._check_usable()
        target = self._appender.next_id - 1
        self._group.wait(target, self._flush)
        return target

    def rotate(self) -> None:
        """Move the appending log into the read queue now (it is fsynced first with
        ``sync_wal``), so the enactor can apply every record committed so far; the writer does
        this itself past ``log_size`` bytes or ``log_age`` seconds."""
        self._check_usable()
        with self._lock:
            self._appender.rotate()

    def stats(self) -> dict[str, Any]:
        """Record ids, queues, overlay use and enactor state, for monitoring."""
        self._check_usable()
        with self._lock:
            self._absorb()
            st = self._queues.read() or self._queues.last or QueueState()
            out: dict[str, Any] = {
                "committed": self._appender.next_id - 1,
                "durable": self._group.durable,
                "logs": {"appending": st.appending, "read": list(st.read),
                         "cleanup": list(st.cleanup), "pool": list(st.pool)},
                "rotations": self._appender.rotations,
                "enactor": self.enactor_mode,
                "enactor_pid": self._publisher.ov.q[ENACTOR_PID],
                "enactor_restarts": self._supervisor.restarts,
                "enactor_errors": list(self._supervisor.errors),
                "enactor_holding_lock": self._supervisor.holding,  # (enactor="thread")
                "logs_handed_over": len(self._handoff) if self._handoff is not None else 0,
                "segment": self._publisher.ov.name,
                "producers": len(self._intake.by_producer) if self._intake else 0,
                "producer_submissions": self._intake.submitted if self._intake else 0,
            }
            out.update(self._publisher.stats())
            return out

    def close(self) -> None:
        """Rotate, let the enactor finish, and remove the shared memory. Idempotent."""
        if self._closed or self._forked:
            return
        if self._intake is not None:  # producers' commits first, while this writer commits
            self._intake.close()
        self._closed = True
        _live_writers.discard(self)
        self._stop.set()
        if self._housekeeper is not threading.current_thread():
            self._housekeeper.join()
        try:
            with self._lock:
                if self._failed is None:
                    try:
                        self._appender.rotate()
                    except StorageError:
                        pass  # recorded in _failed; the logs stay for replay
            self._supervisor.stop()
            if self._failed is None:
                self._drain_here()
        finally:
            with self._lock:
                self._appender.close()
                self._files.close()
                self._publisher.retire()
                self._wlock.release()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"record {self._appender.next_id - 1}"
        return f"<mpwal.Writer {self.path} {state}>"

    # -- committing --------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._forked or os.getpid() != self._pid:
            self._forked = True
            raise ForkedError("this Writer was inherited through fork(); the parent still owns "
                              "it: open a Reader (or, after the parent closes, a new Writer) here")
        if self._closed:
            raise ClosedError(f"the Writer of {self.path} is closed; open a new mpwal.Writer")
        if self._failed is not None:
            raise WriterFailedError(
                f"an earlier error ({self._failed!r}) stopped this Writer; committed records are "
                "safe in the log: close it and open a new Writer to replay") from self._failed

    def _commit(self, rec: ChangeSet, *, intake: bool = False) -> int:
        """The intake: one record through the stages, under the writer's lock: make room
        (publisher), append (appender: from here the record is committed), publish (publisher),
        hand it to the enactor thread, rotate when the log is full; then, outside the lock, wait
        for durability (group commit) with ``durability="commit"``. ``intake``: a producer's
        record (``_intake.py``): its tag, (slot, seq), becomes its producer slot, and the
        intake waits for durability itself."""
        values = rec._values
        chunks = rec._chunks
        drops = rec._drops
        app = self._appender
        pub = self._publisher
        with self._lock:
            self._check_usable()
            rid = app.next_id
            if rec._tag is not None:
                values[(wire.PRODUCER_TABLE, rec._tag[0])] = wire.PAIR.pack(rec._tag[1], rid)
            data = rec.encode(rid)
            # everything that can fail on its own comes before the append
            images = pub.images(drops, chunks)
            need = OverlayWriter.blob_size(values.values()) + len(images) * IMAGE_BYTES
            self._make_room(len(values) + len(chunks), need, drops, len(data))
            doubt = False
            try:
                app.append(data, rid)  # raises with the log as it was: nothing committed
                # the record is committed from here on: it is in the log, replay keeps it
                self._publisher.publish(rid, drops, values, images, len(data), need)
                if self._handing is not None:
                    self._handing.append((rid, values, tuple(images), tuple(drops)))
            except BaseException as e:
                if app.next_id == rid:
                    raise  # the append did not happen
                self._in_doubt(e, f"publishing record {rid}")
                if not isinstance(e, Exception):
                    raise  # KeyboardInterrupt, SystemExit: the record stands, the caller stops
                doubt = True  # readers read it from the log now; later commits are refused
            if not doubt and app.full:
                try:
                    app.rotate()
                except StorageError:
                    pass  # the writer is failed for later commits; this record stands
        if self.durability == "commit" and not intake:
            try:
                if doubt:  # the writer stopped: no group commit, fsync the log here
                    with self._lock:
                        app.sync_now()
                else:
                    self._group.wait(rid, self._flush)
            except (OSError, WriterFailedError) as e:
                err = StorageError(getattr(e, "errno", None) or errno.EIO,
                                   f"record {rid} is committed and visible to readers, but the "
                                   f"fsync that would make it durable failed ({e}); close the "
                                   "Writer and open a new one, which replays the log")
                err.record_id = rid
                raise err from e
        return rid

    def _in_doubt(self, e: BaseException, doing: str) -> None:
        """An exception left the overlay in doubt after a record reached the log: stop the
        writer and retire its segment (readers then read the logs and tables, where every
        committed record is whole). A structural window retires it itself if it was open."""
        if self._failed is None:
            self._failed = e
        self._publisher.retire()
        log.error("%s failed (%r): the writer stops accepting commits; readers read the logs",
                  doing, e)

    def _fail(self, e: OSError, doing: str) -> StorageError:
        err = storage_error(e, doing)
        self._failed = err
        log.error("%s: the writer stops accepting commits", err)
        return err

    def _stop_for(self, e: BaseException) -> None:
        self._failed = self._failed or e

    def _log_started(self, first_record_id: int) -> None:
        """A record begins a new log. Hand the log's records to the enactor thread only if it
        holds enactor.lock now, and then all of them: a list must be the whole log (another
        enactor reads the file, and nothing piles up here)."""
        self._handing = None
        if self._handoff is not None and self._supervisor.holding:
            self._handing = self._handoff.start_log(first_record_id)

    def _reserved_value(self, index: int) -> bytes | None:
        """A slot of the producers' reserved table, newest committed (the intake's reads)."""
        with self._lock:
            return self._publisher.value(wire.PRODUCER_TABLE, index)

    # -- room: absorbing enactment, growing, waiting ----------------------------------------
    def _absorb(self, budget: int | None = None) -> None:
        """Free the overlay versions of records the enactor applied (invariant 2): about
        ``budget`` of them at most (None: all)."""
        try:
            self._publisher.absorb(budget)
        except BaseException as e:
            self._in_doubt(e, "freeing enacted versions")
            raise

    def _make_room(self, new_keys: int, need: int, drops: list[int], nbytes: int) -> None:
        """Room for ``new_keys`` entries and ``need`` overlay bytes, and ``nbytes`` more log
        bytes (backpressure): absorb enactment, else grow the overlay, else wait for the
        enactor. A commit frees at most twice the versions it adds (FREE_PER_COMMIT at least)
        unless it is short of room: freeing keeps up, and no commit waits for a whole batch."""
        self._absorb(max(FREE_PER_COMMIT, 2 * new_keys))
        pub = self._publisher

        def fits() -> bool:
            return pub.fits(new_keys, need, drops, nbytes, self.max_pending_bytes)

        if fits():
            return
        self._absorb()
        if fits():
            return
        if need + new_keys * 64 > self.max_overlay_bytes // 2:
            raise BackpressureError(
                f"one record of {need} bytes cannot fit in max_overlay_bytes="
                f"{self.max_overlay_bytes}; split it or raise max_overlay_bytes")
        try:
            grew = pub.grow(new_keys, need)
        except BaseException as e:  # half grown: readers read the logs, the writer stops
            self._in_doubt(e, "growing the overlay")
            raise
        if grew and fits():
            return
        if not pub.pending and not pub.ov.blobs:  # nothing to wait for: enactment frees nothing
            raise BackpressureError(
                f"one record of {need} bytes does not fit the overlay within max_overlay_bytes="
                f"{self.max_overlay_bytes} ({pub.describe()}); split it or raise max_overlay_bytes")
        self._appender.rotate()
        deadline = time.monotonic() + self.backpressure_timeout
        delay = 0.0005
        while True:
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
            self._absorb()
            if fits():
                return
            if not self._closed:
                self._supervisor.supervise()
            if time.monotonic() > deadline:
                raise BackpressureError(
                    f"enactment did not free room within {self.backpressure_timeout} s "
                    f"({pub.describe()}); check that an enactor runs "
                    "(stats()['enactor_errors']) or raise the limits")

    # -- durability --------------------------------------------------------------------------
    def _publish_durable(self, rid: int) -> None:
        self._publisher.ov.q[DURABLE] = rid  # (called with the writer's lock held)

    def _flush(self) -> None:
        """fsync every log committed records are in (group commit's flush): the descriptors are
        taken under the writer's lock, the fsyncs made outside it, so commits go on meanwhile."""
        with self._lock:
            self._check_usable()
            target, fds, handed = self._appender.take_for_flush()
        try:
            self._appender.sync_dir_if_dirty()
            for fd in fds:
                fileio.fdatasync(fd)
            if not self.sync_data:  # the enactor may have written them without it
                self._files.sync(everything=True)
        except OSError as e:
            with self._lock:
                raise self._fail(e, "syncing the log") from None
        finally:
            for fd in fds + handed:
                os.close(fd)
        with self._lock:  # the overlay may be moving to a new generation
            self._group.advance(target)

    # -- background work ---------------------------------------------------------------------
    def _housekeeping(self) -> None:
        """Absorb enactment, rotate old logs, fsync the appending log ahead of its rotation
        (``Appender.presync_fd``) and keep an enactor running, every 20 ms."""
        while not self._stop.wait(0.02):
            try:
                with self._lock:
                    if self._closed or self._failed is not None:
                        continue
                    self._absorb(FREE_PER_TICK)
                    if self._appender.older_than(self.log_age):
                        self._appender.rotate()
                    presync = self._appender.presync_fd()
                if presync is not None:
                    self._presync(presync)
                if not self._closed:
                    self._supervisor.supervise()
            except StorageError:
                pass  # recorded in _failed; the next commit reports it
            except Exception:  # never let housekeeping die silently
                log.exception("mpwal housekeeping")

    def _presync(self, fd: int) -> None:
        """fdatasync the appending log (a duplicate descriptor) outside the lock. Not a fault
        site (its timing is the housekeeping thread's): a failure stops the writer as a failed
        rotation would, since the kernel may have dropped the pages it could not write."""
        try:
            os.fdatasync(fd)
        except OSError as e:
            with self._lock:
                if self._failed is None:
                    self._fail(e, "syncing the appending log")
        finally:
            os.close(fd)

    def _drain_here(self) -> None:
        """Enact and clean everything left, in this process, if no other enactor is at work."""
        lock = file_lock(self.path, ENACTOR_LOCK)
        try:  # our own enactor is stopped; with enactor="none" one started by hand may hold it
            lock.acquire(timeout=5 if self.enactor_mode != "none" else 0.05)
        except filelock.Timeout:
            return  # that enactor finishes the work
        try:
            e = Enactor(self.path)
            e.detach_on_new_writer = False
            try:
                e.drain()
            finally:
                e.close()
            with self._lock:
                self._absorb()
        except (OSError, Error) as e:
            log.error("enacting at close failed (%s); the logs stay for the next replay", e)
        finally:
            lock.release()


REPLICA_FILE = "replica"  # in a replica directory: what it follows (``shipping/_follow.py``)


def _check_not_replica(path: str) -> None:
    """A replica is written only by ``mpwal follow`` (its one writer, ``replica=True``)."""
    p = os.path.join(path, REPLICA_FILE)
    if os.path.exists(p):
        try:
            what = fileio.read_file(p).decode("utf-8", "replace").strip()
        except OSError:
            what = "a stream"
        raise DatabaseError(f"{path} is a replica ({what}): only mpwal follow writes it; read it "
                            f"with mpwal.Reader, or delete {p} to make it a database of its own")


def _after_fork_in_child() -> None:
    for w in list(_live_writers):
        w._forked = True
        if w._intake is not None:
            w._intake.forget_after_fork()
        if w._wlock is not None:
            try:
                os.close(w._wlock.fd)  # the parent's descriptor keeps the OFD lock
            except OSError:
                pass
            w._wlock.fd = -1
    _live_writers.clear()


def _close_at_exit() -> None:
    for w in list(_live_writers):
        if w._pid == os.getpid():
            try:
                w.close()
            except Exception:
                pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
