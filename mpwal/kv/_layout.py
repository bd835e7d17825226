"""The key-value layer's on-disk layout: parity-db's hash column over mpwal's own tables.

A key-value directory is an ordinary mpwal directory whose ``mpwal.meta`` carries a ``layer``
object ``{"kind": "kv", "version": 1, "salt": "<32 hex>", "columns": [names...],
"index_bits": n}``; every change below is an ordinary record of the log, so replay, overlays,
readers, snapshots and the enactor need nothing new.

Tables. Column ``c`` (0 <= c < MAX_COLUMNS, in the order the directory was created with) owns
the table ids ``base = 256 * (c + 1)`` and up (ids below 256 stay unused):

* ``base + HEADER``: an index table whose chunk 0 is the column's header, 64 u64 entries:
    0  count        keys in the column
    1  index        ``table offset << 8 | index bits`` of the current hash index
    2  (reserved: the index being moved into the current one by a reindex, 0 = none)
    3  (reserved: the reindex's next chunk)
    8 + 2t, 9 + 2t  tier ``t``'s ``filled`` (highest slot ever used) and ``free`` (head of its
                    free list, 0 = empty), for each of the NTIERS tiers
* ``base + INDEX_A``, ``base + INDEX_B``: the hash index (one in use; the other is for a
  reindex into twice the chunks, not built yet: see the issue notes);
* ``base + TIER0 + t``: value table of tier ``t``, slots of ``TIERS[t]`` bytes. Slot 0 is never
  used, so no address is 0.

Keys. ``h``, the key's hash: the first 8 bytes (little-endian) of keyed BLAKE2b of the key, with
the directory's random 16-byte salt as the key, so that nobody who does not know the salt can
make keys that fall into one chunk. With ``b`` index bits, the top ``b`` bits of ``h`` pick the
chunk; an entry of that chunk (0 = empty) is ``partial << address_bits | address`` with
``address = slot << TIER_BITS | tier`` and ``address_bits = b + 6 + TIER_BITS`` (a tier holds at
most ``64 << b`` slots: as many as the index has entries), ``partial`` the next
``64 - address_bits`` bits of ``h`` after the chunk's (parity-db's ``Entry``: the chunk number
and the partial key give ``h``'s top bits back, so a reindex into ``b + 1`` bits needs no value
read). A lookup reads the chunk, and for each entry whose partial matches, the value slot, and
compares the key stored there.

Value slots. The first byte says what a slot holds (the engine's ``stored`` length says how
many bytes are used):

* ``WHOLE``: ``key_len u16``, the key, the value (the tier is the smallest that fits);
* ``HEAD``: ``key_len u16``, ``value_len u64``, ``next u64`` (the slot of the next part in the
  PARTS tier, 0 = none), then the first bytes of ``key + value``: a key and value that do not
  fit the largest whole tier are a HEAD in the MULTIPART tier and a chain of PARTs;
* ``PART``: ``next u64``, then the following bytes of ``key + value`` (``next`` 0 ends it);
* ``FREE``: ``next u64``, the next slot of the tier's free list (a tombstone, reused first).
"""

from __future__ import annotations

import hashlib
import struct

KIND = "kv"
VERSION = 1
MAX_COLUMNS = 255
COLUMN_SPAN = 256  # table ids per column
HEADER, INDEX_A, INDEX_B, TIER0 = 0, 1, 2, 3
INDEX_BITS = 12  # a new column: 4,096 chunks (2 MiB of index, sparse), reindexed as it fills
MIN_INDEX_BITS, MAX_INDEX_BITS = 4, 30
CHUNK_ENTRIES = 64
TIER_BITS = 5
# whole-value tiers (slot bytes), then the multipart tier; 1 + 2 + key + value must fit
TIERS = (32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536, 2048,
         3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 32768, 32768)
NTIERS = len(TIERS)
MULTIPART = NTIERS - 2  # the HEADs of multipart values (an index entry's address)
PARTS = NTIERS - 1  # their PARTs (never in an index entry, so never bounded by it)
assert NTIERS <= (1 << TIER_BITS) and 8 + 2 * NTIERS <= CHUNK_ENTRIES
MAX_KEY = 0xFFFF
MAX_VALUE = 1 << 40  # bytes; in practice the overlay's max_overlay_bytes bounds a record

# header entries
COUNT, INDEX, REINDEX, REINDEX_AT = 0, 1, 2, 3


def filled_entry(tier: int) -> int:
    return 8 + 2 * tier


def free_entry(tier: int) -> int:
    return 9 + 2 * tier


# slot kinds
FREE, WHOLE, HEAD, PART = 0, 1, 2, 3
WHOLE_HEAD = struct.Struct("<BH")  # kind, key_len
HEAD_HEAD = struct.Struct("<BHQQ")  # kind, key_len, value_len, next
PART_HEAD = struct.Struct("<BQ")  # kind, next (also FREE's)
PART_DATA = TIERS[PARTS] - PART_HEAD.size
HEAD_DATA = TIERS[MULTIPART] - HEAD_HEAD.size


def table_base(column: int) -> int:
    return COLUMN_SPAN * (column + 1)


def key_hash(salt: bytes, key: bytes) -> int:
    """``h``: keyed BLAKE2b of the key, its first 8 bytes as a little-endian u64."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, key=salt).digest(), "little")


def address_bits(bits: int) -> int:
    return bits + 6 + TIER_BITS


def chunk_of(h: int, bits: int) -> int:
    return h >> (64 - bits)


def partial_of(h: int, bits: int) -> int:
    """The bits of ``h`` after the chunk's, as many as an entry holds."""
    return ((h << bits) & 0xFFFF_FFFF_FFFF_FFFF) >> address_bits(bits)


def make_entry(h: int, bits: int, slot: int, tier: int) -> int:
    return (partial_of(h, bits) << address_bits(bits)) | (slot << TIER_BITS) | tier


def entry_address(entry: int, bits: int) -> tuple[int, int]:
    """(slot, tier) of an index entry."""
    addr = entry & ((1 << address_bits(bits)) - 1)
    return addr >> TIER_BITS, addr & ((1 << TIER_BITS) - 1)


def entry_partial(entry: int, bits: int) -> int:
    return entry >> address_bits(bits)


def whole_tier(key_len: int, value_len: int) -> int | None:
    """The smallest whole-value tier that holds the key and value, or None (multipart)."""
    need = WHOLE_HEAD.size + key_len + value_len
    for t, size in enumerate(TIERS[:MULTIPART]):
        if need <= size:
            return t
    return None


def encode_whole(key: bytes, value: bytes) -> bytes:
    return WHOLE_HEAD.pack(WHOLE, len(key)) + key + value


def encode_free(next_free: int) -> bytes:
    return PART_HEAD.pack(FREE, next_free)


def multipart_pieces(key: bytes, value: bytes) -> list[bytes]:
    """``key + value`` cut into the data of a HEAD then of PARTs."""
    stream = key + value
    pieces = [stream[:HEAD_DATA]]
    for i in range(HEAD_DATA, len(stream), PART_DATA):
        pieces.append(stream[i:i + PART_DATA])
    return pieces


def encode_head(key_len: int, value_len: int, next_addr: int, data: bytes) -> bytes:
    return HEAD_HEAD.pack(HEAD, key_len, value_len, next_addr) + data


def encode_part(next_addr: int, data: bytes) -> bytes:
    return PART_HEAD.pack(PART, next_addr) + data


def index_word(table_offset: int, bits: int) -> int:
    return table_offset << 8 | bits


def index_of(word: int) -> tuple[int, int]:
    """(table offset, bits) of the header's index word."""
    return word >> 8, word & 0xFF
