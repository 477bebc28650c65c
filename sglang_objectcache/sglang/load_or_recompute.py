"""Load or recompute, inside SGLang 0.5.17 (with the patch set): the glue of `engine/decide.py`.

Attached to the cache controller as `oc_decide`; the patch calls it from three places:
- `note(req_id, last_host_node)`, scheduler thread, when a prefetch is queued: how many tokens the
  request already has on device or host (the context before its storage hit);
- `__call__(operation, hash_value, hit_tokens)`, prefetch thread, once the storage hit is known
  and before the ranks agree on it (their MIN all-reduce follows, so every rank loads the least
  any rank chose): how many of the hit's tokens to load;
- `observe_prefill(batch)`, scheduler thread, when a prefill batch's results are ready: its
  forward time, which fits the prefill model. A batch that loaded from host or storage is left out
  of that fit (it waits on copies); where its load was streamed (gated), its time past the model's
  compute and past its waits for bytes is what the load cost (`LoadCost`).
`t_layer(req_id)` gives the streamed fetch the request's compute time per layer, so `fetch_policy:
slack` ranks requests by need (`layerwise.py`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from ..engine.decide import Decider, LoadCost, PrefillModel
from ..engine.read import locate
from .layer_gate import gate_at

log = logging.getLogger("sglang_objectcache")

MIN_WAIT = 0.05  # seconds: the least a chosen load is given, whatever the model says
PROBE_AFTER = 5.0  # seconds: a tier not read for this long is read once more before it is judged (per instance: probe_after)


KEEP = 4096  # requests remembered per table: far more than are ever in flight at once


def _put(table: collections.OrderedDict, key, value) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > KEEP:
        table.popitem(last=False)


class LoadOrRecompute:
    def __init__(self, controller, backend, *, margin: float, overlap: bool):
        self.cc = controller
        self.cache = backend.cache
        self.fp = backend.fp
        self.page_size = controller.page_size
        self.page_bytes = self.fp.n_layers * self.fp.piece_bytes
        self.model = PrefillModel()
        self.cost = LoadCost()
        self.decider = Decider(self.model, self.page_size, margin=margin, overlap=overlap, cost=self.cost)
        self._lock = threading.Lock()
        # per request, between the calls that set and read them; bounded, since some requests never
        # reach the reading call (no storage hit, a revoked prefetch, a whole prefetch without t_layer)
        self._prefix: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._t_layer: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._deadline: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.probe_after = PROBE_AFTER

    @property
    def margin(self) -> float:
        return self.decider.margin

    # ---- scheduler thread ------------------------------------------------------------------

    def note(self, req_id: str, last_host_node) -> None:
        """A prefetch is about to be queued for `req_id` (its context before the hit)."""
        lw = getattr(self.cc, "oc_layerwise", None)
        if lw is not None:
            lw.queued()  # the prefetch thread's answer should not wait out a switch interval
        n, node = 0, last_host_node
        while node is not None and getattr(node, "parent", None) is not None:
            n += len(node.key)
            node = node.parent
        with self._lock:
            _put(self._prefix, req_id, n)

    def observe_prefill(self, batch) -> None:
        mode = getattr(batch, "forward_mode", None)
        if mode is None or not mode.is_extend() or getattr(mode, "is_mixed", lambda: False)():
            return
        if not getattr(batch, "launch_ts", None):
            return
        took = time.monotonic() - batch.launch_ts
        ext, pre = batch.extend_lens or [], batch.prefix_lens or []
        tokens = sum(ext)
        token_ctx = sum(e * (p + e) for e, p in zip(ext, pre))
        idx = getattr(batch, "hicache_consumer_index", -1)
        if idx is None or idx == -1:
            self.model.observe(tokens, token_ctx, took)
            return
        # a batch that waited on loads does not measure compute; a streamed one measures the load
        gate = self._gate(idx)
        if gate is None or gate.failed is not None:
            return  # loaded whole (host hits, a whole prefetch), or from a failed stream
        coef = self.model.coefficients()
        if coef is None:
            return
        c0, a, b = coef
        compute, waited = c0 + a * tokens + b * token_ctx, sum(gate.stalled)
        extra = took - waited - compute
        self.cost.observe(gate.tokens, extra)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("objectcache: streamed batch of %d new tokens over %d loaded: forward %.1f ms, waited for "
                      "bytes %.1f ms, modelled compute %.1f ms; the load cost %.1f ms", tokens, gate.tokens,
                      took * 1e3, waited * 1e3, compute * 1e3, extra * 1e3)

    def _gate(self, idx: int):
        try:
            return gate_at(self.cc, idx)
        except (AttributeError, IndexError, TypeError):  # a controller without the patch's counter
            return None

    # ---- prefetch thread -------------------------------------------------------------------

    def _load_seconds(self, keys: list[str]):
        objects = locate(self.cache.tiers, self.cache.ns.root, keys)
        meters = self.cache._reads.meters or {}

        def seconds(pages: int) -> float | None:
            per: dict = {}
            for o in objects:
                take = min(len(o.slots), pages - o.first)
                if take > 0:
                    per[o.tier] = per.get(o.tier, 0) + take * self.page_bytes
            worst = 0.0
            for tier, nbytes in per.items():
                meter = meters.get(tier)
                if meter is None or meter.stale(self.probe_after):
                    return None  # not measured (lately): load, and so measure
                t = meter.seconds(nbytes)
                if t is None:
                    return None
                worst = max(worst, t)  # tiers read in parallel
            return worst
        return seconds

    def __call__(self, operation, hash_value, hit_tokens: int) -> int:
        req_id = operation.request_id
        with self._lock:
            prefix = self._prefix.pop(req_id, 0)
        new_tokens = len(operation.token_ids)
        why: dict = {}
        try:
            load = self.decider.tokens_to_load(hit_tokens, new_tokens, prefix,
                                               self._load_seconds(list(hash_value[:hit_tokens // self.page_size])),
                                               why)
        except Exception:  # noqa: BLE001 - never take SGLang's prefetch thread down: as SGLang would
            log.exception("objectcache: load-or-recompute failed; loading the whole hit")
            load = hit_tokens
        rest, budget = new_tokens - load, None
        t = self.model.seconds(rest, prefix + new_tokens)
        full = self.model.seconds(new_tokens, prefix + new_tokens)
        if t is not None and full is not None and load:
            with self._lock:
                if self.decider.overlap:  # streamed (layerwise.py): its compute per layer, for `slack`
                    _put(self._t_layer, req_id, t / max(self.fp.n_layers, 1))
                else:  # whole prefetch (`bounded`): the load may take what recomputing the loaded
                    # part would, plus the margin; no longer
                    budget = max(full - t + self.margin * full, MIN_WAIT)
                    _put(self._deadline, req_id, time.monotonic() + budget)
        if log.isEnabledFor(logging.DEBUG):
            ms = {k: f"{v * 1e3:.0f}" if v is not None else "?" for k, v in why.items() if k.endswith("_s")}
            log.debug("objectcache: request %s loads %d of %d stored tokens (%d new over %d cached); expected ms: "
                      "load %s (and %s in the forward), recompute %s, chosen %s; load wait budget %s", req_id, load,
                      hit_tokens, new_tokens, prefix, ms.get("load_s", "?"), ms.get("cost_s", "?"),
                      ms.get("recompute_s", "?"), ms.get("chosen_s", "?"),
                      f"{budget * 1e3:.0f}" if budget is not None else "-")
        return load

    def bounded(self, page_get, backend):
        """SGLang's page-get function (whole prefetch), with each request's reads ending by its
        deadline: a tier that slows after the decision costs a request at most what recomputing
        would have, plus the margin; what is not in by then is recomputed."""
        def get(operation, hash_values, host_indices, extra_info=None):
            with self._lock:
                at = self._deadline.get(operation.request_id)
            if at is None:
                return page_get(operation, hash_values, host_indices, extra_info)
            with backend.deadline(at):
                return page_get(operation, hash_values, host_indices, extra_info)
        return get

    def t_layer(self, req_id: str) -> float:
        with self._lock:
            return self._t_layer.pop(req_id, 0.0)

    def stats(self) -> dict:
        coef = self.model.coefficients()
        meters = (self.cache._reads.meters or {}).items()
        cost = self.cost.coefficients()
        return {**self.decider.counters, "prefill_fit": list(coef) if coef else None,
                "load_cost": list(cost) if cost else None,
                "read_rates": {t.name: m.rate for t, m in meters},
                "read_latencies": {t.name: m.latency for t, m in meters}}


def attach(controller, backend):
    """The decision for this controller, or None where it does not apply (off in the config, or
    SGLang without the patch's hooks)."""
    cfg = getattr(backend, "config", None)
    if cfg is None or not cfg.load_or_recompute or backend.cache is None:
        return None
    if not getattr(type(controller), "oc_decide_patch", False):
        return None
    overlap = getattr(controller, "oc_layerwise", None) is not None
    lor = LoadOrRecompute(controller, backend, margin=cfg.load_margin, overlap=overlap)
    backend.decisions = lor.stats  # in the backend's stats, and so in /metrics
    return lor
