"""The read path next to a thread that runs Python without pause (as SGLang's scheduler does).

Every call that releases the GIL has to win it back from such a neighbour, which takes up to one
switch interval (5 ms). This measures, in one run, on one local SeaweedFS, three ways to verify and copy:
- `native`: the whole range in one `native.verify_and_copy` call (GIL released once per range);
- `per piece, GIL held`: one call per piece that keeps the GIL (`gil_held.py`, the fallback);
- `per piece, GIL released`: one call per piece that gives the GIL up (ctypes.memmove, xxhash);
first the primitives over 64 MiB, then a whole engine read of 64 Llama-3.1-8B pages (512 MiB),
each alone and next to the busy thread.

    python benchmarks/gil.py [--pages 64]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time

import numpy as np
import xxhash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from transports import LAYERS, PIECE, llama_fingerprint, page_keys, segments_of  # noqa: E402

from sglang_objectcache import native  # noqa: E402
from sglang_objectcache import gil_held  # noqa: E402


class Busy:
    """A thread that holds the GIL except when the interpreter makes it switch. `steps` counts its
    loop: its pace next to a read path, against its pace alone (`pace_alone`), is the share of
    the interpreter that path leaves to a Python-bound thread such as SGLang's scheduler."""

    def __init__(self):
        self._stop = False
        self.steps = 0
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.steps += 1

    @staticmethod
    def pace_alone(seconds: float = 0.5) -> float:
        """Steps per second with nothing else running."""
        with Busy() as b:
            n0, t0 = b.steps, time.perf_counter()
            time.sleep(seconds)
            return (b.steps - n0) / (time.perf_counter() - t0)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


_RELEASING = (ctypes.memmove, lambda a, n: xxhash.xxh3_64_intdigest((ctypes.c_char * n).from_address(a)))
_HELD = (gil_held.memmove, gil_held.xxh3_64)
MODES = ("native", "per piece, GIL held", "per piece, GIL released")


def use(mode: str) -> None:
    """Point the read path at one way of verifying and copying."""
    gil_held.memmove, gil_held.xxh3_64 = _RELEASING if mode.endswith("released") else _HELD
    native._state.clear()
    if mode != "native":
        native._state.update(fn=None, why=mode)
    elif native._load() is None:
        raise SystemExit(f"native helper unavailable: {native.status()}")


def primitives() -> None:
    """Verify and copy 64 MiB as 256 KiB pieces of two 128 KiB segments."""
    src = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    s, d, piece = src.ctypes.data, dst.ctypes.data, 256 << 10
    pieces = list(range(s, s + len(src), piece))
    copies = [(d + off, s + off, piece // 2) for off in range(0, len(src), piece // 2)]
    use("native")
    sums = native.copy_and_hash([], pieces, piece)
    per = 32  # pieces per call: one 8 MiB range of 8 pages x 4 layers

    def run():
        for i in range(0, len(pieces), per):
            assert native.verify_and_copy(pieces[i:i + per], piece, sums[i:i + per], copies[2 * i:2 * (i + per)]) == -1

    def rate(busy):
        run()
        with Busy() if busy else _Nothing():
            t = time.perf_counter()
            for _ in range(3):
                run()
            return 3 * len(src) / (time.perf_counter() - t) / 2**30

    each_mode("verify+copy", rate)
    assert np.array_equal(src, dst)


def each_mode(what: str, rate) -> None:
    """`rate(busy)` in GiB/s for every mode, alone and next to a busy thread."""
    for mode in MODES:
        use(mode)
        alone, busy = rate(False), rate(True)
        print(f"{what}, {mode:24s} alone {alone:6.2f} GiB/s  next to a busy thread {busy:6.2f} GiB/s  "
              f"({busy / alone:.2f})", flush=True)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def engine(pages: int) -> None:
    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.testbed import servers

    srv = servers.start_seaweedfs(memory_limit_mb=None)
    os.environ.update(srv.env())
    try:
        fp = llama_fingerprint("gil")
        data = np.random.default_rng(0).integers(0, 256, size=(pages, LAYERS, PIECE), dtype=np.uint8)
        keys = page_keys(pages)
        tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "gil"}
        cache = ObjectCache(parse_config({"tiers": [tier]}), fp)
        assert all(cache.put(keys, segments_of(data)))
        dst = np.ones_like(data)

        def rate(busy):
            best = 0.0
            with Busy() if busy else _Nothing():
                for _ in range(3):
                    t = time.perf_counter()
                    assert all(cache.get(keys, segments_of(dst)))
                    best = max(best, pages * LAYERS * PIECE / 2**30 / (time.perf_counter() - t))
            return best

        each_mode("engine read", rate)
        assert np.array_equal(dst, data)
        cache.close()
    finally:
        use("native")
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=64)
    args = ap.parse_args(argv)
    print(f"{os.cpu_count()} cores, switch interval {sys.getswitchinterval() * 1e3:.0f} ms")
    primitives()
    engine(args.pages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
