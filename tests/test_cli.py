"""The operator CLI on real files."""

from __future__ import annotations

from engine_util import Pages, fingerprint, keys

from sglang_objectcache.cli.main import main
from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache


def test_check_config(tmp_path, capsys):
    good = tmp_path / "ok.yaml"
    good.write_text(f"tiers:\n  - kind: disk\n    path: {tmp_path}/d\n    capacity: 1GiB\n")
    assert main(["check-config", str(good), "--probe"]) == 0
    assert "reachable" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  - kind: disk\n    path: /x\n    capacity: 1GiB\n    colour: blue\n")
    assert main(["check-config", str(bad)]) == 2
    assert "tiers[0].colour: unknown key" in capsys.readouterr().err


def test_inspect_verifies_and_finds_damage(tmp_path, capsys):
    c = ObjectCache(parse_config({"tiers": [{"kind": "disk", "path": str(tmp_path), "capacity": "1GiB"}]}),
                    fingerprint())
    assert all(c.put(keys(2), Pages(2).segments()))
    c.close()
    path = next(p for p in tmp_path.rglob("*-2") if p.is_file())
    assert main(["inspect", str(path), "--verify"]) == 0
    assert "all checksums match" in capsys.readouterr().out
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1  # a data byte
    path.write_bytes(bytes(raw))
    assert main(["inspect", str(path), "--verify"]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
