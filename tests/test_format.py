"""The object format: layout, checksums, and the damage a reader must catch."""

from __future__ import annotations

import pytest
from engine_util import PIECE, Pages, keys

from sglang_objectcache.format import (ALIGN, PRELUDE, CorruptObject, data_offset_for, decode_header, encode,
                                       readonly_address, scatter, verify_piece)


def obj(n=3):
    src, ks = Pages(n, seed=11), keys(n)
    return src, ks, encode("f" * 32, ks, 4, PIECE, src.segments())


def test_layer_major_layout_and_header():
    src, ks, data = obj()
    h = decode_header(data)
    assert (h.keys, h.n_layers, h.piece_bytes, h.fingerprint) == (tuple(ks), 4, PIECE, "f" * 32)
    assert h.data_offset % ALIGN == 0 and h.data_offset == data_offset_for("f" * 32, ks, 4, PIECE)
    assert len(data) == h.size
    # layer l of page j sits at data_offset + (l * n + j) * piece: one layer of all pages is one range
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


@pytest.mark.parametrize("damage", ["magic", "version", "header", "short"])
def test_bad_headers(damage):
    _, _, data = obj()
    if damage == "magic":
        data[0:4] = b"XXXX"
    elif damage == "version":
        data[4] = 99
    elif damage == "header":
        data[PRELUDE.size:PRELUDE.size + 8] = b"\xc1" * 8
    else:
        data = data[:10]
    with pytest.raises(CorruptObject):
        decode_header(data)


def test_scatter_round_trip():
    src, _, data = obj(2)
    h = decode_header(data)
    dst = Pages.empty_like(src)
    raw = bytes(data)
    base = readonly_address(raw)
    for layer in range(4):
        for j in range(2):
            scatter(base + h.piece_offset(layer, j), dst.segments()(layer, j))
    assert (dst.data == src.data).all()
