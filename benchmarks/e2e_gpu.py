"""End-to-end TTFT with real SGLang 0.5.17 on a GPU machine: objectcache layer-wise vs the baselines.

One sitting, one server (Llama-3.1-8B geometry, dummy weights, page 64, layer_first, io direct,
write_through, prefetch policy wait_complete), SeaweedFS on the same machine. For each context
length it measures, in this order:

  (a) recompute        the prefix is new
  dev                  the prefix is on the GPU (SGLang's fixed per-request cost: the lower of the
                       second hit, which starts the backup, and a third)
  (b) host             device evicted by fillers, the prefix in HiCache host memory (L2)
  (d) objectcache      device and host flushed, the prefix in S3, layer-wise streaming (patched SGLang)
  (c) objectcache      the same, with `layerwise: false` (whole prefetch, then load)
  (e) file             SGLang's own `file` backend on local disk, same flush-then-hit

(c) and (e) are runtime re-attachments of the storage backend (`PUT /hicache/storage-backend`).
Storage rows take the median of `--repeat` samples (one for rows over 3 s), each after a flush.
Shapes: `hit` (the whole context but a 64-token question is a cached prefix) and `compute` (half
the context is a cached prefix, half is new). Also measured in the same sitting: the raw read
ceiling of the server for two plain clients, obstore and the package's native reader (bytes dropped),
at the plan's range size (`read_range_bytes` ranges of the stored 64 MiB objects; 8 MiB and whole
objects too), and from the faster of them the layer-wise bound of the shared GPU notes.

    python benchmarks/e2e_gpu.py --model /tmp/m8b --out results/e2e.json

Needs: SGLang 0.5.17 patched (`objectcache patch-sglang`), this package, obstore, and a `weed`
binary (WEED_BINARY). `benchmarks/gpu/run_e2e.sh` sets that up on the GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # transports.py: the shared geometry
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: the local SeaweedFS

from testbed.servers import process_cpu_seconds  # noqa: E402

PORT = 30000
URL = f"http://127.0.0.1:{PORT}"
KV_PER_TOKEN = 128 << 10  # Llama-3.1-8B, bf16: 32 layers x 4 KiB
LAYERS = 32


ADMIN_KEY = "objectcache-bench"  # runtime detach/attach of the storage backend needs an admin key


def http(method: str, path: str, body: dict | None = None, timeout: float = 600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class Watchdog:
    """Dumps the server's threads (`py-spy dump`, where it is on PATH) into the log's folder when
    its log stays silent for `after` seconds while a request is out: a request that never gets a
    `Prefill batch` line then says where it stuck. (Session 8's lease: two servers took a 512-token
    request after /health and logged nothing for 165 s, until the driver's timeout.) A server
    still silent through `most` dumps is killed: the sitting ends rather than wait out the HTTP
    timeout."""

    def __init__(self, pid: int, log_path: str, after: float = 90.0, most: int = 2):
        self.pid, self.log_path, self.after, self.most = pid, log_path, after, most
        self.dumps: list[str] = []
        self._busy = 0
        self._last = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if shutil.which("py-spy"):
            threading.Thread(target=self._run, daemon=True, name="hang-watchdog").start()

    @contextlib.contextmanager
    def busy(self):
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(5) and len(self.dumps) < self.most:
            with self._lock:
                busy = self._busy > 0
            try:
                silent = time.time() - os.path.getmtime(self.log_path)
            except OSError:
                continue
            if busy and silent > self.after and time.time() - self._last > self.after:
                self._last = time.time()
                path = os.path.join(os.path.dirname(os.path.abspath(self.log_path)), f"hang-{len(self.dumps)}.txt")
                with open(path, "w") as f:  # Python frames, then native ones (a wait inside C)
                    for extra in ([], ["--native"]):
                        f.flush()
                        try:
                            subprocess.run(["py-spy", "dump", "--pid", str(self.pid), "--subprocesses", *extra],
                                           stdout=f, stderr=subprocess.STDOUT, timeout=120, check=False)
                        except subprocess.TimeoutExpired:
                            f.write(f"py-spy dump {' '.join(extra)}: no answer in 120 s\n")
                self.dumps.append(path)
                print(f"server log silent for {silent:.0f}s with a request out; its threads: {path}", flush=True)
                if len(self.dumps) >= self.most:  # stuck through every dump: end the sitting, not the HTTP timeout
                    print(f"server still silent after {self.most} dumps; killing it", flush=True)
                    for pid in process_tree(self.pid):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)


class CpuMeter:
    """CPU seconds the S3 server and SGLang's processes spend inside the `with` blocks, per block:
    which side a slower transport (TLS: the client decrypts, the server encrypts) costs, and
    whether the cores ran out. Linux /proc only; empty where a process could not be read."""

    def __init__(self, srv, root: int):
        self.srv, self.root = srv, root
        self.server = self.sglang = 0.0
        self.blocks = 0
        self.ok = True

    def _now(self) -> tuple[float | None, float | None]:
        return self.srv.cpu_seconds(), process_cpu_seconds(process_tree(self.root))

    def __enter__(self):
        self._t0 = self._now()
        return self

    def __exit__(self, *exc):
        s1, g1 = self._now()
        (s0, g0), self.blocks = self._t0, self.blocks + 1
        if None in (s0, g0, s1, g1):
            self.ok = False
        else:
            self.server += s1 - s0
            self.sglang += g1 - g0

    def per_sample(self) -> dict:
        if not self.ok or not self.blocks:
            return {}
        return {"server_cpu_s": round(self.server / self.blocks, 2), "sglang_cpu_s": round(self.sglang / self.blocks, 2)}


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (SGLang's scheduler and detokenizer are its children)."""
    parent: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


WATCH: Watchdog | None = None  # the running server's, set by main()


def gen(ids: list[int]) -> tuple[float, dict]:
    t = time.perf_counter()
    with WATCH.busy() if WATCH is not None else contextlib.nullcontext():
        r = http("POST", "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    dt = time.perf_counter() - t
    meta = r.get("meta_info", {})
    if meta.get("finish_reason", {}).get("type") == "abort":
        raise RuntimeError(f"request aborted: {meta.get('finish_reason')}")
    return dt * 1000, meta.get("cached_tokens_details") or {"cached": meta.get("cached_tokens")}


def flush() -> None:
    for _ in range(60):
        try:
            http("POST", "/flush_cache")
            return
        except urllib.error.HTTPError:  # refused while requests or writes are pending
            time.sleep(1)
    raise RuntimeError("flush_cache kept failing")


def admin(method: str, body: dict | None = None, tries: int = 30) -> None:
    """Detach or attach the storage backend; SGLang refuses (400) until the scheduler is idle."""
    for i in range(tries):
        try:
            http(method, "/hicache/storage-backend", body)
            return
        except urllib.error.HTTPError as e:
            why = e.read().decode(errors="replace").strip()
            if i == tries - 1:
                raise RuntimeError(f"{method} /hicache/storage-backend: {e.code} {why}") from None
            if i == 0:
                print(f"  {method} refused ({why}); retrying", flush=True)
            time.sleep(1)


def attach(backend: str, extra: dict, write_policy: str = "write_through_selective") -> None:
    admin("DELETE")
    admin("PUT", {
        "hicache_storage_backend": backend, "hicache_storage_backend_extra_config_json": json.dumps(extra),
        "hicache_storage_prefetch_policy": "wait_complete", "hicache_write_policy": write_policy})


class Bucket:
    """The S3 side, seen by a plain client: how much is stored, and how fast it reads."""

    def __init__(self, srv, prefix: str):
        from obstore.store import S3Store

        self.store = S3Store(srv.bucket, endpoint=srv.endpoint, access_key_id=srv.access_key,
                             secret_access_key=srv.secret_key, region=srv.region,
                             client_options={"allow_http": True})
        self.srv = srv
        self.prefix = prefix

    def objects(self) -> list[dict]:
        import obstore as obs

        out = []
        for batch in obs.list(self.store, prefix=self.prefix):
            out.extend(o for o in batch if "/d/" in o["path"])
        return out

    def settle(self, want_bytes: int, limit: float = 150) -> float:
        """Wait until at least `want_bytes` of data objects are stored and the total is steady
        (or has not moved for 30 s: writes that failed will not come)."""
        t0, last, steady = time.time(), -1, 0
        while time.time() - t0 < limit:
            total = sum(o["size"] for o in self.objects())
            steady = steady + 1 if total == last else 0
            if (total >= want_bytes and steady >= 2) or steady >= 30:
                print(f"  stored {total / 2**30:.2f} GiB after {time.time() - t0:.0f}s", flush=True)
                return total
            last = total
            time.sleep(1)
        print(f"  warning: stored bytes did not settle ({last} of {want_bytes})", flush=True)
        return last

    def ceiling(self, objects: list[dict], range_bytes: int = 8 << 20, concurrency: int = 32) -> dict:
        """GiB/s a plain obstore client reads from these objects, as `range_bytes` ranges and whole."""
        import obstore as obs

        async def ranges() -> float:
            sem = asyncio.Semaphore(concurrency)
            jobs = [(o["path"], s, min(s + range_bytes, o["size"])) for o in objects
                    for s in range(0, o["size"], range_bytes)]

            async def one(p, s, e):
                async with sem:
                    b = await obs.get_range_async(self.store, p, start=s, end=e)
                    return len(b)
            t = time.perf_counter()
            n = sum(await asyncio.gather(*[one(*j) for j in jobs]))
            return n / (time.perf_counter() - t) / 2**30

        async def whole() -> float:
            sem = asyncio.Semaphore(concurrency)

            async def one(p):
                async with sem:
                    r = await obs.get_async(self.store, p)
                    return len(await r.bytes_async())
            t = time.perf_counter()
            n = sum(await asyncio.gather(*[one(o["path"]) for o in objects]))
            return n / (time.perf_counter() - t) / 2**30

        return {f"range_{range_bytes >> 20}mib_gibps": max(asyncio.run(ranges()) for _ in range(2)),
                "whole_gibps": asyncio.run(whole()),
                f"range_{range_bytes >> 20}mib_native_gibps": max(self.ceiling_native(objects, range_bytes, concurrency)
                                                              for _ in range(2))}

    def ceiling_native(self, objects: list[dict], range_bytes: int, concurrency: int) -> float:
        """The same ranges by the package's native reader (stores/rawhttp.py), `concurrency` threads,
        each into a buffer of its own: the other plain client, which reads faster than obstore."""
        import numpy as np

        from sglang_objectcache.stores.credentials import Credentials
        from sglang_objectcache.stores.rawhttp import RawRangeReader

        srv = self.srv
        r = RawRangeReader(endpoint=srv.endpoint, bucket=srv.bucket, region=srv.region,
                           creds=Credentials(srv.access_key, srv.secret_key), request_timeout=30,
                           connect_timeout=5, max_idle=concurrency)
        jobs = [(o["path"], s, min(s + range_bytes, o["size"])) for o in objects
                for s in range(0, o["size"], range_bytes)]
        lock, total = threading.Lock(), [0]

        def worker():
            buf = np.empty(range_bytes, dtype=np.uint8)
            while True:
                with lock:
                    if not jobs:
                        return
                    p, s, e = jobs.pop()
                n = r.read_into(p, s, e, buf[: e - s])
                with lock:
                    total[0] += n
        t = time.perf_counter()
        ts = [threading.Thread(target=worker) for _ in range(concurrency)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        r.close()
        return total[0] / (time.perf_counter() - t) / 2**30


class Busy:
    """A thread that runs Python without pause, as SGLang's scheduler does: it holds the GIL except
    when the interpreter makes it switch, so every call that releases the GIL has to win it back."""

    def __init__(self):
        self._stop = False
        self.steps = 0
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.steps += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def engine_probe(srv, cfg: dict, pages: int = 256) -> dict:
    """The engine alone, in this process, on the same server: put then get `pages` Llama-8B pages
    (256 KiB per layer; 2 GiB), so a slow server-side rate can be told from a slow server. The get
    runs with the native verify-and-copy and with its per-piece Python fallback."""
    import numpy as np
    from transports import PAGE_BYTES, PIECE, llama_fingerprint, page_keys, segments_of

    from sglang_objectcache import native
    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache

    data = np.random.default_rng(0).integers(0, 256, size=(pages, LAYERS, PIECE), dtype=np.uint8)
    out = np.zeros_like(data)
    keys = page_keys(pages)
    cfg = dict(cfg, tiers=[dict(cfg["tiers"][0], prefix="probe")])
    cache = ObjectCache(parse_config(cfg), llama_fingerprint("probe"))
    res = {"native": native.status()}
    try:
        t = time.perf_counter()
        res["stored"] = sum(cache.put(keys, segments_of(data)))
        res["put_gibps"] = round(pages * PAGE_BYTES / (time.perf_counter() - t) / 2**30, 2)
        # next to a thread that runs Python without pause (SGLang's scheduler does), at Python's
        # 5 ms GIL switch interval and at 0.5 ms (`switch_interval`)
        for mode, busy, si in (("native", False, None), ("native_busy", True, None),
                               ("native_busy_si05", True, 5e-4), ("python", False, None)):
            if mode == "python":
                native._state.update(fn=None, why="probe")
            was = sys.getswitchinterval()
            if si:
                sys.setswitchinterval(si)
            try:
                with Busy() if busy else contextlib.nullcontext():
                    for _ in range(2):
                        out[:] = 0
                        t = time.perf_counter()
                        n = sum(cache.get(keys, segments_of(out)))
                        rate = pages * PAGE_BYTES / (time.perf_counter() - t) / 2**30
                        res[f"get_{mode}_gibps"] = max(res.get(f"get_{mode}_gibps", 0), round(rate, 2))
            finally:
                sys.setswitchinterval(was)
            res[f"get_{mode}_ok"] = n == pages and bool(np.array_equal(data, out))
    finally:
        native._state.clear()
        cache.close()
    return res


def fault_check(bucket: "Bucket", ids: list[int], fresh: list[int]) -> dict:
    """A storage failure after admission, end to end: store a prefix, overwrite its last object
    with garbage of the same size, flush, and ask again. The stream is admitted, the object fails
    its checksums mid-stream, and the request must end in an abort (never an answer over unwritten
    KV); the same request once more must then succeed (a recompute, or the pages before the bad
    object from storage)."""
    import obstore as obs

    before = {o["path"] for o in bucket.objects()}
    gen(ids + fresh)
    gen(ids + fresh)  # the second hit backs the prefix up
    t0 = time.time()
    while time.time() - t0 < 60:
        new = {o["path"]: o["size"] for o in bucket.objects() if o["path"] not in before}
        if len(new) * (64 << 20) >= len(ids) * KV_PER_TOKEN:
            break
        time.sleep(1)
    if not new:
        raise RuntimeError("the prefix was not backed up to storage within 60 s")
    victim = max(new)
    obs.put(bucket.store, victim, b"\x5a" * new[victim])
    flush()
    res = {"objects": len(new), "corrupted": victim.rsplit("/", 1)[-1]}
    try:
        ms, det = gen(ids + fresh)
        res["first"] = {"ms": round(ms, 1), "detail": det}
    except RuntimeError as e:  # the abort gen() reports
        res["first"] = {"aborted": str(e)[:300]}
    except urllib.error.HTTPError as e:
        res["first"] = {"aborted": f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"}
    ms, det = gen(ids + fresh)
    res["again"] = {"ms": round(ms, 1), "detail": det}
    return res


def start_py_spy(pid: int, out: str) -> subprocess.Popen:
    """py-spy on the launcher and its children (the scheduler process), GIL holders and idle
    threads alike, so that waits show too."""
    cmd = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--threads", "--idle", "--nonblocking",
           "-r", "100", "-f", "raw", "-o", out]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(2)
    return p


def split_cpus(srv, n: int) -> dict:
    """The last `n` CPUs of this process's set to the server's processes (every thread), the rest
    to this process, and so to the SGLang it launches next."""
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 < n < len(cpus):
        raise SystemExit(f"--server-cpus {n}: this machine gives {len(cpus)} CPUs")
    theirs, ours = set(cpus[-n:]), set(cpus[:-n])
    pids = srv.pids()
    if not pids:
        raise SystemExit("--server-cpus: the server's processes were not found")
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(tid), theirs)
    os.sched_setaffinity(0, ours)
    return {"server": f"{min(theirs)}-{max(theirs)}", "sglang_and_client": f"{min(ours)}-{max(ours)}"}


def launch(model: str, cfg_path: str, log_path: str, io_backend: str = "direct") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(PORT), "--attention-backend", "triton",
           "--sampling-backend", "pytorch", "--disable-cuda-graph", "--context-length", "70000",
           "--max-total-tokens", "100000", "--chunked-prefill-size", "16384", "--page-size", "64",
           "--enable-hierarchical-cache", "--hicache-size", "40", "--hicache-mem-layout", "layer_first",
           "--hicache-io-backend", io_backend, "--hicache-write-policy", "write_through_selective",
           "--hicache-storage-prefetch-policy", "wait_complete",
           "--hicache-storage-backend", "objectcache", "--hicache-storage-backend-extra-config", f"@{cfg_path}",
           "--admin-api-key", ADMIN_KEY]
    log = open(log_path, "w")
    # DEBUG: one line per read call (pages, bytes, requests, ms, GiB/s, first layer ready)
    env = dict(os.environ, OBJECTCACHE_LOG_LEVEL="DEBUG")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return wait_healthy(proc, log_path, 500)


def wait_healthy(proc: subprocess.Popen, log_path: str, limit: float, label: str = "") -> subprocess.Popen:
    """The launched server once /health answers; RuntimeError if it exits or `limit` s pass first."""
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {log_path}")
        try:
            urllib.request.urlopen(URL + "/health", timeout=2)
            print(f"{label}server healthy after {time.time() - t0:.0f}s", flush=True)
            return proc
        except Exception:  # noqa: BLE001
            time.sleep(1)
    raise RuntimeError("server not healthy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="hit,compute")
    ap.add_argument("--model", default="/tmp/m8b")
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="samples per storage row (median)")
    ap.add_argument("--with-file", action="store_true", help="also measure SGLang's file backend (e)")
    ap.add_argument("--file-dir", default="/tmp/hicache-file")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "e2e.json"))
    ap.add_argument("--log", default="/tmp/sglang-e2e.log")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="after (c), also measure objectcache re-attached with these config keys changed, "
                    "e.g. lw8='{\"read_range_bytes\": \"8MiB\"}', c64='{\"tier\": {\"max_connections\": 64}}' "
                    "(repeatable)")
    ap.add_argument("--hang-after", type=float, default=90.0, help="seconds of a silent server log, with a "
                    "request out, before its threads are dumped (py-spy)")
    ap.add_argument("--server-cpus", type=int, default=0, help="give SeaweedFS this many CPUs of its own and "
                    "keep this driver and SGLang off them, as with a server on another host (its TLS then costs "
                    "its own cores, as it would there)")
    ap.add_argument("--io-backend", default="direct", choices=("direct", "kernel"),
                    help="--hicache-io-backend: how host KV is copied to the GPU (SGLang's per-layer copy)")
    ap.add_argument("--https", action="store_true", help="SeaweedFS also serves https (a CA made for the run; "
                    "needs the openssl command); after (c), the rows `http` and `https`: (d) re-attached, read over "
                    "the http port, then over the https port through the native reader over OpenSSL")
    ap.add_argument("--fault", action="store_true", help="also check a storage failure after admission "
                    "(a 16K prefix whose last object is overwritten with garbage): abort, then success")
    ap.add_argument("--py-spy", metavar="FILE", help="record the server's threads (py-spy, raw format) "
                    "while (d) runs: where the read path spends its time inside SGLang")
    args = ap.parse_args(argv)
    from sglang_objectcache.config import parse_size
    from testbed.servers import start_seaweedfs

    lengths = [int(x) for x in args.lengths.split(",")]
    shapes = args.shapes.split(",")
    if args.https:
        import tempfile
        from pathlib import Path

        from testbed.tls import start_seaweedfs_tls

        srv, over_tls, certs = start_seaweedfs_tls(Path(tempfile.mkdtemp(prefix="e2e-tls-")), memory_limit_mb=None,
                                                   reader_cache_mb=None)
        # the same configuration over http first: both rows stream the whole prefix layer by layer,
        # so their ratio is the price of TLS alone ((d) may recompute part of a hit, (c) is not streamed)
        # (load_or_recompute off in both: every hit loads whole, whatever the meters say)
        args.variant.append("http=" + json.dumps({"load_or_recompute": False}))
        args.variant.append("https=" + json.dumps({"load_or_recompute": False, "tier": {
            "endpoint": over_tls.endpoint, "ca_bundle": certs["ca"]}}))
    else:
        srv = start_seaweedfs(memory_limit_mb=None, reader_cache_mb=None)
    if args.server_cpus:
        print(f"cpus: {split_cpus(srv, args.server_cpus)}", flush=True)
    for k, v in srv.env().items():
        os.environ[k] = v
    prefix = "e2e"
    oc = {"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
                     "max_write_connections": 32}],
          "prefetch_threshold": 256, "timeout": 60}  # writes of 1 GiB calls need more than 15 s here
    cfg_path = "/tmp/objectcache-e2e.json"
    json.dump(oc, open(cfg_path, "w"))
    bucket = Bucket(srv, prefix)
    rng = random.Random(7)
    new = lambda n: [rng.randrange(3, 30000) for _ in range(n)]  # noqa: E731
    res: dict = {"lengths": lengths, "rows": {sh: {L: {} for L in lengths} for sh in shapes}}
    res["engine_probe"] = engine_probe(srv, oc)
    print(f"engine alone: {res['engine_probe']}", flush=True)
    os.makedirs(args.file_dir, exist_ok=True)
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = args.file_dir
    proc = launch(args.model, cfg_path, args.log, args.io_backend)
    global WATCH
    WATCH = Watchdog(proc.pid, args.log, args.hang_after)
    # hit: the whole context but a short question is cached; compute: half cached, half new
    cached = {sh: {L: new(L if sh == "hit" else L // 2) for L in lengths} for sh in shapes}

    def fresh(sh, L):
        return new(args.question) if sh == "hit" else new(L - L // 2)

    def row(sh, L, name, ms, det):
        res["rows"][sh][L][name] = {"ms": round(ms, 1), "detail": det}
        print(f"{sh:7s} L={L:6d} {name:12s} {ms:9.1f} ms  {det}", flush=True)

    def each(name):
        """One row per shape and length. Storage rows start empty (device and host flushed: the
        prefix can only come from storage) and take the median of `--repeat` samples, but one
        sample of a row slower than 3 s; the host row cannot repeat (its first sample moves the
        prefix to the GPU)."""
        for sh in shapes:
            for L in lengths:
                try:
                    samples, cpu = [], CpuMeter(srv, proc.pid)
                    for _ in range(1 if name == "host" else args.repeat):
                        if name != "host":
                            flush()
                        with cpu:
                            ms, det = gen(cached[sh][L] + fresh(sh, L))
                        samples.append(round(ms, 1))
                        if ms > 3000:
                            break
                    row(sh, L, name, statistics.median(samples), dict(det, samples=samples, **cpu.per_sample()))
                except Exception as e:  # noqa: BLE001 - one failed row must not lose the sitting
                    print(f"{sh:7s} L={L:6d} {name:12s} failed: {e}", flush=True)
    try:
        gen(new(512))  # warm-up
        for sh in shapes:
            for L in lengths:  # back to back, before anything evicts the prefix from the GPU:
                row(sh, L, "recompute", *gen(cached[sh][L] + fresh(sh, L)))  # (a)
                # the second hit: write_through_selective backs the prefix up (host, then S3),
                # which may slow it; the third is a plain device hit. The fixed cost is the lower.
                (d1, _), (d2, det) = gen(cached[sh][L] + fresh(sh, L)), gen(cached[sh][L] + fresh(sh, L))
                row(sh, L, "device", min(d1, d2), dict(det, samples=[round(d1, 1), round(d2, 1)]))
        bucket.settle(sum(len(p) for c in cached.values() for p in c.values()) * KV_PER_TOKEN)
        for _ in range(2):  # evict the device pool (100K tokens); host keeps the copies. Fillers
            gen(new(65536))  # are seen once, so they are never backed up
        time.sleep(2)
        each("host")  # (b)
        spy = start_py_spy(proc.pid, args.py_spy) if args.py_spy else None
        each("oc_layerwise")  # (d)
        if spy is not None:
            spy.send_signal(2)  # py-spy writes its file on SIGINT
            spy.wait(60)
        big = sorted(bucket.objects(), key=lambda o: o["path"])
        objs = big[: max(1, max(lengths) * KV_PER_TOKEN // (64 << 20))]
        res["ceiling"] = bucket.ceiling(objs)  # 8 MiB ranges, and whole objects
        plan_range = parse_size(oc.get("read_range_bytes", "16MiB"), "read_range_bytes")
        if plan_range != 8 << 20:  # the bound uses the ceiling at the plan's own range size
            res["ceiling"].update(bucket.ceiling(objs, range_bytes=plan_range))
        res["plan_range_mib"] = plan_range >> 20
        print(f"ceiling {res['ceiling']}", flush=True)
        try:
            attach("objectcache", dict(oc, layerwise=False))
            each("oc_classic")  # (c)
        except RuntimeError as e:
            print(f"(c) skipped: {e}", flush=True)
        for v in args.variant:
            name, _, keys = v.partition("=")
            try:
                keys = json.loads(keys)
                tier = keys.pop("tier", {})  # changes to the s3 tier's own keys
                attach("objectcache", dict(oc, tiers=[dict(oc["tiers"][0], **tier)], **keys))
                each(name)
            except RuntimeError as e:
                print(f"variant {name} skipped: {e}", flush=True)
        if args.fault:
            try:
                attach("objectcache", oc)
                res["fault"] = fault_check(bucket, new(16384), new(args.question))
                print(f"fault after admission: {res['fault']}", flush=True)
            except RuntimeError as e:  # like a failed row: the sitting goes on
                print(f"fault check failed: {e}", flush=True)
        if args.with_file:
            attach("file", {})  # its directory: SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR
            cached = {sh: {L: new(len(p)) for L, p in c.items()} for sh, c in cached.items()}
            for sh in shapes:
                for L in lengths:  # twice: the second hit backs it up
                    gen(cached[sh][L] + fresh(sh, L))
                    gen(cached[sh][L] + fresh(sh, L))
            time.sleep(15)
            each("file")  # (e)
    finally:
        WATCH.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        srv.stop()
        finish(res, cached, args.out)
    return 0


def finish(res: dict, cached: dict, out: str) -> None:
    """Bounds, break-even, JSON and the table, from whatever was measured."""
    key = f"range_{res.get('plan_range_mib', 8)}mib_gibps"
    if res.get("ceiling", {}).get(key, 0) > 0:
        # the faster of the two plain clients (obstore, the native reader) at the plan's range size
        best = max(res["ceiling"][key], res["ceiling"].get(key.replace("_gibps", "_native_gibps"), 0))
        res["ceiling_client"] = "native" if best > res["ceiling"][key] else "obstore"
        ceil = best * 2**30 / 1e3  # bytes per ms
        res["ceiling_gbps"] = round(ceil * 1e3 / 1e9, 2)
        for sh, rows in res["rows"].items():
            for L, r in rows.items():
                if "device" not in r or "recompute" not in r:
                    continue
                nbytes = len(cached[sh][L]) * KV_PER_TOKEN
                # layer-wise bound (shared GPU notes): max(bytes / ceiling, compute) + first layer's
                # transfer + SGLang's fixed cost; the device-hit TTFT is fixed cost + the new tokens'
                # prefill, so for `hit` it is added whole, for `compute` it is the compute term.
                first = nbytes / LAYERS / ceil
                dev = r["device"]["ms"]
                r["bound_ms"] = round(nbytes / ceil + first + dev if sh == "hit" else max(nbytes / ceil, dev) + first, 1)
                r["break_even_gbps"] = round(nbytes / (r["recompute"]["ms"] / 1e3) / 1e9, 2)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    json.dump(res, open(out, "w"), indent=1)
    print_table(res)


def print_table(res: dict) -> None:
    names = ("recompute", "device", "host", "oc_classic", "oc_layerwise", "file")
    extra = sorted({n for rows in res["rows"].values() for r in rows.values() for n, v in r.items()
                    if isinstance(v, dict)} - set(names))
    for sh, rows in res["rows"].items():
        for L, r in rows.items():
            if any(n in r for n in extra):
                print(f"{sh:7s} {L:>6} " + "  ".join(f"{n} {r[n]['ms']:.1f} ms" for n in extra if n in r))
    nan = float("nan")
    print(f"\nceiling={res.get('ceiling_gbps', nan)} GB/s ({res.get('plan_range_mib', 8)} MiB ranges, "
          f"{res.get('ceiling_client', 'obstore')}); "
          "TTFT in ms")
    print(f"{'shape':7s} {'L':>6} " + " ".join(f"{n:>12}" for n in names)
          + f" {'bound':>8} {'d/bound':>8} {'d/b':>6} {'d/c':>6} {'d/a':>6} {'b-even':>7}")
    for sh, rows in res["rows"].items():
        for L, r in rows.items():
            v = {n: r.get(n, {}).get("ms", nan) for n in names}
            b = r.get("bound_ms", nan)
            print(f"{sh:7s} {L:>6} " + " ".join(f"{v[n]:12.1f}" for n in names) + f" {b:8.1f} "
                  f"{v['oc_layerwise'] / b:8.2f} {v['oc_layerwise'] / v['host']:6.2f} "
                  f"{v['oc_layerwise'] / v['oc_classic']:6.2f} {v['oc_layerwise'] / v['recompute']:6.2f} "
                  f"{r.get('break_even_gbps', nan):7.2f}")


if __name__ == "__main__":
    sys.exit(main())
