"""The key-value layer's native functions (mpwal/_native_kv.c) against their Python references
in mpwal/kv/_column.py, byte for byte and answer for answer (DESIGN invariant 9), and without
reference leaks. Also run against the AddressSanitizer build (test_native.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from native_checks import assert_no_leaks, native, needs_native

from mpwal.kv import _layout as L
from mpwal.kv._column import matches, whole_value

entry_st = st.one_of(st.just(0), st.integers(0, (1 << 64) - 1))


def chunk_of_entries(entries: list[int]) -> bytes:
    return b"".join(e.to_bytes(8, "little") for e in entries)


@needs_native
@settings(max_examples=300)
@given(st.integers(L.MIN_INDEX_BITS, L.MAX_INDEX_BITS), st.data())
def test_kv_matches_is_the_reference(bits, data):
    partial = data.draw(st.integers(0, (1 << (64 - L.address_bits(bits))) - 1))
    # entries with the partial key, others, empties
    made = data.draw(st.lists(st.one_of(
        st.integers(0, (1 << L.address_bits(bits)) - 1).map(lambda a: partial << L.address_bits(bits) | a),
        entry_st), min_size=64, max_size=64))
    chunk = chunk_of_entries(made)
    assert tuple(native.kv_matches(chunk, bits, partial)) == tuple(matches(chunk, bits, partial))


@needs_native
def test_kv_matches_refuses_what_is_not_a_chunk():
    for chunk, bits in ((bytes(511), 12), (bytes(513), 12), (bytes(512), 3), (bytes(512), 31)):
        with pytest.raises(ValueError):
            native.kv_matches(chunk, bits, 0)
    with pytest.raises(TypeError):
        native.kv_matches("x" * 512, 12, 0)


@needs_native
@settings(max_examples=300)
@given(st.binary(max_size=300), st.binary(max_size=40), st.binary(max_size=40), st.booleans())
def test_kv_whole_is_the_reference(raw, key, value, well_formed):
    data = L.encode_whole(key, value) if well_formed else raw
    for probe in (key, key + b"x", b""):
        try:
            want = whole_value(data, probe)
        except ValueError:
            with pytest.raises(ValueError):
                native.kv_whole(data, probe)
            continue
        assert native.kv_whole(data, probe) == want


@needs_native
def test_kv_natives_do_not_leak():
    chunk = chunk_of_entries([L.make_entry(h, 12, h % 1000 + 1, 3) for h in range(1, 65)])
    data = L.encode_whole(b"key", b"value" * 20)
    key = b"key"

    def run(n):
        for _ in range(n):
            native.kv_matches(chunk, 12, L.partial_of(5, 12))
            native.kv_whole(data, key)
            native.kv_whole(data, b"other")
            try:
                native.kv_whole(b"\x01\xff\xff", key)
            except ValueError:
                pass
    assert_no_leaks(run, (chunk, data, key))


def _kv_dir(path: str, enact: bool):
    """A key-value directory whose live writer has reindexed (16 chunks to more), deleted,
    overwritten and stored multipart values; with ``enact``, everything enacted first and then
    more changes on top (so lookups mix the overlay and the table files)."""
    import mpwal
    from mpwal._enactor import Enactor
    kv = mpwal.KVWriter(path, index_bits=4, enactor="none", log_age=1e9, log_size=1 << 20)
    for i in range(2500):
        kv.put(b"k%d" % i, b"v%d" % i * (i % 40))
    kv.put(b"big", b"b" * 70000)
    for i in range(0, 2500, 5):
        del kv[b"k%d" % i]
    if enact:
        kv._w.rotate()
        e = Enactor(kv.path)
        e.drain()
        e.close()
    for i in range(1, 2500, 7):
        kv.put(b"k%d" % i, b"w" * (i % 300))
    return kv


@needs_native
@pytest.mark.parametrize("enact", [False, True])
def test_kv_get_is_the_reference(tmp_path, enact):
    """The native whole get (Lookups.kv_get) gives what the Python path (Column.get under
    read_with) gives, for every key present, deleted, never written and multipart (for which
    it hands over: RETRY), from the overlay and from the table files."""
    import mpwal
    from mpwal._overlay import RETRY
    kv = _kv_dir(str(tmp_path / "db"), enact)
    try:
        with mpwal.KVReader(kv.path) as r:
            col = r._columns["default"]
            seg = r._r._fast
            assert seg is not None and seg.kv_get is not None
            answered = 0
            for k in [b"k%d" % i for i in range(2600)] + [b"big", b"", b"x" * 300]:
                got = seg.kv_get(col.header_table, [L.key_hash(col.salt, k)], [k],
                                 col.default_bits, r._r._files.read_chunk)
                want = r._read(lambda v, k=k: col.get(v, k))
                if got is RETRY:
                    assert k == b"big", k
                    continue
                answered += 1
                assert got == [want], k
                assert r.get(k) == want
            assert answered > 2500
            keys = [b"k%d" % i for i in range(0, 2600, 3)]
            many = seg.kv_get(col.header_table, [L.key_hash(col.salt, k) for k in keys], keys,
                              col.default_bits, r._r._files.read_chunk)
            assert many == r._read(lambda v: [col.get(v, k) for k in keys]) == r.get_many(keys)
            assert seg.kv_get(col.header_table, [L.key_hash(col.salt, b"big"), 5], [b"big", b"k5"],
                              col.default_bits, r._r._files.read_chunk) is RETRY  # one multipart
            assert r.get_many([b"big", b"k2"]) == [b"b" * 70000, b"v2v2"]
            with pytest.raises(TypeError):
                seg.kv_get(col.header_table, [1], [b"a", b"b"], col.default_bits, r._r._files.read_chunk)
            with pytest.raises(TypeError):
                seg.kv_get(col.header_table, [1], ["a"], col.default_bits, r._r._files.read_chunk)
    finally:
        kv.close()


@needs_native
def test_kv_get_does_not_leak(tmp_path):
    import mpwal
    kv = _kv_dir(str(tmp_path / "db"), True)
    try:
        with mpwal.KVReader(kv.path) as r:
            col = r._columns["default"]
            seg = r._r._fast
            keys = [b"k1", b"k3", b"k5", b"nope", b"big"]
            hashes = [L.key_hash(col.salt, k) for k in keys]
            read_chunk = r._r._files.read_chunk

            def run(n):
                for _ in range(n):
                    seg.kv_get(col.header_table, hashes, keys, col.default_bits, read_chunk)
                    seg.kv_get(col.header_table, hashes[:4], keys[:4], col.default_bits, read_chunk)
                    for k, h in zip(keys, hashes):
                        seg.kv_get(col.header_table, [h], [k], col.default_bits, read_chunk)
            assert_no_leaks(run, (*keys, read_chunk), rounds=1000)
    finally:
        kv.close()
