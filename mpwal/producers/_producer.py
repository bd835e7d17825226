"""``Producer``: commit records to a directory from any process, through its writer."""

from __future__ import annotations

import os
import time
from typing import Any

from .. import _wire as wire
from .._errors import ArgumentRangeError, ArgumentTypeError, DatabaseError, NoWriterError, StorageError
from .._reader import Reader
from .._record import ChangeSet, Record
from .._tables import META_FILE, Table, check_layer, database_id, is_database, load_catalog
from ._client import Client


class Producer:
    """A producer of the writer of ``path`` (DESIGN "Producers"): ``record()`` builds a record
    exactly as ``Writer.record()`` does, and its commit returns once the writer committed it
    (``durability="relaxed"``) or once it is on disk (``"commit"``: one fsync covers the records
    waiting from every producer). Records of one producer commit in the order submitted; a
    commit in flight when the writer dies is committed once, by the next writer (within
    ``timeout``). Thread-safe; a context manager; ``close()`` it (or leave the ``with``).

    Bad input raises at the call, as the writer would; no writer within ``timeout`` seconds
    raises ``NoWriterError``."""

    _kind: str | None = None  # the layer of the directories this class produces for

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0,
                 durability: str = "relaxed") -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if durability not in ("relaxed", "commit"):
            raise ArgumentRangeError(f"durability must be 'relaxed' or 'commit', not {durability!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ArgumentRangeError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.path = os.path.realpath(os.fspath(path))
        self.timeout = float(timeout)
        self.durability = durability
        self._wait_for_database()
        check_layer(self.path, self._kind)
        ident = database_id(self.path)
        if ident is None:
            raise DatabaseError(f"{self.path} is of format 1: open a Writer on it once to "
                                "upgrade it, then producers can reach it")
        self._stamp: tuple[int, int] | None = None
        self._catalog: dict[int, Table] = {}
        self._refresh_catalog()
        self._client = Client(self.path, ident, self.timeout)
        self._reader: Any = None  # opened by the first read through

    def _wait_for_database(self) -> None:
        """A producer may start before the writer that creates the directory: wait for it."""
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while not is_database(self.path):
            if time.monotonic() > deadline:
                raise NoWriterError(f"{self.path} is not an mpwal database, and no writer made it "
                                    f"one within {self.timeout} s: start a Writer on it")
            time.sleep(delay)
            delay = min(2 * delay, 0.1)

    def _refresh_catalog(self) -> None:
        """Validate against the tables the metadata lists now (a writer may have added some)."""
        try:
            st = os.stat(os.path.join(self.path, META_FILE))
        except OSError as e:
            raise StorageError(e.errno, f"reading {META_FILE} of {self.path} failed: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._catalog = {t: d for t, d in load_catalog(self.path).items()
                             if t != wire.PRODUCER_TABLE}
            self._stamp = stamp

    # -- the API ---------------------------------------------------------------------------
    def record(self) -> Record:
        """Start one atomic record (the builder of ``Writer.record()``); its ``with`` block
        commits it through the writer and sets ``record_id``."""
        self._client.check_usable("Producer")
        self._refresh_catalog()
        return Record(self)

    def sync(self) -> int:
        """Return once everything the writer committed before this call is on disk; that id."""
        self._client.check_usable("Producer")
        return self._client.submit(wire.SYNC, b"", True)

    @property
    def producer_id(self) -> int:
        """The id the writer gave this producer (0 before its first commit)."""
        return self._client.producer

    def close(self) -> None:
        """Close the connection (a commit still waiting in another thread raises ClosedError)."""
        self._client.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpwal.{type(self).__name__} {self.path} producer {self._client.producer}>"

    # -- what a Record needs of its committer --------------------------------------------------
    def value(self, table: int, index: int) -> bytes | None:
        """The newest committed value of a slot (through a Reader of the directory)."""
        return self._reads().value(table, index)

    def index_entry(self, table: int, chunk: int, entry: int) -> int:
        """One committed entry of an index chunk (through a Reader)."""
        return self._reads().index_entry(table, chunk, entry)

    def _reads(self) -> Any:
        self._client.check_usable("Producer")
        if self._reader is None:
            self._reader = Reader(self.path)
        return self._reader

    def _commit(self, rec: ChangeSet) -> int:
        self._client.check_usable("Producer")
        return self._client.submit(wire.RECORD, rec.encode(0), self.durability == "commit")
