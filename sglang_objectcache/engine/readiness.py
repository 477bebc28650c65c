"""Per-layer readiness of one request's fetch: who waits for layer l, and when it is there.

Layer l is ready when every range that carries layer l of any page of the request has its layer-l
bytes verified and copied into place. A failure (corrupt object, I/O error, deadline,
cancellation) marks the whole request failed with a reason and releases every waiter; a layer is
never reported ready unless all of its bytes are in place and verified.

The counts live in one int64 array that the native helper (`native/layers.c`) shares: a pull thread
receiving a range piece by piece counts each of the range's layers there as soon as that layer's
pieces are in place, without the GIL, and the thread that gates a layer's host-to-GPU copy waits
there too. Without the helper the same counts are kept in Python under a condition variable.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .. import native

_FOREVER_NS = 1 << 61


class LayerReadiness:
    def __init__(self, n_layers: int, pending_per_layer: list[int]):
        if len(pending_per_layer) != n_layers:
            raise ValueError("one pending count per layer")
        n = self.n_layers = n_layers
        # landed[n], need[n], ready_ns[n] (CLOCK_MONOTONIC, 0 before), failed: native/layers.c
        self.words = np.zeros(3 * n + 1, dtype=np.int64)
        self._landed, self._need, self._ready_ns = self.words[:n], self.words[n:2 * n], self.words[2 * n:3 * n]
        self._need[:] = pending_per_layer
        self._ready_ns[self._need == 0] = time.monotonic_ns()
        self.address = self.words.ctypes.data
        self._native = native.layer_words()
        self._cond = threading.Condition()
        self.failed: str | None = None
        self._ready_when_failed = 0

    def arrived(self, l0: int, l1: int) -> None:
        """One verified range covering layers [l0, l1) has been copied into place."""
        if self.failed is not None:
            return
        if self._native is not None:  # atomic with the pull threads' own counts
            self._native[0](self.address, self.n_layers, l0, l1)
        else:
            with self._cond:
                self._landed[l0:l1] += 1
                done = np.flatnonzero(self._landed[l0:l1] == self._need[l0:l1]) + l0
                self._ready_ns[done] = time.monotonic_ns()
                self._cond.notify_all()
        over = np.flatnonzero(self._landed[l0:l1] > self._need[l0:l1])
        if over.size:
            raise RuntimeError(f"layer {l0 + int(over[0])} delivered more ranges than planned")

    def fail(self, reason: str) -> None:
        """Mark the request failed and release every waiter. The first reason wins; a request
        whose every layer is already in place does not fail."""
        with self._cond:
            if self.failed is None and self._leading() < self.n_layers:
                self._ready_when_failed = self._leading()
                self.failed = reason
                self.words[3 * self.n_layers] = 1
            self._cond.notify_all()

    def _leading(self) -> int:
        short = np.flatnonzero(self._landed < self._need)
        return int(short[0]) if short.size else self.n_layers

    @property
    def ready_layers(self) -> int:
        """Layers ready, counted from layer 0 (the order the GPU needs them); after a failure,
        those that were ready when it came."""
        return self._ready_when_failed if self.failed is not None else self._leading()

    @property
    def ready_at(self) -> list[float | None]:
        """When each layer became ready (time.monotonic() seconds), None where it has not."""
        return [ns / 1e9 if ns else None for ns in self._ready_ns.tolist()]

    def is_ready(self, layer: int) -> bool:
        return self.failed is None and self._landed[layer] >= self._need[layer]

    def wait(self, layer: int, timeout: float | None = None) -> bool:
        """Block until layer `layer` is ready (True) or the request failed or timed out (False)."""
        if self.is_ready(layer) or self.failed is not None:
            return self.is_ready(layer)
        if self._native is not None:  # without the GIL, where the pull threads count
            ns = _FOREVER_NS if timeout is None else max(0, int(timeout * 1e9))
            self._native[1](self.address, self.n_layers, layer, ns)
        else:
            with self._cond:
                self._cond.wait_for(lambda: self.failed is not None or self._landed[layer] >= self._need[layer],
                                    timeout)
        return self.is_ready(layer)

    def wait_all(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for layer in range(self.n_layers):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.wait(layer, left):
                return False
        return True
