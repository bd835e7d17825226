"""The publisher: the writer's stage that owns its shared-memory overlay.

It publishes each appended record's versions and raises the watermark (``_overlay.py`` has the
protocol), frees the versions of records the enactor applied (invariant 2: only once their data
is in the table files and, because the enactor honours pins, no snapshot needs them), grows the
overlay into a new generation when it fills, and answers the writer's own reads (the newest
version, else the table file). Every method runs under the writer's lock.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from ._errors import StorageError
from ._format import CHUNK_BYTES
from ._overlay import (CLOSED, ENACTED, ENACTING, MAX_DROPS, MISS, SUPERSEDED_STATE,
                      OverlayWriter)
from ._queues import QueueStore
from ._tables import TableFiles

log = logging.getLogger("mpwal")
ZERO_CHUNK = bytes(CHUNK_BYTES)
Image = tuple[tuple[int, int], bytes]  # ((table, chunk), the chunk's 512-byte after-image)


class Publisher:
    """The overlay of one writer and the records it holds that are not enacted yet."""

    def __init__(self, path: str, queues: QueueStore, files: TableFiles, ov: OverlayWriter,
                 max_overlay_bytes: int) -> None:
        self.path = path
        self.queues = queues
        self.files = files
        self.ov = ov
        self.max_overlay_bytes = max_overlay_bytes
        self.pending: collections.deque = collections.deque()  # (rid, log bytes)
        self.pending_bytes = 0  # log bytes of the pending records

    # -- the writer's reads ------------------------------------------------------------------
    def value(self, table: int, index: int) -> bytes | None:
        got = self.ov.get(table, index)
        return self.files.read_value(table, index) if got is MISS else got

    def chunk(self, table: int, chunk: int) -> bytes:
        got = self.ov.get(table, chunk)
        if got is MISS:
            return self.files.read_chunk(table, chunk)
        return got or ZERO_CHUNK

    def images(self, drops: list[int], chunks: dict[tuple[int, int], Any]) -> list[Image]:
        """((table, chunk), 512-byte after-image) of each index chunk a record changes."""
        images = []
        for (t, c), (_mask, entries) in chunks.items():
            base = bytearray(ZERO_CHUNK if t in drops else self.chunk(t, c))
            for e, v in entries.items():
                base[e * 8:e * 8 + 8] = v.to_bytes(8, "little")
            images.append(((t, c), bytes(base)))
        return images

    # -- publishing --------------------------------------------------------------------------
    def publish(self, rid: int, drops: list[int], values: dict[tuple[int, int], bytes | None],
                images: list[Image], nbytes: int, size: int | None = None) -> None:
        """Make record ``rid`` visible: its versions first, then the watermark. ``size``: its
        overlay bytes (``OverlayWriter.blob_size``), if known."""
        self.ov.publish(rid, values.items(), images, drops, size)
        self.pending.append((rid, nbytes))
        self.pending_bytes += nbytes

    def absorb(self, budget: int | None = None) -> None:
        """Free the versions of the records the enactor applied: about ``budget`` of them at
        most (None: all; see ``OverlayWriter.free_enacted``)."""
        ov = self.ov
        enacted = ov.load_acquire(ENACTED)
        pend = self.pending
        while pend and pend[0][0] <= enacted:
            self.pending_bytes -= pend.popleft()[1]
        if (ov.blobs and ov.blobs[0][0] <= enacted) or ov.pending_drops:
            ov.free_enacted(enacted, budget)

    # -- room --------------------------------------------------------------------------------
    def fits(self, new_keys: int, need: int, drops: list[int], nbytes: int,
             max_pending_bytes: int) -> bool:
        """Whether a record of ``new_keys`` keys, a ``need``-byte blob, ``drops`` and
        ``nbytes`` log bytes fits now."""
        ov = self.ov
        return (ov.room_for(new_keys, need)
                and (self.pending_bytes + nbytes <= max_pending_bytes or not self.pending)
                and len(ov.pending_drops) + len(drops) <= MAX_DROPS)

    def grow(self, new_keys: int, need: int) -> bool:
        """Move to a generation with twice the capacity, if the limits allow; readers follow."""
        old = self.ov
        if old.room_for(new_keys, need):
            return False  # what is short is not the overlay
        nslots = old.nslots
        while (old.nkeys + new_keys) > nslots // 2:
            nslots *= 2
        heap = old.heap_bytes
        while old.used + need > heap // 2:  # copied blobs are packed; keep half free
            heap *= 2
        if nslots == old.nslots and heap == old.heap_bytes:
            nslots *= 2
            heap *= 2
        while heap + nslots * 32 > self.max_overlay_bytes and heap // 2 >= old.used + need \
                and heap // 2 > old.heap_bytes:
            heap //= 2  # past the limit with half free: less free room, as long as it fits
        if heap + nslots * 32 > self.max_overlay_bytes:
            return False
        gen = old.generation + 1
        try:
            new = OverlayWriter(self.path, gen, nslots, heap)
        except StorageError as e:
            log.warning("cannot grow the overlay: %s", e)
            return False
        try:
            new.copy_from(old)  # no reader knows the new generation yet
            new.q[ENACTED] = max(new.q[ENACTED], old.q[ENACTED])
            new.q[ENACTING] = max(new.q[ENACTING], old.q[ENACTING])
            # the old generation names its successor before the queue state does, so a reader
            # (or a pinning snapshot) that finds the old one retired moves on, and one that
            # reads the queue state finds the new one live
            old.retire(SUPERSEDED_STATE, gen)
            self.queues.set_generation(gen)
            new.q[ENACTED] = max(new.q[ENACTED], old.q[ENACTED])  # the enactor may have moved
            new.q[ENACTING] = max(new.q[ENACTING], old.q[ENACTING])
        except BaseException:
            new.retire(CLOSED)
            new.release()
            raise  # the writer stops (its caller): old is retired or the state is in doubt
        self.ov = new
        old.release()
        log.debug("overlay grew to generation %d: %d slots, %d heap bytes", gen, nslots, heap)
        return True

    def describe(self) -> str:
        ov = self.ov
        return (f"overlay {ov.used} of {ov.heap_end - ov.heap_start} bytes, {ov.nkeys} "
                f"entries, {self.pending_bytes} log bytes pending")

    def stats(self) -> dict[str, Any]:
        ov = self.ov
        return {
            "enacted": ov.q[ENACTED],
            "generation": ov.generation,
            "pending_bytes": self.pending_bytes,
            "pending_records": len(self.pending),
            "overlay_entries": ov.nkeys,
            "overlay_bytes": ov.used,
            "overlay_capacity_entries": ov.nslots // 2,
            "overlay_capacity_bytes": ov.heap_bytes,
        }

    def retire(self) -> None:
        """The writer stops (closed, or in doubt): readers leave this generation."""
        self.ov.retire(CLOSED)
