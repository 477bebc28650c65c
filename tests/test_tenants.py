"""Tenant isolation through SGLang's real tree, on both releases: two requests with the same tokens
but a different cache_salt, extra_key or LoRA adapter never load each other's KV from storage.

One instance (SGLang's HiCache tree with objectcache on a real S3 server) serves a request and
backs its prefix up to storage; a second instance on the same bucket, its device and host pools
empty, then admits requests with the same tokens through the scheduler's own prefetch step
(`Scheduler._prefetch_kvcache`, unbound, on the real tree). Only a request in the writer's
namespace gets a storage hit. Requests are SGLang's `Req`, so the namespace is composed as the
release composes it (0.5.17 folds the LoRA id into extra_key in `Req`, and cache_salt into
extra_key in its OpenAI layer; 0.5.23 keeps cache_salt apart). On 0.5.17 this needs the namespace
hunks of `patches/sglang-0.5.17` (CI applies the patch set); unpatched, the LoRA and salt cases
fail: the second tenant loads the first one's KV.
"""

from __future__ import annotations

import inspect
import os
import time
import types
import uuid
from array import array

import pytest

from sglang_objectcache.sglang.compat import sglang_version

pytestmark = pytest.mark.usefixtures("sglang_cpu")

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
PAGE = 16
TOKENS = list(range(3000, 3000 + 16 * PAGE))  # 16 pages


def make_req(rid: str, *, cache_salt=None, extra_key=None, lora_id=None):
    """SGLang's own Req for TOKENS, its namespace composed as the installed release does."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    kw = {}
    if "cache_salt" in inspect.signature(Req.__init__).parameters:
        kw["cache_salt"] = cache_salt
    elif cache_salt is not None:  # 0.5.17: its OpenAI layer joins cache_salt and extra_key into extra_key
        from sglang.srt.entrypoints.openai.serving_base import OpenAIServingBase

        extra_key = OpenAIServingBase._compute_extra_key(
            None, types.SimpleNamespace(cache_salt=cache_salt, extra_key=extra_key))
    req = Req(rid, "", array("q", TOKENS), SamplingParams(max_new_tokens=1), lora_id=lora_id, extra_key=extra_key, **kw)
    return req


def radix_key(req, tokens):
    from sglang.srt.mem_cache.radix_cache import RadixKey

    if "cache_salt" in inspect.signature(RadixKey.__init__).parameters:
        return RadixKey(array("q", tokens), extra_key=req.extra_key, cache_salt=req.cache_salt)
    return RadixKey(array("q", tokens), req.extra_key)


class Instance:
    """One SGLang HiCache tree with objectcache on `prefix`, as the installed release builds it."""

    def __init__(self, srv, prefix: str):
        extra = {"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix}],
                 "prefetch_threshold": PAGE, "layerwise": False, "timeout": 20}
        if sglang_version() == "0.5.17":
            from testbed.hiradix import build_tree

            self.cache = build_tree(extra, layers=4, heads=2, head_dim=32, page_size=PAGE, device_tokens=1024)
            self.alloc = self.cache.token_to_kv_pool_allocator
            self.kv = self.alloc.get_kvcache()
            self._close = self.cache.cache_controller.storage_backend.close
        else:
            import replay

            replay.setup_sglang()
            tree = replay.Tree("objectcache", extra, replay.Geometry(4, 2, 32, PAGE), 1024, 2048, PAGE)
            self.cache, self.alloc, self.kv, self._close = tree.cache, tree.alloc, tree.kv, tree.close
        self.backend = self.cache.cache_controller.storage_backend

    def pump(self, cond, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.cache.check_hicache_events()
            if time.monotonic() > deadline:
                raise TimeoutError("SGLang's HiCache did not finish in time")
            time.sleep(0.002)

    def serve_and_back_up(self, req) -> None:
        """The request's KV computed into device slots and inserted: write-through backs it up to
        host and then to storage."""
        import torch
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams

        idx = self.alloc.alloc(len(TOKENS)).to(torch.int64)
        for layer in range(self.kv.layer_num):
            self.kv.k_buffer[layer][idx] = torch.randn_like(self.kv.k_buffer[layer][idx])
            self.kv.v_buffer[layer][idx] = torch.randn_like(self.kv.v_buffer[layer][idx])
        self.cache.insert(InsertParams(key=radix_key(req, TOKENS), value=idx))
        self.pump(lambda: not self.cache.ongoing_write_through and not self.cache.ongoing_backup)
        self.backend.cache.flush()

    def storage_hit(self, req) -> int:
        """Tokens the scheduler's prefetch step loads from storage for `req`."""
        from sglang.srt.managers.scheduler import Scheduler

        sched = types.SimpleNamespace(enable_hicache_storage=True, enable_lmcache=False, tree_cache=self.cache)
        Scheduler._prefetch_kvcache(sched, req)
        handle = getattr(req, "cache_request_handle", req.rid)
        self.pump(lambda: self.cache.check_prefetch_progress(handle))
        if hasattr(self.cache, "pop_prefetch_loaded_tokens"):
            return self.cache.pop_prefetch_loaded_tokens(handle)
        return self.cache.prefetch_loaded_tokens_by_reqid.pop(req.rid, 0)

    def close(self) -> None:
        self._close()


NAMESPACES = {
    "cache_salt": ({"cache_salt": "tenant-a"}, {"cache_salt": "tenant-b"}),
    "extra_key": ({"extra_key": "tenant-a"}, {"extra_key": "tenant-b"}),
    "lora": ({"lora_id": "adapter-a"}, {"lora_id": "adapter-b"}),
}


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
@pytest.mark.parametrize("kind", list(NAMESPACES))
def test_a_namespace_never_loads_another_namespaces_kv(kind, s3, s3_env, monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    mine, theirs = NAMESPACES[kind]
    prefix = f"tenants-{uuid.uuid4().hex[:8]}"
    writer = Instance(s3_env, prefix)
    try:
        writer.serve_and_back_up(make_req("w", **mine))
    finally:
        writer.close()
    reader = Instance(s3_env, prefix)
    try:
        # the other tenant and an unnamespaced request first: a hit of theirs would move the pages
        # into host memory, so the writer's own namespace is asked last
        assert reader.storage_hit(make_req("other", **theirs)) == 0, f"another {kind} loaded this one's KV"
        assert reader.storage_hit(make_req("plain")) == 0, f"a request without {kind} loaded its KV"
        same = reader.storage_hit(make_req("same", **mine))
        assert same >= len(TOKENS) - PAGE, "the writer's own namespace must hit (else this test proves nothing)"
    finally:
        reader.close()


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_unnamespaced_requests_share_across_instances(s3, s3_env, monkeypatch):
    """The control: without a namespace, the second instance hits what the first stored."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    prefix = f"tenants-{uuid.uuid4().hex[:8]}"
    writer = Instance(s3_env, prefix)
    try:
        writer.serve_and_back_up(make_req("w"))
    finally:
        writer.close()
    reader = Instance(s3_env, prefix)
    try:
        assert reader.storage_hit(make_req("plain")) >= len(TOKENS) - PAGE
    finally:
        reader.close()


def test_the_namespace_seed_is_sglang_0523s_byte_for_byte():
    """Objects a patched 0.5.17 writes for a namespaced request are the ones 0.5.23 asks for
    (where the release composes the same extra_key and no separate salt)."""
    import hashlib

    from sglang_objectcache.sglang import compat

    if not compat.namespaced_storage_hashes():
        pytest.skip("this SGLang as installed has no storage namespace (run objectcache patch-sglang)")
    from sglang.srt.mem_cache.utils import storage_namespace_seed

    want = hashlib.sha256(b"sglang-cache-namespace-v1" + b"\x01" + (9).to_bytes(8, "little") + b"adapter-a"
                          + b"\x00").hexdigest()
    args = ("adapter-a", None) if sglang_version() == "0.5.23" else ("adapter-a",)
    assert storage_namespace_seed(*args) == want
    assert storage_namespace_seed(*((None, None) if sglang_version() == "0.5.23" else (None,))) is None
