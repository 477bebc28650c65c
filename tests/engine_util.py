"""Synthetic pages for engine tests: numpy arrays as the 'host pool', segments into them."""

from __future__ import annotations

import numpy as np

from sglang_objectcache.format import SegmentTable
from sglang_objectcache.keys import Fingerprint

LAYERS, PIECE = 4, 8192


def fingerprint(model: str = "m", **kw) -> Fingerprint:
    base = dict(model=model, dtype="bfloat16", page_size=16, n_layers=LAYERS, start_layer=0,
                piece_bytes=PIECE, attention="mha", kv_heads=2, head_dim=64, v_head_dim=64,
                tp_rank=0, tp_size=1)
    base.update(kw)
    return Fingerprint(**base)


class Pages:
    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(n, LAYERS, PIECE), dtype=np.uint8)

    def segments(self, order=None, table: bool = False):
        """K half and V half of each piece as two segments, like an MHA host pool; `table`: as
        an array (format.SegmentTable, what the SGLang backend passes), else a plain function."""
        order = list(range(len(self.data))) if order is None else order
        d, half = self.data, PIECE // 2
        if table:
            base = np.array([[d[o, layer].ctypes.data for o in order] for layer in range(LAYERS)], dtype=np.int64)
            addr = np.stack([base, base + half], axis=-1)  # [layer, page, part]
            return SegmentTable(np.stack([addr, np.full_like(addr, half)], axis=-1))

        def seg(layer, i):
            base = d[order[i], layer].ctypes.data
            return [(base, half), (base + half, half)]

        return seg

    def only_verified_from(self, src: "Pages") -> bool:
        """Every (page, layer) piece is untouched (zero) or exactly src's: a failed read may have
        copied pieces it checked, never bytes it had not."""
        same = (self.data == src.data).all(axis=2)
        empty = ~self.data.any(axis=2)
        return bool((same | empty).all())

    @classmethod
    def empty_like(cls, other: "Pages") -> "Pages":
        p = cls.__new__(cls)
        p.data = np.zeros_like(other.data)
        return p


def keys(n: int, salt: str = "") -> list[str]:
    import hashlib

    out, h = [], b""
    for i in range(n):
        h = hashlib.sha256(h + f"{salt}{i}".encode()).digest()
        out.append(h.hex())
    return out
