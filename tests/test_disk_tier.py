"""The disk tier keeps its promises: recency counts ranged reads, one budget holds for every
process sharing a directory, and what a crash leaves behind is removed at start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache

OBJ = 8 * 4 * 8192 + 4096  # 8 pages of 4 layers of 8 KiB, and room for the footer


def make(path: str, capacity: int, model: str = "m", **top) -> ObjectCache:
    cfg = parse_config({"tiers": [{"kind": "disk", "path": path, "capacity": capacity}], **top})
    return ObjectCache(cfg, fingerprint(model))


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if not f.startswith("."))


def test_a_ranged_read_counts_as_use(tmpdir_path):
    c = make(tmpdir_path, int(OBJ * 2.5), read_range_bytes="32KiB")  # 4 ranges per object
    try:
        spans = [(Pages(8, seed=i), keys(8, f"s{i}")) for i in range(3)]
        for src, ks in spans[:2]:
            assert all(c.put(ks, src.segments()))
            time.sleep(0.05)  # file times order them
        src, ks = spans[0]
        assert c.get(ks, Pages.empty_like(src).segments()) == [True] * 8  # the older one, read in ranges
        time.sleep(0.05)
        assert all(c.put(spans[2][1], spans[2][0].segments()))
        assert c.exists(spans[0][1]) == 8, "just read: stays"
        assert c.exists(spans[1][1]) == 0, "least recently used: gone"
    finally:
        c.close()


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from engine_util import Pages, fingerprint, keys
    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    cfg = parse_config({"tiers": [{"kind": "disk", "path": sys.argv[2], "capacity": int(sys.argv[3])}]})
    c = ObjectCache(cfg, fingerprint("other-model"))
    for i in range(4):
        assert all(c.put(keys(8, f"child{i}"), Pages(8, seed=50 + i).segments()))
    c.close()
""")


def test_one_budget_for_every_process_sharing_the_directory(tmpdir_path):
    cap = int(OBJ * 3.5)
    c = make(tmpdir_path, cap)
    try:
        child = subprocess.Popen([sys.executable, "-c", WRITER, os.path.dirname(__file__), tmpdir_path, str(cap)],
                                 env={**os.environ, "PYTHONPATH": os.getcwd()})
        mine = [(Pages(8, seed=i), keys(8, f"p{i}")) for i in range(4)]
        for src, ks in mine:
            assert all(c.put(ks, src.segments()))
        assert child.wait(60) == 0
        assert dir_bytes(tmpdir_path) <= cap, "8 objects written by two processes into room for 3"
        # what the other process evicted of ours is a miss here, then forgotten
        for src, ks in mine:
            dst = Pages.empty_like(src)
            got = c.get(ks, dst.segments())
            assert got in ([True] * 8, [False] * 8)
            if got[0]:
                assert np.array_equal(dst.data, src.data)
            else:
                assert c.exists(ks) == 0
    finally:
        c.close()


def test_crash_leftovers_are_removed_at_start(tmpdir_path, caplog):
    c = make(tmpdir_path, OBJ * 10)
    spans = [(Pages(8, seed=i), keys(8, f"s{i}")) for i in range(3)]
    try:
        for src, ks in spans:
            assert all(c.put(ks, src.segments()))
        files = {f: os.path.join(d, f) for d, _, fs in os.walk(tmpdir_path) for f in fs if f.endswith("-8")}
        names = [files[f"{ks[0]}-8"] for _, ks in spans]
    finally:
        c.close()
    assert len(files) == 3
    os.truncate(names[0], OBJ // 2)  # cut short
    size = os.path.getsize(names[1])
    with open(names[1], "wb") as f:  # zeroed, full size: a power loss before the data reached the disk
        f.write(bytes(size))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    tmp = os.path.join(os.path.dirname(names[2]), f".{os.path.basename(names[2])}.{dead}.0.tmp")
    with open(tmp, "wb") as f:  # a write in flight when its process died
        f.write(b"x" * 5000)
    again = make(tmpdir_path, OBJ * 10)
    try:
        assert not os.path.exists(names[0]) and not os.path.exists(names[1]) and not os.path.exists(tmp)
        assert again.exists(spans[0][1]) == 0 and again.exists(spans[1][1]) == 0
        dst = Pages.empty_like(spans[2][0])
        assert again.get(spans[2][1], dst.segments()) == [True] * 8
        assert np.array_equal(dst.data, spans[2][0].data)
        st = again.snapshot()["tiers"][again.tiers[0].name]
        assert st["used_bytes"] == os.path.getsize(names[2]), "their bytes are back in the budget"
        assert st["swept_temporary_files"] == 1
    finally:
        again.close()


def test_a_live_writers_temporary_file_is_left_alone_and_counted(tmpdir_path):
    c = make(tmpdir_path, OBJ * 10)
    try:
        tmp = os.path.join(tmpdir_path, f".something.{os.getpid()}.7.tmp")
        with open(tmp, "wb") as f:
            f.write(b"x" * 5000)
        assert all(c.put(keys(8, "x"), Pages(8, seed=1).segments()))
        assert os.path.exists(tmp)
        assert c.snapshot()["tiers"][c.tiers[0].name]["used_bytes"] >= OBJ + 5000 - 4096
    finally:
        c.close()


def test_a_zombie_writer_counts_as_dead():
    """A writer that exited but was not reaped yet (its parent still runs) holds no write: its
    temporary files are crash leftovers."""
    from sglang_objectcache.stores.disk_budget import _pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # exited, not waited for: a zombie
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert not _pid_alive(child.pid)
        assert _pid_alive(os.getpid())
    finally:
        child.wait()
