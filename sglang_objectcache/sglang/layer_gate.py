"""What a layer-wise load waits on: the streams it reads, a gate per layer, one loader thread.

A `Stream` is one prefetch's layer-ordered fetch (the engine's `ReadSession`) into host slots; a
`LayerGate` opens layer l of a host-to-GPU load once every stream it reads has layer l in place;
the `GatedLoader` runs gated copy loops one after another on its own thread, so the load stream's
order is kept. `layerwise.py` wires them into SGLang's controller and tree.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

import torch

log = logging.getLogger("sglang_objectcache")


class Stream:
    """One prefetch operation's layer-ordered fetch, from the IO thread to the tree."""

    def __init__(self, fetch, slots: torch.Tensor):
        self.readiness = fetch.readiness
        self.started = fetch.started  # time.monotonic() when the fetch began
        self.op_started: Optional[float] = None  # when SGLang queued the prefetch (timeline)
        self.slots = slots  # host token slots the fetch writes
        self.admitted = False  # set under the operation's lock by the scheduler
        self.closed = False  # set under the operation's lock by the IO thread when the fetch ended
        self.ok: Optional[bool] = None  # every page landed and verified (set once closed)
        self.deferred: Optional[torch.Tensor] = None  # duplicate slots, freed when the fetch ends
        self.nodes: list = []  # tree nodes whose host_value lies in `slots`

    def reason(self) -> str:
        return self.readiness.failed or "incomplete"


class LayerGate:
    """One host-to-GPU load's gate: layer l is copied once every stream it reads has layer l."""

    def __init__(self, streams: list[Stream], n_layers: int, timeout: float, tokens: int = 0):
        self.streams = streams
        self.tokens = tokens  # tokens this load copies to the GPU (host hits and streamed ones)
        self.n_layers = n_layers
        self.timeout = timeout
        self.created = time.monotonic()
        self.deadline = self.created + timeout  # one budget for all layers, not one per layer
        self.failed: Optional[str] = None
        self.opened_at: list[Optional[float]] = [None] * n_layers  # when layer l's copy was released
        self.stalled = [0.0] * n_layers  # seconds the forward waited for layer l's copy (timeline)
        self.asked_at: Optional[float] = None  # when the forward first asked for a layer
        self.gpu = GpuMarks(n_layers) if GpuMarks.wanted() else None  # GPU-side timeline (DEBUG only)
        self._enqueued = [threading.Event() for _ in range(n_layers)]
        self._all = threading.Event()

    def wait(self, layer: int) -> bool:
        """Loader thread, before layer `layer`'s copy: block until it is in host memory."""
        for s in self.streams:
            if self.failed is not None:
                break  # the batch is lost: open the remaining layers at once
            if not s.readiness.wait(layer, max(0.0, self.deadline - time.monotonic())):
                self.failed = s.reason() if s.readiness.failed else f"layer {layer} not ready after {self.timeout:.0f}s"
        self.opened_at[layer] = time.monotonic()
        if self.gpu is not None:
            self.gpu.mark(self.gpu.copy_begin, layer)  # on the load stream (the loader's context)
        return self.failed is None

    def enqueued(self, layer: int) -> None:
        """Loader thread, after layer `layer`'s copy and event are on the load stream."""
        if self.gpu is not None:
            self.gpu.mark(self.gpu.copy_end, layer)
        self._enqueued[layer].set()
        if layer == self.n_layers - 1:
            self._all.set()

    def release(self, reason: Optional[str] = None) -> None:
        """Open every gate (after an error in the loader): nobody may wait forever."""
        if reason and self.failed is None:
            self.failed = reason
        for e in self._enqueued:
            e.set()
        self._all.set()

    def wait_enqueued(self, layer: int) -> None:
        """Forward thread, in the KV accessor of layer `layer`."""
        e = self._enqueued[layer]
        if self.asked_at is None:
            self.asked_at = time.monotonic()
        if not e.is_set():
            t = time.monotonic()
            e.wait()
            self.stalled[layer] += time.monotonic() - t
        if self.gpu is not None:
            self.gpu.mark(self.gpu.reached, layer)  # on the forward's stream, before it waits

    def join(self) -> None:
        self._all.wait()


class GpuMarks:
    """CUDA events around each layer's copy (load stream) and where the forward reached each layer
    (its stream): what the GPU did, which host clocks cannot see. A forward can launch every layer
    without a host-side stall and still wait on the GPU for copies; this says how long."""

    def __init__(self, n_layers: int):
        self.copy_begin: list = [None] * n_layers
        self.copy_end: list = [None] * n_layers
        self.reached: list = [None] * n_layers

    @staticmethod
    def wanted() -> bool:
        return log.isEnabledFor(logging.DEBUG) and torch.cuda.is_available()

    @staticmethod
    def mark(marks: list, layer: int) -> None:
        """Runs on the loader's and the forward's threads: whatever fails here leaves the layer
        unmarked (and the timeline line out), never the load or the forward."""
        try:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
        except Exception:  # noqa: BLE001 - a debug aid
            return
        marks[layer] = e

    def summary(self) -> Optional[dict]:
        """Milliseconds (None where a layer went unmarked): the copies' GPU time, the span from the
        first copy's start to the last one's end, and how long the forward's stream waited on copies
        in all (per layer, from reaching the layer to that layer's copy ending). Waits for the
        events, as the batch's result is about to anyway (DEBUG only)."""
        events = self.copy_begin + self.copy_end + self.reached
        if any(e is None for e in events):
            return None
        for e in events:
            e.synchronize()
        return gpu_summary(self.copy_begin, self.copy_end, self.reached)


def gpu_summary(begin: list, end: list, reached: list) -> dict:
    """`GpuMarks.summary` on any events with `elapsed_time(other)` (ms from self to other)."""
    return {
        "copy_ms": sum(b.elapsed_time(e) for b, e in zip(begin, end)),
        "span_ms": begin[0].elapsed_time(end[-1]),
        "forward_waited_ms": sum(max(0.0, r.elapsed_time(e)) for r, e in zip(reached, end)),
        "first_reach_ms": begin[0].elapsed_time(reached[0]),  # < 0: the forward got there first
    }


class GatedLoader:
    """A single thread that runs gated copy loops in order, so load-stream order is kept."""

    def __init__(self):
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._run, name="objectcache-layer-loader", daemon=True)
        self._t.start()

    def submit(self, fn: Callable[[], None], gate: LayerGate, on_error: Optional[Callable[[], None]] = None) -> None:
        self._q.put((fn, gate, on_error))

    def stop(self, timeout: float = 5.0) -> None:
        """After the loads already queued (SGLang re-attaches backends only when idle)."""
        self._q.put(None)
        self._t.join(timeout)

    @property
    def alive(self) -> bool:
        return self._t.is_alive()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, gate, on_error = item
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a dead loader would hang every forward
                log.exception("objectcache: layer-wise load failed")
                if on_error is not None:  # before the gates open: whoever waited on them sees it done
                    try:
                        on_error()  # e.g. ack the load, so that SGLang unlocks its nodes
                    except Exception:  # noqa: BLE001
                        log.exception("objectcache: cleaning up a failed layer-wise load failed")
                gate.release(f"loader error: {e}")
            else:
                gate.release()
            if log.isEnabledFor(logging.DEBUG) and gate.opened_at[-1] is not None:
                log.debug("objectcache: gated load of %d layers: layer 0 copied %.1f ms after the load "
                          "began, the last layer %.1f ms after%s", gate.n_layers,
                          (gate.opened_at[0] - gate.created) * 1e3, (gate.opened_at[-1] - gate.created) * 1e3,
                          f" (failed: {gate.failed})" if gate.failed else "")


def gate_at(controller, idx: int) -> Optional[LayerGate]:
    """The gate of the load whose consumer index is `idx` (a batch's `hicache_consumer_index`), or
    None where that load was not streamed (the patch hangs it on the load's event as `oc_gate`)."""
    return getattr(controller.layer_done_counter.events[idx], "oc_gate", None)
