"""What the tools (``mpwal inspect``, ``dump``) show of a key-value directory: its columns, and
what each logged change means in the layout of ``_layout.py``."""

from __future__ import annotations

from typing import Any

from . import _layout as L
from ._column import chunk_entries
from ._keys import columns_of

_HEADER_NAMES = {L.COUNT: "count", L.INDEX: "index", L.REINDEX: "reindex from",
                 L.REINDEX_AT: "reindex at"}


def _preview(b: bytes, n: int = 32) -> str:
    return repr(b[:n]) + ("…" if len(b) > n else "")


class Describer:
    """Names the tables of a key-value layer object and decodes its slots and header entries."""

    def __init__(self, layer: dict[str, Any]) -> None:
        self.columns = columns_of(layer)

    def role(self, table: int) -> tuple[str, str, int] | None:
        """(column, role, tier or -1) of an engine table id, or None if it is none of ours."""
        c, offset = divmod(table, L.COLUMN_SPAN)
        c -= 1
        if not 0 <= c < len(self.columns):
            return None
        name = self.columns[c]
        if offset == L.HEADER:
            return name, "header", -1
        if offset in (L.INDEX_A, L.INDEX_B):
            return name, "index " + ("A" if offset == L.INDEX_A else "B"), -1
        tier = offset - L.TIER0
        if 0 <= tier < L.NTIERS:
            role = "parts" if tier == L.PARTS else "multipart heads" if tier == L.MULTIPART else "tier"
            return name, role, tier
        return None

    def value_text(self, table: int, slot: int, data: bytes | None) -> str | None:
        """What a value slot's new content means, or None for a table not of the layer."""
        r = self.role(table)
        if r is None or r[2] < 0:
            return None
        column, role, tier = r
        where = f"column {column!r} {role} {tier} slot {slot}"
        if not data:
            return f"{where}: empty"
        kind = data[0]
        try:
            if kind == L.WHOLE:
                _, klen = L.WHOLE_HEAD.unpack_from(data)
                key = data[L.WHOLE_HEAD.size:L.WHOLE_HEAD.size + klen]
                value = data[L.WHOLE_HEAD.size + klen:]
                return f"{where}: key {_preview(key)} = {len(value)} bytes {_preview(value)}"
            if kind == L.HEAD:
                _, klen, vlen, nxt = L.HEAD_HEAD.unpack_from(data)
                stream = data[L.HEAD_HEAD.size:]
                return (f"{where}: key {_preview(stream[:klen])} = {vlen} bytes in parts "
                        f"(next part {nxt})")
            if kind == L.PART:
                return f"{where}: part of a value, {len(data) - L.PART_HEAD.size} bytes " \
                       f"(next part {L.PART_HEAD.unpack_from(data)[1]})"
            if kind == L.FREE:
                return f"{where}: free (next free {L.PART_HEAD.unpack_from(data)[1]})"
        except Exception:  # noqa: BLE001 - a damaged slot is shown as such, not raised
            pass
        return f"{where}: {len(data)} bytes the layout does not describe"

    def entries_text(self, table: int, chunk: int, entries: list[tuple[int, int]]) -> str | None:
        """What an index change means, or None for a table not of the layer."""
        r = self.role(table)
        if r is None or r[2] >= 0:
            return None
        column, role, _ = r
        if role == "header":
            parts = []
            for e, v in entries:
                if e in _HEADER_NAMES:
                    if e in (L.INDEX, L.REINDEX) and v:
                        off, bits = L.index_of(v)
                        parts.append(f"{_HEADER_NAMES[e]} {'A' if off == L.INDEX_A else 'B'} "
                                     f"of {1 << bits} chunks")
                    else:
                        parts.append(f"{_HEADER_NAMES[e]} {v}")
                elif e >= 8:
                    tier, which = divmod(e - 8, 2)
                    parts.append(f"tier {tier} {'free' if which else 'filled'} {v}")
            return f"column {column!r} header: " + ", ".join(parts)
        return f"column {column!r} {role} chunk {chunk}: {len(entries)} entries"


def columns_report(reader: Any) -> list[dict[str, Any]]:
    """Each column's name, keys, index size and reindex state, read through a KVReader."""
    out = []
    for name, col in reader._columns.items():
        def look(v: Any, col: Any = col, name: str = name) -> dict[str, Any]:
            h = col.header(v)
            table, bits = col.index(h)
            old = col.reindexing(h)
            return {"name": name, "keys": h[L.COUNT], "index_chunks": 1 << bits,
                    "reindexing_from_chunks": None if old is None else 1 << old[1],
                    "reindex_at": h[L.REINDEX_AT] if old is not None else None}
        out.append(reader._read(look))
    return out


def check_columns(reader: Any, limit: int = 20) -> tuple[int, list[str]]:
    """Check every column's layout at one snapshot (``mpwal verify``): each index entry leads
    to a slot that holds a key whose hash gives that chunk and partial key, no slot is used
    twice, the count is the number of entries, free lists hold only free slots, and a multipart
    value's parts are all there. Returns (keys checked, the first ``limit`` problems)."""
    problems: list[str] = []
    checked = 0
    with reader.snapshot() as s:
        for name, col in reader._columns.items():
            def at(fn: Any) -> Any:
                return s._read(fn)
            header = at(col.header)
            used: set[tuple[int, int]] = set()
            entries = 0
            for table, bits in col.indexes(header):
                for c in range(1 << bits):
                    chunk = at(lambda v, table=table, c=c: v.chunk(table, c))
                    for e, entry in enumerate(chunk_entries(chunk)):
                        if not entry:
                            continue
                        entries += 1
                        slot, tier = L.entry_address(entry, bits)
                        where = f"column {name!r} index {table} chunk {c} entry {e}"
                        pair = at(lambda v, slot=slot, tier=tier, col=col: col.read_pair(v, slot, tier))
                        if pair is None:
                            problems.append(f"{where}: slot {slot} of tier {tier} holds no value")
                            continue
                        checked += 1
                        h = L.key_hash(col.salt, pair[0])
                        if L.chunk_of(h, bits) != c or L.entry_partial(entry, bits) != L.partial_of(h, bits):
                            problems.append(f"{where}: the key {pair[0][:32]!r} does not hash here")
                        if (tier, slot) in used:
                            problems.append(f"{where}: slot {slot} of tier {tier} is used twice")
                        used.add((tier, slot))
                        if tier == L.MULTIPART:
                            for part in at(lambda v, slot=slot, col=col: col.part_slots(v, slot)):
                                if (L.PARTS, part) in used:
                                    problems.append(f"{where}: part {part} is used twice")
                                used.add((L.PARTS, part))
            if entries != header[L.COUNT]:
                problems.append(f"column {name!r}: the header counts {header[L.COUNT]} keys, "
                                f"the index holds {entries}")
            for tier in range(L.NTIERS):
                slot, steps = header[L.free_entry(tier)], 0
                while slot and steps <= header[L.filled_entry(tier)]:
                    data = at(lambda v, slot=slot, tier=tier, col=col: v.value(col.tier_table(tier), slot))
                    if not data or data[0] != L.FREE:
                        problems.append(f"column {name!r} tier {tier}: free-list slot {slot} is "
                                        "not free")
                        break
                    if (tier, slot) in used:
                        problems.append(f"column {name!r} tier {tier}: slot {slot} is free and used")
                    slot, steps = L.PART_HEAD.unpack_from(data)[1], steps + 1
    return checked, problems[:limit]
