"""Python's GIL switch interval, lowered while our threads need the GIL promptly.

Each range read hands the GIL between obstore's callback, the I/O loop and a copy thread, and
SGLang's scheduler thread holds it most of the time: at Python's 5 ms interval every hand-over can
wait that long. So do SGLang's prefetch thread's answers to storage queries, which a request waits
for under `wait_complete` (`sglang/layerwise.py`'s query window). The setting is process-wide:
each holder `enter`s with the interval it wants and `leave`s with the same; while any hold, the
smallest of theirs applies, and Python's own comes back when the last one leaves.
"""

from __future__ import annotations

import collections
import sys
import threading

_lock = threading.Lock()
_held: collections.Counter = collections.Counter()  # interval -> holders
_saved: float | None = None


def _apply() -> None:
    global _saved
    if _held:
        if _saved is None:
            _saved = sys.getswitchinterval()
        sys.setswitchinterval(min(_held))
    elif _saved is not None:
        sys.setswitchinterval(_saved)
        _saved = None


def enter(interval: float) -> None:
    """A holder starts; `interval` seconds (0: leave Python's alone)."""
    if not interval:
        return
    with _lock:
        _held[interval] += 1
        _apply()


def leave(interval: float) -> None:
    """The holder that called `enter(interval)` has ended."""
    if not interval:
        return
    with _lock:
        _held[interval] -= 1
        if _held[interval] <= 0:
            del _held[interval]
        _apply()
