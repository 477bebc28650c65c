"""Closing the backend when SGLang's process ends.

SGLang calls a storage backend's `close()` only when the backend is detached; a server that simply
exits would drop the copies owed below (write-back) and the last manifest. So every open cache is
closed (each within its `shutdown_timeout`) at interpreter exit, and on SIGTERM before the signal's
previous handling goes on (SGLang's own handler where it set one, else the default: the process
ends).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref

log = logging.getLogger("sglang_objectcache")

_open: "weakref.WeakSet" = weakref.WeakSet()
_installed = False
_lock = threading.Lock()


def register(cache) -> None:
    """Close `cache` (anything with `close()`) when the process ends."""
    global _installed
    _open.add(cache)
    with _lock:
        if _installed:
            return
        _installed = True
    atexit.register(close_all)
    if threading.current_thread() is threading.main_thread():
        _chain_sigterm()


def close_all() -> None:
    for cache in list(_open):
        try:
            cache.close()
        except Exception:  # noqa: BLE001 - shutting down: keep closing the others
            log.exception("objectcache: close at exit failed")


def _chain_sigterm() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return

    def on_sigterm(signum, frame):
        log.info("objectcache: SIGTERM: publishing what is owed before the process ends")
        close_all()
        if callable(previous):
            previous(signum, frame)
        else:  # the default: end the process as SIGTERM would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
