"""Replay mode: the workload through SGLang 0.5.23's real HiCache on CPU, with synthetic KV.

SGLang's `UnifiedRadixCache` (0.5.23's HiRadixCache) and its `HybridCacheController` (a
HiCacheController) run unchanged; only the model is missing. Per request, as the scheduler does:
match the prefix; prefetch the rest from storage (`prefetch_from_storage`, pumped with
`check_hicache_events` until the prefetch completes); load host hits back to the device pool; then
"compute" the uncached tokens by writing a deterministic KV pattern into fresh device slots and
insert the sequence, which under write_through backs it up to host and then to storage. Pools are
small, so prefixes are evicted from device and host and later come back from storage; every reused
token's KV is compared with the pattern after it is back on the device.

GPU compute and host-to-device copies cannot be measured here: they are modelled from the H200
numbers in the project's GPU notes, and every such column says "modelled".

The `replay` mode of benchmarks/shared_prefix.py (`make bench`); not part of the package, since it
needs the CPU shims of tests/testbed.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from sglang_objectcache.bench.live import percentile  # noqa: E402
from sglang_objectcache.bench.workload import Request  # noqa: E402

# Modelled GPU side (Llama-3.1-8B, bf16, batch 1, measured on an H200, 2026-11-27):
# one layer's prefill of n new tokens over ctx tokens of context, least-squares fit of
# t = c + a*n + b*n*ctx to 4K/16K/64K full prefills (2.9/15.7/108.6 ms) and 512 tokens over a
# 4K/64K prefix (0.60/1.81 ms); within ~25% of each point.
PREFILL_MS = (0.338, 5.28e-4, 2.10e-8)
H2D_BYTES_PER_S = 55e9  # pinned host -> GPU copy, H200


def modelled_prefill_s(new_tokens: int, ctx_tokens: int, layers: int) -> float:
    if new_tokens <= 0:
        return 0.0
    c, a, b = PREFILL_MS
    return layers * (c + a * new_tokens + b * new_tokens * ctx_tokens) / 1e3


@dataclass(frozen=True)
class Geometry:
    """The KV geometry of the synthetic model (default: Llama-3.1-8B at page size 64)."""

    layers: int = 32
    heads: int = 8
    head_dim: int = 128
    page_size: int = 64

    @property
    def bytes_per_token(self) -> int:
        return self.layers * self.heads * self.head_dim * 2 * 2  # K and V, bf16


@dataclass
class ReqResult:
    index: int
    group: int
    tokens: int
    device_hit: int = 0
    host_hit: int = 0
    storage_hit: int = 0
    prefetch_issued: bool = False
    fetch_s: float = 0.0  # prefetch submit -> complete (storage -> host), measured
    first_batch_s: float | None = None  # submit -> first batch_get returned, measured
    first_layer_s: float | None = None  # submit -> layer 0 of the first batch ready (objectcache only)
    verified_tokens: int = 0
    corrupt_tokens: int = 0
    ttft_modelled_s: float = 0.0  # fetch (measured) + H2D and prefill (modelled)


@dataclass
class BackendRun:
    backend: str
    concurrency: int
    system_prompt_len: int
    requests: list[ReqResult] = field(default_factory=list)
    wall_s: float = 0.0
    drain_s: float = 0.0  # of wall_s: waiting for storage writes still queued after the last request
    pages_read: int = 0
    pages_read_requested: int = 0
    pages_written: int = 0
    get_calls: int = 0
    set_calls: int = 0
    s3_requests: dict[str, int] | None = None  # by verb; None where the backend is not S3
    bytes_per_token: int = 0
    page_size: int = 64
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- SGLang on CPU ---------------------------------------------------------------------------

_sglang_ready = False
_one_rank = None


def setup_sglang() -> None:
    """Import SGLang with the CPU shims, load plugins (objectcache's registration), pin one rank."""
    global _sglang_ready
    if _sglang_ready:
        return
    from testbed import cpu_shims

    cpu_shims.install()
    import sglang.srt.mem_cache.memory_pool  # noqa: F401

    cpu_shims.install_cpu_hicache_patches()
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import get_parallel

    load_plugins()
    # SGLang hashes pages with a C++ extension it compiles on first use (~20 s, cached under
    # ~/.cache/torch_extensions): do it now rather than inside the first request's fetch time.
    from sglang.srt.mem_cache.cpp_utils.native_hash import _load_native_hash_module

    _load_native_hash_module()
    # no process group here: one rank (what SGLang's own unit fixtures do)
    global _one_rank
    _one_rank = get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    _one_rank.__enter__()  # kept referenced: the override ends when the object goes
    _sglang_ready = True


# objectcache with one tier key changed, compared in the same run as the default
VARIANTS = {"objectcache-obstore": {"native_reads": "off"}}


def backend_kind(name: str) -> str:
    """SGLang's storage backend name of a row (a variant of objectcache is objectcache)."""
    return "objectcache" if name in VARIANTS else name


def backend_extra(name: str, srv, prefix: str, file_dir: str) -> dict:
    """Each backend's extra config against the same server (or a local directory for `file`)."""
    if backend_kind(name) == "objectcache":
        tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix}
        return {"tiers": [{**tier, **VARIANTS.get(name, {})}]}
    if name == "seaweedfs":
        return {"endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
                "access_key": srv.access_key, "secret_key": srv.secret_key}
    if name == "file":
        return {"file_storage_path": file_dir}
    raise ValueError(f"unknown backend {name}; choose objectcache, {', '.join(VARIANTS)}, file, seaweedfs")


def available_backends(names: list[str]) -> tuple[list[str], list[str]]:
    """(usable, skipped-with-reason) for this SGLang."""
    ok, skipped = [], []
    for n in names:
        if n == "objectcache-linker":
            try:
                import sglang.srt.mem_cache.unified_cache.unified_cache_linker  # noqa: F401
            except ImportError:
                skipped.append("objectcache-linker: this SGLang has no external cache linker (0.5.23 has it)")
                continue
        if n == "seaweedfs":
            try:
                import sglang.srt.mem_cache.storage.seaweedfs.seaweedfs_store  # noqa: F401
            except ImportError:
                skipped.append("seaweedfs: not in this SGLang (0.5.23 has it)")
                continue
        ok.append(n)
    return ok, skipped


class KVPattern:
    """Synthetic KV: a function of (token id, position) per element, varied per (layer, K/V) by an
    XOR of a small constant; int16 bit patterns below 0x7F80, so every bf16 value is finite and
    comparisons are exact."""

    def __init__(self, kv, geo: Geometry):
        import torch

        self.kv, self.geo, self.torch = kv, geo, torch
        self._el = torch.arange(geo.heads * geo.head_dim, dtype=torch.int64).view(1, geo.heads, geo.head_dim)

    def _rows(self, toks, pos):
        base = toks * 2654435761 + pos * 40503
        return ((base.view(-1, 1, 1) + self._el * 31) % 0x7F00).to(self.torch.int16)

    @staticmethod
    def _salt(layer: int, kv: int) -> int:
        return (layer * 2 + kv) * 37 % 0x7F

    def fill(self, idx, toks, pos) -> None:
        rows = self._rows(toks, pos)
        for layer in range(self.geo.layers):
            self.kv.k_buffer[layer].view(self.torch.int16)[idx] = rows ^ self._salt(layer, 0)
            self.kv.v_buffer[layer].view(self.torch.int16)[idx] = rows ^ self._salt(layer, 1)

    def verify(self, idx, toks, pos) -> bool:
        t, rows = self.torch, self._rows(toks, pos)
        return all(t.equal(self.kv.k_buffer[layer].view(t.int16)[idx], rows ^ self._salt(layer, 0))
                   and t.equal(self.kv.v_buffer[layer].view(t.int16)[idx], rows ^ self._salt(layer, 1))
                   for layer in range(self.geo.layers))


class Tree:
    """One SGLang UnifiedRadixCache with HiCache and a storage backend, plus its pools."""

    def __init__(self, backend: str, extra: dict, geo: Geometry, device_tokens: int, host_tokens: int,
                 prefetch_threshold: int):
        import torch
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.mem_cache.unified_cache.components.base import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

        self.geo, self.torch = geo, torch
        extra = dict(extra, prefetch_threshold=prefetch_threshold)
        sa = ServerArgs(model_path="dummy", page_size=geo.page_size, enable_hierarchical_cache=True,
                        hicache_io_backend="direct", hicache_mem_layout="layer_first",
                        hicache_write_policy="write_through", hicache_storage_backend=backend,
                        hicache_storage_backend_extra_config=json.dumps(extra),
                        hicache_storage_prefetch_policy="wait_complete",
                        hicache_ratio=host_tokens / device_tokens)
        set_global_server_args_for_scheduler(sa)
        rtp = ReqToTokenPool(size=4, max_context_len=device_tokens, device="cpu", enable_memory_saver=False)
        self.kv = MHATokenToKVPool(size=device_tokens, page_size=geo.page_size, dtype=torch.bfloat16,
                                   head_num=geo.heads, head_dim=geo.head_dim, layer_num=geo.layers,
                                   device="cpu", enable_memory_saver=False)
        self.alloc = TokenToKVPoolAllocator(size=device_tokens, dtype=torch.bfloat16, device="cpu",
                                            kvcache=self.kv, need_sort=False)
        params = CacheInitParams(req_to_token_pool=rtp, token_to_kv_pool_allocator=self.alloc,
                                 page_size=geo.page_size, disable=False, tree_components=(ComponentType.FULL,),
                                 eviction_policy="lru")
        self.cache = UnifiedRadixCache(params=params)
        # SGLang keeps 10 GiB of host RAM free for a GPU server's other needs; a CPU replay on a small
        # machine needs only its pools, so the check runs against what is available minus 1 GiB.
        import psutil
        from sglang.srt.mem_cache.pool_host.base import host_memory_budget_scope

        with host_memory_budget_scope(max(psutil.virtual_memory().available - 2**30, 0)):
            self.cache.init_hicache(sa, params)
        import atexit

        atexit.unregister(self.cache.shutdown)
        self.cc = self.cache.cache_controller
        self.backend = self.cc.storage_backend
        self.pattern = KVPattern(self.kv, geo)

    def fill(self, idx, toks, pos) -> None:
        self.pattern.fill(idx, toks, pos)

    def verify(self, idx, toks, pos) -> bool:
        return self.pattern.verify(idx, toks, pos)

    def pump(self, cond: Callable[[], bool], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.cache.check_hicache_events()
            if cond():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("SGLang's HiCache did not finish in time")
            time.sleep(0.002)

    def drain_writes(self, timeout: float = 600.0) -> None:
        self.pump(lambda: not self.cache.ongoing_backup and not self.cache.ongoing_write_through, timeout)

    def close(self) -> None:
        try:
            self.cc._stop_storage_threads()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass
        if hasattr(self.backend, "close"):
            self.backend.close()
        ex = getattr(self.backend, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=True)


class Probe:
    """Counts what the controller asks of the backend (uniform over backends) and, for objectcache,
    when layer 0 of each request's first fetch was ready (the engine's per-layer readiness)."""

    def __init__(self, tree: Tree, backend: str):
        self.lock = threading.Lock()
        self.pages_read = self.pages_req = self.pages_written = self.get_calls = self.set_calls = 0
        self.first_batch: dict[str, float] = {}
        self.first_layer: dict[str, float] = {}
        self._cur = threading.local()
        self.s3: dict[str, int] = {}
        cc = tree.cc
        get0, set0 = cc.page_get_func, cc.page_set_func

        def page_get(operation, hash_values, host_indices, extra_info=None):
            rid = str(getattr(getattr(operation, "request_id", None), "rid", operation.request_id))
            self._cur.rid = rid
            try:
                n = get0(operation, hash_values, host_indices, extra_info)
            finally:
                self._cur.rid = None
            with self.lock:
                self.get_calls += 1
                self.pages_req += len(hash_values)
                self.pages_read += int(n or 0)
                self.first_batch.setdefault(rid, time.monotonic())
            return n

        def page_set(hash_values, host_indices, extra_info=None):
            ok = set0(hash_values, host_indices, extra_info)
            with self.lock:
                self.set_calls += 1
                self.pages_written += len(hash_values) if ok else 0
            return ok

        cc.page_get_func, cc.page_set_func = page_get, page_set
        b = tree.backend
        if backend == "objectcache":
            fetch0 = b.cache.fetch

            def fetch(keys, segments, t_layer=0.0):
                f = fetch0(keys, segments, t_layer)
                rid = getattr(self._cur, "rid", None)
                if rid is not None and rid not in self.first_layer:
                    def when_ready(r=f.readiness, rid=rid):
                        if r.wait(0, 120) and r.ready_at[0] is not None:
                            self.first_layer.setdefault(rid, r.ready_at[0])
                    when_ready()  # the IO thread waits for the whole fetch anyway
                return f

            b.cache.fetch = fetch
        elif backend == "seaweedfs":
            b._s3.meta.events.register("before-send.s3", self._count)

    def _count(self, request=None, **_):
        verb = request.method if request is not None else "?"
        with self.lock:
            self.s3[verb] = self.s3.get(verb, 0) + 1


def s3_requests_of(cache) -> dict[str, int]:
    """The requests an objectcache engine sent, by verb."""
    out: dict[str, int] = {}
    for t in cache.tiers:
        for verb, n in t.requests.items():
            out[verb.upper()] = out.get(verb.upper(), 0) + n
    return out


def s3_requests(tree: Tree, backend: str, probe: Probe) -> dict[str, int] | None:
    if backend == "objectcache":
        return s3_requests_of(tree.backend.cache)
    if backend == "seaweedfs":
        return dict(probe.s3)
    return None


def run_backend(backend: str, reqs: list[Request], *, srv, geo: Geometry, concurrency: int,
                device_tokens: int, host_tokens: int, prefetch_threshold: int,
                progress: Callable[[str], None] | None = None, settle_writes: bool = False) -> BackendRun:
    """Replay `reqs` through a fresh tree with `backend`; waves of `concurrency` requests prefetch
    together (SGLang's one prefetch IO thread serves them in turn), then are admitted one by one.
    `settle_writes`: each wave's backups are written before the next wave starts, so what reaches
    storage does not depend on how fast the writes went against the host pool's evictions (a
    test's deterministic mode; the benchmark races them, as a server does)."""
    import torch
    from sglang.srt.mem_cache.base_prefix_cache import (CacheRequestHandle, EvictParams, InsertParams,
                                                        MatchPrefixParams)
    from sglang.srt.mem_cache.radix_cache import RadixKey

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    file_dir = tempfile.mkdtemp(prefix="sglang-oc-file-")
    tree = Tree(backend_kind(backend), backend_extra(backend, srv, prefix, file_dir), geo, device_tokens,
                host_tokens, prefetch_threshold)
    probe = Probe(tree, backend_kind(backend))
    cache, ps = tree.cache, geo.page_size
    run = BackendRun(backend, concurrency, reqs[0].prefix_len if reqs else 0, bytes_per_token=geo.bytes_per_token,
                     page_size=ps)
    run.notes.append("prefetch policy wait_complete; write policy write_through; io backend direct; "
                     "layout layer_first")
    t_start = time.perf_counter()

    def match(toks):
        return cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", toks))))

    try:
        for w0 in range(0, len(reqs), concurrency):
            if settle_writes:
                tree.drain_writes()
            wave = reqs[w0:w0 + concurrency]
            res: dict[int, ReqResult] = {}
            pending: dict[int, tuple] = {}
            for r in wave:
                toks = r.input_ids
                rr = res[r.index] = ReqResult(r.index, r.group, len(toks))
                m = match(toks)
                rr.device_hit, rr.host_hit = m.device_prefix_len, m.host_hit_length
                matched = rr.device_hit + rr.host_hit
                if cache.is_backuped(m.last_host_node) or cache.is_root(m.last_host_node):
                    h = CacheRequestHandle(f"r{r.index}", 0)
                    cache.prefetch_from_storage(h, m.last_host_node, array("q", toks[matched:len(toks) - 1]),
                                                cache.get_last_hash_value(m.last_host_node), None,
                                                matched_prefix_tokens=array("q", toks[:matched]))
                    if cache.has_ongoing_prefetch(h):
                        rr.prefetch_issued = True
                        pending[r.index] = (h, time.monotonic())
            while pending:
                cache.check_hicache_events()
                for i, (h, t0) in list(pending.items()):
                    if cache.check_prefetch_progress(h):
                        rr = res[i]
                        rr.fetch_s = time.monotonic() - t0
                        rr.storage_hit = cache.pop_prefetch_loaded_tokens(h)
                        if h.rid in probe.first_batch:
                            rr.first_batch_s = probe.first_batch.pop(h.rid) - t0
                        if h.rid in probe.first_layer:
                            rr.first_layer_s = probe.first_layer.pop(h.rid) - t0
                        del pending[i]
                time.sleep(0.002)
            for r in wave:
                rr, toks = res[r.index], r.input_ids
                m = match(toks)
                if m.host_hit_length > 0:  # host hits, including what the prefetch just brought
                    if cache.load_back(m.best_match_node):
                        cache.ready_to_load_host_cache()
                        for ack in list(tree.cc.ack_load_queue):
                            ack.finish_event.synchronize()
                        cache.loading_check()
                    m = match(toks)
                reused = m.device_prefix_len
                idx = cache.path_device_indices(m.last_device_node) if reused else torch.empty(0, dtype=torch.int64)
                if reused:
                    if tree.verify(idx, torch.tensor(toks[:reused]), torch.arange(reused)):
                        rr.verified_tokens = reused
                    else:
                        rr.corrupt_tokens = reused
                aligned = len(toks) // ps * ps
                lock = cache.inc_lock_ref(m.last_device_node).to_dec_params()
                need = aligned - reused
                if tree.alloc.available_size() < need:
                    cache.evict(EvictParams(num_tokens=need - tree.alloc.available_size()))
                new = tree.alloc.alloc(need)
                if new is None:
                    raise RuntimeError(f"device pool of {device_tokens} tokens cannot hold a {aligned}-token "
                                       "request; raise --device-tokens")
                new = new.to(torch.int64)
                tree.fill(new, torch.tensor(toks[reused:aligned]), torch.arange(reused, aligned))
                cache.dec_lock_ref(m.last_device_node, lock)
                cache.insert(InsertParams(key=RadixKey(array("q", toks[:aligned])), value=torch.cat([idx, new]),
                                          prev_prefix_len=reused))
                cache.check_hicache_events()
                reused_total = rr.device_hit + rr.host_hit + rr.storage_hit
                rr.ttft_modelled_s = (rr.fetch_s + (rr.host_hit + rr.storage_hit) * geo.bytes_per_token / H2D_BYTES_PER_S
                                      + modelled_prefill_s(len(toks) - reused_total, len(toks), geo.layers))
                run.requests.append(rr)
                if progress:
                    progress(backend)
        t_drain = time.perf_counter()
        tree.drain_writes()
        run.drain_s = time.perf_counter() - t_drain
        run.wall_s = time.perf_counter() - t_start
        run.pages_read, run.pages_read_requested = probe.pages_read, probe.pages_req
        run.pages_written, run.get_calls, run.set_calls = probe.pages_written, probe.get_calls, probe.set_calls
        run.s3_requests = s3_requests(tree, backend_kind(backend), probe)
        if backend_kind(backend) != "objectcache":
            run.notes.append("time to first layer: not available (the backend returns whole 128-page batches)")
    finally:
        tree.close()
        del tree, probe
        gc.collect()
        import shutil

        shutil.rmtree(file_dir, ignore_errors=True)
    return run


def summarize(run: BackendRun) -> dict:
    """One row of the summary table."""
    rs = run.requests
    n = len(rs) or 1
    tokens = sum(r.tokens for r in rs)
    st = [r for r in rs if r.storage_hit > 0]
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    ttft = [r.ttft_modelled_s for r in rs]
    return {
        "backend": run.backend, "concurrency": run.concurrency, "system_prompt_len": run.system_prompt_len,
        "requests": len(rs), "tokens": tokens,
        "device_hit_rate": sum(r.device_hit for r in rs) / max(tokens, 1),
        "host_hit_rate": sum(r.host_hit for r in rs) / max(tokens, 1),
        "storage_hit_rate": sum(r.storage_hit for r in rs) / max(tokens, 1),
        "storage_hit_requests": len(st),
        "fetch_ms_mean": (mean([r.fetch_s for r in st]) or 0) * 1e3 if st else None,
        "fetch_ms_p90": percentile([r.fetch_s for r in st], 90) * 1e3 if st else None,
        "first_batch_ms_mean": (mean([r.first_batch_s for r in st if r.first_batch_s is not None]) or 0) * 1e3 if st else None,
        "first_layer_ms_mean": (mean([r.first_layer_s for r in st if r.first_layer_s is not None]) * 1e3
                                if any(r.first_layer_s is not None for r in st) else None),
        "fetch_gibps": (sum(r.storage_hit for r in st) * run.bytes_per_token / 2**30 / sum(r.fetch_s for r in st)
                        if st and sum(r.fetch_s for r in st) > 0 else None),
        "ttft_modelled_ms_mean": sum(ttft) / n * 1e3, "ttft_modelled_ms_p90": percentile(ttft, 90) * 1e3,
        "bytes_read": run.pages_read * run.page_size * run.bytes_per_token,
        "bytes_written": run.pages_written * run.page_size * run.bytes_per_token,
        "verified_bytes": sum(r.verified_tokens for r in rs) * run.bytes_per_token,
        "verified_storage_bytes": sum(min(r.storage_hit, r.verified_tokens) for r in rs) * run.bytes_per_token,
        "corrupt_tokens": sum(r.corrupt_tokens for r in rs),
        "requests_issued": (sum(run.s3_requests.values()) if run.s3_requests is not None else None),
        "s3_requests": run.s3_requests, "backend_get_calls": run.get_calls, "backend_set_calls": run.set_calls,
        "wall_s": run.wall_s,
    }


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    """The summary table, a row per backend and workload point (rows from `summarize`)."""
    head = ("| backend | prefix | conc | reqs | hit device / host / storage | storage-hit reqs | fetch ms mean / p90 "
            "| first batch ms | first layer ms | fetch GiB/s | TTFT ms mean / p90 (modelled) | GiB read / written "
            "| verified GiB (from storage) | S3 requests |")
    lines = [head, "|" + "|".join("---" for _ in range(14)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['system_prompt_len']} | {r['concurrency']} | {r['requests']} "
            f"| {r['device_hit_rate']:.0%} / {r['host_hit_rate']:.0%} / {r['storage_hit_rate']:.0%} "
            f"| {r['storage_hit_requests']} | {_f(r['fetch_ms_mean'], '.0f')} / {_f(r['fetch_ms_p90'], '.0f')} "
            f"| {_f(r['first_batch_ms_mean'], '.0f')} | {_f(r['first_layer_ms_mean'], '.0f')} "
            f"| {_f(r['fetch_gibps'], '.3f')} "
            f"| {r['ttft_modelled_ms_mean']:.0f} / {r['ttft_modelled_ms_p90']:.0f} "
            f"| {_gib(r['bytes_read'])} / {_gib(r['bytes_written'])} "
            f"| {_gib(r['verified_bytes'])} ({_gib(r['verified_storage_bytes'])}) "
            f"| {_f(r['requests_issued'], 'd')} |")
    return "\n".join(lines)


def sizes_for(reqs: list[Request], concurrency: int, page_size: int, host_frac: float) -> tuple[int, int]:
    """Device and host pool sizes (tokens) that make prefixes spill to storage: the host pool holds
    about host_frac of the distinct prefixes (at least what SGLang's prefetch limit needs for
    `concurrency` requests: half the host pool), the device pool half of that."""
    longest = max(len(r.input_ids) for r in reqs)
    longest = -(-longest // page_size) * page_size
    prefixes = {r.group: r.prefix_len for r in reqs}
    working = sum(prefixes.values()) + longest
    host = max(int(working * host_frac), 2 * concurrency * longest + 2 * longest)
    device = max(host // 2, (concurrency + 1) * longest)
    host = max(host, device + page_size)
    return -(-device // page_size) * page_size, -(-host // page_size) * page_size
