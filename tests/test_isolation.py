"""Tenant isolation in storage, against the installed SGLang's own hashing: a release either folds
the request's namespace (extra_key: cache_salt, LoRA id) into every storage page key, or the
backend refuses the setup in which that would serve one adapter's KV to another. Runs on both
releases (.ci/test.sh)."""

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


def test_our_table_matches_how_the_release_hashes():
    """NAMESPACED_STORAGE_HASHES must say the truth about the installed release: if SGLang 0.5.17
    starts folding extra_key in (or 0.5.23 stops), this fails and the refusal is revisited."""
    differ = storage_keys(None) != storage_keys("lora-adapter-A") != storage_keys("lora-adapter-B")
    assert differ == (compat.sglang_version() in compat.NAMESPACED_STORAGE_HASHES)


def test_lora_on_a_release_that_shares_keys_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "lora_enabled", lambda: True)
    version = compat.sglang_version()
    if version in compat.NAMESPACED_STORAGE_HASHES:
        compat.check_isolation(version)  # adapters have their own keys: nothing to refuse
        return
    assert storage_keys("lora-adapter-A") == storage_keys("lora-adapter-B"), "the reason for refusing"
    with pytest.raises(ConfigError, match="LoRA"):
        compat.check_isolation(version)


def test_the_backend_checks_isolation_when_sglang_builds_it(monkeypatch):
    from testbed.sglang_pools import storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    monkeypatch.setattr(compat, "lora_enabled", lambda: True)
    cfg = storage_config(mla=False, layout="layer_first",
                         extra={"tiers": [{"kind": "disk", "path": "/tmp/never-used", "capacity": "1GiB"}]})
    if compat.sglang_version() in compat.NAMESPACED_STORAGE_HASHES:
        ObjectCacheStorage(cfg, None)
    else:
        with pytest.raises(ConfigError, match="LoRA"):
            ObjectCacheStorage(cfg, None)


def test_without_lora_a_release_that_shares_keys_says_so(monkeypatch, caplog):
    monkeypatch.setattr(compat, "lora_enabled", lambda: False)
    version = compat.sglang_version()
    compat.check_isolation(version)
    assert ("cache_salt" in caplog.text) == (version not in compat.NAMESPACED_STORAGE_HASHES)
