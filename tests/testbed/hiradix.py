"""SGLang 0.5.17's real HiRadixCache + HiCacheController on CPU, with a storage backend attached.

What a scheduler process sets up before it builds the tree, reduced to one rank: a single-rank
gloo process group (the controller all-reduces hit counts and queue sizes), parallel-rank
overrides (the host pool and storage config ask `get_parallel()`), the plugin hooks, and CPU
device and host pools. Used by the layer-wise streaming tests.
"""

from __future__ import annotations

import json
import os
import socket

import torch


def _init_single_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from sglang.srt import runtime_context as rc

    over = {k: (1 if k.endswith("_size") else 0) for k in rc._PARALLEL_FIELDS if k.endswith(("_size", "_rank"))}
    rc.get_parallel()._overrides.update(over, dcp_enabled=False)


def build_tree(extra_config: dict, *, layers: int = 8, heads: int = 4, head_dim: int = 64,
               page_size: int = 16, device_tokens: int = 1024, host_ratio: float = 2.0,
               backend: str = "objectcache", policy: str = "wait_complete"):
    """A HiRadixCache whose controller has `backend` attached with `extra_config`."""
    import torch.distributed as dist
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.hiradix_cache import HiRadixCache
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    from . import cpu_shims

    cpu_shims.install_cpu_hicache_patches()
    _init_single_rank()
    load_plugins()
    kv = MHATokenToKVPool(device_tokens, page_size, torch.bfloat16, heads, head_dim, layers, "cpu", False,
                          start_layer=0, end_layer=layers - 1)
    alloc = PagedTokenToKVPoolAllocator(device_tokens, page_size, torch.bfloat16, "cpu", kv, False)
    group = dist.new_group([0], backend="gloo")
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(8, 8192, "cpu", False),
                             token_to_kv_pool_allocator=alloc, page_size=page_size, tp_cache_group=group,
                             attn_tp_cache_group=group, attn_cp_cache_group=group)
    args = ServerArgs(model_path="dummy", served_model_name="tiny-llama", enable_hierarchical_cache=True,
                      hicache_ratio=host_ratio, hicache_mem_layout="layer_first", hicache_io_backend="direct",
                      hicache_storage_backend=backend, hicache_storage_prefetch_policy=policy,
                      page_size=page_size, hicache_storage_backend_extra_config=json.dumps(extra_config))
    return HiRadixCache(params, args)


def store_prefix(tree, tokens: list[int], seed: int = 0) -> torch.Tensor:
    """Write `tokens`' pages to the tree's storage backend with random KV, as another instance
    would have; return that KV (host layout: 2, layers, tokens, heads, dim) and leave the host
    slots free and zeroed, so what comes back later can only come from storage."""
    cc = tree.cache_controller
    host = cc.mem_pool_host
    keys = cc.get_hash_str(tokens, None, page_size=tree.page_size)
    idx = host.alloc(len(tokens))
    g = torch.Generator().manual_seed(seed)
    data = torch.randn((2, host.layer_num, len(tokens), *host.kv_buffer.shape[3:]), generator=g).to(host.dtype)
    host.kv_buffer[:, :, idx] = data
    ok = cc.storage_backend.batch_set_v1(keys, idx)
    if not all(ok):
        raise RuntimeError(f"storing the prefix failed: {ok}")
    cc.storage_backend.cache.flush()
    host.kv_buffer[:, :, idx] = 0
    host.free(idx)
    return data
