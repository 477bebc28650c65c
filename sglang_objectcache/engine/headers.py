"""Footers of recently used objects: the checksums a read verifies against, kept in memory only
for the objects in use.

The index does not hold checksums (2 KiB per 8-page object of a 32-layer model; they made up
most of its memory). A read of an object whose footer is not here gets it in its own small range
request, sent together with the object's data requests (`read.ReadSession`), so no request waits
for another; an object read whole carries its footer. Objects this process writes or reads
stay here, least recently used leaving first, within a byte budget.
"""

from __future__ import annotations

import collections
import threading

from ..format import Header

HEADER_CACHE_BYTES = 64 << 20  # about 25,000 footers of 8-page, 32-layer objects


def header_bytes(h: Header) -> int:
    """What a held footer costs, roughly: its checksum table, its keys and the objects around them."""
    return len(h.checksums) + 120 * h.n_pages + 400


class HeaderCache:
    def __init__(self, max_bytes: int = HEADER_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._lock = threading.Lock()
        self._held: collections.OrderedDict[str, Header] = collections.OrderedDict()

    def get(self, name: str, digest: int) -> Header | None:
        """The footer of `name` if held and it describes the bytes with `digest` (0: any)."""
        with self._lock:
            h = self._held.get(name)
            if h is None:
                return None
            if digest and h.digest != digest:  # the object was rewritten since: not these bytes
                return None
            self._held.move_to_end(name)
            return h

    def put(self, name: str, h: Header) -> None:
        size = header_bytes(h)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._held.pop(name, None)
            if old is not None:
                self.bytes -= header_bytes(old)
            self._held[name] = h
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, gone = self._held.popitem(last=False)
                self.bytes -= header_bytes(gone)

    def drop(self, name: str) -> None:
        with self._lock:
            h = self._held.pop(name, None)
            if h is not None:
                self.bytes -= header_bytes(h)

    def clear(self) -> None:
        with self._lock:
            self._held.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._held)
