"""Operator commands against real S3 servers: ls, du, gc (with the collectors' lease) and verify."""

from __future__ import annotations

import json
import time

import boto3
from conftest import s3_tier
from engine_util import Pages, keys
from test_gc import bucket_bytes, spans
from test_index_truth import make

from sglang_objectcache.cli.main import main


def config(tmp_path, srv, prefix) -> str:
    p = tmp_path / "oc.json"
    p.write_text(json.dumps({"tiers": [s3_tier(srv, prefix)]}))
    return str(p)


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def test_ls_and_du_show_each_namespace(s3_env, prefix, tmp_path, capsys):
    a = make(s3_env, prefix)
    try:
        spans(a, 3, "s")
        cfg = config(tmp_path, s3_env, prefix)
        rc, out = run(capsys, "ls", cfg, "--json")
        rows = json.loads(out)
        assert rc == 0 and len(rows) == 1
        assert rows[0]["namespace"] == a.ns.root and rows[0]["objects"] == 3
        assert rows[0]["data_bytes"] == bucket_bytes(s3_env, prefix)
        assert rows[0]["objects_by_part"]["manifests"] >= 1
        rc, out = run(capsys, "du", cfg)
        assert rc == 0 and a.ns.root in out and "total" in out
        rc, out = run(capsys, "ls", cfg)
        assert a.ns.root in out and "LAST WRITE" in out
    finally:
        a.close()


def test_gc_dry_run_then_for_real_and_the_lease(s3_env, prefix, tmp_path, capsys, monkeypatch):
    from sglang_objectcache.engine import gc as gc_mod

    monkeypatch.setattr(gc_mod, "GRACE", 0.0)  # objects a second old may go
    a = make(s3_env, prefix)
    try:
        spans(a, 4, "g")
        time.sleep(1.1)
        total = bucket_bytes(s3_env, prefix)
        cfg = config(tmp_path, s3_env, prefix)
        ns = a.ns.root[len(prefix) + 1:]
        rc, out = run(capsys, "gc", cfg, "--namespace", ns, "--capacity", str(total // 2), "--dry-run", "--json")
        r = json.loads(out)[0]
        assert rc == 0 and r["dry_run"] and r["deleted"] == 3 and bucket_bytes(s3_env, prefix) == total
        # a running instance holds the lease: the command stands aside unless forced
        assert a.runtime.run(a.tiers[0].collector.take_lease(), timeout=10)
        rc, out = run(capsys, "gc", cfg, "--capacity", str(total // 2), "--json")
        assert "skipped" in json.loads(out)[0]
        assert bucket_bytes(s3_env, prefix) == total
        rc, out = run(capsys, "gc", cfg, "--capacity", str(total // 2), "--force", "--json")
        assert json.loads(out)[0]["deleted"] == 3 and bucket_bytes(s3_env, prefix) <= total // 2
    finally:
        a.close()


def test_gc_deletes_and_the_writer_forgets(s3_env, prefix, tmp_path, capsys, monkeypatch):
    from sglang_objectcache.engine import gc as gc_mod

    monkeypatch.setattr(gc_mod, "GRACE", 0.0)
    a = make(s3_env, prefix)
    try:
        written = spans(a, 4, "h")
        time.sleep(1.1)
        total = bucket_bytes(s3_env, prefix)
        rc, out = run(capsys, "gc", config(tmp_path, s3_env, prefix), "--capacity", str(total // 2), "--json")
        r = json.loads(out)[0]
        assert rc == 0 and r["deleted"] == 3 and bucket_bytes(s3_env, prefix) <= total // 2
        # the running instance learns the deletions from the command's manifest (tombstones)
        from test_index_truth import eventually
        assert eventually(lambda: sum(a.exists(ks) == 8 for ks, _ in written) == 1)
    finally:
        a.close()


def test_verify_finds_a_damaged_object(s3_env, prefix, tmp_path, capsys):
    a = make(s3_env, prefix)
    try:
        spans(a, 3, "v")
    finally:
        a.close()
    cfg = config(tmp_path, s3_env, prefix)
    rc, out = run(capsys, "verify", cfg)
    assert rc == 0 and "checked 3 objects: 0 failed" in out
    s3 = boto3.client("s3", **s3_env.client_kwargs())
    name = next(o["Key"] for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix + "/")["Contents"]
                if o["Key"].split("/")[-2] == "d")
    body = bytearray(s3.get_object(Bucket=s3_env.bucket, Key=name)["Body"].read())
    body[100] ^= 1
    s3.put_object(Bucket=s3_env.bucket, Key=name, Body=bytes(body))
    rc, out = run(capsys, "verify", cfg, "--json")
    r = json.loads(out)
    assert rc == 1 and r["checked"] == 3 and [f["object"] for f in r["failed"]] == [name]
    rc, out = run(capsys, "verify", cfg, "--sample", "1", "--json")
    assert json.loads(out)["checked"] == 1
