"""Says so, once, when one of SGLang's storage threads has died, or its prefetch thread is stuck.

SGLang's prefetch and backup threads end on the first exception they do not catch. After that no
prefetch is ever answered, and under `--hicache-storage-prefetch-policy wait_complete` every
request with a prefix long enough to query storage waits for good, with nothing in the log of
why. A prefetch thread that is alive but never answers (session 8's GPU servers: most likely
torch waiting on a dead build's lock, `page_hash.py`) looks the same; a query unanswered for
STUCK_AFTER seconds is named, once per request. Checked from the scheduler thread
(`Layerwise.poll`), a few times a minute at most.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("sglang_objectcache")

THREADS = ("prefetch_thread", "prefetch_io_aux_thread", "backup_thread")
STUCK_AFTER = 30.0  # seconds a storage query may go unanswered (one takes milliseconds: an index lookup)


class ThreadWatch:
    def __init__(self, controller, every: float = 5.0, clock=time.monotonic):
        self.cc = controller
        self.every, self._clock = every, clock
        self._next = clock() + every
        self.dead: set[str] = set()  # named once each
        self.stuck: set[str] = set()  # requests named as waiting on an unanswered query (bounded)

    def check(self, tree=None) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.every
        stop = getattr(self.cc, "storage_stop_event", None)
        if not getattr(self.cc, "enable_storage", False) or stop is None or stop.is_set():
            return  # detached, or stopping on purpose
        if tree is not None:
            self._unanswered(tree, time.monotonic())  # SGLang stamps operations with time.monotonic
        for name in THREADS:
            t = getattr(self.cc, name, None)
            if t is None or name in self.dead or t.ident is None:  # none, named already, or not started
                continue
            if not t.is_alive():
                self.dead.add(name)
                log.error("objectcache: SGLang's storage thread %s has died (its exception, if any, is in this "
                          "log above); storage is out until the backend is re-attached, and under the prefetch "
                          "policy wait_complete requests that query storage will wait for good", name)

    def _unanswered(self, tree, now: float) -> None:
        for entry in list((getattr(tree, "ongoing_prefetch", None) or {}).values()):
            op = entry[-1] if isinstance(entry, tuple) else entry
            rid, started = getattr(op, "request_id", None), getattr(op, "start_time", None)
            if rid is None or started is None or rid in self.stuck or now - started < STUCK_AFTER:
                continue
            if getattr(op, "storage_hit_count", 0) or getattr(op, "is_terminated", lambda: True)():
                continue  # answered (a hit being read), or given up
            if len(self.stuck) >= 1024:
                self.stuck.clear()
            self.stuck.add(rid)
            alive = getattr(getattr(self.cc, "prefetch_thread", None), "is_alive", lambda: False)()
            log.error("objectcache: request %s has waited %.0f s for SGLang's prefetch thread to answer its storage "
                      "query (an index lookup: milliseconds); the thread is %s. Under wait_complete the request "
                      "waits until it does: `py-spy dump --pid %d` shows where the thread is", rid, now - started,
                      "alive, so stuck" if alive else "gone", os.getpid())
