"""`ObjectCacheStorage`: SGLang's HiCacheStorage over the objectcache engine.

Thin on purpose: turn host indices into (address, length) segments of the host pool's own
buffers (zero copy), hand them to the engine, and make sure nothing raises into SGLang's threads:
every failure is a miss (reads) or False (writes), logged by the engine.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from ..config import parse_config
from ..errors import ConfigError
from ..engine.cache import ObjectCache
from ..format import SegmentFn
from . import metrics, page_hash, shutdown, weights
from .compat import check_isolation, check_version, storage_metrics
from .pool import describe_pool, flat_segments, host_segments

log = logging.getLogger("sglang_objectcache")

SUPPORTED_LAYOUTS = ("layer_first", "page_first_direct")


class ObjectCacheStorage(HiCacheStorage):
    """Registered as `--hicache-storage-backend objectcache`; also works through `dynamic`."""

    def __init__(self, storage_config: HiCacheStorageConfig, mem_pool_host: Any = None):
        check_isolation(check_version())
        self.storage_config = storage_config
        self.config = parse_config(storage_config.extra_config or {})
        page_hash.ensure_built()  # before serving: never on SGLang's prefetch thread (page_hash.py)
        if storage_config.is_page_first_layout:
            raise ConfigError(
                "--hicache-mem-layout page_first is not supported by objectcache: one layer of a "
                "page is strided there, so pages cannot be read layer by layer. Launch with "
                "--hicache-mem-layout layer_first (or page_first_direct)"
            )
        self.cache: ObjectCache | None = None
        self.mem_pool_host = None
        self._metrics_lock = threading.Lock()
        self._deadline = threading.local()  # a sooner deadline for this thread's reads (load_or_recompute)
        self._metrics: dict[str, collections.deque] = {
            k: collections.deque(maxlen=4096) for k in ("get_pgs", "set_pgs", "get_bw", "set_bw")}
        # `dynamic` passes {} as the second argument; the pool arrives via register_mem_pool_host.
        if hasattr(mem_pool_host, "get_page_buffer_meta"):
            self.register_mem_pool_host(mem_pool_host)

    # ---- attach --------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host) -> None:
        if self.cache is not None:
            if mem_pool_host is not self.mem_pool_host:
                log.warning("objectcache: ignoring a second host pool; the first one stays attached")
            return
        layout = getattr(mem_pool_host, "layout", None)
        if layout not in SUPPORTED_LAYOUTS:
            raise ConfigError(
                f"--hicache-mem-layout {layout} is not supported by objectcache; use layer_first "
                "(recommended) or page_first_direct"
            )
        self.mem_pool_host = mem_pool_host
        self.fp = describe_pool(mem_pool_host, self.storage_config)
        if self.config.model_revision is None:  # not named in the config: what the weights say
            rev = weights.server_identity()
            if rev:
                self.fp = dataclasses.replace(self.fp, model_revision=rev)
                log.info("objectcache: weights identified as %s (part of the fingerprint; model_revision "
                         "names them instead, '' leaves them unidentified)", rev)
        self.cache = ObjectCache(self.config, self.fp)
        shutdown.register(self.cache)  # SGLang closes a backend only on detach
        self._exporter = metrics.start_exporter(self.stats, f"tp{self.fp.tp_rank}pp{self.fp.pp_rank}")

    def register_mem_host_pool_v2(self, host_pool, host_pool_name) -> None:
        # Side pools (Mamba, SWA, ...) are not stored by objectcache: dense KV only.
        if getattr(host_pool_name, "value", host_pool_name) in ("kv", "KV") or host_pool is self.mem_pool_host:
            return
        log.warning("objectcache: side pool %s is not stored (dense KV only)", host_pool_name)

    def _ready(self) -> bool:
        if self.cache is None:
            log.error("objectcache: no host pool registered yet; call register_mem_pool_host first")
            return False
        return True

    # ---- zero-copy interface -------------------------------------------------------------

    def _segments(self, keys: List[str], host_indices: torch.Tensor) -> SegmentFn:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        return host_segments(self.mem_pool_host.layout, self.fp.n_layers, len(keys), ptrs, sizes)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        if not keys or not self._ready():
            return [False] * len(keys)
        t0 = time.perf_counter()
        try:
            ok = self.cache.get(keys, self._segments(keys, host_indices), self._call_timeout())
        except Exception:  # noqa: BLE001 - a raise here would kill SGLang's prefetch IO thread
            log.exception("objectcache: batch_get_v1 failed; %d pages are misses", len(keys))
            return [False] * len(keys)
        self._record("get", sum(ok), time.perf_counter() - t0)
        return ok

    def _call_timeout(self) -> float:
        """The configured deadline, or less where the calling thread carries a sooner one (`deadline`)."""
        at = getattr(self._deadline, "at", None)
        if at is None:
            return self.config.timeout
        return max(0.001, min(self.config.timeout, at - time.monotonic()))

    @contextlib.contextmanager
    def deadline(self, at: float):
        """Reads made by this thread inside the block end by monotonic time `at` (what is not in by
        then is a miss): a request loads from storage no longer than recomputing would take."""
        self._deadline.at = at
        try:
            yield
        finally:
            self._deadline.at = None

    def start_layer_fetch(self, keys: List[str], host_indices: torch.Tensor, t_layer: float = 0.0):
        """Start filling pages into the host pool in layer order and return the engine's
        `ReadSession` at once (per-layer readiness, then per-page results); None if nothing can start. Used by
        the layer-wise streaming patch (`sglang/layerwise.py`). `t_layer`: the request's compute time
        per layer, when measured (`load_or_recompute.py`), for the `slack` policy."""
        if not keys or not self._ready():
            return None
        try:
            return self.cache.fetch(keys, self._segments(keys, host_indices), t_layer, streamed=True)
        except Exception:  # noqa: BLE001 - the prefetch IO thread must survive
            log.exception("objectcache: cannot start a layer-wise fetch of %d pages", len(keys))
            return None

    def finish_layer_fetch(self, fetch, started: float) -> List[bool]:
        """Wait for a fetch from `start_layer_fetch` (the configured deadline) and account it as
        `batch_get_v1` accounts its calls; `started` is its perf_counter() start."""
        ok = self.cache.collect(fetch)
        self._record("get", sum(ok), time.perf_counter() - started)
        return ok

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        if not keys or not self._ready():
            return [False] * len(keys)
        t0 = time.perf_counter()
        try:
            ok = self.cache.put(keys, self._segments(keys, host_indices))
        except Exception:  # noqa: BLE001 - a raise here would kill SGLang's backup thread
            log.exception("objectcache: batch_set_v1 failed; %d pages not stored", len(keys))
            return [False] * len(keys)
        self._record("set", sum(ok), time.perf_counter() - t0)
        return ok

    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        if not keys or self.cache is None:
            return 0
        try:
            return self.cache.exists(keys)
        except Exception:  # noqa: BLE001
            log.exception("objectcache: batch_exists failed")
            return 0

    # ---- generic interface (flat page tensors: one extra copy; used by SGLang's generic path) ----

    def _flat(self, tensors: List[torch.Tensor]) -> SegmentFn | None:
        expect = self.fp.n_layers * self.fp.piece_bytes
        for t in tensors:
            if t is None or not t.is_contiguous() or t.numel() * t.element_size() != expect or t.device.type != "cpu":
                log.error("objectcache: a flat page must be a contiguous CPU tensor of %d bytes", expect)
                return None
        return flat_segments(self.fp.attention, self.fp.n_layers, self.fp.piece_bytes,
                             [t.data_ptr() for t in tensors])

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None] | None:
        if not self._ready():
            return [None] * len(keys)
        targets = list(target_locations) if target_locations is not None else [
            self.mem_pool_host.get_dummy_flat_data_page() for _ in keys]
        seg = self._flat(targets)
        if seg is None:
            return [None] * len(keys)
        try:
            ok = self.cache.get(keys, seg)
        except Exception:  # noqa: BLE001
            log.exception("objectcache: batch_get failed")
            return [None] * len(keys)
        return [t if hit else None for t, hit in zip(targets, ok)]

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_set(self, keys: List[str], values: Optional[Any] = None,
                  target_locations: Optional[Any] = None, target_sizes: Optional[Any] = None) -> bool:
        if not self._ready() or values is None:
            return False
        seg = self._flat(list(values))
        if seg is None:
            return False
        try:
            return all(self.cache.put(keys, seg))
        except Exception:  # noqa: BLE001
            log.exception("objectcache: batch_set failed")
            return False

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], None if value is None else [value])

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---- admin ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every page now and delete this namespace's objects in the background: SGLang
        calls this on its scheduler thread, which must not wait on the network."""
        if self.cache is not None:
            self.cache.clear()

    def _record(self, op: str, pages: int, seconds: float) -> None:
        gbps = pages * self.fp.n_layers * self.fp.piece_bytes / max(seconds, 1e-9) / 1e9
        with self._metrics_lock:
            self._metrics[f"{op}_pgs"].append(pages)
            self._metrics[f"{op}_bw"].append(gbps)

    def get_stats(self):
        """SGLang's StorageMetrics for the calls since the last report."""
        with self._metrics_lock:
            m = {k: list(v) for k, v in self._metrics.items()}
            for v in self._metrics.values():
                v.clear()
        return storage_metrics(m["get_pgs"], m["set_pgs"], m["get_bw"], m["set_bw"])

    def stats(self) -> dict:
        """The engine's counters: requests, bytes, hits, corrupt objects, timeouts, per tier; and
        the load-or-recompute decisions where they run (the 0.5.17 patch set)."""
        snap = self.cache.snapshot() if self.cache is not None else {}
        decisions = getattr(self, "decisions", None)
        if decisions is not None:
            snap["decisions"] = decisions()
        return snap

    def close(self) -> None:
        if getattr(self, "_exporter", None) is not None:
            self._exporter.stop()
        if self.cache is not None:
            self.cache.close()
