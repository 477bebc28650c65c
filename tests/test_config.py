"""Config validation: every error names the key and the fix; SGLang's keys pass through."""

from __future__ import annotations

import pytest

from sglang_objectcache.config import ConfigError, load_config_file, parse_config

DISK = {"kind": "disk", "path": "/tmp/x", "capacity": "10GiB"}
S3 = {"kind": "s3", "endpoint": "http://127.0.0.1:7480", "bucket": "kv-cache"}


def test_the_issue_example_parses():
    cfg = parse_config({"write_policy": "write_through", "tiers": [
        {**DISK, "capacity": "100GiB"}, {**S3, "prefix": "prod", "region": "us-east-1"}]})
    assert cfg.tiers[0].capacity == 100 * 2**30
    assert cfg.tiers[1].prefix == "prod" and cfg.tiers[1].transport == "auto"


@pytest.mark.parametrize("raw, match", [
    ({"tiers": [DISK], "pages_per_objekt": 2}, r"^pages_per_objekt: unknown key; known keys here are"),
    ({"tiers": [{**S3, "endpont": "x"}]}, r"^tiers\[0\]\.endpont: unknown key"),
    ({"tiers": [DISK], "write_policy": "write_sometimes"}, r"^write_policy: 'write_sometimes' is not one of"),
    ({"tiers": [{**DISK, "capacity": "lots"}]}, r"^tiers\[0\]\.capacity: cannot read 'lots' as a size"),
    ({"tiers": [{**DISK, "capacity": -5}]}, r"^tiers\[0\]\.capacity: must be positive"),
    ({"tiers": [{**S3, "max_connections": "many"}]}, r"^tiers\[0\]\.max_connections: expected an integer"),
    ({"tiers": [{**S3, "max_connections": True}]}, r"^tiers\[0\]\.max_connections: expected an integer"),
    ({"tiers": [{**S3, "request_timeout": "soon"}]}, r"^tiers\[0\]\.request_timeout: cannot read"),
    ({"tiers": [{**S3, "endpoint": "127.0.0.1:7480"}]}, r"^tiers\[0\]\.endpoint: .* must start with http"),
    ({"tiers": [{**S3, "bucket": "Bad_Bucket"}]}, r"^tiers\[0\]\.bucket: 'Bad_Bucket' is not a valid"),
    ({"tiers": [{"kind": "s3"}]}, r"^tiers\[0\]\.bucket: required"),
    ({"tiers": [{"kind": "tape"}]}, r"^tiers\[0\]\.kind: 'tape' is not a tier kind"),
    ({"tiers": [S3, DISK]}, r"^tiers: list the disk tier before the s3 tier"),
    ({"tiers": []}, r"^tiers: at least one tier"),
    ({"tiers": [{**S3, "max_connections": 4, "max_write_connections": 8}]}, r"max_write_connections: 8 exceeds"),
    ({"tiers": [S3], "first_range_layers": 1}, r"^first_range_layers: unknown key"),  # removed
    ({"tiers": [S3], "switch_interval": "1s"}, r"^switch_interval: at most 100ms"),
    ({"tiers": [S3], "switch_interval": "soon"}, r"^switch_interval: cannot read"),
    ({"tiers": [S3], "first_layer_hold": "1m"}, r"^first_layer_hold: at most 10s"),
    ({"tiers": [S3], "read_waves": 4}, r"^read_waves: unknown key"),  # removed
    ({"tiers": [{**S3, "native_receive": "staging"}]}, r"^tiers\[0\]\.native_receive: unknown key"),  # removed
    ({"tiers": [S3], "bandwidth": "fast"}, r"^bandwidth: cannot read 'fast' as a size"),
    ({"tiers": [S3], "load_margin": 1.5}, r"^load_margin: a fraction in \[0, 1\)"),
    ({"tiers": [S3], "load_margin": "10%"}, r"^load_margin: a fraction"),
    ({"tiers": [S3], "load_or_recompute": "yes"}, r"^load_or_recompute: expected true or false"),
    ({"tiers": [{**S3, "sign_payload": "no"}]}, r"^tiers\[0\]\.sign_payload: expected true or false"),
    (None, r"^tiers: no configuration given"),
])
def test_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_sglang_keys_pass_through_untouched():
    keys = {"prefetch_threshold": 8192, "prefetch_timeout_base": 2, "prefetch_timeout_per_ki_token": 0.5,
            "backend_name": "objectcache", "module_path": "m", "class_name": "c", "interface_v1": 1,
            "hicache_storage_pass_prefix_keys": True, "tp_lcm_size": 4}
    cfg = parse_config({"tiers": [DISK], **keys})
    assert cfg.sglang == keys


def test_units():
    cfg = parse_config({"tiers": [{**S3, "request_timeout": "250ms", "index_refresh_interval": "1m"}],
                        "read_range_bytes": "4MiB", "timeout": 3})
    t = cfg.tiers[0]
    assert (t.request_timeout, t.index_refresh_interval, cfg.read_range_bytes, cfg.timeout) == (0.25, 60.0, 4 << 20, 3.0)
    assert [parse_config({"tiers": [S3], "bandwidth": b}).bandwidth for b in (0, "0", "1GiB")] == [0, 0, 1 << 30]
    assert parse_config({"tiers": [S3], "switch_interval": "0.3ms"}).switch_interval == 0.0003
    assert parse_config({"tiers": [S3], "switch_interval": 0}).switch_interval == 0.0  # Python's own
    assert parse_config({"tiers": [S3]}).first_layer_hold == 0.1  # on for streamed fetches
    assert parse_config({"tiers": [S3], "first_layer_hold": 0}).first_layer_hold == 0.0  # off
    assert parse_config({"tiers": [S3], "first_layer_hold": "50ms"}).first_layer_hold == 0.05


def test_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("tiers:\n  - kind: disk\n    path: /tmp/x\n    capacity: 1GiB\n")
    assert load_config_file(y).tiers[0].capacity == 2**30
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"c\.json: not valid json"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config_file(tmp_path / "missing.yaml")
