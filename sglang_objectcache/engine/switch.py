"""Python's GIL switch interval, lowered while reads are in flight.

Each range read hands the GIL between obstore's callback, the I/O loop and a copy thread, and
SGLang's scheduler thread holds it most of the time: at Python's 5 ms interval every hand-over can
wait that long. The setting is process-wide, so it is lowered only while at least one fetch is in
flight (counted across every cache in the process) and restored when the last one ends; decoding
without reads runs at Python's own interval.
"""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_active = 0
_saved: float | None = None


def enter(interval: float) -> None:
    """A fetch starts; `interval` seconds (0: leave Python's alone)."""
    global _active, _saved
    if not interval:
        return
    with _lock:
        _active += 1
        if _active == 1:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(interval)


def leave(interval: float) -> None:
    """The fetch that called `enter(interval)` has ended."""
    global _active, _saved
    if not interval:
        return
    with _lock:
        _active -= 1
        if _active == 0 and _saved is not None:
            sys.setswitchinterval(_saved)
            _saved = None
