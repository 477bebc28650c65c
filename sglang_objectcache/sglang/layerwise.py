"""Layer-wise streaming from storage into SGLang 0.5.17's HiCache (Route A).

The patch in `patches/sglang-0.5.17/` adds one-line calls into this module; all the logic lives
here so that it is tested with the package. The life of one streamed prefetch:

1. prefetch IO thread, `page_transfer`: start one layer-ordered fetch of the whole storage hit into
   the host slots SGLang allocated, publish it as a `Stream`, wait for it.
2. scheduler, `admit` (from `check_prefetch_progress`): once the hit is agreed and host slots are
   allocated, insert the span as host nodes (protected from host eviction) and let the request be
   scheduled now instead of after the last byte.
3. scheduler, `gate_for` (from `start_loading`): a host-to-GPU load that touches a streaming span
   gets a `LayerGate`; the copy loop then runs on the loader thread, and waits before layer l
   until layer l of every page has landed and been verified.
4. forward, `LayerGate.wait_enqueued` (from `LayerLoadingEvent.wait`): the KV accessor of layer l
   blocks until layer l's copy has been enqueued (before that its CUDA event is unrecorded, and
   waiting on an unrecorded event is a silent no-op), then waits on the event as before.
5. scheduler, `poll` (from `check_hicache_events`): a finished stream unprotects its nodes; a
   failed one poisons them: no new match sees them, they are never written back to storage, and
   they are dropped (with anything inserted below them) once nobody holds them. It also logs,
   once, a storage thread of SGLang's that has died (`thread_watch.py`).
6. result processing, `abort_failed` (from `process_batch_result_prefill`): a batch whose load
   waited on a failed stream had garbage KV in its forward: the requests whose prefix holds a node
   of that stream end with an abort, and their KV is freed, not inserted.

Streaming is off (the unpatched path runs) with `layerwise: false`, with draft models, and with
attention TP > 1 (where each rank's failures would have to be agreed before the tree changes).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from ..engine import switch
from .layer_gate import GatedLoader, LayerGate, Stream, gate_at
from .thread_watch import ThreadWatch

log = logging.getLogger("sglang_objectcache")

# The switch interval while SGLang's prefetch thread has storage queries to answer and the scheduler
# is busy (its last turn, poll to poll, took BUSY_TURN or more: a forward's kernels are launched
# from Python, holding the GIL). On the 2-core VM (benchmarks/admission.py) it cut a miss's wait for
# admission beside a busy scheduler 2-6x; beside an idle one, which gives the GIL up many times a
# millisecond anyway, it only made the two threads hand it to and fro (+1 ms), so it stays off there.
QUERY_INTERVAL = 0.001
BUSY_TURN = 0.002

ABORT_MESSAGE = "objectcache: KV streamed from storage failed after admission; request aborted"


class Layerwise:
    """Per-controller state of layer-wise streaming; see the module docstring."""

    def __init__(self, controller, backend, timeout: float):
        self.cc = controller
        self.backend = backend
        self.page_size = controller.page_size
        self.timeout = timeout + 5.0  # the fetch's own deadline fires first; this is a backstop
        self._active: list[Stream] = []  # admitted streams not yet retired by `poll` (scheduler thread)
        self._poisoned: list = []  # roots of subtrees to drop once unlocked (scheduler thread)
        self._loader = GatedLoader()
        # the gated copies hand the GIL to and fro with the forward: as short as the reads' hand-overs
        self.switch_interval = getattr(getattr(backend, "config", None), "switch_interval", 0.0)
        # and SGLang's prefetch thread's answers to storage queries get QUERY_INTERVAL (`queued`);
        # `switch_interval: 0` leaves Python's interval alone for both
        self.query_interval = QUERY_INTERVAL if self.switch_interval else 0.0
        self._window = 0.0  # the interval `queued` lowered Python's to, while it is lowered
        self._last_poll = 0.0
        self._busy = False  # the scheduler's last turn took BUSY_TURN or more
        self.counters = dict(admitted=0, streamed_pages=0, failed=0, aborted=0, dropped_nodes=0)
        self.threads = ThreadWatch(controller)

    def close(self) -> None:
        """The backend is being replaced (a runtime re-attach): stop the loader thread."""
        self._loader.stop()
        self._close_window()

    # ---- scheduler thread: the storage-query window ----------------------------------------

    def queued(self) -> None:
        """A prefetch was just queued. Under `wait_complete` its request waits until SGLang's
        prefetch thread has asked the backend and answered, and that thread must first take the
        GIL from this one, which spins: up to a switch interval per hand-over (Python's 5 ms,
        `benchmarks/admission.py`). So, while the scheduler is busy, the interval stays at
        QUERY_INTERVAL until no prefetch is outstanding (`poll`)."""
        if not self._window and self.query_interval and self._busy:
            self._window = self.query_interval
            switch.enter(self._window)

    def _close_window(self) -> None:
        if self._window:
            switch.leave(self._window)
            self._window = 0.0

    # ---- prefetch IO thread --------------------------------------------------------------

    def page_transfer(self, op) -> None:
        """Replaces `_page_transfer`: one layer-ordered fetch of the whole hit."""
        keys = list(op.hash_value)
        n_tok = len(keys) * self.page_size
        slots = op.host_indices[:n_tok]
        t0 = time.perf_counter()
        decide = getattr(self.cc, "oc_decide", None)  # the request's compute per layer, for `slack`
        fetch = self.backend.start_layer_fetch(keys, slots, decide.t_layer(op.request_id) if decide else 0.0)
        if fetch is None:
            op.mark_terminate()
            return
        planned = sum(len(o.slots) for o in fetch.plan.objects)
        stream = Stream(fetch, slots)
        stream.op_started = getattr(op, "start_time", None)
        if planned == len(keys):  # stream only what will arrive in full; else the classic path
            with op._lock:
                op.oc_stream = stream
        ok = self.backend.finish_layer_fetch(fetch, t0)
        good = next((i for i, v in enumerate(ok) if not v), len(ok))
        with op._lock:
            stream.closed = True
            stream.ok = good == len(keys)
            admitted = stream.admitted
        if not admitted:  # the scheduler has not used the stream: the classic contract applies
            op.increment(good * self.page_size)
            if good < len(keys):
                op.mark_terminate()
            return
        if stream.deferred is not None and stream.deferred.numel():
            self.cc.append_host_mem_release(stream.deferred)
        if not stream.ok:
            log.warning("objectcache: a streamed prefetch of %d pages failed after admission (%s); "
                        "its requests will be aborted", len(keys), stream.reason())

    @staticmethod
    def owns_tail(op) -> bool:
        """True when the tree owns the slots past `completed_tokens` (streamed): the IO thread must
        not release them."""
        s = getattr(op, "oc_stream", None)
        return s is not None and s.admitted

    # ---- scheduler thread ----------------------------------------------------------------

    def admit(self, tree, req_id: str) -> bool:
        """Admit a request whose storage hit is still streaming. False: use the classic path."""
        last_host_node, prefetch_key, op = tree.ongoing_prefetch[req_id]
        stream: Optional[Stream] = getattr(op, "oc_stream", None)
        if stream is None or op.host_indices is None or op.is_terminated():
            return False
        ps = self.page_size
        n_tok = len(op.hash_value) * ps
        with op._lock:
            if stream.closed:
                return False
            stream.admitted = True
            key = prefetch_key[:n_tok]
            matched = tree._insert_helper_host(last_host_node, key, op.host_indices[:n_tok],
                                               op.hash_value)
            stream.deferred = op.host_indices[:matched]
            stream.nodes = self._nodes_after(last_host_node, key, matched)
            for node in stream.nodes:
                node.protect_host()
                node.oc_stream = stream
        last_host_node.release_host()
        del tree.ongoing_prefetch[req_id]
        self.cc.prefetch_tokens_occupied -= len(prefetch_key)
        loaded = n_tok - matched
        tree.prefetch_loaded_tokens_by_reqid[req_id] = loaded
        if tree.enable_storage_metrics:
            tree.storage_metrics_collector.log_prefetched_tokens(loaded)
        self._active.append(stream)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("objectcache: admitted a streaming prefetch of %d pages %.1f ms after its fetch "
                      "began, %d of %d layers in", len(op.hash_value), (time.monotonic() - stream.started) * 1e3,
                      stream.readiness.ready_layers, stream.readiness.n_layers)
        self.counters["admitted"] += 1
        self.counters["streamed_pages"] += len(op.hash_value)
        return True

    def _nodes_after(self, start, key, matched: int) -> list:
        """The nodes on `key`'s path below `start` that hold tokens past `matched` (the new ones)."""
        nodes, node, done = [], start, 0
        while done < len(key):
            child = node.children[key[done:].child_key(self.page_size)]
            if done >= matched:
                nodes.append(child)
            done += len(child.key)
            node = child
        return nodes

    def gate_for(self, host_indices: torch.Tensor) -> Optional[LayerGate]:
        """The gate for a load of these host slots, or None when none of them is streaming."""
        if not self._active:
            return None
        hit = [s for s in self._active if torch.isin(host_indices, s.slots).any()]
        if not hit:
            return None
        return LayerGate(hit, self.cc.layer_num, self.timeout, tokens=int(host_indices.numel()))

    def run_gated(self, fn: Callable[[], None], gate: LayerGate,
                  on_error: Optional[Callable[[], None]] = None) -> None:
        """Run a gated copy loop on the loader thread; `on_error` runs if it raises."""
        interval = self.switch_interval

        def lowered() -> None:
            switch.enter(interval)
            try:
                fn()
            finally:
                switch.leave(interval)

        self._loader.submit(lowered, gate, on_error)

    def on_split(self, new_node, child) -> None:
        """`_split_node` made `new_node` the head of `child`: it shares the stream and the poison."""
        stream = getattr(child, "oc_stream", None)
        if stream is not None:
            new_node.oc_stream = stream
            new_node.protect_host()
            stream.nodes.append(new_node)
        if getattr(child, "oc_poisoned", False):
            new_node.oc_poisoned = True
            self._poisoned.append(new_node)

    def poll(self, tree) -> None:
        """Retire finished streams, poison failed ones, drop poisoned subtrees nobody holds; say
        so when one of SGLang's storage threads has died; keep the storage-query window open while
        a prefetch is outstanding (`queued`)."""
        self.threads.check(tree)
        now = time.monotonic()
        self._busy, self._last_poll = now - self._last_poll >= BUSY_TURN, now
        if getattr(tree, "ongoing_prefetch", None) and self._busy:
            self.queued()
        else:
            self._close_window()
        still = []
        for s in self._active:
            if not s.closed:
                still.append(s)
                continue
            for node in s.nodes:
                node.oc_stream = None
                node.release_host()
                if not s.ok:
                    node.oc_poisoned = True
                    self._poisoned.append(node)
            if not s.ok:
                self.counters["failed"] += 1
        self._active = still
        if self._poisoned:
            self._drop_poisoned(tree)

    def _drop_poisoned(self, tree) -> None:
        keep = []
        roots = {id(top): top for top in map(self._top_poisoned, self._poisoned)}
        for node in roots.values():
            if not self._in_tree(tree, node):
                continue  # already gone: evicted, dropped, or the whole tree was reset (flush_cache)
            sub, stack = [], [node]
            while stack:
                n = stack.pop()
                sub.append(n)
                stack.extend(n.children.values())
            if any(n.lock_ref > 0 or n.host_ref_counter > 0 for n in sub):
                keep.append(node)
                continue
            tree._drop_subtree_no_host(node)
            self.counters["dropped_nodes"] += len(sub)
            log.warning("objectcache: dropped %d tree nodes whose KV came from a failed stream", len(sub))
        self._poisoned = keep

    @staticmethod
    def _log_timeline(gate: LayerGate) -> None:
        """One line per streamed prefill, at its result: where the time between the request's
        prefetch and its first token went (ms)."""
        now, t0 = time.monotonic(), gate.created
        st = gate.streams[0]
        worst = max(range(gate.n_layers), key=gate.stalled.__getitem__)
        log.debug("objectcache: streamed prefill: prefetch queued %.1f ms and fetch began %.1f ms before the "
                  "load began; forward asked for KV at +%.1f ms, stalled %.1f ms in all (layer 0: %.1f, "
                  "worst layer %d: %.1f); result at +%.1f ms",
                  (t0 - st.op_started) * 1e3 if st.op_started else float("nan"), (t0 - st.started) * 1e3,
                  ((gate.asked_at or now) - t0) * 1e3, sum(gate.stalled) * 1e3, gate.stalled[0] * 1e3,
                  worst, gate.stalled[worst] * 1e3, (now - t0) * 1e3)
        try:
            g = gate.gpu.summary() if gate.gpu is not None else None
        except Exception as e:  # noqa: BLE001 - a debug line must never take the scheduler down
            log.debug("objectcache: no GPU timeline for this prefill: %s", e)
            g = None
        if g is not None:
            log.debug("objectcache: streamed prefill on the GPU: %d layer copies took %.1f ms over a span of "
                      "%.1f ms; the forward reached layer 0 %.1f ms after the first copy began and waited "
                      "%.1f ms in all for copies", gate.n_layers, g["copy_ms"], g["span_ms"],
                      g["first_reach_ms"], g["forward_waited_ms"])

    @staticmethod
    def _read_failed_stream(req, failed: set[int]) -> bool:
        """Whether the request's prefix holds a node of a failed stream (poisoned already, or still
        marked with its stream). Without a tree position, any request that loaded from host or
        storage is taken to have."""
        node = getattr(req, "last_node", None)
        if node is None:
            return getattr(req, "host_hit_length", 0) > 0 or getattr(req, "storage_hit_length", 0) > 0
        while node is not None:
            if getattr(node, "oc_poisoned", False) or id(getattr(node, "oc_stream", None)) in failed:
                return True
            node = node.parent
        return False

    def _in_tree(self, tree, node) -> bool:
        """Whether `node` hangs, link by link, from this tree's current root. After a reset the old
        nodes still point at each other, but their slots belong to the new tree: never free them."""
        while node.parent is not None:
            if node.parent.children.get(node.key.child_key(self.page_size)) is not node:
                return False
            node = node.parent
        return node is tree.root_node

    @staticmethod
    def _top_poisoned(node):
        while node.parent is not None and getattr(node.parent, "oc_poisoned", False):
            node = node.parent
        return node

    # ---- checks called from SGLang's tree and scheduler ------------------------------------

    @staticmethod
    def unmatchable(node) -> bool:
        """`_match_prefix_helper` stops before a poisoned node."""
        return getattr(node, "oc_poisoned", False)

    @staticmethod
    def poisoned_path(node) -> bool:
        """True if `node` or an ancestor holds poisoned KV: never back such a node up to storage."""
        while node is not None:
            if getattr(node, "oc_poisoned", False):
                return True
            node = node.parent
        return False

    def abort_failed(self, batch) -> None:
        """Before a prefill batch's results are used: if its load waited on a failed stream, end
        the requests that loaded from host or storage with an abort and free, not cache, their KV."""
        idx = getattr(batch, "hicache_consumer_index", -1)
        if idx is None or idx < 0:
            return
        gate = gate_at(self.cc, idx)
        if gate is None:
            return
        gate.join()
        if log.isEnabledFor(logging.DEBUG):
            self._log_timeline(gate)
        if gate.failed is None:
            return
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        failed = {id(st) for st in gate.streams if st.readiness.failed is not None or st.ok is False}
        # no stream failed: the copy itself did, and left every request that loaded incomplete
        copy_failed = not failed
        for req in batch.reqs:
            loaded = getattr(req, "host_hit_length", 0) > 0 or getattr(req, "storage_hit_length", 0) > 0
            if (copy_failed and loaded) or self._read_failed_stream(req, failed):
                req.to_finish = FINISH_ABORT(f"{ABORT_MESSAGE} ({gate.failed})", 503, "ServiceUnavailable")
                req.skip_radix_cache_insert = True
                self.counters["aborted"] += 1
        log.error("objectcache: %s: %s", ABORT_MESSAGE, gate.failed)


def attach(controller, backend) -> Optional[Layerwise]:
    """Called after the backend is attached: turn streaming on where the patch and the set-up
    allow it, and say so once."""
    if not getattr(controller, "oc_layerwise_patch", False):
        from .patcher import available_versions
        from .compat import sglang_version

        if sglang_version() in available_versions():
            log.info("objectcache: SGLang is not patched, so storage hits load whole before admission; "
                     "`objectcache patch-sglang` enables layer-wise streaming")
        return None
    from ..errors import PatchError
    from .patcher import state

    try:
        st = state()
    except (PatchError, OSError) as e:
        st = str(e)
    if st != "applied":  # e.g. an older release's patch, without a later fix: do not stream on it
        log.warning("objectcache: layer-wise streaming is off: the installed patch is not this release's "
                    "(%s); run `objectcache patch-sglang`", st)
        return None
    cfg = getattr(backend, "config", None)
    if cfg is None or not cfg.layerwise:
        log.info("objectcache: layer-wise streaming is off (layerwise: false)")
        return None
    why = _unsupported(controller)
    if why:
        log.warning("objectcache: layer-wise streaming is off: %s", why)
        return None
    lw = Layerwise(controller, backend, cfg.timeout)
    log.info("objectcache: layer-wise streaming is on")
    return lw


def _unsupported(controller) -> str:
    if getattr(controller, "has_draft", False):
        return "a draft model is attached"
    for group in ("attn_tp_group", "tp_group"):
        g = getattr(controller, group, None)
        if g is None:
            continue
        try:
            size = torch.distributed.get_world_size(group=g)
        except Exception as e:  # noqa: BLE001 - unknown means unsafe: failures must be rank-agreed
            return f"cannot tell the size of {group} ({type(e).__name__})"
        if size > 1:
            return "attention TP size > 1"
    return ""


def counters(controller) -> dict[str, Any]:
    lw = getattr(controller, "oc_layerwise", None)
    return dict(lw.counters) if lw is not None else {}
