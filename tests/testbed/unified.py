"""SGLang 0.5.23's real UnifiedRadixCache with an external cache linker, on CPU, one rank (or one
tensor-parallel rank of several, each its own process: `build_unified_tree(tp_size=, tp_rank=)`).

`build_unified_tree` goes through SGLang's own construction path for `--enable-unified-cache-
external-linker --unified-cache-external-linker-backend dynamic`: the CLI parser turns the JSON
config into a dict (fields/memory.py:209-235), `publish` resolves and installs the ServerArgs as
`run_scheduler_process` does (scheduler.py:6323-6335), `handle_hicache` checks the linker flags
(arg_groups/hicache_hook.py:25-60), and the real `create_tree_cache` (mem_cache/registry.py:223)
builds the tree, imports the linker through `create_unified_cache_linker` (unified_cache/
linker_factory.py:59-99) and installs its counter into the KV pool and the worker
(registry.py:200-219). The driver functions below are the scheduler's steps, one per function.

Replicated by hand, because SGLang cannot load a model on CPU:
- `prepare_server_args` (server_args.py:668-720) minus its `logging.basicConfig(force=True)`,
  which would strip pytest's log handlers: the same argparse parser and `ServerArgs.from_cli_args`.
- `handle_hicache` is called directly: `resolve_once` returns early for `model_path="dummy"`
  (arg_groups/pipeline.py:105-108) before it reaches that hook (pipeline.py:272).
- The process groups: gloo groups from `dist.new_group` instead of SGLang's
  `initialize_model_parallel` (which the model runner calls), and `publish(..., SpawnRanks(rank))`.
  With tp_size > 1 (no DP attention, no CP, no PP) they are laid out as SGLang's are for plain TP:
  the dp-tp group (CacheInitParams.tp_cache_group, kv_cache_builder.py:402) and the attention-TP
  group (attn_tp_cache_group, :404) span every rank; the attention-CP and PP groups are one rank
  each (:403, :405). The tree's `_all_reduce_attn_groups` (unified_radix_cache.py:355-362) then
  reduces over the attention-TP group: the linker wrapper's `_sync_restorable_prefix`
  (unified_cache_linker.py:349-368), `finish_loads` (:568-595) and `check_hicache_events`'
  offload counts (unified_radix_cache.py:3651-3667) are real cross-process collectives, so every
  rank must drive the same scheduler steps in the same order. The ranks themselves
  (`get_parallel().tp_rank`, `tp_size`, `attn_tp_*`) come from `publish` with `--tp-size`
  (runtime_context.py:230-251); no group handle is read from `get_parallel()` on this path.
- The device pools (`MHATokenToKVPool` on "cpu", `PagedTokenToKVPoolAllocator`, `ReqToTokenPool`)
  are built directly, as `ModelRunner` would size them from a model config.
- `CacheInitParams` and `TreeCacheBuildContext` (kv_cache_builder.py:389-455) are filled with the
  fields a single-rank plain-MHA Llama gets; the rest keep their defaults.
- The tp worker is `_TpWorker`: the two real `TpModelWorker` methods the tree path calls
  (tp_worker.py:540-545) and a `model_runner.forward_stream` (model_runner.py:469) on CPU.
- The steps of admission and batch building that only touch the tree (listed per function).

`MemoryLinker` is a small in-memory `UnifiedCacheLinker` used to prove the harness; it is also a
reference for the contract (unified_cache_linker.py:133-224).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import cpu_shims

cpu_shims.install()  # before sglang: triton and torchvision stubs (see cpu_shims)

from sglang.srt.mem_cache.hicache_storage import PoolName  # noqa: E402
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import (  # noqa: E402
    LayerWiseLoadCounter,
    UnifiedCacheLinker,
)

__all__ = [
    "MemoryLinker", "UnifiedBed", "build_unified_tree", "make_req", "match", "admit", "loaded_slots",
    "start", "consume", "finish", "insert", "check_events", "wait_offloads", "store_and_flush", "flush",
]


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@dataclass
class UnifiedBed:
    tree: Any  # UnifiedRadixCache
    kv: Any  # MHATokenToKVPool
    alloc: Any  # PagedTokenToKVPoolAllocator
    linker: Any  # the UnifiedCacheLinker instance SGLang built (tree.linker.cache_linker)
    counter: Any  # the layer_done_counter installed into kv (kv.layer_transfer_counter)
    req_to_token: Any  # ReqToTokenPool
    server_args: Any
    params: Any  # CacheInitParams
    tp_worker: "_TpWorker"
    page_size: int
    tp_rank: int = 0
    tp_size: int = 1
    groups: Optional["_Groups"] = None  # the gloo groups handed to the tree (CacheInitParams)


class _TpWorker:
    """What the tree path reads of a TpModelWorker: `model_runner.forward_stream` (registry.py:213)
    and the counter hooks, which are TpModelWorker's own methods (tp_worker.py:540-545)."""

    def __init__(self):
        from types import SimpleNamespace

        from sglang.srt.managers.tp_worker import TpModelWorker

        self.model_runner = SimpleNamespace(forward_stream=torch.cpu.Stream())
        self.hicache_layer_transfer_counter = None
        self._register = TpModelWorker.register_hicache_layer_transfer_counter
        self._set_consumer = TpModelWorker.set_hicache_consumer

    def register_hicache_layer_transfer_counter(self, counter) -> None:
        self._register(self, counter)

    def set_hicache_consumer(self, consumer_index: int) -> None:
        self._set_consumer(self, consumer_index)


def _init_gloo(rank: int = 0, world_size: int = 1, timeout_s: float = 60.0) -> None:
    """The default (world) gloo group. One rank: on a free port. Several: every rank's process
    calls this with the same MASTER_ADDR/MASTER_PORT in its environment, set by whoever started
    them; a collective that a peer never joins fails after `timeout_s` instead of hanging."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"torch.distributed is already up as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not {rank} of {world_size}")
        return
    if world_size == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    elif "MASTER_PORT" not in os.environ:
        raise RuntimeError("tp_size > 1: set MASTER_PORT (and MASTER_ADDR) for every rank's process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


@dataclass
class _Groups:
    tp: Any  # dp-tp group: every rank (no DP attention)
    attn_tp: Any  # every rank (attn_tp_size == tp_size without DP attention or CP)
    attn_cp: Any  # this rank alone (attn_cp_size == 1)
    pp: Any  # this rank alone (pp_size == 1)


def _build_groups(rank: int, world_size: int) -> _Groups:
    """Plain-TP groups over the world gloo group. `dist.new_group` is collective over the world:
    every rank creates every group, in the same order, and keeps the ones it belongs to."""
    import torch.distributed as dist

    everyone = list(range(world_size))
    tp = dist.new_group(everyone, backend="gloo")
    attn_tp = dist.new_group(everyone, backend="gloo")
    singles = {"cp": {}, "pp": {}}
    for kind in ("cp", "pp"):
        for r in everyone:
            singles[kind][r] = dist.new_group([r], backend="gloo")
    return _Groups(tp=tp, attn_tp=attn_tp, attn_cp=singles["cp"][rank], pp=singles["pp"][rank])


def server_args_for(linker_class: str, linker_module: str, linker_extra_config: dict, *,
                    page_size: int = 16, served_model_name: str = "tiny-llama", extra_argv=()):
    """ServerArgs from the command line a user would type (prepare_server_args, server_args.py:668)."""
    from sglang.srt.server_args import ServerArgs

    config = {"linker": linker_class, "linker_module_path": linker_module,
              "linker_extra_config": linker_extra_config}
    argv = ["--model-path", "dummy", "--device", "cpu", "--page-size", str(page_size),
            "--served-model-name", served_model_name,
            "--enable-unified-cache-external-linker",
            "--unified-cache-external-linker-backend", "dynamic",
            "--unified-cache-external-linker-config", json.dumps(config), *extra_argv]
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def build_unified_tree(linker_class: str, linker_module: str, linker_extra_config: dict, *,
                       layers: int = 4, heads: int = 2, head_dim: int = 32, page_size: int = 16,
                       device_tokens: int = 1024, served_model_name: str = "tiny-llama",
                       dtype: torch.dtype = torch.bfloat16, tp_size: int = 1, tp_rank: int = 0,
                       dist_timeout_s: float = 60.0) -> UnifiedBed:
    """A UnifiedRadixCache on CPU pools with `linker_module.linker_class` attached by SGLang.

    `tp_size` > 1: this process is TP rank `tp_rank` of `tp_size` (`--tp-size` on the command
    line, `SpawnRanks(world_rank=tp_rank)`); every rank's process must call this, with
    MASTER_ADDR/MASTER_PORT set alike, and then drive the same steps in the same order (see the
    module docstring). `heads` is this rank's share of KV heads; each rank has its own pools."""
    from sglang.srt.arg_groups.hicache_hook import handle_hicache
    from sglang.srt.arg_groups.resolution_hooks import run_hook
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import SpawnRanks, get_memory, get_parallel, publish

    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
    server_args = server_args_for(linker_class, linker_module, linker_extra_config,
                                  page_size=page_size, served_model_name=served_model_name,
                                  extra_argv=("--tp-size", str(tp_size)) if tp_size > 1 else ())
    run_hook(handle_hicache, server_args)  # pipeline.py:272, skipped for a dummy model
    # run_scheduler_process (scheduler.py:6323-6335): plugins, then publish with this rank.
    load_plugins()
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=tp_rank))
    assert get_memory().enable_unified_cache_external_linker
    parallel = get_parallel()
    assert (parallel.tp_rank, parallel.tp_size) == (tp_rank, tp_size), (parallel.tp_rank, parallel.tp_size)
    _init_gloo(tp_rank, tp_size, dist_timeout_s)
    groups = _build_groups(tp_rank, tp_size)

    kv = MHATokenToKVPool(device_tokens, page_size, dtype, heads, head_dim, layers, "cpu", False,
                          start_layer=0, end_layer=layers - 1)
    alloc = PagedTokenToKVPoolAllocator(device_tokens, page_size, dtype, "cpu", kv, False)
    req_to_token = ReqToTokenPool(16, 8192, "cpu", False)
    params = CacheInitParams(  # kv_cache_builder.py:389-431, plain MHA, plain TP
        disable=False, req_to_token_pool=req_to_token, token_to_kv_pool_allocator=alloc,
        page_size=page_size, tp_cache_group=groups.tp, attn_cp_cache_group=groups.attn_cp,
        attn_tp_cache_group=groups.attn_tp, pp_cache_group=groups.pp,
        eviction_policy=get_memory().radix_eviction_policy,
        eviction_policy_config=get_memory().radix_eviction_policy_config,
        pp_rank=parallel.pp_rank, pp_size=parallel.pp_size,
        attn_cp_rank=parallel.attn_cp_rank, attn_cp_size=parallel.attn_cp_size)
    tp_worker = _TpWorker()
    ctx = TreeCacheBuildContext(  # kv_cache_builder.py:441-455
        server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
        enable_hierarchical_cache=False, disable_radix_cache=False, tp_worker=tp_worker,
        model_config=None, tp_size=tp_size, tp_rank=tp_rank, tp_group=groups.tp)
    tree = create_tree_cache(ctx)  # kv_cache_builder.py:461
    linker = tree.linker.cache_linker
    return UnifiedBed(tree=tree, kv=kv, alloc=alloc, linker=linker, counter=kv.layer_transfer_counter,
                      req_to_token=req_to_token, server_args=server_args, params=params,
                      tp_worker=tp_worker, page_size=page_size, tp_rank=tp_rank, tp_size=tp_size,
                      groups=groups)


# ---------------------------------------------------------------------------------------------
# Driver: one request through the scheduler's steps
# ---------------------------------------------------------------------------------------------


def make_req(rid: str, tokens, max_new_tokens: int = 1):
    """A real Req, as handle_generate_request builds one from a tokenized request (scheduler.py:3676)."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    return Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=max_new_tokens))


def match(tree, req):
    """Req.init_next_round_input (schedule_batch.py:1692-1743) for a plain request: the prefix
    match through match_kv_cache (common.py:221-268), which runs the linker lookup
    (unified_radix_cache.py:636-641). Returns the MatchResult and sets the req's match fields."""
    from sglang.srt.mem_cache.common import match_kv_cache

    req.refresh_fill_ids()
    token_ids = req.full_untruncated_fill_ids
    result = match_kv_cache(req, tree, token_ids, cow_mamba=tree.supports_mamba(),
                            max_prefix_len=req._compute_max_prefix_len(len(token_ids)))
    if result.cache_protected_len is None:
        req.kv.cache_protected_len = req.prefix_len
    return result


def admit(tree, req) -> int:
    """The load-back part of admission (schedule_policy.py:1470-1571): init_load_back, which for a
    linker hit allocates private device slots and calls linker.load. Returns the tokens queued."""
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams

    if not req.needs_host_load_back():
        return 0
    loaded = tree.init_load_back(InitLoadBackParams(
        best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req))
    req.host_loaded_length, req.last_node = loaded
    req.prefix_len += req.host_loaded_length
    return req.host_loaded_length


def loaded_slots(tree, req) -> Optional[torch.Tensor]:
    """The request-private device slots a linker load writes (unified_cache_linker.py:471), valid
    from admit to finish."""
    return tree.linker.private_load_indices.get(req.rid)


def start(tree, tp_worker=None) -> int:
    """Prefill batch build (scheduler.py:4351-4355): ready_to_load_host_cache -> linker
    start_layer_wise_loading; then the forward sets the consumer (tp_worker.py:637)."""
    index = tree.ready_to_load_host_cache()
    if tp_worker is not None:
        tp_worker.set_hicache_consumer(index)
    return index


def consume(kv, counter, index: int, layer: int, rows: torch.Tensor):
    """One attention layer of the forward: set_consumer (tp_worker.py:543-545), then the pool
    accessors, which wait on the counter (memory_pool.py:2852-2879). Returns (k, v) at `rows`."""
    counter.set_consumer(index)
    k = kv.get_key_buffer(layer)[rows].clone()
    v = kv.get_value_buffer(layer)[rows].clone()
    return k, v


def finish(tree, reqs) -> list[str]:
    """After the forward launch (scheduler.py:4926-4931): finish_external_linker_loads ->
    linker.finish_layer_wise_loading. Returns the rids whose KV did not land (marked for abort)."""
    return [r.rid for r in tree.finish_external_linker_loads(list(reqs))]


def insert(tree, req, tokens, kv_indices: torch.Tensor, *, prev_prefix_len: Optional[int] = None):
    """The insert of computed KV in checkpoint_into_tree (unified_radix_cache.py:1183-1230); with a
    linker the write-through threshold is 1 (unified_cache_linker.py:284), so the new nodes'
    BackupKV actions call linker.offload (unified_radix_cache.py:1409-1411). Returns InsertResult."""
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    if prev_prefix_len is None:
        prev_prefix_len = req.prefix_len if req is not None else 0
    key = RadixKey(array("q", tokens), getattr(req, "extra_key", None),
                   cache_salt=getattr(req, "cache_salt", None)).page_aligned(tree.page_size)
    value = kv_indices[: len(key)].to(dtype=torch.int64, copy=True)
    return tree.insert(InsertParams(key=key, value=value, prev_prefix_len=prev_prefix_len,
                                    session_id=getattr(req, "session_id", None)))


def check_events(tree) -> int:
    """Per scheduler step (scheduler.py:3889): check_hicache_events pops completed offloads and
    unlocks their nodes (unified_radix_cache.py:3651-3667). Returns the offloads still pending."""
    tree.check_hicache_events()
    return len(tree.linker.pending_offloads)


def wait_offloads(tree, timeout: float = 10.0) -> None:
    """check_events until no offload is pending (the scheduler's loop, compressed)."""
    import time

    deadline = time.monotonic() + timeout
    while check_events(tree):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(tree.linker.pending_offloads)} offloads still pending")
        time.sleep(0.005)


def store_and_flush(bed: UnifiedBed, tokens, seed: int) -> list:
    """Compute (random KV bytes), insert into the tree and let write-through offload it; then flush
    the device cache and zero the pool, so a hit can only come from storage. Returns each layer's
    (K, V) rows as stored. With several ranks, each calls this at the same point: `wait_offloads`
    polls `check_hicache_events`, which all-reduces the completed offload counts."""
    kv = bed.kv
    layers = len(kv.k_buffer)
    slots = bed.alloc.alloc(len(tokens))
    g = torch.Generator().manual_seed(seed)
    for layer in range(layers):
        for buf in (kv.k_buffer[layer], kv.v_buffer[layer]):
            raw = buf[slots].view(torch.uint8)
            buf[slots] = torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g).view(buf.dtype)
    want = [(kv.k_buffer[i][slots].clone(), kv.v_buffer[i][slots].clone()) for i in range(layers)]
    insert(bed.tree, None, tokens, slots)
    wait_offloads(bed.tree, timeout=30)
    bed.linker.cache.flush()
    flush(bed)
    for layer in range(layers):
        kv.k_buffer[layer].zero_()
        kv.v_buffer[layer].zero_()
    return want


def flush(bed: UnifiedBed) -> None:
    """Scheduler.flush_cache (scheduler.py:5518-5526): tree.reset (which resets the linker),
    then the request and token pools."""
    bed.tree.reset()
    bed.req_to_token.clear()
    bed.alloc.clear()


# ---------------------------------------------------------------------------------------------
# MemoryLinker: an in-memory external store
# ---------------------------------------------------------------------------------------------


class MemoryLinker(UnifiedCacheLinker):
    """Pages kept in a process-wide dict, key -> (K, V) of shape (layers, page, heads, dim).

    extra_config: `namespace` (which dict; default "default"), `fail_layer` (int: loads fail at
    this layer, for abort tests), `layer_delay_s` (float: sleep before each layer lands).
    """

    stores: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __init__(self, server_args, params, *, components, extra_config, forward_stream=None):
        from sglang.srt.mem_cache.unified_cache.components import ComponentType

        if set(components) != {ComponentType.FULL}:
            raise ValueError(f"MemoryLinker serves FULL only, got {components}")
        self.kv = params.token_to_kv_pool_allocator.get_kvcache()
        self.pools = {PoolName.KV: self.kv}
        self.num_layers = len(self.kv.k_buffer)
        self.layer_done_counter = LayerWiseLoadCounter(self.num_layers)
        self.forward_stream = forward_stream
        self.page_size = params.page_size
        extra = dict(extra_config or {})
        self.store = self.stores.setdefault(extra.get("namespace", "default"), {})
        self.fail_layer = extra.get("fail_layer")
        self.layer_delay_s = float(extra.get("layer_delay_s", 0.0))
        self.queued: list[tuple[str, list[str], torch.Tensor]] = []
        self.loaders: dict[int, threading.Thread] = {}
        self.offloader = ThreadPoolExecutor(1, thread_name_prefix="memlinker-offload")
        self.completed: deque[bool] = deque()
        self.calls: list[str] = []  # the scheduler-side calls, in order, for tests

    def _rows(self, device_indices: torch.Tensor, i: int) -> torch.Tensor:
        return device_indices[i * self.page_size:(i + 1) * self.page_size].long()

    def lookup(self, rid, transfers):
        self.calls.append("lookup")
        n = 0
        for key in transfers[0].keys:
            if key not in self.store:
                break
            n += 1
        return list(range(1, n + 1))

    def load(self, rid, transfers):
        self.calls.append("load")
        t = transfers[0]
        self.queued.append((rid, list(t.keys), t.device_indices))
        return True

    def start_layer_wise_loading(self):
        self.calls.append("start")
        if not self.queued:
            return -1
        batch, self.queued = self.queued, []
        index = self.layer_done_counter.update_producer()
        th = threading.Thread(target=self._load, args=(index, batch), daemon=True,
                              name=f"memlinker-load-{index}")
        self.loaders[index] = th
        th.start()
        return index

    def _load(self, index, batch):
        import time

        try:
            for layer in range(self.num_layers):
                if self.layer_delay_s:
                    time.sleep(self.layer_delay_s)
                if layer == self.fail_layer:
                    raise RuntimeError(f"MemoryLinker: injected failure at layer {layer}")
                for _rid, keys, dev in batch:
                    for i, key in enumerate(keys):
                        k, v = self.store[key]
                        rows = self._rows(dev, i)
                        self.kv.k_buffer[layer].index_copy_(0, rows, k[layer])
                        self.kv.v_buffer[layer].index_copy_(0, rows, v[layer])
                self.layer_done_counter.complete(index, layer)
        except BaseException as e:  # noqa: BLE001 - reported through finish()
            self.layer_done_counter.fail(index, e)

    def finish_layer_wise_loading(self, counter_index):
        self.calls.append("finish")
        ok = self.layer_done_counter.finish(counter_index)
        th = self.loaders.pop(counter_index, None)
        if th is not None:
            th.join()
        return ok

    def cancel_queued_load(self, rid):
        before = len(self.queued)
        self.queued = [q for q in self.queued if q[0] != rid]
        return len(self.queued) != before

    def offload(self, transfers, session_id=None):
        self.calls.append("offload")
        events = self.record_offload_ready()
        t = transfers[0]
        self.offloader.submit(self._offload, events, list(t.keys), t.device_indices.clone())
        return True

    def _offload(self, events, keys, dev):
        try:
            for e in events:
                e.synchronize()
            for i, key in enumerate(keys):
                rows = self._rows(dev, i)
                k = torch.stack([self.kv.k_buffer[l][rows] for l in range(self.num_layers)]).clone()
                v = torch.stack([self.kv.v_buffer[l][rows] for l in range(self.num_layers)]).clone()
                self.store[key] = (k, v)
            self.completed.append(True)
        except BaseException:  # noqa: BLE001
            self.completed.append(False)

    def num_completed_offloads(self):
        return len(self.completed)

    def pop_completed_offload(self):
        return self.completed.popleft()

    def _quiesce(self):
        self.offloader.submit(lambda: None).result()
        for th in list(self.loaders.values()):
            th.join()

    def reset(self):
        self.calls.append("reset")
        self._quiesce()
        self.loaders.clear()
        self.queued.clear()
        self.completed.clear()
        self.layer_done_counter.reset()

    def close(self):
        self.calls.append("close")
        self._quiesce()
        self.offloader.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# Self-check: python -m testbed.unified (from tests/)
# ---------------------------------------------------------------------------------------------


def _self_check() -> None:
    ns = f"selfcheck-{os.getpid()}"
    bed = build_unified_tree("MemoryLinker", "testbed.unified", {"namespace": ns})
    tree, kv, ps = bed.tree, bed.kv, bed.page_size
    assert type(bed.linker).__name__ == "MemoryLinker", bed.linker
    assert bed.counter is bed.linker.layer_done_counter is bed.tp_worker.hicache_layer_transfer_counter
    layers = len(kv.k_buffer)

    # Producer: 3 pages computed, inserted, offloaded through BackupKV -> linker.offload.
    pages = 3
    tokens = list(range(100, 100 + pages * ps))
    slots = bed.alloc.alloc(len(tokens))
    g = torch.Generator().manual_seed(0)
    for layer in range(layers):
        kv.k_buffer[layer][slots] = torch.randn(kv.k_buffer[layer][slots].shape, generator=g).to(kv.dtype)
        kv.v_buffer[layer][slots] = torch.randn(kv.v_buffer[layer][slots].shape, generator=g).to(kv.dtype)
    want_k = [kv.k_buffer[l][slots].clone() for l in range(layers)]
    want_v = [kv.v_buffer[l][slots].clone() for l in range(layers)]
    insert(tree, None, tokens, slots)
    assert tree.linker.pending_offloads, "insert issued no offload"
    wait_offloads(tree)
    store = bed.linker.store  # the instance SGLang built (module testbed.unified, not __main__)
    assert len(store) == pages, f"{len(store)} pages stored, want {pages}"

    # Flush the device cache; zero the pool so a hit can only come from the linker.
    flush(bed)
    for layer in range(layers):
        kv.k_buffer[layer].zero_()
        kv.v_buffer[layer].zero_()

    # Consumer: same prompt + one token (the match stops one token short of the input).
    req = make_req("r1", tokens + [7])
    m = match(tree, req)
    assert m.device_prefix_len == 0 and m.host_hit_length == pages * ps, m
    assert admit(tree, req) == pages * ps
    rows = loaded_slots(tree, req).clone()
    index = start(tree, bed.tp_worker)
    assert index >= 0
    for layer in range(layers):
        k, v = consume(kv, bed.counter, index, layer, rows)
        assert torch.equal(k, want_k[layer]) and torch.equal(v, want_v[layer]), f"layer {layer} differs"
    failed = finish(tree, [req])
    assert failed == [], failed
    print("calls:", " ".join(bed.linker.calls))
    print(f"OK: {pages} pages offloaded via insert+check_hicache_events, reloaded layer by layer "
          f"into slots {rows[0].item()}..{rows[-1].item()}, {layers} layers equal")


if __name__ == "__main__":
    _self_check()
