"""The bytes of one object: KV data in layer-major order, then a small versioned footer.

Pure functions over buffers; no I/O. `docs/format.md` describes the layout byte by byte.

An object holds n consecutive pages of one radix path. Its data is ordered
(layer 0: page 0, page 1, ... page n-1), (layer 1: page 0, ...), ... so that any contiguous range
of layers of any contiguous run of pages is a handful of byte ranges, and one layer of the
whole object is exactly one range. Each (layer, page) piece carries its own xxh3-64 checksum, so
a reader can verify exactly the bytes it fetched. The footer (msgpack) and a fixed trailer come
last so that the data starts at offset 0 and every layer block is aligned.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import msgpack
import numpy as np

from . import native
from .errors import CorruptObject
from .gil_held import xxh3_64

MAGIC = b"OCKV"
VERSION = 1
TRAILER = struct.Struct("<4sHHII")  # magic, version, flags, footer length, reserved


@dataclass(frozen=True)
class Header:
    """What the footer says about an object (named for its role, not its place)."""

    fingerprint: str
    keys: tuple[str, ...]
    n_layers: int
    piece_bytes: int  # bytes of one page of one layer (K and V together for MHA)
    checksums: bytes  # n_layers * n_pages little-endian u64, layer-major
    meta_bytes: int  # footer + trailer, after the data
    mac: bytes = b""  # keyed integrity mode only (footer_mac)

    @property
    def n_pages(self) -> int:
        return len(self.keys)

    @property
    def data_bytes(self) -> int:
        return self.n_layers * self.n_pages * self.piece_bytes

    @property
    def size(self) -> int:
        return self.data_bytes + self.meta_bytes

    def piece_offset(self, layer: int, slot: int) -> int:
        return (layer * self.n_pages + slot) * self.piece_bytes

    @functools.cached_property
    def sums_array(self) -> np.ndarray:
        """All checksums as uint64 [layer, slot]."""
        return np.frombuffer(self.checksums, dtype="<u8").reshape(self.n_layers, self.n_pages)

    @functools.cached_property
    def sums(self) -> tuple[int, ...]:
        """All checksums as ints, in data order (decoded once per header)."""
        return struct.unpack(f"<{len(self.checksums) // 8}Q", self.checksums)

    def checksum(self, layer: int, slot: int) -> int:
        return self.sums[layer * self.n_pages + slot]

    @functools.cached_property
    def digest(self) -> int:
        """xxh3-64 of the checksum table: names these bytes (not this name) in 8 bytes, for the
        index and the journal, which do not hold the table."""
        return xxh3_64(readonly_address(self.checksums), len(self.checksums)) if self.checksums else 0


def _pack_footer(fp: str, keys: Sequence[str], n_layers: int, piece: int, sums: bytes,
                 mac: bytes | None = None) -> bytes:
    doc = {"fp": fp, "keys": list(keys), "layers": n_layers, "piece": piece, "xxh3": sums}
    if mac is not None:
        doc["mac"] = mac
    return msgpack.packb(doc, use_bin_type=True)


MAC_BYTES = 32  # HMAC-SHA256


def footer_mac(key: bytes, fp: str, keys: Sequence[str], n_layers: int, piece: int, sums: bytes) -> bytes:
    """The keyed integrity mode's MAC: HMAC-SHA256 under the deployment's secret over the footer
    without its MAC (fingerprint, page keys, geometry, the checksum table), so that an object
    written without the secret never verifies, and a valid footer cannot move to other pages."""
    return hmac.new(key, _pack_footer(fp, keys, n_layers, piece, sums), hashlib.sha256).digest()


def mac_ok(h: "Header", key: bytes) -> bool:
    return len(h.mac) == MAC_BYTES and hmac.compare_digest(
        h.mac, footer_mac(key, h.fingerprint, h.keys, h.n_layers, h.piece_bytes, h.checksums))


def empty_buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes, not zeroed. A bytearray zero-fills its pages while it
    holds the GIL (34 ms per 64 MiB on the 2-core VM: SGLang's scheduler thread waits that long
    per object a backup encodes); numpy's empty touches nothing, so the pages fault in the native
    copy that fills them, with the GIL released."""
    return memoryview(np.empty(size, dtype=np.uint8))


def buffer_address(buf: bytearray | memoryview) -> int:
    """Address of a writable buffer's first byte."""
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def readonly_address(buf) -> int:
    """Address of any buffer's first byte (bytes and other read-only buffers included)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


# A piece source/target: the (address, length) segments that make up one (layer, page) piece.
Segments = Sequence[tuple[int, int]]
SegmentFn = Callable[[int, int], Segments]  # (layer, index in the call's key list) -> segments


class SegmentTable:
    """A SegmentFn backed by an array: `table[layer, page, part]` is (address, length). The read
    path slices it per range with numpy instead of calling per piece: that Python ran with the GIL
    held, once per piece, competing with SGLang's scheduler thread."""

    def __init__(self, table: np.ndarray):
        if table.ndim != 4 or table.shape[3] != 2:
            raise ValueError(f"a segment table is [layers, pages, parts, 2], not {list(table.shape)}")
        self.table = np.ascontiguousarray(table, dtype=np.int64)

    def __call__(self, layer: int, i: int) -> Segments:
        return [(int(a), int(n)) for a, n in self.table[layer, i]]


def piece_copies(seg: np.ndarray, piece_at: np.ndarray, piece: int, *, to_targets: bool,
                 layer0: int = 0, page0: int = 0) -> np.ndarray:
    """(dst, src, len) copies, uint64 [k, 3], between the pieces of an object buffer at `piece_at`
    ([layers, pages] addresses) and their targets `seg` (the same [layers, pages] of a SegmentTable):
    into the targets (`to_targets`, a read) or out of them (a write). The copies are grouped by
    piece, in piece order, `parts` each. ValueError where the targets do not fit the pieces."""
    if seg.shape[:2] != piece_at.shape:
        raise ValueError(f"targets for {list(seg.shape[:2])} (layers, pages), expected {list(piece_at.shape)}")
    lengths = seg[..., 1]
    wrong = lengths.sum(axis=-1) != piece
    if wrong.any():
        layer, page = (int(x) for x in np.argwhere(wrong)[0])
        raise ValueError(f"page {page0 + page} layer {layer0 + layer}: {int(lengths[layer, page].sum())} bytes, "
                         f"expected {piece}")
    inside = piece_at[..., None] + np.cumsum(lengths, axis=-1) - lengths
    dst, src = (seg[..., 0], inside) if to_targets else (inside, seg[..., 0])
    return np.stack([dst, src, lengths], axis=-1).reshape(-1, 3).astype(np.uint64)


def encode(
    fp: str,
    keys: Sequence[str],
    n_layers: int,
    piece: int,
    segments: SegmentFn,
    first: int = 0,
    mac_key: bytes | None = None,
    alloc=None,
) -> memoryview:
    """Build one object from pages `first .. first+len(keys)-1` of a call (with `mac_key`, its
    footer carries the keyed integrity MAC), into `alloc(size)` (a writable buffer of exactly
    `size` bytes; default `empty_buffer`).

    Data comes first, so layer blocks sit at multiples of their size (servers store objects in
    aligned chunks; aligned ranges read faster). One copy: each segment is copied once, all of
    them and the checksums in one native call (`native.copy_and_hash`).
    """
    n = len(keys)
    data_bytes = n_layers * n * piece
    footer_len = meta_bytes_for(fp, keys, n_layers, piece, keyed=mac_key is not None) - TRAILER.size
    out = (alloc or empty_buffer)(data_bytes + footer_len + TRAILER.size)
    base = buffer_address(out)
    table = getattr(segments, "table", None)
    if table is not None:  # a SegmentTable: the copies in a few numpy operations, not a call per piece
        at = base + (np.arange(n_layers, dtype=np.int64)[:, None] * n + np.arange(n, dtype=np.int64)) * piece
        copies = piece_copies(table[:, first:first + n], at, piece, to_targets=False, page0=first).tolist()
        pieces = at.ravel().tolist()
    else:
        copies, pieces = _piece_copies_by_call(segments, n_layers, n, piece, base, first)
    sums = struct.pack(f"<{len(pieces)}Q", *native.copy_and_hash(copies, pieces, piece))
    mac = footer_mac(mac_key, fp, keys, n_layers, piece, sums) if mac_key is not None else None
    footer = _pack_footer(fp, keys, n_layers, piece, sums, mac)
    assert len(footer) == footer_len  # its size depends only on its shape
    out[data_bytes : data_bytes + footer_len] = footer
    TRAILER.pack_into(out, data_bytes + footer_len, MAGIC, VERSION, 0, footer_len, 0)
    return out


def _piece_copies_by_call(segments: SegmentFn, n_layers: int, n: int, piece: int, base: int,
                          first: int) -> tuple[list, list]:
    """`encode`'s copies and piece addresses from a plain SegmentFn, one call per piece."""
    copies, pieces = [], []
    for layer in range(n_layers):
        for slot in range(n):
            pos = start = (layer * n + slot) * piece
            for addr, length in segments(layer, first + slot):
                copies.append((base + pos, addr, length))
                pos += length
            if pos - start != piece:
                raise ValueError(f"page {first + slot} layer {layer}: {pos - start} bytes, expected {piece}")
            pieces.append(base + start)
    return copies, pieces


def encode_meta(h: Header) -> bytes:
    """Footer + trailer of an object as `encode` wrote them (msgpack of the same map: the same bytes)."""
    footer = _pack_footer(h.fingerprint, h.keys, h.n_layers, h.piece_bytes, h.checksums, h.mac or None)
    return footer + TRAILER.pack(MAGIC, VERSION, 0, len(footer), 0)


def meta_bytes_for(fp: str, keys: Sequence[str], n_layers: int, piece: int, keyed: bool = False) -> int:
    """Footer + trailer length; depends only on the shape, not on the checksums' (or MAC's) values."""
    return len(_pack_footer(fp, keys, n_layers, piece, bytes(8 * n_layers * len(keys)),
                            bytes(MAC_BYTES) if keyed else None)) + TRAILER.size


def decode_meta(tail) -> Header:
    """Parse footer + trailer from the end of `tail` (the whole object, or its last bytes)."""
    mv = memoryview(tail)
    if len(mv) < TRAILER.size:
        raise CorruptObject(f"object shorter than its {TRAILER.size}-byte trailer")
    magic, version, _flags, flen, _ = TRAILER.unpack_from(mv, len(mv) - TRAILER.size)
    if magic != MAGIC:
        raise CorruptObject("bad magic: not an objectcache object, or truncated")
    if version != VERSION:
        raise CorruptObject(f"format version {version} is not supported (this reader knows {VERSION})")
    if flen + TRAILER.size > len(mv):
        raise CorruptObject("footer truncated")
    end = len(mv) - TRAILER.size
    try:
        h = msgpack.unpackb(mv[end - flen : end], raw=False)
        header = Header(
            fingerprint=h["fp"],
            keys=tuple(h["keys"]),
            n_layers=int(h["layers"]),
            piece_bytes=int(h["piece"]),
            checksums=bytes(h["xxh3"]),
            meta_bytes=flen + TRAILER.size,
            mac=bytes(h.get("mac", b"")),
        )
    except Exception as e:  # noqa: BLE001 - any malformed footer is corruption
        raise CorruptObject(f"unreadable footer: {e}") from None
    if len(header.checksums) != 8 * header.n_layers * header.n_pages:
        raise CorruptObject("checksum table does not match the page and layer counts")
    return header


def decode_header(obj) -> Header:
    """The Header of a whole object, checking its length against it."""
    h = decode_meta(obj)
    if len(obj) != h.size:
        raise CorruptObject(f"object is {len(obj)} bytes, its footer says {h.size}")
    return h


def verify_piece(header: Header, buf, buf_offset: int, layer: int, slot: int) -> None:
    """Check piece (layer, slot) of `buf`, which holds object bytes from buf_offset (one piece at a
    time, for inspection; the read path checks whole ranges in `native.verify_and_copy`)."""
    start = header.piece_offset(layer, slot) - buf_offset
    if start < 0 or start + header.piece_bytes > len(buf):
        raise CorruptObject(f"object truncated at layer {layer} page {slot}")
    if xxh3_64(readonly_address(buf) + start, header.piece_bytes) != header.checksum(layer, slot):
        raise CorruptObject(f"checksum mismatch at layer {layer} page {slot}")
