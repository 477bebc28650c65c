"""The weights' identity in the fingerprint (sglang/weights.py): two checkpoints under one served
name, with the same config and file sizes, never share KV; copies of the same files do."""

from __future__ import annotations

import os
import shutil

import pytest

from sglang_objectcache.sglang import weights


def _checkpoint(d, seed: int, size: int = 1 << 20):
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}')
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    rng = __import__("random").Random(seed)
    (d / "model-1.safetensors").write_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
    return d


def test_two_checkpoints_with_the_same_shapes_differ_and_copies_agree(tmp_path):
    a = _checkpoint(tmp_path / "step-100", seed=1)
    b = _checkpoint(tmp_path / "step-200", seed=2)  # same config, same sizes, other bytes
    copy = tmp_path / "node2" / "step-100"
    shutil.copytree(a, copy)
    os.utime(copy / "model-1.safetensors", (0, 0))  # another host's copy: other mtimes
    ia, ib, ic = (weights.identity(str(p)) for p in (a, b, copy))
    assert ia and ia.startswith("auto:")
    assert ia != ib, "another checkpoint under the same name must not share KV"
    assert ia == ic, "copies of the same weights share"
    (b / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}')
    assert weights.identity(str(b)) != ib
    assert weights.identity(str(tmp_path)) is None, "no config.json: not a model directory"


def test_a_hub_model_is_its_snapshot_commit(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weights.identity("org/tiny") == f"hf:{commit}"
    assert weights.identity("org/not-downloaded") is None


@pytest.mark.usefixtures("sglang_cpu")
def test_the_backend_puts_the_identity_in_the_fingerprint(tmp_path, monkeypatch):
    from testbed.sglang_pools import make_host_pool, storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    def backend(extra):
        cfg = storage_config(mla=False, layout="layer_first",
                             extra={"tiers": [{"kind": "disk", "path": str(tmp_path), "capacity": "1GiB"}], **extra})
        return ObjectCacheStorage(cfg, make_host_pool("mha", "layer_first"))

    monkeypatch.setattr(weights, "server_identity", lambda: "auto:00aa")
    derived, named, off = backend({}), backend({"model_revision": "ckpt-7"}), backend({"model_revision": ""})
    try:
        assert derived.fp.model_revision == "auto:00aa"
        assert named.cache.fp.model_revision == "ckpt-7" and off.fp.model_revision == ""
        roots = {derived.cache.ns.root, named.cache.ns.root, off.cache.ns.root}
        assert len(roots) == 3, "each identity is its own namespace"
    finally:
        for b in (derived, named, off):
            b.close()
