"""Where each (layer, page) piece lives in SGLang's host pools: the segment tables built from
`get_page_buffer_meta`'s pointer lists, checked against the layouts' own arithmetic."""

import numpy as np
import pytest

from sglang_objectcache.format import SegmentTable
from sglang_objectcache.sglang.pool import flat_segments, host_segments

L, PAGES, PIECE = 3, 4, 1024


def test_layer_first_one_buffer_per_layer_and_part():
    # per page: K0 V0 K1 V1 K2 V2, each its own buffer (sizes differ per part to catch swaps)
    ptrs = [10_000 * i + 100 * layer + part for i in range(PAGES) for layer in range(L) for part in range(2)]
    sizes = [600 if part == 0 else 424 for _ in range(PAGES) for _ in range(L) for part in range(2)]
    seg = host_segments("layer_first", L, PAGES, ptrs, sizes)
    assert isinstance(seg, SegmentTable) and seg.table.shape == (L, PAGES, 2, 2)
    for layer in range(L):
        for i in range(PAGES):
            assert seg(layer, i) == [(10_000 * i + 100 * layer, 600), (10_000 * i + 100 * layer + 1, 424)]


def test_page_first_direct_one_block_per_part_holding_all_layers():
    ptrs = [(i * 2 + part) << 16 for i in range(PAGES) for part in range(2)]
    sizes = [L * 512] * (2 * PAGES)
    seg = host_segments("page_first_direct", L, PAGES, ptrs, sizes)
    for layer in range(L):
        for i in range(PAGES):
            assert seg(layer, i) == [(((i * 2) << 16) + layer * 512, 512), (((i * 2 + 1) << 16) + layer * 512, 512)]


def test_flat_pages_all_k_layers_then_all_v_layers():
    bases = [1 << 24, 3 << 24, 2 << 24]
    seg = flat_segments("mha", L, PIECE, bases)
    for layer in range(L):
        for i, b in enumerate(bases):
            assert seg(layer, i) == [(b + layer * 512, 512), (b + (L + layer) * 512, 512)]
    mla = flat_segments("mla", L, PIECE, bases)
    assert mla(2, 1) == [(bases[1] + 2 * PIECE, PIECE)]


def test_bad_pointer_lists_are_refused():
    with pytest.raises(ValueError, match="buffers for"):
        host_segments("layer_first", L, PAGES, [0] * 5, [1] * 5)
    with pytest.raises(ValueError, match="not a multiple"):
        host_segments("layer_first", 4, 1, [0] * 6, [1] * 6)
    with pytest.raises(ValueError, match="not supported"):
        host_segments("page_head", L, 1, [0] * 6, [1] * 6)
    with pytest.raises(ValueError, match="segment table"):
        SegmentTable(np.zeros((2, 2, 2), dtype=np.int64))
