"""Receiving one object's ranges: verify each against its footer's checksums, copy it into place.

Ranges are planned by plan.py (layer-aligned, about `read_range_bytes`); they arrive in any order
and from several threads. The footer says what every range is checked against: it is known
before the read where the tier holds it (`headers.HeaderCache`), comes with the data where the
object is read whole, and otherwise arrives by its own small request sent with the data requests
(`read.ReadSession`); a range that lands before it waits for it. Every footer is checked against
the index (shape, digest) and the request (the full keys of the pages copied), so a stale index
entry or a colliding key hash is a miss, never someone else's pages.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .. import native
from ..errors import CorruptObject
from ..format import Header, decode_header, mac_ok, piece_copies, readonly_address
from ..stores.base import RangePieces
from .index import ObjectInfo

HEADER_WAIT = 120.0  # seconds a range waits for its footer at most (a cancelled read stops it sooner)


@dataclass
class ObjectRead:
    """The state of one object's read: how many ranges are in, a promotion buffer."""

    info: ObjectInfo
    slots: list[int]  # object slots wanted, in call order
    first: int  # index of the first wanted key in the call
    n_ranges: int
    fingerprint: str
    verify: bool
    keys: Sequence[str]  # the request's keys of `slots`, in call order
    header: Header | None = None  # what every range is checked against, once known
    promote: memoryview | None = None
    done_ranges: int = 0
    failed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    mac_key: bytes | None = None  # keyed integrity: the footer's MAC must verify under it

    def __post_init__(self) -> None:
        self._known = threading.Event()  # the header is set, or cannot be
        self._header_error: BaseException | None = None
        if self.header is not None:
            try:
                self.header = self._check(self.header)
                self._known.set()
            except CorruptObject:  # a held footer that does not fit: read the stored one
                self.header = None

    def set_header(self, h: Header) -> Header:
        """The object's footer, from its own request or its whole bytes: checked, then every
        range waiting for it goes on. CorruptObject where it is not the object the read wants."""
        try:
            h = self._check(h)
        except CorruptObject as e:
            self.header_failed(e)
            raise
        with self.lock:
            if self.header is None:
                self.header = h
        self._known.set()
        return self.header

    def header_failed(self, e: BaseException) -> None:
        """The footer cannot be had (gone, unreadable, cancelled): ranges waiting for it fail with `e`."""
        with self.lock:
            if self._header_error is None and self.header is None:
                self._header_error = e
        self._known.set()

    def header_known(self, timeout: float) -> bool:
        """Wait up to `timeout` for the footer (or its failure); True once either is in."""
        return self._known.wait(timeout)

    def wait_header(self, timeout: float = HEADER_WAIT) -> Header:
        if not self._known.wait(timeout):
            raise TimeoutError(f"no footer after {timeout:.0f} s")
        if self.header is None:
            raise self._header_error
        return self.header

    def deliver(self, start: int, end: int, l0: int, l1: int, data, segments) -> tuple[list, bool | None]:
        """Take one range's bytes. Returns the layer spans [(l0, l1)] now verified and copied, and
        True for exactly one caller, the one that completes the object (None, with no spans, once
        the object has failed).

        Ranges of one object may be delivered from several threads at once; the lock guards only
        the bookkeeping, never the copies."""
        with self.lock:
            if self.failed:
                return [], None
        if len(data) != end - start:
            raise CorruptObject(f"range {start}-{end} returned {len(data)} bytes: object truncated")
        if start == 0 and end == self.info.size:  # a whole object: it carries its footer
            h = decode_header(data)
            if self.header is not None and h.checksums != self.header.checksums:
                raise CorruptObject("footer checksums differ from the ones this read expected")
            self.set_header(h)
        else:
            self.wait_header()
        self._apply(start, l0, l1, data, segments)
        if self.promote is not None:
            self.promote[start:end] = data
        complete = self.landed()
        return ([], None) if complete is None else ([(l0, l1)], complete)

    def _check(self, h: Header) -> Header:
        if h.fingerprint != self.fingerprint:
            raise CorruptObject("fingerprint differs: written by another model, dtype or geometry")
        if self.mac_key is not None and not mac_ok(h, self.mac_key):
            raise CorruptObject("footer MAC does not verify: written without the integrity key")
        if (h.n_pages, h.n_layers, h.piece_bytes, h.meta_bytes) != (
                self.info.n_pages, self.info.n_layers, self.info.piece_bytes, self.info.meta_bytes):
            raise CorruptObject("footer does not match the index entry or this pool's geometry")
        if self.info.digest and h.digest != self.info.digest:
            raise CorruptObject("footer checksums differ from the ones announced for this object")
        if any(h.keys[slot] != key for slot, key in zip(self.slots, self.keys)):
            raise CorruptObject("footer keys differ from the pages asked for")
        return h

    def _apply(self, start: int, l0: int, l1: int, buf, segments) -> None:
        """Verify the range and copy it into place: one native call (GIL released once)."""
        table = getattr(segments, "table", None)
        if table is not None and self._apply_table(start, l0, l1, buf, table):
            return
        h = self.header
        base = readonly_address(buf) - start
        pieces, expect, copies, first = [], [], [], []
        for layer in range(l0, l1):
            for j, slot in enumerate(self.slots):
                off = h.piece_offset(layer, slot)
                if off < start or off + h.piece_bytes > start + len(buf):
                    raise CorruptObject(f"object truncated at layer {layer} page {slot}")
                pieces.append(base + off)
                if self.verify:
                    expect.append(h.checksum(layer, slot))
                src = base + off
                first.append(len(copies))  # this piece's copies follow: it is copied after its check
                for addr, length in segments(layer, self.first + j):
                    copies.append((addr, src, length))
                    src += length
        bad = native.verify_and_copy(pieces, h.piece_bytes, expect if self.verify else None, copies,
                                     first + [len(copies)])
        if bad >= 0:
            raise self.mismatch(l0, bad)

    def mismatch(self, l0: int, bad: int) -> CorruptObject:
        """The error for piece `bad` of a range starting at layer l0."""
        layer, j = l0 + bad // len(self.slots), bad % len(self.slots)
        return CorruptObject(f"checksum mismatch at layer {layer} page {self.slots[j]}")

    def _apply_table(self, start: int, l0: int, l1: int, buf, table: np.ndarray) -> bool:
        """`_apply` with the targets as an array (format.SegmentTable): the pieces, checksums and
        copies of the range are a few numpy operations, not a Python loop per piece. False where
        the native helper is unavailable (the caller takes the per-piece path)."""
        off, seg, expect = self._targets(l0, l1, table)
        outside = (off < start) | (off + self.header.piece_bytes > start + len(buf))
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            raise CorruptObject(f"object truncated at layer {l0 + k // len(self.slots)} page "
                                f"{self.slots[k % len(self.slots)]}")
        at = off + (readonly_address(buf) - start)
        copies = piece_copies(seg, at, self.header.piece_bytes, to_targets=True, layer0=l0, page0=self.first)
        bad = native.verify_and_copy_arrays(at.ravel().astype(np.uint64), self.header.piece_bytes, expect, copies,
                                            _per_piece(seg))
        if bad is None:
            return False
        if bad >= 0:
            raise self.mismatch(l0, bad)
        return True

    def _targets(self, l0: int, l1: int, table: np.ndarray):
        """The range's pieces: their offsets in the object ([layer, page]), their targets (the
        table's [layer, page, part]) and their checksums (flat, or None when not verifying)."""
        h = self.header
        slots = np.asarray(self.slots, dtype=np.int64)
        off = (np.arange(l0, l1, dtype=np.int64)[:, None] * h.n_pages + slots[None, :]) * h.piece_bytes
        seg = table[l0:l1, self.first:self.first + len(slots)]  # [layer, page, part, (address, length)]
        expect = np.ascontiguousarray(h.sums_array[l0:l1][:, slots]).ravel() if self.verify else None
        return off, seg, expect

    def pieces(self, start: int, end: int, l0: int, l1: int, segments) -> RangePieces | None:
        """The range as pieces to check and copy while they arrive (`RangeSource.apply`); None
        where it must be received whole first: no table of targets, a promotion buffer to fill."""
        table = getattr(segments, "table", None)
        if table is None or self.promote is not None or self.header is None:
            return None
        off, seg, expect = self._targets(l0, l1, table)
        if (off < start).any() or (off + self.header.piece_bytes > end).any():
            return None
        rel = off - start
        copies = piece_copies(seg, rel, self.header.piece_bytes, to_targets=True, layer0=l0, page0=self.first)
        return RangePieces(rel.ravel().astype(np.uint64), self.header.piece_bytes, expect, copies, _per_piece(seg),
                           l0=l0, per_layer=len(self.slots))

    def landed(self, ranges: int = 1) -> bool | None:
        """`ranges` more ranges of the object are in place (`deliver`'s, or one that `pieces`
        described). True for exactly one caller, the one that completes the object; None if the
        object failed meanwhile."""
        with self.lock:
            if self.failed:
                return None
            self.done_ranges += ranges
            return self.done_ranges == self.n_ranges


def _per_piece(seg: np.ndarray) -> np.ndarray:
    """Where each piece's copies start in piece_copies' list (`parts` per piece), and the end."""
    n, parts = seg.shape[0] * seg.shape[1], seg.shape[2]
    return np.arange(0, n * parts + 1, parts, dtype=np.int64)
