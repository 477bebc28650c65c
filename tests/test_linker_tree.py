"""`ObjectCacheLinker` inside SGLang 0.5.23's real UnifiedRadixCache on CPU (testbed/unified.py:
the linker is loaded by SGLang's own `dynamic` factory from the launch flags), against a real S3
server with the read rate capped so a prefix's layers arrive over about a second.

What the issue asks to see: a storage hit is admitted before its bytes land; layer l's device KV is
right when the forward's wait for layer l returns, and not there before its bytes land; a corrupt
object mid-stream aborts the requests that loaded in that batch, with nothing inserted and their
staging freed, while a request in the same batch that did not load is untouched; computed KV
offloaded through the tree's write-through is found again after a flush.
"""

from __future__ import annotations

import time

import pytest
import torch

from conftest import s3_tier
from sglang_objectcache.sglang.compat import sglang_version

pytestmark = [
    pytest.mark.usefixtures("sglang_cpu"),
    pytest.mark.skipif(sglang_version() != "0.5.23", reason="the external cache linker is SGLang 0.5.23's"),
]

PAGE, LAYERS, PAGES = 16, 4, 16  # 16 pages x 4 layers x 4 KiB: 256 KiB per prefix


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture
def bed(s3_env, prefix):
    from testbed.unified import build_unified_tree

    extra = {"tiers": [s3_tier(s3_env, prefix)], "timeout": 20, "bandwidth": "256KiB",
             "read_range_bytes": "32KiB", "pages_per_object": 8}
    b = build_unified_tree("ObjectCacheLinker", "sglang_objectcache.sglang.linker", extra, layers=LAYERS,
                           page_size=PAGE)
    yield b
    b.linker.close()



def test_a_hit_is_admitted_at_once_and_each_layer_is_there_when_the_forward_reads_it(bed):
    from testbed.unified import admit, consume, finish, insert, loaded_slots, make_req, match, start, store_and_flush

    tokens = list(range(1000, 1000 + PAGES * PAGE))
    want = store_and_flush(bed, tokens, seed=1)
    assert bed.linker.counts["offload_pages"] == PAGES

    req = make_req("r1", tokens + [7])
    m = match(bed.tree, req)
    assert m.device_prefix_len == 0 and m.host_hit_length == PAGES * PAGE  # from the index: no request
    t0 = time.monotonic()
    assert admit(bed.tree, req) == PAGES * PAGE
    rows = loaded_slots(bed.tree, req).clone()
    index = start(bed.tree, bed.tp_worker)
    admitted = time.monotonic() - t0
    assert index >= 0 and admitted < 0.5  # admission and batch start do no network I/O
    # nothing of the last layer yet: its bytes are still on the wire
    assert not _same(bed.kv.k_buffer[LAYERS - 1][rows], want[LAYERS - 1][0])
    ready = []
    for layer in range(LAYERS):
        k, v = consume(bed.kv, bed.counter, index, layer, rows)
        ready.append(time.monotonic() - t0)
        assert _same(k, want[layer][0]) and _same(v, want[layer][1]), layer
        if layer < LAYERS - 1:  # layer l is in while a later layer is not (yet)
            later = bed.kv.k_buffer[LAYERS - 1][rows]
            assert layer == LAYERS - 2 or not _same(later, want[LAYERS - 1][0]), layer
    assert ready[-1] > 0.5 and ready[0] < ready[-1] * 0.7, ready
    assert finish(bed.tree, [req]) == []
    # the request inserts the loaded tail like computed KV: a device hit next time, no new object
    insert(bed.tree, req, tokens + [7], torch.cat([rows, bed.alloc.alloc(PAGE)]))
    again = make_req("r2", tokens + [8])
    assert match(bed.tree, again).device_prefix_len == PAGES * PAGE


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_a_corrupt_object_aborts_the_batchs_loaders_only_and_inserts_nothing(bed, s3_env, prefix):
    import boto3

    from testbed.unified import admit, consume, finish, make_req, match, start, store_and_flush

    tokens = list(range(5000, 5000 + PAGES * PAGE))
    store_and_flush(bed, tokens, seed=2)
    s3 = boto3.client("s3", **s3_env.client_kwargs())
    names = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)["Contents"]
                   if "/d/" in o["Key"])
    size = s3.head_object(Bucket=s3_env.bucket, Key=names[-1])["ContentLength"]
    s3.put_object(Bucket=s3_env.bucket, Key=names[-1], Body=b"\x5a" * size)

    bad = make_req("bad", tokens + [7])
    match(bed.tree, bad)
    assert admit(bed.tree, bad) == PAGES * PAGE
    bystander = make_req("bystander", list(range(9000, 9000 + 4 * PAGE)) + [1])  # computes: no load
    match(bed.tree, bystander)
    assert admit(bed.tree, bystander) == 0
    free_before = bed.alloc.available_size()
    t0 = time.monotonic()
    index = start(bed.tree, bed.tp_worker)
    for layer in range(LAYERS):  # the forward never hangs: failed layers resolve too
        consume(bed.kv, bed.counter, index, layer, torch.arange(PAGE))
    assert finish(bed.tree, [bad, bystander]) == ["bad"]
    assert time.monotonic() - t0 < 20
    assert bad.skip_radix_cache_insert and bad.discard_output_reason is not None  # a 503 to the client
    assert not bystander.skip_radix_cache_insert and bystander.discard_output_reason is None
    assert bed.linker._reserved == 0 and not bed.tree.linker.private_load_indices
    assert bed.linker.counts["failed_batches"] == 1
    assert bed.alloc.available_size() == free_before  # the slots stay the request's, for SGLang to free
    # nothing of the failed load joined the tree
    probe = make_req("probe", tokens + [9])
    assert match(bed.tree, probe).device_prefix_len == 0


def test_pages_already_stored_are_not_written_again(bed):
    """A loaded tail, inserted by its request, is offloaded again by SGLang's write-through: the
    engine sees the keys stored and writes nothing."""
    from testbed.unified import admit, finish, insert, loaded_slots, make_req, match, start, store_and_flush, wait_offloads

    tokens = list(range(3000, 3000 + 4 * PAGE))
    store_and_flush(bed, tokens, seed=3)
    puts = bed.linker.cache.snapshot()["counters"].get("put_written", 0)
    req = make_req("r", tokens + [7])
    match(bed.tree, req)
    assert admit(bed.tree, req) == 4 * PAGE
    rows = loaded_slots(bed.tree, req).clone()
    index = start(bed.tree, bed.tp_worker)
    bed.counter.set_consumer(index)
    assert finish(bed.tree, [req]) == []
    insert(bed.tree, req, tokens + [7], torch.cat([rows, bed.alloc.alloc(PAGE)]))
    wait_offloads(bed.tree, timeout=30)
    assert bed.linker.cache.snapshot()["counters"].get("put_written", 0) == puts


def test_a_flush_waits_for_the_offload_in_progress(bed):
    """SGLang's flush_cache resets the tree, which resets the linker: an offload already taken off
    the queue must finish inside reset, or its result would be credited to the next offload (and
    its node unlocked before its bytes were written)."""
    from testbed.unified import flush, insert

    for attempt in range(5):
        tokens = list(range(20000 + attempt * 4096, 20000 + attempt * 4096 + 32 * PAGE))
        slots = bed.alloc.alloc(len(tokens))
        insert(bed.tree, None, tokens, slots)
        flush(bed)  # at once, while the offload runs
        time.sleep(0.3)
        assert bed.linker.num_completed_offloads() == 0, attempt
