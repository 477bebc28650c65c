"""`ObjectCacheLinker`: layer-wise streaming on SGLang 0.5.23 with no patch, through its external
cache linker (`sglang/srt/mem_cache/unified_cache/unified_cache_linker.py`).

    --enable-unified-cache-external-linker --unified-cache-external-linker-backend dynamic
    --unified-cache-external-linker-config '{"linker": "ObjectCacheLinker",
        "linker_module_path": "sglang_objectcache.sglang.linker",
        "linker_extra_config": {"config_file": "/etc/objectcache.yaml"}}'

SGLang admits a storage hit at once into fresh device slots private to the request (`load`),
starts the batch's loads when it builds the batch (`start_layer_wise_loading`), and the KV pool's
accessors wait on our `layer_done_counter` per layer. Per batch, one engine fetch per request
lands in pinned staging in layer order; a loader thread copies each layer into the requests'
device slots as soon as every request's bytes for it are in and verified, then completes it on the
counter. A failed or late fetch fails the counter: SGLang aborts the batch's loading requests
(503) and never inserts their KV. Offloads (SGLang's write-through of computed nodes) copy the
node's pages into staging and store them as the HiCache route does: same keys (SGLang's chained
page hashes, namespace folded in), same fingerprint, same objects, so either route reads what the
other wrote.

All calls come from the scheduler thread; none of them does network I/O there. `load` decides
from sizes alone (the staging budget), so every rank answers the same.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter, UnifiedCacheLinker

from ..config import ObjectCacheConfig, load_config_file, parse_config, parse_size
from ..engine.cache import ObjectCache
from ..errors import ConfigError
from ..format import SegmentTable
from ..keys import Fingerprint
from . import metrics, page_hash, shutdown, weights
from .compat import check_version

log = logging.getLogger("sglang_objectcache")

DEFAULT_STAGING = 4 << 30  # bytes of pinned staging that loads may hold at once (`staging_bytes`)


@dataclasses.dataclass(frozen=True)
class LinkerOptions:
    staging_bytes: int = DEFAULT_STAGING
    # 0: any number of loading requests per batch; SGLang's contract has one verdict per batch, so a
    # failed load aborts all of them. 1: a failed load aborts only its own request (further hits
    # admitted into the same batch recompute)
    loads_per_batch: int = 0


def linker_config(extra: dict | None) -> tuple[ObjectCacheConfig, LinkerOptions]:
    """The engine's config from the linker's extra config: `config_file` (YAML or JSON, the same
    file as `@objectcache.yaml` on the HiCache route), or the keys inline; and the linker's own
    keys, `staging_bytes` and `loads_per_batch`."""
    extra = dict(extra or {})
    staging = parse_size(extra.pop("staging_bytes", DEFAULT_STAGING), "staging_bytes")
    per_batch = extra.pop("loads_per_batch", 0)
    if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch < 0:
        raise ConfigError(f"linker_extra_config.loads_per_batch: {per_batch!r} is not a count; 0 (no limit) or "
                          "1 (a failed load aborts only its own request)")
    opts = LinkerOptions(staging, per_batch)
    path = extra.pop("config_file", None)
    if path is not None:
        if extra:
            raise ConfigError(f"linker_extra_config: give either config_file or the keys inline, not both "
                              f"(also given: {', '.join(sorted(extra))})")
        if not isinstance(path, str) or not path:
            raise ConfigError("linker_extra_config.config_file: a path to the objectcache YAML or JSON file")
        return load_config_file(Path(path)), opts
    if not extra:
        raise ConfigError('linker_extra_config: give {"config_file": "/path/objectcache.yaml"} (the flag '
                          "takes inline JSON only; @file is not supported there)")
    return parse_config(extra), opts


def _parallel() -> tuple[int, int, int, int]:
    """(tp_rank, tp_size, pp_rank, pp_size) as HiCache's storage config has them
    (managers/cache_controller.py `_generate_storage_config`)."""
    try:
        from sglang.srt.layers.dp_attention import is_dp_attention_enabled
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
        if is_dp_attention_enabled():
            tp_rank, tp_size = p.attn_tp_rank, p.attn_tp_size
        else:
            tp_rank, tp_size = p.tp_rank, p.tp_size
        return int(tp_rank), int(tp_size), int(getattr(p, "pp_rank", 0) or 0), int(getattr(p, "pp_size", 1) or 1)
    except Exception:  # noqa: BLE001 - outside a scheduler process (tests, tools)
        return 0, 1, 0, 1


def device_fingerprint(kv, model_name: str | None) -> Fingerprint:
    """The fingerprint HiCache's `describe_pool` gives the host pool of the same model and rank
    (`pool.py`): the same bytes per (layer, page) piece, so the namespaces match."""
    page = int(kv.page_size)
    itemsize = torch.empty((), dtype=kv.store_dtype).element_size()
    mla = hasattr(kv, "kv_buffer") and hasattr(kv, "kv_lora_rank")
    tp_rank, tp_size, pp_rank, pp_size = _parallel()
    if mla:
        dim = int(kv.kv_cache_dim)
        heads, vdim, piece = 1, 0, page * dim * itemsize
        tp_rank, tp_size = 0, 1  # replicated across TP ranks: one copy serves all
    else:
        heads, dim = int(kv.head_num), int(kv.head_dim)
        vdim = int(getattr(kv, "v_head_dim", dim) or dim)
        piece = page * heads * (dim + vdim) * itemsize
    return Fingerprint(model=model_name or "model", dtype=str(kv.dtype).replace("torch.", ""), page_size=page,
                       n_layers=int(kv.layer_num), start_layer=int(kv.start_layer or 0), piece_bytes=piece,
                       attention="mla" if mla else "mha", kv_heads=heads, head_dim=dim, v_head_dim=vdim,
                       tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size)


class _Parts:
    """Per layer, the device tensors a page's piece is split into, in object order: (K, V) for
    MHA, (latent,) for MLA; each viewed as [token slot, bytes per token]."""

    def __init__(self, kv, mla: bool):
        if mla:
            self.layers = [(kv.kv_buffer[i],) for i in range(kv.layer_num)]
        else:
            self.layers = [(kv.k_buffer[i], kv.v_buffer[i]) for i in range(kv.layer_num)]
        self.token_bytes = [t[0].numel() * t.element_size() for t in self.layers[0]]

    def rows(self, layer: int, part: int) -> torch.Tensor:
        t = self.layers[layer][part]
        return t.view(t.shape[0], -1).view(torch.uint8)


@dataclasses.dataclass
class _Load:
    rid: str
    keys: list[str]
    slots: torch.Tensor  # device token slots, page-aligned, len(keys) * page_size
    session: Any = None
    staging: Optional[torch.Tensor] = None  # uint8: per layer, per part, the pages' token rows


@dataclasses.dataclass
class _Batch:
    index: int
    loads: list[_Load]
    ready: Any  # an event recorded on the scheduler's stream when the batch started
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class ObjectCacheLinker(UnifiedCacheLinker):
    """SGLang 0.5.23's external cache linker over the objectcache engine (dense MHA or MLA KV)."""

    def __init__(self, server_args, params, *, components=None, extra_config=None, forward_stream=None):
        check_version()
        self.config, self.options = linker_config(extra_config)
        page_hash.ensure_built()  # SGLang's page keys: built before serving (page_hash.py)
        self.staging_budget = self.options.staging_bytes
        comps = set(components or ())
        if comps - {ComponentType.FULL}:
            names = ", ".join(sorted(c.name for c in comps - {ComponentType.FULL}))
            raise ConfigError(f"objectcache linker stores dense KV only; this model also has {names} state. "
                              "Use the HiCache route (--hicache-storage-backend objectcache) for it")
        if getattr(params, "mtp_draft_device_pools", None) or getattr(params, "sidecar_draft_device_pools", None):
            raise ConfigError("objectcache linker: speculative decoding's draft KV pools are not supported")
        kv = params.token_to_kv_pool_allocator.get_kvcache()
        if getattr(kv, "is_quantized_kv_cache", False) or getattr(kv, "use_hnd", False):
            raise ConfigError("objectcache linker: a quantized or head-major (HND) KV cache is not supported")
        self.kv = kv
        self.mla = hasattr(kv, "kv_buffer") and hasattr(kv, "kv_lora_rank")
        self.parts = _Parts(kv, self.mla)
        self.page_size = int(kv.page_size)
        self.n_layers = int(kv.layer_num)
        # the pool's own device, with its index: our threads start on CUDA device 0, and a TP rank's
        # pool is on its own GPU
        self.device = self.parts.layers[0][0].device
        self.cuda = self.device.type == "cuda"
        self._stream = None  # the loader's copy stream, made on the loader thread
        self.pools = {PoolName.KV: kv}
        self.layer_done_counter = LayerWiseLoadCounter(self.n_layers)
        self.forward_stream = forward_stream
        fp = device_fingerprint(kv, getattr(server_args, "served_model_name", None))
        if self.config.model_revision is None:
            rev = weights.server_identity()
            if rev:
                fp = dataclasses.replace(fp, model_revision=rev)
        self.fp = fp
        self.writes = not self.mla or _parallel()[0] == 0  # MLA: the KV is the same on every rank; one writes
        self.cache = ObjectCache(self.config, fp)
        shutdown.register(self.cache)
        self._exporter = metrics.start_exporter(self.stats, f"tp{_parallel()[0]}pp{fp.pp_rank}")
        self._pending: dict[str, _Load] = {}
        self._reserved = 0  # staging bytes held by queued and running loads (scheduler thread only)
        self._batches: dict[int, _Batch] = {}
        self._loads: queue.Queue = queue.Queue()
        self._offloads: queue.Queue = queue.Queue()
        self._offload_results: queue.Queue = queue.Queue()
        self._free: list[torch.Tensor] = []  # staging buffers to reuse
        self._free_lock = threading.Lock()
        self.counts = dict(lookups=0, lookup_pages=0, loads=0, load_pages=0, failed_batches=0, offloads=0,
                           offload_pages=0, refused=0)
        self._threads = [threading.Thread(target=self._load_loop, daemon=True, name="objectcache-linker-load"),
                         threading.Thread(target=self._offload_loop, daemon=True, name="objectcache-linker-offload")]
        for t in self._threads:
            t.start()
        log.info("objectcache linker ready: %s %s page=%d layers=%d %s; namespace %s; staging budget %d MiB",
                 fp.model, fp.dtype, self.page_size, self.n_layers, fp.attention, self.cache.ns.root,
                 self.staging_budget >> 20)

    # ---- staging ------------------------------------------------------------------------

    def _piece_bytes(self) -> int:
        return self.fp.piece_bytes

    def _staging(self, pages: int) -> torch.Tensor:
        """Flat uint8 staging for `pages` pages: layer by layer, part by part (K rows of every
        page, then V rows), so one layer's part is one contiguous block of token rows."""
        need = self.n_layers * pages * self._piece_bytes()
        with self._free_lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= need:
                    del self._free[i]
                    return buf[:need]
        pin = self.cuda
        return torch.empty(need, dtype=torch.uint8, pin_memory=pin)

    def _part(self, buf: torch.Tensor, pages: int, layer: int, part: int) -> torch.Tensor:
        """The token rows of one layer's part of every page: [pages * page_size, token bytes]."""
        tb = self.parts.token_bytes
        rows = pages * self.page_size
        at = layer * pages * self._piece_bytes() + rows * sum(tb[:part])
        return buf[at: at + rows * tb[part]].view(rows, tb[part])

    def _release(self, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        with self._free_lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel())
            while sum(b.numel() for b in self._free) > self.staging_budget:
                self._free.pop(0)

    def _segments(self, buf: torch.Tensor, pages: int) -> SegmentTable:
        """Where each (layer, page, part) piece of the objects lands in `buf`."""
        tb = np.asarray(self.parts.token_bytes, dtype=np.int64)
        size = self.page_size * tb  # one page's part
        start = np.concatenate([[0], np.cumsum(size * pages)[:-1]])  # each part's block in a layer
        layer = np.arange(self.n_layers, dtype=np.int64)[:, None, None] * pages * self._piece_bytes()
        page = np.arange(pages, dtype=np.int64)[None, :, None] * size[None, None, :]
        ptr = buf.data_ptr() + layer + start[None, None, :] + page
        table = np.stack([ptr, np.broadcast_to(size[None, None, :], ptr.shape)], axis=-1)
        return SegmentTable(np.ascontiguousarray(table))

    # ---- lookup and load (scheduler thread) -----------------------------------------------

    def lookup(self, rid: str, transfers: list[PoolTransfer]) -> list[int]:
        kv = next((t for t in transfers if t.name == PoolName.KV), None)
        if kv is None or not kv.keys:
            return []
        n = self.cache.exists(list(kv.keys))  # the index only: no request
        self.counts["lookups"] += 1
        self.counts["lookup_pages"] += n
        return list(range(1, n + 1))

    def load(self, rid: str, transfers: list[PoolTransfer]) -> bool:
        kv = next((t for t in transfers if t.name == PoolName.KV), None)
        if kv is None or not kv.keys or kv.device_indices is None:
            return False
        if rid in self._pending:
            raise RuntimeError(f"objectcache linker: a load for {rid} is already queued")
        nbytes = len(kv.keys) * self._piece_bytes() * self.n_layers
        per_batch = self.options.loads_per_batch
        # sizes and counts only: the same answer on every rank
        if self._reserved + nbytes > self.staging_budget or (per_batch and len(self._pending) >= per_batch):
            self.counts["refused"] += 1
            return False
        self._reserved += nbytes
        self._pending[rid] = _Load(rid, list(kv.keys), kv.device_indices.to(torch.int64))
        return True

    def cancel_queued_load(self, rid: str) -> bool:
        load = self._pending.pop(rid, None)
        if load is None:
            return False
        self._reserved -= len(load.keys) * self._piece_bytes() * self.n_layers
        return True

    def start_layer_wise_loading(self) -> int:
        if not self._pending:
            return -1
        loads, self._pending = list(self._pending.values()), {}
        index = self.layer_done_counter.update_producer()
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        for load in loads:  # the reads start now, off this thread; only the plan is made here
            load.staging = self._staging(len(load.keys))
            try:
                load.session = self.cache.fetch(load.keys, self._segments(load.staging, len(load.keys)),
                                                streamed=True)
            except Exception:  # noqa: BLE001 - the loader thread fails the batch
                log.exception("objectcache linker: cannot start a fetch of %d pages for %s", len(load.keys), load.rid)
        batch = _Batch(index, loads, ready)
        self._batches[index] = batch
        self.counts["loads"] += len(loads)
        self.counts["load_pages"] += sum(len(x.keys) for x in loads)
        self._loads.put(batch)
        return index

    def finish_layer_wise_loading(self, counter_index: int) -> bool:
        batch = self._batches.pop(counter_index, None)
        landed = self.layer_done_counter.finish(counter_index)
        if batch is None:
            return landed
        batch.done.wait()  # the loader has stopped writing device memory
        for load in batch.loads:
            if load.session is not None:
                ok = load.session.wait(0.0 if not landed else self.config.timeout)
                landed = landed and all(ok)
            self._release(load.staging)
            self._reserved -= len(load.keys) * self._piece_bytes() * self.n_layers
        if not landed:
            self.counts["failed_batches"] += 1
        return landed

    # ---- loader thread -------------------------------------------------------------------

    def _on_device(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)

    def _load_loop(self) -> None:
        self._on_device()
        while True:
            batch = self._loads.get()
            if batch is None:
                return
            try:
                self._load_batch(batch)
            except BaseException as e:  # noqa: BLE001 - the forward must never wait forever
                log.exception("objectcache linker: load batch %d failed", batch.index)
                self.layer_done_counter.fail(batch.index, e)
            finally:
                batch.done.set()

    def _load_batch(self, batch: _Batch) -> None:
        counter = self.layer_done_counter
        if any(load.session is None for load in batch.loads):
            counter.fail(batch.index, RuntimeError("a fetch could not start"))
            return
        cuda = batch.ready is not None
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        stream = self._stream
        if cuda:
            stream.wait_event(batch.ready)
        for load in batch.loads:  # once, not per layer
            load.slots = load.slots.to(self.device, non_blocking=True)
        deadline = time.monotonic() + self.config.timeout
        for layer in range(self.n_layers):
            for load in batch.loads:
                if not load.session.readiness.wait(layer, max(0.0, deadline - time.monotonic())):
                    why = load.session.readiness.failed or f"layer {layer} not in after {self.config.timeout:.0f}s"
                    load.session.cancel(f"batch failed: {why}")
                    for other in batch.loads:
                        if other is not load:
                            other.session.cancel(f"batch failed: {why}")
                    log.warning("objectcache linker: load of %s failed at layer %d (%s); SGLang aborts the "
                                "batch's loading requests", load.rid, layer, why)
                    counter.fail(batch.index, RuntimeError(why))
                    return
            if cuda:
                with torch.cuda.stream(stream):
                    self._copy_layer(batch, layer)
                    done = torch.cuda.Event()
                    done.record(stream)
                done.synchronize()  # reported only once the device copy is complete
            else:
                self._copy_layer(batch, layer)
            counter.complete(batch.index, layer)

    def _copy_layer(self, batch: _Batch, layer: int) -> None:
        for load in batch.loads:
            for part in range(len(self.parts.token_bytes)):
                src = self._part(load.staging, len(load.keys), layer, part)
                self.parts.rows(layer, part).index_copy_(0, load.slots, src.to(self.device, non_blocking=True))

    # ---- offload -------------------------------------------------------------------------

    def offload(self, transfers: list[PoolTransfer], session_id: Optional[str] = None) -> bool:
        kv = next((t for t in transfers if t.name == PoolName.KV), None)
        if kv is None or not kv.keys or kv.device_indices is None:
            return False
        if not self.writes:
            self._offload_results.put(True)
            return True
        pages = len(kv.keys)
        slots = kv.device_indices.to(torch.int64)[: pages * self.page_size]
        self._offloads.put((list(kv.keys), slots, self.record_offload_ready()))
        return True

    def _offload_loop(self) -> None:
        self._on_device()
        while True:
            task = self._offloads.get()
            try:
                if task is None:
                    return
                self._offload(*task)
            finally:
                self._offloads.task_done()  # reset() waits for the offload in progress, not only the queue

    def _offload(self, keys, slots, events) -> None:
        ok = False
        buf = None
        try:
            for event in events:
                event.synchronize()
            buf = self._staging(len(keys))
            slots_dev = slots.to(self.device)
            for layer in range(self.n_layers):
                for part in range(len(self.parts.token_bytes)):
                    self._part(buf, len(keys), layer, part).copy_(
                        self.parts.rows(layer, part).index_select(0, slots_dev))
            ok = all(self.cache.put(keys, self._segments(buf, len(keys))))
            self.counts["offloads"] += 1
            self.counts["offload_pages"] += len(keys)
        except Exception:  # noqa: BLE001 - an offload that fails is reported, not raised
            log.exception("objectcache linker: offload of %d pages failed", len(keys))
        finally:
            self._release(buf)
            self._offload_results.put(ok)

    def num_completed_offloads(self) -> int:
        return self._offload_results.qsize()

    def pop_completed_offload(self) -> bool:
        return self._offload_results.get_nowait()

    # ---- lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        for rid in list(self._pending):
            self.cancel_queued_load(rid)
        for index, batch in list(self._batches.items()):
            for load in batch.loads:
                if load.session is not None:
                    load.session.cancel("reset")
            self.layer_done_counter.fail(index, RuntimeError("reset"))
            self.finish_layer_wise_loading(index)
        self._offloads.join()  # the running offload too: its result must not outlive the reset
        self.cache.flush()
        while True:
            try:
                self._offload_results.get_nowait()
            except queue.Empty:
                break
        self.layer_done_counter.reset()

    def close(self) -> None:
        self.reset()
        self._loads.put(None)
        self._offloads.put(None)
        for t in self._threads:
            t.join(timeout=60)
        self.cache.close()

    def stats(self) -> dict:
        return {**self.cache.snapshot(), "linker": dict(self.counts)}


__all__ = ["ObjectCacheLinker", "LinkerOptions", "linker_config", "device_fingerprint"]

