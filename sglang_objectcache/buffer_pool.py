"""Byte buffers reused across calls, so a steady stream of reads or writes neither allocates nor
has the kernel zero fresh pages for every one (about 0.5 CPU s per GiB on the 2-core VM).

A caller takes a buffer at least as long as it needs and gives it back once nothing reads or
writes it any more; at most `keep` are held between uses, so an idle process holds a bounded
amount. Users: the native reader's whole-range staging (`stores/native_reader.py`) and encoded
objects on their way to the tiers (`engine/write.py`)."""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    def __init__(self, keep: int, min_bytes: int = 0):
        self.keep = keep
        self.min_bytes = min_bytes  # a fresh buffer is at least this long (so later, longer needs fit)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0  # takes served by a held buffer

    def take(self, size: int) -> np.ndarray:
        """A buffer of at least `size` bytes, not zeroed."""
        with self._lock:
            i = next((i for i, b in enumerate(self._free) if b.nbytes >= size), None)
            if i is not None:
                self.reused += 1
                return self._free.pop(i)
        return np.empty(max(size, self.min_bytes), dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)
