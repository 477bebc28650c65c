"""The bytes of one object: a small versioned header, then KV data in layer-major order.

Pure functions over buffers; no I/O. `docs/format.md` describes the layout byte by byte.

An object holds n consecutive pages of one radix path. Its data is ordered
(layer 0: page 0, page 1, ... page n-1), (layer 1: page 0, ...), ... so that any contiguous range
of layers of any contiguous run of pages is a handful of byte ranges, and one layer of the
whole object is exactly one range. Each (layer, page) piece carries its own xxh3-64 checksum, so
a reader can verify exactly the bytes it fetched.
"""

from __future__ import annotations

import ctypes
import functools
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import msgpack
import numpy as np
import xxhash

MAGIC = b"OCKV"
VERSION = 1
PRELUDE = struct.Struct("<4sHHII")  # magic, version, flags, header_len, data_offset
ALIGN = 4096  # data starts on a 4 KiB boundary: cheap, and friendly to O_DIRECT readers


class CorruptObject(ValueError):
    """The object's bytes do not match its header, its checksums or the reader's expectations."""


@dataclass(frozen=True)
class Header:
    fingerprint: str
    keys: tuple[str, ...]
    n_layers: int
    piece_bytes: int  # bytes of one page of one layer (K and V together for MHA)
    checksums: bytes  # n_layers * n_pages little-endian u64, layer-major
    data_offset: int

    @property
    def n_pages(self) -> int:
        return len(self.keys)

    @property
    def size(self) -> int:
        return self.data_offset + self.n_layers * self.n_pages * self.piece_bytes

    def piece_offset(self, layer: int, slot: int) -> int:
        return self.data_offset + (layer * self.n_pages + slot) * self.piece_bytes

    @functools.cached_property
    def sums(self) -> tuple[int, ...]:
        """All checksums as ints, in data order (decoded once per header)."""
        return struct.unpack(f"<{len(self.checksums) // 8}Q", self.checksums)

    def checksum(self, layer: int, slot: int) -> int:
        return self.sums[layer * self.n_pages + slot]


def _pack_header(fp: str, keys: Sequence[str], n_layers: int, piece: int, sums: bytes) -> bytes:
    return msgpack.packb(
        {"fp": fp, "keys": list(keys), "layers": n_layers, "piece": piece, "xxh3": sums},
        use_bin_type=True,
    )


def data_offset_for(fp: str, keys: Sequence[str], n_layers: int, piece: int) -> int:
    """Where data starts; depends only on the header's shape, not on the checksums' values."""
    hlen = len(_pack_header(fp, keys, n_layers, piece, bytes(8 * n_layers * len(keys))))
    return -(-(PRELUDE.size + hlen) // ALIGN) * ALIGN


def buffer_address(buf: bytearray | memoryview) -> int:
    """Address of a writable buffer's first byte."""
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def readonly_address(buf) -> int:
    """Address of any buffer's first byte (bytes and other read-only buffers included)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


# A piece source/target: the (address, length) segments that make up one (layer, page) piece.
Segments = Sequence[tuple[int, int]]
SegmentFn = Callable[[int, int], Segments]  # (layer, index in the call's key list) -> segments


def encode(
    fp: str,
    keys: Sequence[str],
    n_layers: int,
    piece: int,
    segments: SegmentFn,
    first: int = 0,
) -> bytearray:
    """Build one object from pages `first .. first+len(keys)-1` of a call.

    One copy: each segment is memmoved once from its source into the object buffer.
    """
    n = len(keys)
    off = data_offset_for(fp, keys, n_layers, piece)
    out = bytearray(off + n_layers * n * piece)
    base = buffer_address(out)
    mv = memoryview(out)
    sums = bytearray(8 * n_layers * n)
    for layer in range(n_layers):
        for slot in range(n):
            pos = off + (layer * n + slot) * piece
            start = pos
            for addr, length in segments(layer, first + slot):
                ctypes.memmove(base + pos, addr, length)
                pos += length
            if pos - start != piece:
                raise ValueError(f"page {first + slot} layer {layer}: {pos - start} bytes, expected {piece}")
            h = xxhash.xxh3_64_intdigest(mv[start:pos])
            struct.pack_into("<Q", sums, 8 * (layer * n + slot), h)
    header = _pack_header(fp, keys, n_layers, piece, bytes(sums))
    PRELUDE.pack_into(out, 0, MAGIC, VERSION, 0, len(header), off)
    out[PRELUDE.size : PRELUDE.size + len(header)] = header
    return out


def decode_header(buf) -> Header:
    """Parse and sanity-check the header at the start of `buf` (the whole object or a prefix)."""
    mv = memoryview(buf)
    if len(mv) < PRELUDE.size:
        raise CorruptObject(f"object shorter than its {PRELUDE.size}-byte prelude")
    magic, version, _flags, hlen, off = PRELUDE.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptObject("bad magic: not an objectcache object")
    if version != VERSION:
        raise CorruptObject(f"format version {version} is not supported (this reader knows {VERSION})")
    if PRELUDE.size + hlen > min(len(mv), off):
        raise CorruptObject("header truncated")
    try:
        h = msgpack.unpackb(mv[PRELUDE.size : PRELUDE.size + hlen], raw=False)
        header = Header(
            fingerprint=h["fp"],
            keys=tuple(h["keys"]),
            n_layers=int(h["layers"]),
            piece_bytes=int(h["piece"]),
            checksums=bytes(h["xxh3"]),
            data_offset=off,
        )
    except Exception as e:  # noqa: BLE001 - any malformed header is corruption
        raise CorruptObject(f"unreadable header: {e}") from None
    if len(header.checksums) != 8 * header.n_layers * header.n_pages:
        raise CorruptObject("checksum table does not match the page and layer counts")
    return header


def verify_piece(header: Header, buf, buf_offset: int, layer: int, slot: int) -> memoryview:
    """Return the verified bytes of piece (layer, slot); `buf` holds object bytes from buf_offset."""
    start = header.piece_offset(layer, slot) - buf_offset
    mv = memoryview(buf)[start : start + header.piece_bytes]
    if len(mv) != header.piece_bytes:
        raise CorruptObject(f"object truncated at layer {layer} page {slot}")
    if xxhash.xxh3_64_intdigest(mv) != header.checksum(layer, slot):
        raise CorruptObject(f"checksum mismatch at layer {layer} page {slot}")
    return mv


def scatter(src_addr: int, segments: Segments) -> None:
    """Copy one verified piece starting at src_addr into its target segments."""
    for addr, length in segments:
        ctypes.memmove(addr, src_addr, length)
        src_addr += length
