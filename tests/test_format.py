"""The object format: layout, checksums, and the damage a reader must catch."""

from __future__ import annotations

import pytest
from engine_util import LAYERS, PIECE, Pages, keys

from sglang_objectcache.format import (TRAILER, CorruptObject, decode_header, decode_meta, encode, meta_bytes_for,
                                       readonly_address, verify_piece)


def obj(n=3):
    src, ks = Pages(n, seed=11), keys(n)
    return src, ks, encode("f" * 32, ks, 4, PIECE, src.segments())


def test_layer_major_layout_and_footer():
    src, ks, data = obj()
    h = decode_header(data)
    assert (h.keys, h.n_layers, h.piece_bytes, h.fingerprint) == (tuple(ks), 4, PIECE, "f" * 32)
    assert h.meta_bytes == meta_bytes_for("f" * 32, ks, 4, PIECE)
    assert len(data) == h.size == 4 * 3 * PIECE + h.meta_bytes
    # the footer alone (the object's last meta_bytes) is enough to read the header
    assert decode_meta(bytes(data[-h.meta_bytes:])) == h
    # layer l of page j sits at (l * n + j) * piece: one layer of all pages is one aligned range
    for layer in range(4):
        for j in range(3):
            off = h.piece_offset(layer, j)
            assert bytes(data[off:off + PIECE]) == src.data[j, layer].tobytes()
            verify_piece(h, data, 0, layer, j)


def test_verify_catches_a_flipped_byte_and_truncation():
    _, _, data = obj()
    h = decode_header(data)
    data[h.piece_offset(2, 1) + 17] ^= 0x40
    with pytest.raises(CorruptObject, match="checksum mismatch at layer 2 page 1"):
        verify_piece(h, data, 0, 2, 1)
    verify_piece(h, data, 0, 2, 0)  # neighbours are fine
    with pytest.raises(CorruptObject, match="truncated"):
        verify_piece(h, data[: h.piece_offset(3, 2) + 10], 0, 3, 2)


@pytest.mark.parametrize("damage", ["magic", "version", "footer", "short", "truncated", "extended"])
def test_bad_footers(damage):
    _, _, data = obj()
    t = len(data) - TRAILER.size
    if damage == "magic":
        data[t:t + 4] = b"XXXX"
    elif damage == "version":
        data[t + 4] = 99
    elif damage == "footer":  # the start of the msgpack map
        f = t - (decode_header(data).meta_bytes - TRAILER.size)
        data[f:f + 8] = b"\xc1" * 8
    elif damage == "short":
        data = data[:10]
    elif damage == "truncated":
        data = data[:-1]
    else:
        data = bytes(data) + b"\0"
    with pytest.raises(CorruptObject):
        decode_header(data)


def test_scatter_round_trip():
    """An encoded object, checked against its own footer and copied back into page buffers."""
    from sglang_objectcache import native

    src, _, data = obj(2)
    h = decode_header(data)
    dst = Pages.empty_like(src)
    raw = bytes(data)
    base = readonly_address(raw)
    pieces, expect, copies = [], [], []
    for layer in range(4):
        for j in range(2):
            pieces.append(base + h.piece_offset(layer, j))
            expect.append(h.checksum(layer, j))
            at = pieces[-1]
            for addr, length in dst.segments()(layer, j):
                copies.append((addr, at, length))
                at += length
    assert native.verify_and_copy(pieces, h.piece_bytes, expect, copies) == -1
    assert (dst.data == src.data).all()


def test_gil_held_primitives_match_the_library_and_keep_the_gil():
    """The copy and checksum used on the read path: same xxh3-64 values as the xxhash package
    (objects stay compatible), a correct memmove, and both called without releasing the GIL
    (ctypes' PYTHONAPI flag), which is what keeps them fast next to SGLang's busy scheduler."""
    import ctypes

    import numpy as np
    import xxhash

    from sglang_objectcache import gil_held
    from sglang_objectcache.format import buffer_address

    rng = np.random.default_rng(5)
    for n in (0, 1, 17, 240, 4096, 256 << 10):
        buf = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        addr = buffer_address(buf) if n else 0
        assert gil_held.xxh3_64(addr, n) == xxhash.xxh3_64_intdigest(bytes(buf))
    src = bytearray(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    dst = bytearray(len(src))
    gil_held.memmove(buffer_address(dst), buffer_address(src), len(src))
    assert dst == src
    for f in (gil_held.memmove, gil_held.xxh3_64):
        assert f._flags_ & ctypes._FUNCFLAG_PYTHONAPI, f


def test_encode_from_a_segment_table_gives_the_same_object():
    """SGLang's pools hand `encode` an array (SegmentTable): the copies are built from it in one
    go, and the object is byte for byte the one a per-piece function gives; targets that do not
    hold whole pieces are refused, naming the page and layer."""
    src, ks = Pages(5, seed=12), keys(5)
    for first in (0, 2):
        assert encode("fp", ks[first:], LAYERS, PIECE, src.segments(table=True), first) == \
            encode("fp", ks[first:], LAYERS, PIECE, src.segments(), first)
    bad = src.segments(table=True)
    bad.table[3, 1, 1, 1] -= 16  # layer 3 of page 1 is 16 bytes short
    with pytest.raises(ValueError, match=f"page 1 layer 3: {PIECE - 16} bytes, expected {PIECE}"):
        encode("fp", ks, LAYERS, PIECE, bad)
    with pytest.raises(ValueError, match="targets for"):
        encode("fp", ks + keys(1, "x"), LAYERS, PIECE, src.segments(table=True))  # one page more than given
