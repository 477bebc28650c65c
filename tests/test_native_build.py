"""The compiled helper is code loaded into SGLang's process: it is loaded only from a private
directory, only if it is ours and unchanged since we built it; anything else is rebuilt or refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STATUS = "from sglang_objectcache import native; print(native.status())"


def status(native_dir: Path) -> tuple[str, str]:
    env = {**os.environ, "OBJECTCACHE_NATIVE_DIR": str(native_dir), "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", STATUS], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


def built(native_dir: Path) -> Path:
    out, _ = status(native_dir)
    assert out.startswith("native"), out
    return next(native_dir.glob("objectcache-*.so"))


def test_a_fresh_build_is_private_and_recorded(tmp_path):
    d = tmp_path / "nd"
    so = built(d)
    assert d.stat().st_mode & 0o777 == 0o700
    assert so.with_suffix(".sha256").read_text().strip() == __import__("hashlib").sha256(so.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["changed", "no-record"])
def test_a_damaged_cached_build_is_rebuilt_not_loaded(tmp_path, damage):
    d = tmp_path / "nd"
    so = built(d)
    good = so.read_bytes()
    if damage == "changed":
        so.write_bytes(good[: len(good) // 2])  # a half-written file, or someone's edit
    else:
        so.with_suffix(".sha256").unlink()
    out, err = status(d)
    assert out.startswith("native") and "rebuilding" in err
    assert so.read_bytes() != good[: len(good) // 2] and so.with_suffix(".sha256").exists()


def test_a_directory_others_can_write_is_refused(tmp_path):
    d = tmp_path / "nd"
    built(d)
    d.chmod(0o777)
    out, _ = status(d)
    assert out.startswith("python fallback") and "writable by group or others" in out


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_file_of_another_user_is_replaced_not_loaded(tmp_path):
    d = tmp_path / "nd"
    so = built(d)
    os.chown(so, 12345, 12345)
    out, err = status(d)
    assert out.startswith("native") and "belongs to uid 12345" in err
    assert so.stat().st_uid == os.getuid()
