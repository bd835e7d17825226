"""One column of a key-value directory: lookups through any view of the tables, and the plan
of a batch's changes (``_layout.py`` is the spec of every table and slot used here).

A *view* is anything with ``value(table, index)`` and ``chunk(table, chunk)`` that reads at one
watermark: a reader's ``read_with`` view, a snapshot's, or a batch's ``Pending`` (the writer's
newest committed data under the batch's own changes). Lookups only read; ``Pending`` records
what a batch changes so it can become one record.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from .. import _backend
from .._errors import CorruptionError
from . import _layout as L


class View(Protocol):
    def value(self, table: int, index: int) -> bytes | None: ...
    def chunk(self, table: int, chunk: int) -> bytes: ...


class IndexFullError(Exception):
    """Raised inside the plan when a key's index chunk has no empty entry (``_store.py`` turns
    it into the public error)."""


ZERO_CHUNK = bytes(L.CHUNK_ENTRIES * 8)


_CHUNK = struct.Struct(f"<{L.CHUNK_ENTRIES}Q")


def chunk_entries(chunk: bytes) -> list[int]:
    """The 64 u64 entries of a 512-byte index chunk."""
    return list(_CHUNK.unpack(chunk))


def matches(chunk: bytes, bits: int, partial: int) -> list[tuple[int, int, int]]:
    """(entry number, slot, tier) of each entry of an index chunk (of a ``bits``-bit index)
    that is not empty and holds the partial key ``partial``, in order. The reference of
    ``_native.kv_matches``."""
    ab = L.address_bits(bits)
    mask = (1 << ab) - 1
    return [(e, (v & mask) >> L.TIER_BITS, v & ((1 << L.TIER_BITS) - 1))
            for e, v in enumerate(_CHUNK.unpack(chunk)) if v and v >> ab == partial]


def whole_value(data: bytes, key: bytes) -> bytes | None:
    """The value of a WHOLE slot if its key is ``key``, else None; ValueError if the slot is
    not WHOLE or its key runs past its end. The reference of ``_native.kv_whole``."""
    if len(data) < L.WHOLE_HEAD.size or data[0] != L.WHOLE:
        raise ValueError("not a WHOLE slot")
    klen = L.WHOLE_HEAD.unpack_from(data)[1]
    start = L.WHOLE_HEAD.size
    if start + klen > len(data):
        raise ValueError("a WHOLE slot whose key runs past its end")
    if data[start:start + klen] != key:
        return None
    return bytes(data[start + klen:])


def _matches(chunk: bytes, bits: int, partial: int) -> Any:
    native = _backend.native
    return matches(chunk, bits, partial) if native is None else native.kv_matches(chunk, bits, partial)


class Column:
    """The tables of column ``number`` and how to read them."""

    def __init__(self, name: str, number: int, salt: bytes, default_bits: int) -> None:
        self.name = name
        self.number = number
        self.salt = salt
        self.base = L.table_base(number)
        self.header_table = self.base + L.HEADER
        self.default_bits = default_bits

    def tier_table(self, tier: int) -> int:
        return self.base + L.TIER0 + tier

    def header(self, view: View) -> list[int]:
        return chunk_entries(view.chunk(self.header_table, 0))

    def index(self, header: list[int]) -> tuple[int, int]:
        """(index table id, index bits) in use. A header never written: INDEX_A at the
        directory's first size."""
        word = header[L.INDEX]
        if not word:
            return self.base + L.INDEX_A, self.default_bits
        offset, bits = L.index_of(word)
        if offset not in (L.INDEX_A, L.INDEX_B) or not L.MIN_INDEX_BITS <= bits <= L.MAX_INDEX_BITS:
            raise CorruptionError(f"column {self.name!r}: header index word {word:#x} is not valid")
        return self.base + offset, bits

    def reindexing(self, header: list[int]) -> tuple[int, int] | None:
        """(index table id, bits) of the index a reindex is moving into the current one, or
        None."""
        word = header[L.REINDEX]
        if not word:
            return None
        offset, bits = L.index_of(word)
        if offset not in (L.INDEX_A, L.INDEX_B) or not L.MIN_INDEX_BITS <= bits <= L.MAX_INDEX_BITS:
            raise CorruptionError(f"column {self.name!r}: header reindex word {word:#x} is not valid")
        return self.base + offset, bits

    def indexes(self, header: list[int]) -> list[tuple[int, int]]:
        """The index tables a lookup checks, in order: the current one, then the one a reindex
        is emptying (its chunks below the reindex's position are empty already)."""
        old = self.reindexing(header)
        return [self.index(header)] if old is None else [self.index(header), old]

    # -- lookups -----------------------------------------------------------------------------
    def find(self, view: View, key: bytes, header: list[int] | None = None, h: int | None = None
             ) -> tuple[int, int, int, int, int, bytes] | None:
        """Where ``key`` is: (index table, its bits, chunk, entry number, entry, value), or
        None. ``h``: the key's hash, if the caller has it."""
        if header is None:
            header = self.header(view)
        if h is None:
            h = L.key_hash(self.salt, key)
        for table, bits in self.indexes(header):
            c = L.chunk_of(h, bits)
            for e, slot, tier in _matches(view.chunk(table, c), bits, L.partial_of(h, bits)):
                got = self.read_slot(view, slot, tier, key)
                if got is not None:
                    entry = L.make_entry(h, bits, slot, tier)
                    return table, bits, c, e, entry, got
        return None

    def get(self, view: View, key: bytes) -> bytes | None:
        found = self.find(view, key)
        return None if found is None else found[5]

    def read_slot(self, view: View, slot: int, tier: int, key: bytes | None) -> bytes | None:
        """The value stored at (slot, tier) if its key is ``key`` (any key: None), else None."""
        if key is not None and tier < L.MULTIPART:  # the common case: the key check in C
            data = view.value(self.tier_table(tier), slot)
            if not data or data[0] != L.WHOLE:
                return None
            native = _backend.native
            try:
                return whole_value(data, key) if native is None else native.kv_whole(data, key)
            except ValueError:
                raise CorruptionError(f"column {self.name!r}: slot {slot} of tier {tier} is "
                                      "torn") from None
        kv = self.read_pair(view, slot, tier)
        if kv is None or (key is not None and kv[0] != key):
            return None
        return kv[1]

    def read_pair(self, view: View, slot: int, tier: int) -> tuple[bytes, bytes] | None:
        """(key, value) stored at (slot, tier), or None for a slot that holds no value."""
        if not 0 <= tier < L.MULTIPART + 1:
            raise CorruptionError(f"column {self.name!r}: an index entry names tier {tier}")
        data = view.value(self.tier_table(tier), slot)
        if not data:
            return None
        kind = data[0]
        if kind == L.WHOLE and tier < L.MULTIPART:
            (_, klen) = L.WHOLE_HEAD.unpack_from(data)
            start = L.WHOLE_HEAD.size
            if start + klen > len(data):
                raise CorruptionError(f"column {self.name!r}: slot {slot} of tier {tier} is torn")
            return bytes(data[start:start + klen]), bytes(data[start + klen:])
        if kind == L.HEAD and tier == L.MULTIPART:
            _, klen, vlen, nxt = L.HEAD_HEAD.unpack_from(data)
            parts = [data[L.HEAD_HEAD.size:]]
            have = len(parts[0])
            need = klen + vlen
            steps = 0
            while have < need:
                if not nxt or steps > need // L.PART_DATA + 1:
                    raise CorruptionError(f"column {self.name!r}: the parts of slot {slot} end early")
                part = view.value(self.tier_table(L.PARTS), nxt)
                if not part or part[0] != L.PART:
                    raise CorruptionError(f"column {self.name!r}: part {nxt} is missing")
                (_, nxt) = L.PART_HEAD.unpack_from(part)
                parts.append(part[L.PART_HEAD.size:])
                have += len(parts[-1])
                steps += 1
            stream = b"".join(parts)
            return stream[:klen], stream[klen:need]
        return None  # FREE, or a kind that does not belong in this tier

    def part_slots(self, view: View, slot: int) -> list[int]:
        """The PARTS slots of the multipart value whose HEAD is ``slot``."""
        data = view.value(self.tier_table(L.MULTIPART), slot)
        out: list[int] = []
        if not data or data[0] != L.HEAD:
            return out
        nxt = L.HEAD_HEAD.unpack_from(data)[3]
        while nxt and len(out) <= (1 << 40) // L.PART_DATA:
            out.append(nxt)
            part = view.value(self.tier_table(L.PARTS), nxt)
            if not part or part[0] != L.PART:
                break
            nxt = L.PART_HEAD.unpack_from(part)[1]
        return out

    def chunk_pairs(self, view: View, table: int, bits: int, first: int, count: int
                    ) -> list[tuple[bytes, bytes]]:
        """The (key, value) pairs of ``count`` chunks of an index table from ``first`` on."""
        out = []
        for c in range(first, min(first + count, 1 << bits)):
            chunk = view.chunk(table, c)
            if chunk == ZERO_CHUNK:
                continue
            for entry in chunk_entries(chunk):
                if entry:
                    kv = self.read_pair(view, *L.entry_address(entry, bits))
                    if kv is not None:
                        out.append(kv)
        return out


class Pending:
    """A batch's changes over the writer's committed data, readable as a view: index entries
    by (table, chunk) and value slots by (table, slot)."""

    def __init__(self, base: Any) -> None:
        self.base = base  # the Writer: value(t, i) and index_chunk(t, c), newest committed
        # what was read of the Writer, when it is the base: a batch holds the KVWriter's lock,
        # so nothing else commits under it
        self._chunks: dict[tuple[int, int], bytes] | None = None if isinstance(base, Pending) else {}
        self._values: dict[tuple[int, int], bytes | None] | None = None if isinstance(base, Pending) else {}
        self.entries: dict[tuple[int, int], dict[int, int]] = {}
        self.values: dict[tuple[int, int], bytes | None] = {}
        self.drops: set[int] = set()  # index tables emptied by this batch (before its entries)

    def value(self, table: int, index: int) -> bytes | None:
        key = (table, index)
        if key in self.values:
            return self.values[key]
        cache = self._values
        if cache is None:
            return self.base.value(table, index)
        if key not in cache:
            cache[key] = self.base.value(table, index)
        return cache[key]

    def _base_chunk(self, table: int, chunk: int) -> bytes:
        cache = self._chunks
        if cache is None:
            return self.base.index_chunk(table, chunk)
        data = cache.get((table, chunk))
        if data is None:
            data = cache[(table, chunk)] = self.base.index_chunk(table, chunk)
        return data

    def chunk(self, table: int, chunk: int) -> bytes:
        data = ZERO_CHUNK if table in self.drops else self._base_chunk(table, chunk)
        changed = self.entries.get((table, chunk))
        if not changed:
            return data
        out = bytearray(data)
        for e, v in changed.items():
            out[e * 8:e * 8 + 8] = v.to_bytes(8, "little")
        return bytes(out)

    index_chunk = chunk  # so that a Pending can be the base of another (one change of a batch)

    def set_entry(self, table: int, chunk: int, e: int, v: int) -> None:
        self.entries.setdefault((table, chunk), {})[e] = v

    def set_value(self, table: int, slot: int, data: bytes | None) -> None:
        self.values[(table, slot)] = data

    def drop(self, table: int) -> None:
        """Empty an index table: its entries changed so far are void, later ones apply."""
        self.drops.add(table)
        for key in [k for k in self.entries if k[0] == table]:
            del self.entries[key]

    def merge(self, child: Pending) -> None:
        """Take a child's changes (made after this one's) as this one's."""
        for t in child.drops:
            self.drop(t)
        for key, ents in child.entries.items():
            self.entries.setdefault(key, {}).update(ents)
        self.values.update(child.values)

    def __bool__(self) -> bool:
        return bool(self.entries or self.values or self.drops)


MOVE_PER_CHANGE = 2  # old index chunks a reindex moves with each put or delete: it ends
# after half as many changes as the old index has chunks, long before the new one could fill


class Planner:
    """Plans puts and deletes of one column into a ``Pending``; a reindex moves along with
    them (parity-db moves it in a background thread; here each change carries a little of it,
    so it needs no thread and every step is an ordinary record)."""

    def __init__(self, col: Column, pending: Pending) -> None:
        self.col = col
        self.p = pending
        self._h = col.header(pending)  # kept up to date by _set_header

    def _header(self) -> list[int]:
        return self._h

    def _set_header(self, e: int, v: int) -> None:
        self._h[e] = v
        self.p.set_entry(self.col.header_table, 0, e, v)

    # -- slots ---------------------------------------------------------------------------------
    def _alloc(self, tier: int, limit: int | None) -> int:
        """A slot of ``tier``: the head of its free list, else one past ``filled``."""
        col, h = self.col, self._header()
        head = h[L.free_entry(tier)]
        if head:
            data = self.p.value(col.tier_table(tier), head)
            if not data or data[0] != L.FREE:
                raise CorruptionError(f"column {col.name!r}: free slot {head} of tier {tier} "
                                      "does not hold a free-list link")
            self._set_header(L.free_entry(tier), L.PART_HEAD.unpack_from(data)[1])
            return head
        slot = h[L.filled_entry(tier)] + 1
        if limit is not None and slot >= limit:
            raise IndexFullError(f"tier {tier} has no slot an index entry can address")
        self._set_header(L.filled_entry(tier), slot)
        return slot

    def _free(self, tier: int, slot: int) -> None:
        col = self.col
        h = self._header()
        self.p.set_value(col.tier_table(tier), slot, L.encode_free(h[L.free_entry(tier)]))
        self._set_header(L.free_entry(tier), slot)

    def _write(self, key: bytes, value: bytes, bits: int) -> tuple[int, int]:
        """Store key and value in new slots; (slot, tier) of the one an entry addresses."""
        col = self.col
        limit = 1 << (bits + 6)
        tier = L.whole_tier(len(key), len(value))
        if tier is not None:
            slot = self._alloc(tier, limit)
            self.p.set_value(col.tier_table(tier), slot, L.encode_whole(key, value))
            return slot, tier
        pieces = L.multipart_pieces(key, value)
        parts = [self._alloc(L.PARTS, None) for _ in pieces[1:]]
        for i, piece in enumerate(pieces[1:]):
            nxt = parts[i + 1] if i + 1 < len(parts) else 0
            self.p.set_value(col.tier_table(L.PARTS), parts[i], L.encode_part(nxt, piece))
        head = self._alloc(L.MULTIPART, limit)
        self.p.set_value(col.tier_table(L.MULTIPART), head,
                         L.encode_head(len(key), len(value), parts[0] if parts else 0, pieces[0]))
        return head, L.MULTIPART

    def _release(self, slot: int, tier: int) -> None:
        """Free a value's slots (a multipart value's parts too)."""
        if tier == L.MULTIPART:
            for part in self.col.part_slots(self.p, slot):
                self._free(L.PARTS, part)
        self._free(tier, slot)

    # -- the index ---------------------------------------------------------------------------
    def _insert_entry(self, h: int, slot: int, tier: int) -> None:
        """An entry for a key of hash ``h`` stored at (slot, tier), in the current index. A
        full chunk starts a reindex into twice the chunks (the other index table, empty); one
        full while a reindex runs (rare: the new index is at most about half full) finishes
        that reindex first, in this change."""
        col = self.col
        started = False
        while True:
            header = self._header()
            table, bits = col.index(header)
            c = L.chunk_of(h, bits)
            entries = chunk_entries(self.p.chunk(table, c))
            if 0 in entries:
                if slot >= 1 << (bits + 6):
                    raise IndexFullError(f"slot {slot} of tier {tier} is past what an entry of "
                                         f"a {bits}-bit index addresses")
                self.p.set_entry(table, c, entries.index(0), L.make_entry(h, bits, slot, tier))
                return
            old = col.reindexing(header)
            if old is not None:
                self._move((1 << old[1]) + 1)  # every chunk left, then the drop
                if col.reindexing(self._header()) is not None:
                    raise IndexFullError(f"index chunk {c} of {1 << bits} is full, and so are "
                                         "chunks the reindex must move entries into")
                continue
            if started or bits >= L.MAX_INDEX_BITS:
                raise IndexFullError(f"index chunk {c} of {1 << bits} is full after a reindex")
            offset = L.INDEX_B if table == col.base + L.INDEX_A else L.INDEX_A
            self._set_header(L.REINDEX, L.index_word(table - col.base, bits))
            self._set_header(L.REINDEX_AT, 0)
            self._set_header(L.INDEX, L.index_word(offset, bits + 1))
            started = True

    def _move(self, chunks: int) -> None:
        """Reindex: move ``chunks`` chunks of the old index into the current one (old chunk c
        goes to new chunks 2c and 2c + 1: the entry's partial key has the bit that decides),
        and once all are moved, drop the old index. A chunk whose entries do not all fit
        stays (the reindex stalls there; lookups check both indexes meanwhile)."""
        col = self.col
        for _ in range(chunks):
            header = self._header()
            old = col.reindexing(header)
            if old is None:
                return
            old_table, old_bits = old
            table, bits = col.index(header)
            at = header[L.REINDEX_AT]
            if at >= 1 << old_bits:  # done: the old index is empty
                self.p.drop(old_table)
                self._set_header(L.REINDEX, 0)
                self._set_header(L.REINDEX_AT, 0)
                return
            width = 64 - L.address_bits(old_bits)
            targets: dict[int, list[int]] = {}
            moves = []
            for e, entry in enumerate(chunk_entries(self.p.chunk(old_table, at))):
                if not entry:
                    continue
                # h's top bits, as far as the old chunk number and partial key give them
                h = (at << (64 - old_bits)) | (L.entry_partial(entry, old_bits) << (64 - old_bits - width))
                c = L.chunk_of(h, bits)
                free = targets.get(c)
                if free is None:
                    free = targets[c] = [i for i, v in enumerate(chunk_entries(self.p.chunk(table, c)))
                                         if not v]
                if not free:
                    return  # stalls: see above
                moves.append((e, c, free.pop(0), L.make_entry(h, bits, *L.entry_address(entry, old_bits))))
            for e, c, slot_e, new in moves:
                self.p.set_entry(table, c, slot_e, new)
                self.p.set_entry(old_table, at, e, 0)
            self._set_header(L.REINDEX_AT, at + 1)

    # -- changes -------------------------------------------------------------------------------
    def put(self, key: bytes, value: bytes) -> None:
        col = self.col
        header = self._header()
        _, bits = col.index(header)
        h = L.key_hash(col.salt, key)
        found = col.find(self.p, key, header, h)
        if found is None:
            slot, tier = self._write(key, value, bits)
            self._insert_entry(h, slot, tier)
            self._set_header(L.COUNT, self._header()[L.COUNT] + 1)
        else:
            table, old_bits, c, e, entry, _old = found
            old_slot, old_tier = L.entry_address(entry, old_bits)
            new_tier = L.whole_tier(len(key), len(value))
            if new_tier is not None and new_tier == old_tier:  # in place: the same slot
                self.p.set_value(col.tier_table(old_tier), old_slot, L.encode_whole(key, value))
                slot, tier = old_slot, old_tier
            else:
                self._release(old_slot, old_tier)
                slot, tier = self._write(key, value, bits)
            if slot < 1 << (old_bits + 6):  # in place, in whichever index holds it (the move
                self.p.set_entry(table, c, e, L.make_entry(h, old_bits, slot, tier))  # takes it)
            else:  # a slot the old index cannot address: into the current one now
                self.p.set_entry(table, c, e, 0)
                self._insert_entry(h, slot, tier)
        self._move(MOVE_PER_CHANGE)

    def delete(self, key: bytes) -> bool:
        col = self.col
        header = self._header()
        found = col.find(self.p, key, header)
        if found is None:
            return False
        table, bits, c, e, entry, _ = found
        self._release(*L.entry_address(entry, bits))
        self.p.set_entry(table, c, e, 0)
        self._set_header(L.COUNT, header[L.COUNT] - 1)
        self._move(MOVE_PER_CHANGE)
        return True
