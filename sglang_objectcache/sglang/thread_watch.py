"""Says so, once, when one of SGLang's storage threads has died.

SGLang's prefetch and backup threads end on the first exception they do not catch. After that no
prefetch is ever answered, and under `--hicache-storage-prefetch-policy wait_complete` every
request with a prefix long enough to query storage waits for good, with nothing in the log of
why. Checked from the scheduler thread (`Layerwise.poll`), a few times a minute at most.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("sglang_objectcache")

THREADS = ("prefetch_thread", "prefetch_io_aux_thread", "backup_thread")


class ThreadWatch:
    def __init__(self, controller, every: float = 5.0, clock=time.monotonic):
        self.cc = controller
        self.every, self._clock = every, clock
        self._next = clock() + every
        self.dead: set[str] = set()  # named once each

    def check(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.every
        stop = getattr(self.cc, "storage_stop_event", None)
        if not getattr(self.cc, "enable_storage", False) or stop is None or stop.is_set():
            return  # detached, or stopping on purpose
        for name in THREADS:
            t = getattr(self.cc, name, None)
            if t is None or name in self.dead or t.ident is None:  # none, named already, or not started
                continue
            if not t.is_alive():
                self.dead.add(name)
                log.error("objectcache: SGLang's storage thread %s has died (its exception, if any, is in this "
                          "log above); storage is out until the backend is re-attached, and under the prefetch "
                          "policy wait_complete requests that query storage will wait for good", name)
