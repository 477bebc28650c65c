"""The read path next to a thread that runs Python without pause (as SGLang's scheduler does).

Every call that releases the GIL has to win it back from such a neighbour, which takes up to one
switch interval (5 ms). This measures, in one run, on one local SeaweedFS:
- the primitives (128 KiB copies, 256 KiB xxh3) that release the GIL against the ones in
  `gil_held.py` that keep it;
- a whole engine read of 64 Llama-3.1-8B pages (512 MiB) with each, alone and next to the busy
  thread.

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

from sglang_objectcache import format as fmt  # noqa: E402
from sglang_objectcache import gil_held  # noqa: E402


class Busy:
    """A thread that holds the GIL except when the interpreter makes it switch."""

    def __init__(self):
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        x = 0
        while not self._stop:
            x += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def releasing(on: bool) -> None:
    """Point the read path at the GIL-releasing primitives (on) or the GIL-held ones (off)."""
    fmt.memmove = ctypes.memmove if on else gil_held.memmove
    fmt.xxh3_64 = (lambda a, n: xxhash.xxh3_64_intdigest((ctypes.c_char * n).from_address(a))) if on \
        else gil_held.xxh3_64


def primitives() -> None:
    src = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    s, d, piece = src.ctypes.data, dst.ctypes.data, 128 << 10

    def copy(f):
        for off in range(0, len(src), piece):
            f(d + off, s + off, piece)

    def hash_(f):
        for off in range(0, len(src), 2 * piece):
            f(s + off, 2 * piece)

    def rate(fn, busy):
        fn()
        with Busy() if busy else _Nothing():
            t = time.perf_counter()
            for _ in range(3):
                fn()
            return 3 * len(src) / (time.perf_counter() - t) / 2**30

    xx_rel = lambda a, n: xxhash.xxh3_64_intdigest((ctypes.c_char * n).from_address(a))  # noqa: E731
    for name, fn in (("copy 128 KiB, GIL released", lambda: copy(ctypes.memmove)),
                     ("copy 128 KiB, GIL held", lambda: copy(gil_held.memmove)),
                     ("xxh3 256 KiB, GIL released", lambda: hash_(xx_rel)),
                     ("xxh3 256 KiB, GIL held", lambda: hash_(gil_held.xxh3_64))):
        alone, busy = rate(fn, False), rate(fn, True)
        print(f"{name:28s} alone {alone:6.2f} GiB/s  next to a busy thread {busy:6.2f} GiB/s  ({busy / alone:.2f})",
              flush=True)


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

        for on in (True, False):
            releasing(on)
            alone, busy = rate(False), rate(True)
            name = "engine read, GIL released" if on else "engine read, GIL held"
            print(f"{name:28s} alone {alone:6.2f} GiB/s  next to a busy thread {busy:6.2f} GiB/s  ({busy / alone:.2f})",
                  flush=True)
        assert np.array_equal(dst, data)
        cache.close()
    finally:
        releasing(False)
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
