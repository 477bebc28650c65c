"""Counters and warnings that a server running for months can afford.

Counters are cheap and thread-safe (`ObjectCache.snapshot()` reads them); warnings about the same
kind of trouble are rate-limited, so a dead server gives a line every few seconds, not one per
page.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger("sglang_objectcache")


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: collections.Counter[str] = collections.Counter()

    def add(self, **kw: int) -> None:
        with self._lock:
            self._c.update(kw)

    def set(self, **kw: int) -> None:
        """Gauges (a level, not a count): the latest value wins."""
        with self._lock:
            self._c.update({k: v - self._c.get(k, 0) for k, v in kw.items()})

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class RateLimitedLog:
    """First occurrence of each kind at WARNING, then a count every `every` seconds."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._suppressed[kind] += 1
                return
            self._last[kind] = now
            n = self._suppressed.pop(kind, 0)
        log.warning(msg + (f" (+{n} similar)" if n else ""), *args)
