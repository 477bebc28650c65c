"""SGLang's page-hash extension is built when the backend starts, not by the first storage query:
a dead build's lock is cleared, a build that cannot finish in time or cannot be made at all is a
startup error that says why (sglang/page_hash.py). Each case runs in a fresh process with its own
TORCH_EXTENSIONS_DIR, since a loaded extension stays loaded."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(f"""
    import sys, time
    sys.path.insert(0, {TESTS!r})
    from testbed import cpu_shims
    cpu_shims.install()
    from sglang_objectcache.sglang import page_hash
    t = time.monotonic()
    try:
        page_hash.ensure_built(timeout=float(sys.argv[1]))
    except Exception as e:
        print("ERR", type(e).__name__, e)
    else:
        from sglang.srt.mem_cache.cpp_utils import native_hash
        print("OK", native_hash.get_native_hash([5, 6, 7, 8], None, 4))
    print("TOOK", time.monotonic() - t)
""")


def run(ext_dir, timeout: float, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(timeout)], capture_output=True, text=True,
                         timeout=timeout + 120, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), **env})
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines() if " " in ln}
    assert "TOOK" in lines, out.stdout + out.stderr
    return {**lines, "log": out.stderr}


def test_a_dead_builds_lock_is_cleared_and_the_extension_builds(tmp_path):
    lock = tmp_path / "hicache_hash_cpp" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 3600  # a build killed an hour ago; torch alone would wait on it forever
    os.utime(lock, (old, old))
    r = run(tmp_path, timeout=240)
    assert "OK" in r, r
    assert not lock.exists()
    assert list(lock.parent.glob("hicache_hash_cpp*.so")), "built into the directory asked for"


def test_a_build_that_cannot_finish_in_time_is_a_startup_error_naming_the_directory(tmp_path):
    """Another process holds the build lock (a live build, or a stuck one): we wait our deadline,
    not forever."""
    build = tmp_path / "hicache_hash_cpp"
    with open(tmp_path / ".hicache_hash_cpp.sglang.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        r = run(tmp_path, timeout=3)
    assert r.get("ERR", "").startswith("StartupError"), r
    assert "was not ready after 3 s" in r["ERR"] and str(build) in r["ERR"]
    assert float(r["TOOK"]) < 30


def test_a_build_that_fails_is_a_startup_error_that_says_what_is_missing(tmp_path):
    r = run(tmp_path, timeout=120, CXX="/bin/false")  # no working C++ compiler
    assert r.get("ERR", "").startswith("StartupError"), r
    assert "cannot be built or loaded" in r["ERR"] and "C++ compiler" in r["ERR"]


@pytest.mark.usefixtures("sglang_cpu")
def test_the_backend_builds_it_before_it_serves(tmpdir_path, monkeypatch):
    from testbed.sglang_pools import make_host_pool, storage_config

    from sglang_objectcache.errors import StartupError
    from sglang_objectcache.sglang import page_hash
    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    calls = []

    def refuse(timeout=page_hash.BUILD_TIMEOUT):
        calls.append(timeout)
        raise StartupError("no compiler")

    monkeypatch.setattr(page_hash, "ensure_built", refuse)
    cfg = storage_config(mla=False, layout="layer_first",
                         extra={"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]})
    with pytest.raises(StartupError, match="no compiler"):
        ObjectCacheStorage(cfg, make_host_pool("mha", "layer_first"))
    assert calls == [page_hash.BUILD_TIMEOUT]
