"""Host-pool geometry: the fingerprint of a pool, and where each (layer, page) piece lives.

`get_page_buffer_meta` is SGLang's zero-copy accessor; its shape depends on the layout:
- layer_first: per page, one buffer per layer per part (MHA: K0 V0 K1 V1 ..., MLA: L0 L1 ...);
- page_first_direct: per page, one block per part holding all layers (MHA: K block, V block).
Both become the same object bytes: for layer l of a page, K then V (MHA) or the latent (MLA).
So a page written from one of these layouts loads into the other.
"""

from __future__ import annotations

import numpy as np
import torch

from ..format import SegmentFn, SegmentTable
from ..keys import Fingerprint


def _attr(pool, name: str, default=None):
    for obj in (pool, getattr(pool, "device_pool", None)):
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    return default


def describe_pool(pool, storage_config) -> Fingerprint:
    """Everything that decides whether stored bytes fit this pool."""
    n_layers = int(_attr(pool, "layer_num"))
    page = int(pool.page_size)
    ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page, dtype=torch.int64))
    piece = sum(sizes) // n_layers
    mla = bool(storage_config.is_mla_model) or hasattr(pool, "kv_lora_rank")
    if mla:
        heads, dim, vdim = 1, int(_attr(pool, "kv_cache_dim", 0)), 0
        tp_rank, tp_size = 0, 1  # replicated across TP ranks: one copy serves all
    else:
        heads = int(_attr(pool, "head_num"))
        dim = int(_attr(pool, "head_dim"))
        vdim = int(_attr(pool, "v_head_dim", dim) or dim)
        tp_rank, tp_size = int(storage_config.tp_rank), int(storage_config.tp_size)
    return Fingerprint(
        model=storage_config.model_name or "model",
        dtype=str(pool.dtype).replace("torch.", ""),
        page_size=page,
        n_layers=n_layers,
        start_layer=int(_attr(pool, "start_layer", 0) or 0),
        piece_bytes=piece,
        attention="mla" if mla else "mha",
        kv_heads=heads,
        head_dim=dim,
        v_head_dim=vdim,
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=int(getattr(storage_config, "pp_rank", 0) or 0),
        pp_size=int(getattr(storage_config, "pp_size", 1) or 1),
        attn_cp_rank=int(getattr(storage_config, "attn_cp_rank", 0) or 0),
        attn_cp_size=int(getattr(storage_config, "attn_cp_size", 1) or 1),
        dcp_rank=int(getattr(storage_config, "dcp_rank", 0) or 0),
        dcp_size=int(getattr(storage_config, "dcp_size", 1) or 1),
        logical_page_size=int(getattr(storage_config, "logical_page_size", 0) or 0)
        if int(getattr(storage_config, "dcp_size", 1) or 1) > 1 else 0,
    )


def host_segments(layout: str, n_layers: int, n_pages: int, ptrs: list[int], sizes: list[int]) -> SegmentFn:
    """Segments of (layer, page) pieces inside the host pool, from get_page_buffer_meta."""
    if not n_pages or len(ptrs) % n_pages:
        raise ValueError(f"{len(ptrs)} buffers for {n_pages} pages")
    per_page = len(ptrs) // n_pages
    p = np.asarray(ptrs, dtype=np.int64).reshape(n_pages, per_page)
    n = np.asarray(sizes, dtype=np.int64).reshape(n_pages, per_page)
    if layout == "layer_first":  # per page: layer 0 parts, layer 1 parts, ...
        if per_page % n_layers:
            raise ValueError(f"{per_page} buffers per page is not a multiple of {n_layers} layers")
        parts = per_page // n_layers  # 2 for MHA (K, V), 1 for MLA
        table = np.stack([p, n], axis=-1).reshape(n_pages, n_layers, parts, 2).transpose(1, 0, 2, 3)
        return SegmentTable(table)
    if layout == "page_first_direct":  # per page: one block per part, holding all layers
        chunk = n // n_layers  # [page, part]
        layers = np.arange(n_layers, dtype=np.int64)[:, None, None]
        addr = p[None] + layers * chunk[None]
        return SegmentTable(np.stack([addr, np.broadcast_to(chunk, addr.shape)], axis=-1))
    raise ValueError(f"layout {layout!r} is not supported")


def flat_segments(attention: str, n_layers: int, piece: int, bases: list[int]) -> SegmentFn:
    """Segments inside flat page tensors (SGLang's generic path): MHA [2, L, ...] (all K layers,
    then all V layers), MLA [L, ...]."""
    parts = 2 if attention == "mha" else 1
    chunk = piece // parts
    b = np.asarray(bases, dtype=np.int64)[None, :, None]  # [1, page, 1]
    layer = np.arange(n_layers, dtype=np.int64)[:, None, None]
    part = np.arange(parts, dtype=np.int64)[None, None, :]
    addr = b + (part * n_layers + layer) * chunk  # [layer, page, part]
    return SegmentTable(np.stack([addr, np.full_like(addr, chunk)], axis=-1))
