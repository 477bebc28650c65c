"""The one asyncio loop on its own thread, and the synchronous face SGLang's threads call.

SGLang calls the backend from its prefetch, IO and backup threads. Each call hands coroutines to
this loop and waits on its own thread, never on the scheduler thread; a deadline bounds every
wait, so a stuck server turns into misses, not a hung thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Coroutine

log = logging.getLogger("sglang_objectcache")


class Runtime:
    def __init__(self, name: str = "objectcache-io"):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Schedule on the loop; safe from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run to completion and return its result; TimeoutError after `timeout` seconds
        (the coroutine is cancelled)."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer within {timeout:.1f}s") from None

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), timeout)
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


class Background:
    """Work started on the loop that nobody waits for at once (promotions, write-backs, clears),
    kept so that `wait` can let it finish before shutdown; a failure is reported through
    `on_error(what, exception)`, never raised."""

    def __init__(self, runtime: Runtime, on_error):
        self.runtime = runtime
        self.on_error = on_error
        self._futs: set[concurrent.futures.Future] = set()

    def __len__(self) -> int:
        return len(self._futs)

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> concurrent.futures.Future:
        fut = self.runtime.submit(coro)
        self._futs.add(fut)

        def done(f: concurrent.futures.Future) -> None:
            self._futs.discard(f)
            if not f.cancelled() and f.exception() is not None:
                self.on_error(what, f.exception())

        fut.add_done_callback(done)
        return fut

    def wait(self, deadline: float) -> None:
        """Until everything spawned has ended, or time.monotonic() passes `deadline`."""
        while self._futs and time.monotonic() < deadline:
            concurrent.futures.wait(list(self._futs), timeout=max(0.0, deadline - time.monotonic()))
