"""Reading one object as parallel, layer-aligned range GETs.

A big object read in one GET is one TCP stream; split into ranges of about `range_bytes` that
each hold whole layers (all pages of a layer are adjacent), it loads in parallel, the first range
(header + first layers) arrives early, and every piece can be verified as soon as its range is in.
The first range carries the header; later ranges that arrive before it wait for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..format import CorruptObject, Header, decode_header, readonly_address, scatter, verify_piece
from .index import ObjectInfo


def plan_ranges(info: ObjectInfo, range_bytes: int) -> list[tuple[int, int, int, int]]:
    """[(start, end, first_layer, end_layer)] covering the whole object in layer order."""
    block = len(info.keys) * info.piece_bytes  # one layer of every page of the object
    per = max(1, range_bytes // block)
    out = []
    for l0 in range(0, info.n_layers, per):
        l1 = min(info.n_layers, l0 + per)
        start = 0 if l0 == 0 else info.data_offset + l0 * block
        out.append((start, info.data_offset + l1 * block, l0, l1))
    return out


@dataclass
class ObjectRead:
    """The state of one object's read: which layers are in, the header, a promotion buffer."""

    info: ObjectInfo
    slots: list[int]  # object slots wanted, in call order
    first: int  # index of the first wanted key in the call
    n_ranges: int
    digest: str
    verify: bool
    promote: bytearray | None = None
    header: Header | None = None
    stash: list = field(default_factory=list)
    done_ranges: int = 0
    failed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(self, start: int, end: int, l0: int, l1: int, data, segments) -> bool:
        """Take one range's bytes; True for exactly one caller: the one that completes the object.

        Ranges of one object may be delivered from several threads at once; the lock guards only
        the bookkeeping, never the copies."""
        with self.lock:
            if self.failed:
                return False
            if len(data) != end - start:
                raise CorruptObject(f"range {start}-{end} returned {len(data)} bytes: object truncated")
            if start == 0:
                self.header = self._check_header(data)
                todo = [(start, end, l0, l1, data), *self.stash]
                self.stash = []
            elif self.header is None:
                self.stash.append((start, end, l0, l1, data))
                return False
            else:
                todo = [(start, end, l0, l1, data)]
        for s, e, a, b, buf in todo:
            self._apply(s, a, b, buf, segments)
            if self.promote is not None:
                self.promote[s:e] = buf
        with self.lock:
            if self.failed:
                return False
            self.done_ranges += len(todo)
            return self.done_ranges == self.n_ranges

    def _check_header(self, data) -> Header:
        h = decode_header(data)
        if h.fingerprint != self.digest:
            raise CorruptObject("fingerprint differs: written by another model, dtype or geometry")
        if (h.keys, h.n_layers, h.piece_bytes, h.data_offset) != (
                self.info.keys, self.info.n_layers, self.info.piece_bytes, self.info.data_offset):
            raise CorruptObject("header does not match the index entry or this pool's geometry")
        return h

    def _apply(self, start: int, l0: int, l1: int, buf, segments) -> None:
        h = self.header
        if self.verify:  # verify the whole range before writing any of it
            for layer in range(l0, l1):
                for slot in self.slots:
                    verify_piece(h, buf, start, layer, slot)
        base = readonly_address(buf) - start
        for layer in range(l0, l1):
            for j, slot in enumerate(self.slots):
                scatter(base + h.piece_offset(layer, slot), segments(layer, self.first + j))
