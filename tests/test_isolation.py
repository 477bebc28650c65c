"""Tenant isolation in storage, against the installed SGLang's own hashing: SGLang either folds
the request's namespace (extra_key: cache_salt, LoRA id) into every storage page key (0.5.23;
0.5.17 with `objectcache patch-sglang`), or the backend refuses the setup in which that would
serve one adapter's KV to another. Runs on both releases (.ci/test.sh); through the real tree:
test_tenants.py."""

from __future__ import annotations

import pytest

from sglang_objectcache.errors import ConfigError
from sglang_objectcache.sglang import compat

TOKENS = list(range(1000, 1064))  # four pages of 16 tokens
PAGE = 16


class _Node:
    """Just what SGLang's compute_node_hash_values reads of a tree node: a child of the root."""

    def __init__(self, key, parent=None):
        self.key, self.parent, self.hash_value = key, parent, None


def storage_keys(extra_key: str | None) -> list[str]:
    """The page keys SGLang gives a storage backend for TOKENS under `extra_key`, from its own
    functions (the node hashes that writes and non-root prefetches use)."""
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.utils import compute_node_hash_values

    root = _Node(RadixKey([], None))
    return compute_node_hash_values(_Node(RadixKey(list(TOKENS), extra_key), root), PAGE)


def test_our_check_matches_how_the_release_hashes():
    """namespaced_storage_hashes() must say the truth about the installed SGLang (0.5.23; 0.5.17
    with the patch set): if the hashing changes under it, this fails and the refusal is revisited."""
    differ = storage_keys(None) != storage_keys("lora-adapter-A") != storage_keys("lora-adapter-B")
    assert differ == compat.namespaced_storage_hashes()


def test_lora_where_keys_are_shared_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "lora_enabled", lambda: True)
    version = compat.sglang_version()
    if compat.namespaced_storage_hashes():
        compat.check_isolation(version)  # adapters have their own keys: nothing to refuse
    else:
        assert storage_keys("lora-adapter-A") == storage_keys("lora-adapter-B"), "the reason for refusing"
    # an SGLang without the namespace (0.5.17 unpatched), whatever this one is
    monkeypatch.setattr(compat, "namespaced_storage_hashes", lambda: False)
    with pytest.raises(ConfigError, match="LoRA.*objectcache patch-sglang"):
        compat.check_isolation(version)


def test_the_backend_checks_isolation_when_sglang_builds_it(monkeypatch):
    from testbed.sglang_pools import storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    monkeypatch.setattr(compat, "lora_enabled", lambda: True)
    cfg = storage_config(mla=False, layout="layer_first",
                         extra={"tiers": [{"kind": "disk", "path": "/tmp/never-used", "capacity": "1GiB"}]})
    monkeypatch.setattr(compat, "namespaced_storage_hashes", lambda: False)
    with pytest.raises(ConfigError, match="LoRA"):
        ObjectCacheStorage(cfg, None)


def test_without_lora_shared_keys_are_logged(monkeypatch, caplog):
    monkeypatch.setattr(compat, "lora_enabled", lambda: False)
    compat.check_isolation(compat.sglang_version())
    assert ("cache_salt" in caplog.text) == (not compat.namespaced_storage_hashes())
    monkeypatch.setattr(compat, "namespaced_storage_hashes", lambda: False)
    compat.check_isolation(compat.sglang_version())
    assert "cache_salt" in caplog.text and "objectcache patch-sglang" in caplog.text


# ---- fingerprints: every layout that changes a page's bytes -------------------------------------

def _fingerprint(mla: bool, **overrides):
    import dataclasses

    from testbed.sglang_pools import make_host_pool, storage_config

    from sglang_objectcache.sglang.pool import describe_pool

    cfg = storage_config(mla=mla, layout="layer_first", extra={})
    fields = {f.name for f in dataclasses.fields(cfg)}
    missing = set(overrides) - fields
    if missing:
        pytest.skip(f"SGLang {compat.sglang_version()} has no {', '.join(sorted(missing))}")
    if mla and overrides.get("dcp_size", 1) > 1:
        overrides.setdefault("logical_page_size", 16 * overrides["dcp_size"])
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except ValueError as e:  # SGLang's own validation of a layout it cannot build here
        pytest.skip(str(e))
    return describe_pool(make_host_pool("mla" if mla else "mha", "layer_first"), cfg)


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_context_parallel_ranks_get_their_own_namespace(mla):
    """Each attention-CP rank holds a disjoint slice of every page: rank 1 must never read rank 0's."""
    fps = [_fingerprint(mla, attn_cp_rank=r, attn_cp_size=2) for r in (0, 1)]
    assert fps[0].digest != fps[1].digest
    assert _fingerprint(mla).digest not in {f.digest for f in fps}, "nor the unsharded deployment's"


def test_decode_context_parallel_ranks_get_their_own_namespace():
    fps = [_fingerprint(True, dcp_rank=r, dcp_size=2, tp_rank=r, tp_size=2) for r in (0, 1)]
    assert fps[0].digest != fps[1].digest and _fingerprint(True).digest not in {f.digest for f in fps}


def test_an_unsharded_deployment_keeps_its_namespace():
    """Fields added for sharded layouts count only when set: what an unsharded deployment stored
    before stays under the same fingerprint."""
    import dataclasses
    import hashlib
    import json

    from sglang_objectcache import keys as keys_mod

    fp = _fingerprint(False)
    before = {k: v for k, v in dataclasses.asdict(fp).items() if k not in keys_mod._LATER_FIELDS}
    old = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    assert fp.digest == old


def test_two_checkpoints_under_one_served_name_do_not_share(tmp_path):
    """The served name does not identify the weights; `model_revision` does."""
    from engine_util import Pages, fingerprint, keys

    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache

    def cache(rev):
        cfg = {"tiers": [{"kind": "disk", "path": str(tmp_path), "capacity": "1GiB"}], "model_revision": rev}
        return ObjectCache(parse_config(cfg), fingerprint("same-name"))
    a, b, a2 = cache("ckpt-2026-11"), cache("ckpt-2026-12"), None
    try:
        src, ks = Pages(8, seed=1), keys(8)
        assert all(a.put(ks, src.segments()))
        assert a.ns.root != b.ns.root and b.exists(ks) == 0
        a2 = cache("ckpt-2026-11")
        assert a2.exists(ks) == 8, "the same weights share"
    finally:
        for c in (a, b, a2):
            if c is not None:
                c.close()
