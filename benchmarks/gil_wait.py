"""How long SGLang's scheduler thread waits for the GIL while a backend stores or loads pages.

The backend runs in SGLang's own process: its backup thread (batch_set_v1) and prefetch thread
(batch_get_v1) share the GIL with the scheduler thread, which runs Python almost without pause.
Every millisecond a backend holds the GIL is a millisecond every request in the server waits.
Here a probe thread stands in for the scheduler (a tight pure-Python loop). From the kernel's
per-thread counters (/proc/self/task/<tid>/schedstat) its wall time splits into time on a CPU,
time waiting for a CPU (the run queue), and the rest: time asleep, which for this loop can only be
waiting for the GIL. Printed per GiB moved, for each backend, in one run against one server; the
probe's Python rate next to its rate when idle.

Llama-3.1-8B geometry (as `storage.py`), SGLang's 128-page batches, one after another.

    python benchmarks/gil_wait.py                       # starts its own SeaweedFS
    python benchmarks/gil_wait.py --tokens 16384 --backends objectcache,objectcache-ppo1,seaweedfs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import storage  # noqa: E402  (geometry, backends, keys)
from testbed import cpu_shims  # noqa: E402

GiB = 2**30


def _schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting in the run queue) of the calling thread."""
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
        on_cpu, queued, _ = f.read().split()
    return int(on_cpu) / 1e9, int(queued) / 1e9


class Probe:
    """A pure-Python loop on its own thread; `gil_wait` is its wall time neither on a CPU nor
    queued for one."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.result: dict = {}

    def _run(self) -> None:
        w0, (c0, q0), n = time.perf_counter(), _schedstat(), 0
        while not self._stop.is_set():
            s = 0
            for i in range(2000):
                s += i
            n += 1
        (c1, q1), wall = _schedstat(), time.perf_counter() - w0
        self.result = {"wall_s": wall, "cpu_s": c1 - c0, "queued_s": q1 - q0,
                       "gil_wait_s": max(0.0, wall - (c1 - c0) - (q1 - q0)), "loops_per_s": n / wall}

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def idle_rate(seconds: float = 2.0) -> dict:
    with Probe() as p:
        time.sleep(seconds)
    return p.result


def measure(name: str, srv, pool, n_pages: int) -> dict:
    import torch

    prefix = f"gil-{uuid.uuid4().hex[:8]}"
    keys = storage.chain_keys(n_pages, prefix)
    idx = torch.arange(n_pages * storage.PAGE, dtype=torch.int64)
    total = n_pages * storage.PAGE_BYTES
    out = {"backend": name, "tokens": n_pages * storage.PAGE, "bytes": total}
    w = storage.make_backend(name, srv, prefix, pool)
    with Probe() as p:
        ok = True
        for i in range(0, n_pages, storage.BATCH):
            ok &= all(w.backend.batch_set_v1(keys[i:i + storage.BATCH], idx[i * storage.PAGE:(i + storage.BATCH) * storage.PAGE]))
    w.close()
    out["write"] = {**p.result, "ok": bool(ok)}
    r = storage.make_backend(name, srv, prefix, pool)
    with Probe() as p:
        got = 0
        for i in range(0, n_pages, storage.BATCH):
            got += sum(r.backend.batch_get_v1(keys[i:i + storage.BATCH], idx[i * storage.PAGE:(i + storage.BATCH) * storage.PAGE]))
    r.close()
    out["read"] = {**p.result, "ok": got == n_pages}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens stored then loaded per backend")
    ap.add_argument("--backends", default="objectcache,seaweedfs")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gil_wait.json"))
    args = ap.parse_args(argv)
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/schedstat"):
        ap.error("needs Linux's per-thread schedstat (/proc/self/task/<tid>/schedstat)")

    cpu_shims.install()
    import sglang.srt.mem_cache.memory_pool  # noqa: F401

    cpu_shims.install_cpu_hicache_patches()
    from testbed import servers
    from testbed.sglang_pools import fill_random, make_host_pool

    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for n in names:
        if n not in storage.BACKENDS or storage.BACKENDS[n] and storage.BACKENDS[n].get("https"):
            ap.error(f"unknown or unsupported backend {n} (https rows need storage.py's TLS server)")
    if "seaweedfs" in names:
        try:
            import sglang.srt.mem_cache.storage.seaweedfs.seaweedfs_store  # noqa: F401
        except ImportError:
            print("skipping seaweedfs: this SGLang has no seaweedfs backend")
            names.remove("seaweedfs")
    n_pages = max(1, args.tokens // storage.PAGE)
    pool = make_host_pool("mha", "layer_first", page_size=storage.PAGE, layers=storage.LAYERS,
                          heads=storage.HEADS, head_dim=storage.DIM, tokens=n_pages * storage.PAGE,
                          host_tokens=n_pages * storage.PAGE)
    fill_random(pool, seed=3)
    srv = servers.start_seaweedfs()
    os.environ.update(AWS_ACCESS_KEY_ID=srv.access_key, AWS_SECRET_ACCESS_KEY=srv.secret_key)
    try:
        idle = idle_rate()
        results = [measure(n, srv, pool, n_pages) for n in names]
    finally:
        srv.stop()
    print(f"probe idle: {idle['loops_per_s']:.0f} loops/s, GIL wait {idle['gil_wait_s'] * 1e3:.0f} ms in "
          f"{idle['wall_s']:.1f} s; {os.cpu_count()} CPUs")
    print("| backend | op | GiB | seconds | GIL wait ms per GiB | run-queue ms per GiB | probe rate / idle | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        gib = r["bytes"] / GiB
        for op in ("write", "read"):
            m = r[op]
            print(f"| {r['backend']} | {op} | {gib:.2f} | {m['wall_s']:.2f} | {m['gil_wait_s'] * 1e3 / gib:.0f} | "
                  f"{m['queued_s'] * 1e3 / gib:.0f} | {m['loops_per_s'] / idle['loops_per_s']:.2f} | {m['ok']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"idle": idle, "results": results, "cpus": os.cpu_count()}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
