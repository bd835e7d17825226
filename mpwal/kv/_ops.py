"""The key-value layer's submissions from producers (``_wire.py``'s ``LAYER`` body): a batch
of puts and deletes as keys and values, planned by the writer (``KVWriter``), since slot
allocation and free lists need the one planner. Little-endian::

    count u32
    count × ( op u8 (PUT 1, DELETE 2)  column u16  key_len u16  key[key_len]
              and for PUT: value_len u64  value[value_len] )

``column`` is the column's number, in the order the directory lists them. ``decode`` checks
every field (a submission comes from another process) and raises ``ArgumentTypeError`` for
bytes that are not such a batch.
"""

from __future__ import annotations

import struct

from .._errors import ArgumentTypeError

PUT, DELETE = 1, 2
_HEAD = struct.Struct("<BHH")
_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")


def encode(changes: list[tuple[int, bytes, bytes | None]]) -> bytes:
    """``changes``: (column number, key, value or None to delete), in the order made."""
    parts = [_COUNT.pack(len(changes))]
    for column, key, value in changes:
        parts.append(_HEAD.pack(PUT if value is not None else DELETE, column, len(key)))
        parts.append(key)
        if value is not None:
            parts.append(_LEN.pack(len(value)))
            parts.append(value)
    return b"".join(parts)


def decode(body: bytes, columns: int) -> list[tuple[int, bytes, bytes | None]]:
    """The changes of a batch of a directory with ``columns`` columns."""
    try:
        (n,), at = _COUNT.unpack_from(body), _COUNT.size
        out: list[tuple[int, bytes, bytes | None]] = []
        for _ in range(n):
            op, column, klen = _HEAD.unpack_from(body, at)
            at += _HEAD.size
            key = body[at:at + klen]
            at += klen
            if op not in (PUT, DELETE) or column >= columns or len(key) != klen:
                raise ValueError(f"change {len(out)}: op {op}, column {column}")
            value = None
            if op == PUT:
                (vlen,) = _LEN.unpack_from(body, at)
                at += _LEN.size
                value = body[at:at + vlen]
                at += vlen
                if len(value) != vlen:
                    raise ValueError("a torn value")
            out.append((column, key, value))
        if at != len(body):
            raise ValueError(f"{len(body) - at} bytes after the last change")
    except (struct.error, ValueError) as e:
        raise ArgumentTypeError(f"a key-value submission that does not decode ({e})") from None
    return out
