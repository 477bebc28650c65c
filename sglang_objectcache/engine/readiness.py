"""Per-layer readiness of one request's fetch: who waits for layer l, and when it is there.

Layer l is ready when every range that carries layer l of any page of the request has arrived and
been verified and copied. A failure (corrupt object, I/O error, deadline, cancellation) marks the
whole request failed with a reason and releases every waiter; a layer is never reported ready unless
all of its bytes are in place and verified.
"""

from __future__ import annotations

import threading
import time


class LayerReadiness:
    def __init__(self, n_layers: int, pending_per_layer: list[int]):
        if len(pending_per_layer) != n_layers:
            raise ValueError("one pending count per layer")
        self.n_layers = n_layers
        self._pending = list(pending_per_layer)
        self._events = [threading.Event() for _ in range(n_layers)]
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.failed: str | None = None
        self.ready_layers = 0  # layers ready, counted from layer 0 (the order the GPU needs them)
        self.ready_at: list[float | None] = [None] * n_layers
        for layer, n in enumerate(self._pending):
            if n == 0:
                self._mark(layer)
        self._advance()

    def _mark(self, layer: int) -> None:
        self.ready_at[layer] = time.monotonic()
        self._events[layer].set()

    def _advance(self) -> None:
        while self.ready_layers < self.n_layers and self._events[self.ready_layers].is_set():
            self.ready_layers += 1
        if self.ready_layers == self.n_layers:
            self._done.set()

    def arrived(self, l0: int, l1: int) -> None:
        """One verified range covering layers [l0, l1) has been copied into place."""
        with self._lock:
            if self.failed is not None:
                return
            for layer in range(l0, l1):
                self._pending[layer] -= 1
                if self._pending[layer] < 0:
                    raise RuntimeError(f"layer {layer} delivered more ranges than planned")
                if self._pending[layer] == 0:
                    self._mark(layer)
            self._advance()

    def fail(self, reason: str) -> None:
        """Mark the request failed and release every waiter. The first reason wins."""
        with self._lock:
            if self.failed is None and not self._done.is_set():
                self.failed = reason
        for e in self._events:
            e.set()
        self._done.set()

    def is_ready(self, layer: int) -> bool:
        return self.failed is None and self._events[layer].is_set() and self._pending[layer] == 0

    def wait(self, layer: int, timeout: float | None = None) -> bool:
        """Block until layer `layer` is ready (True) or the request failed or timed out (False)."""
        self._events[layer].wait(timeout)
        return self.is_ready(layer)

    def wait_all(self, timeout: float | None = None) -> bool:
        self._done.wait(timeout)
        return self.failed is None and self.ready_layers == self.n_layers
