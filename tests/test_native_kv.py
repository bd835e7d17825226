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
