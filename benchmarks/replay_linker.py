"""The replay's linker-route row: the same workload through SGLang 0.5.23's real UnifiedRadixCache
with `ObjectCacheLinker` attached by SGLang's `dynamic` linker factory (tests/testbed/unified.py),
on CPU with synthetic KV.

Per wave of `concurrency` requests, as the scheduler does: match (the linker's lookup), admit
(private device slots, `load` queued), start the batch's loads, then the forward: layer by layer,
wait on the linker's counter, as the KV pool's accessors do. Each layer's ready time is measured;
the GPU's compute per layer is modelled as in the HiCache rows (`replay.modelled_prefill_s`), and a
request's TTFT is the pipeline of the two: layer l's compute starts when layer l is ready and the
previous layer's compute is done. Then the uncached tail is "computed" (the KV pattern written into
fresh slots) and the sequence inserted, which writes it through to storage. There is no host tier
on this route, so the device pool is the only cache in front of storage: the row's storage hits
differ from the HiCache rows' by design, and it takes no part in the verdict.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable

import replay
from replay import BackendRun, Geometry, KVPattern, ReqResult, modelled_prefill_s

from sglang_objectcache.bench.workload import Request

NAME = "objectcache-linker"


def run_linker(reqs: list[Request], *, srv, geo: Geometry, concurrency: int, device_tokens: int,
               progress: Callable[[str], None] | None = None) -> BackendRun:
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from testbed.unified import admit, build_unified_tree, finish, insert, loaded_slots, make_req, match, start
    from testbed.unified import wait_offloads

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    extra = {"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix}]}
    bed = build_unified_tree("ObjectCacheLinker", "sglang_objectcache.sglang.linker", extra, layers=geo.layers,
                             heads=geo.heads, head_dim=geo.head_dim, page_size=geo.page_size,
                             device_tokens=device_tokens)
    tree, kv, ps, linker = bed.tree, bed.kv, geo.page_size, bed.linker
    pattern = KVPattern(kv, geo)
    run = BackendRun(NAME, concurrency, reqs[0].prefix_len if reqs else 0, bytes_per_token=geo.bytes_per_token,
                     page_size=ps)
    run.notes.append("linker route: no host tier; loads stream into private device slots layer by layer")
    t_start = time.perf_counter()
    try:
        for w0 in range(0, len(reqs), concurrency):
            wave = reqs[w0:w0 + concurrency]
            live = []  # (request, its Req, result, loaded slots)
            for r in wave:
                toks = r.input_ids
                rr = ReqResult(r.index, r.group, len(toks))
                q = make_req(f"r{r.index}-{uuid.uuid4().hex[:6]}", toks)
                m = match(tree, q)
                lock = tree.inc_lock_ref(m.last_device_node).to_dec_params()  # held until the insert
                rr.device_hit = m.device_prefix_len
                loaded = admit(tree, q) if m.host_hit_length else 0
                rr.storage_hit = loaded
                rr.prefetch_issued = loaded > 0
                rows = loaded_slots(tree, q)
                live.append((r, q, rr, None if rows is None else rows.clone(), m, lock))
            t0 = time.monotonic()
            index = start(tree, bed.tp_worker)
            ready = []
            if index >= 0:
                for layer in range(geo.layers):  # the forward's waits, as get_key_buffer(layer) does
                    bed.counter.set_consumer(index)
                    bed.counter.wait_until(layer)
                    ready.append(time.monotonic() - t0)
            failed = set(finish(tree, [x[1] for x in live])) if index >= 0 else set()
            for r, q, rr, rows, m, lock in live:
                toks = r.input_ids
                new_tokens = len(toks) - rr.device_hit - rr.storage_hit
                if rr.storage_hit and ready:
                    rr.fetch_s, rr.first_layer_s = ready[-1], ready[0]
                    per_layer = modelled_prefill_s(new_tokens, len(toks), 1)
                    f = 0.0
                    for t in ready:
                        f = max(f, t) + per_layer
                    rr.ttft_modelled_s = f
                else:
                    rr.ttft_modelled_s = modelled_prefill_s(new_tokens, len(toks), geo.layers)
                dev_idx = (tree.path_device_indices(m.last_device_node) if rr.device_hit
                           else torch.empty(0, dtype=torch.int64))
                if rr.device_hit:
                    ok = pattern.verify(dev_idx, torch.tensor(toks[:rr.device_hit]), torch.arange(rr.device_hit))
                    rr.verified_tokens += rr.device_hit if ok else 0
                    rr.corrupt_tokens += 0 if ok else rr.device_hit
                if q.rid in failed:
                    run.notes.append(f"request {r.index}: load failed (aborted)")
                    tree.dec_lock_ref(m.last_device_node, lock)
                    continue
                have = rr.device_hit
                parts = [dev_idx]
                if rows is not None:
                    span = torch.arange(have, have + rr.storage_hit)
                    if pattern.verify(rows, torch.tensor(toks[have:have + rr.storage_hit]), span):
                        rr.verified_tokens += rr.storage_hit
                    else:
                        rr.corrupt_tokens += rr.storage_hit
                    parts.append(rows)
                    have += rr.storage_hit
                aligned = len(toks) // ps * ps
                need = aligned - have
                if bed.alloc.available_size() < need:
                    tree.evict(EvictParams(num_tokens=need - bed.alloc.available_size()))
                new = bed.alloc.alloc(need) if need else torch.empty(0, dtype=torch.int64)
                if new is None:
                    raise RuntimeError(f"device pool of {device_tokens} tokens cannot hold a {aligned}-token request")
                new = new.to(torch.int64)
                pattern.fill(new, torch.tensor(toks[have:aligned]), torch.arange(have, aligned))
                parts.append(new)
                insert(tree, q, toks[:aligned], torch.cat(parts), prev_prefix_len=rr.device_hit)
                tree.dec_lock_ref(m.last_device_node, lock)
                run.requests.append(rr)
                if progress:
                    progress(NAME)
            wait_offloads(tree, timeout=600)  # each wave's writes land before the next (settled mode)
        t_drain = time.perf_counter()
        linker.cache.flush()
        run.drain_s = time.perf_counter() - t_drain
        run.wall_s = time.perf_counter() - t_start
        c = linker.counts
        run.pages_read = run.pages_read_requested = c["load_pages"]
        run.pages_written = linker.cache.snapshot()["counters"].get("put_written", 0)
        run.get_calls, run.set_calls = c["loads"], c["offloads"]
        run.s3_requests = replay.s3_requests_of(linker.cache)
    finally:
        linker.close()
        del bed, tree, linker
        gc.collect()
    return run
