"""Real SGLang host KV pools on CPU, for both supported releases (tests and benchmarks).

The host-pool constructors are the one place where 0.5.17 and 0.5.23 differ for our tests:
0.5.17 takes the device pool, 0.5.23 takes its buffer info plus keyword geometry.
"""

from __future__ import annotations

import torch

from sglang_objectcache.sglang.compat import sglang_version


def make_host_pool(attention: str, layout: str, *, page_size: int = 16, layers: int = 4,
                   heads: int = 2, head_dim: int = 32, tokens: int = 256, dtype=torch.bfloat16,
                   host_tokens: int | None = None):
    """A host pool of `host_tokens` slots (default: twice the device pool's `tokens`)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    new = sglang_version() != "0.5.17"
    if attention == "mha":
        dev = MHATokenToKVPool(tokens, page_size, dtype, heads, head_dim, layers, "cpu", False,
                               start_layer=0, end_layer=layers - 1)
        ratio = 2.0 if host_tokens is None else host_tokens / tokens
        if not new:
            return MHATokenToKVPoolHost(dev, ratio, 0, page_size, layout, False, "cpu")
        info = dev.get_device_pool_infos()[0].buffer_info
        return MHATokenToKVPoolHost(info, ratio, 0, page_size, layout, pin_memory=False, device="cpu",
                                    device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                                    end_layer=dev.end_layer, host_token_capacity=host_tokens,
                                    write_back_staging=getattr(dev, "hicache_write_back_staging", None))
    dev = MLATokenToKVPool(tokens, page_size, dtype, 64, 16, layers, "cpu", False,
                           start_layer=0, end_layer=layers - 1)
    if not new:
        return MLATokenToKVPoolHost(dev, 2.0, 0, page_size, layout, False, "cpu")
    info = dev.get_device_pool_infos()[0].buffer_info
    return MLATokenToKVPoolHost(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=dev.size, start_layer=dev.start_layer,
                                end_layer=dev.end_layer, target_layer_num=layers)


def fill_random(pool, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in ("kv_buffer", "k_buffer", "v_buffer"):
        buf = getattr(pool, name, None)
        if isinstance(buf, torch.Tensor):
            raw = buf.view(torch.uint8) if buf.dtype != torch.uint8 else buf
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=g))


def page_bytes(pool, host_indices: torch.Tensor) -> list[bytes]:
    """Each page's bytes in SGLang's own flat-page order (get_data_page): the reference."""
    out = []
    for i in range(0, len(host_indices), pool.page_size):
        t = pool.get_data_page(host_indices[i], flat=True)
        out.append(t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def storage_config(*, mla: bool, layout: str, extra: dict, model: str = "tiny-llama", tp_rank: int = 0,
                   tp_size: int = 1):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False, is_page_first_layout=layout == "page_first",
        model_name=model, extra_config=dict(extra))
