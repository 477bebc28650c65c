"""The live shared-prefix benchmark against real SGLang 0.5.17 servers on the GPU machine.

One server per backend, launched in turn with the same flags but the storage backend:

  objectcache   layer-wise streaming from a local SeaweedFS (patched SGLang), load or recompute per request
  objectcache-static   the same with `load_or_recompute: false` (SGLang's static prefetch_threshold only)
  l2            HiCache without a storage backend: what falls out of host memory is recomputed
  file          SGLang's own `file` backend on local disk

The pools are small on purpose (`--max-total-tokens`, `--hicache-size`), so that the workload's
distinct prefixes outgrow device and host memory and later requests of a group find their prefix
in storage, or nowhere (l2). Per backend, each (prefix length, concurrency) point is one
`objectcache bench shared-prefix live` run with its own seed (fresh prefixes: no point reuses an
earlier point's storage), after a `/flush_cache`.

    python benchmarks/gpu/live.py --backends objectcache,l2 --out $OUT/live
    python benchmarks/gpu/live.py --backends file --out $OUT/live      # next call, same machine
    python benchmarks/gpu/live.py --interleave --backends objectcache,objectcache-static,l2 --out $OUT/live

`--interleave` launches one server and, at each point, runs every backend in turn on the same
prompts, attaching each at runtime (l2: the storage backend detached), from empty device, host
and storage: the backends' rows are then side by side in time on one process, and the sitting
pays for one server start instead of three.

Needs what `benchmarks/gpu/run_e2e.sh setup` and `s3` install. Each point's JSON lands in
`--out/<backend>-<len>-c<conc>/live.json` as soon as it is measured, and the table of all points
found under `--out` is printed at the end (so a second call extends the first's table).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: the local SeaweedFS
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from e2e_gpu import ADMIN_KEY, PORT, URL, Watchdog, admin, attach, wait_healthy  # noqa: E402  the same server


def launch(model: str, backend: str, cfg_path: str, log_path: str, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(PORT), "--attention-backend", "triton",
           "--sampling-backend", "pytorch", "--disable-cuda-graph", "--context-length", "20000",
           "--max-total-tokens", str(args.device_tokens), "--chunked-prefill-size", "8192", "--page-size", "64",
           "--enable-hierarchical-cache", "--hicache-size", str(args.host_gb), "--hicache-mem-layout", "layer_first",
           "--hicache-io-backend", args.io_backend, "--hicache-write-policy", "write_through",
           "--hicache-storage-prefetch-policy", "wait_complete", "--enable-metrics", "--admin-api-key", ADMIN_KEY]
    if backend.startswith("objectcache"):
        cmd += ["--hicache-storage-backend", "objectcache", "--hicache-storage-backend-extra-config", f"@{cfg_path}"]
    elif backend == "file":
        cmd += ["--hicache-storage-backend", "file"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return wait_healthy(proc, log_path, 400, f"{backend}: ")


def flush() -> None:
    for _ in range(120):
        try:
            # an admin endpoint: the server has an admin key (for runtime attach), so it is required
            urllib.request.urlopen(urllib.request.Request(URL + "/flush_cache", method="POST", headers={
                "Authorization": f"Bearer {ADMIN_KEY}"}), timeout=30)
            return
        except Exception:  # noqa: BLE001  (refused while requests or writes are pending)
            time.sleep(1)
    raise RuntimeError("flush_cache kept failing")


def empty_bucket(srv) -> None:
    """Delete the previous point's objects, and the bucket with them, then make it again. Each
    point writes its own prefixes (about 16 GiB at 8K x 16 groups) and never reads an earlier
    point's, but the machine has 64 GiB of disk: without this SeaweedFS filled it at the fifth
    point and writes failed. Deleting the bucket drops its volumes at once (deleting objects alone
    frees nothing until a vacuum)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=srv.endpoint, aws_access_key_id=srv.access_key,
                      aws_secret_access_key=srv.secret_key, region_name=srv.region)
    for _ in range(3):  # writes of the last point may still land while we delete
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=srv.bucket)
                for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=srv.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        try:
            s3.delete_bucket(Bucket=srv.bucket)
            break
        except Exception:  # noqa: BLE001  (not empty yet)
            time.sleep(1)
    try:
        s3.create_bucket(Bucket=srv.bucket)
    except Exception as e:  # noqa: BLE001  (still there: the delete did not go through)
        print(f"bucket not recreated: {e}", flush=True)


def bench(label: str, L: int, g: int, c: int, seed: int, args, watch) -> None:
    with watch.busy():
        subprocess.run([sys.executable, "-m", "sglang_objectcache.cli.bench", "live", "--url", URL,
                        "--label", label, "--num-groups", str(g), "--prompts-per-group", str(args.prompts_per_group),
                        "--system-prompt-len", str(L), "--question-len", "64", "--output-len", str(args.output_len),
                        "--concurrency", str(c), "--seed", str(seed),
                        "--out", os.path.join(args.out, f"{label}-{L}-c{c}")], check=False)


def interleaved(args, lengths, groups, concs) -> None:
    """One server for every backend: at each point, each backend in turn on the same prompts (one
    seed per point), attached at runtime (`PUT /hicache/storage-backend`; l2: detached), each from
    empty device, host and storage. Side by side in time, on one process: drift between backends'
    servers (GPU clocks, a neighbour's load, JIT caches) stays out of their ratios."""
    from testbed.servers import start_seaweedfs

    srv = start_seaweedfs(memory_limit_mb=None, reader_cache_mb=None)
    os.environ.update(srv.env())
    os.environ["OBJECTCACHE_LOG_LEVEL"] = "DEBUG"
    tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "live",
            "max_write_connections": 32}
    configs = {"objectcache": {"tiers": [tier], "timeout": 60},
               "objectcache-static": {"tiers": [tier], "timeout": 60, "load_or_recompute": False}}
    cfg_path = "/tmp/objectcache-live.json"
    json.dump(configs["objectcache"], open(cfg_path, "w"))
    backends = args.backends.split(",")
    unknown = set(backends) - {*configs, "l2"}
    if unknown:
        raise SystemExit(f"--interleave runs {', '.join([*configs, 'l2'])}; not {', '.join(sorted(unknown))}")
    log_path = os.path.join(args.out, "sglang-interleaved.log")
    proc = launch(args.model, "objectcache", cfg_path, log_path, args)
    watch = Watchdog(proc.pid, log_path)
    try:
        seed = 1
        for L, g in zip(lengths, groups):
            for c in concs:
                seed += 1
                for backend in backends:
                    try:
                        admin("DELETE")  # nothing reads the bucket while it is emptied
                        empty_bucket(srv)
                        if backend != "l2":
                            attach("objectcache", configs[backend], write_policy="write_through")
                        flush()
                    except Exception as e:  # noqa: BLE001 - one failed point must not lose the sitting
                        print(f"== {backend} {L} c{c} skipped: {e}", flush=True)
                        continue
                    print(f"== {backend} {L} c{c}", flush=True)
                    bench(backend, L, g, c, seed, args, watch)
                    if backend != "l2":
                        scrape(os.path.join(args.out, f"metrics-{backend}-{L}-c{c}.txt"))
    finally:
        watch.stop()
        stop(proc)
        srv.stop()


def scrape(path: str) -> None:
    """The server's /metrics lines of objectcache (its counters and load-or-recompute decisions)."""
    try:
        text = urllib.request.urlopen(URL + "/metrics", timeout=30).read().decode()
    except Exception as e:  # noqa: BLE001
        print(f"/metrics: {e}", flush=True)
        return
    mine = [ln for ln in text.splitlines() if ln.startswith("objectcache_")]
    open(path, "w").write("\n".join(mine) + "\n")
    for ln in mine:
        if ln.startswith(("objectcache_decisions", "objectcache_get_hits", "objectcache_corrupt")):
            print(ln, flush=True)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    subprocess.run(["pkill", "-9", "-f", "sglang.launch_server"], check=False)
    subprocess.run(["pkill", "-9", "-f", "sglang::"], check=False)
    time.sleep(3)


def table(out: str) -> str:
    from sglang_objectcache.bench import report

    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*", "live.json"))):
        for run in json.load(open(path))["runs"]:
            rows.append(run["summary"])
    order = {"objectcache": 0, "objectcache-static": 1, "l2": 2, "file": 3}
    rows.sort(key=lambda r: (r["system_prompt_len"], r["concurrency"], order.get(r["label"], 9)))
    return report.live_table(rows) + "\n\nTTFT by where the prefix came from:\n" + report.source_table(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="objectcache,l2,file")
    ap.add_argument("--model", default="/tmp/m8b")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--groups", default="24,16", help="groups per length (distinct prefixes)")
    ap.add_argument("--prompts-per-group", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--device-tokens", type=int, default=49152, help="--max-total-tokens (6 GiB of KV)")
    ap.add_argument("--io-backend", default="direct", choices=("direct", "kernel"),
                    help="--hicache-io-backend: how host KV is copied to the GPU (SGLang's per-layer copy)")
    ap.add_argument("--host-gb", type=int, default=8, help="--hicache-size (about 65K tokens)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "live-gpu"))
    ap.add_argument("--interleave", action="store_true", help="one server; at each point every backend in "
                    "turn (objectcache, objectcache-static, l2), attached at runtime, on the same prompts")
    args = ap.parse_args(argv)
    from testbed.servers import start_seaweedfs

    lengths = [int(x) for x in args.lengths.split(",")]
    groups = [int(x) for x in args.groups.split(",")]
    concs = [int(x) for x in args.concurrency.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.interleave:
        interleaved(args, lengths, groups, concs)
        print("\n" + table(args.out), flush=True)
        return 0
    file_dir = "/tmp/hicache-file"
    for backend in args.backends.split(","):
        srv = None
        cfg_path = "/tmp/objectcache-live.json"
        if backend.startswith("objectcache"):
            srv = start_seaweedfs(memory_limit_mb=None, reader_cache_mb=None)
            os.environ.update(srv.env())
            # one line per read (size, rate, first-layer latency) and per decision (expected times)
            os.environ["OBJECTCACHE_LOG_LEVEL"] = "DEBUG"
            json.dump({"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "live",
                                  "max_write_connections": 32}], "timeout": 60,
                       "load_or_recompute": backend != "objectcache-static"}, open(cfg_path, "w"))
        elif backend == "file":
            shutil.rmtree(file_dir, ignore_errors=True)
            os.makedirs(file_dir)
            os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = file_dir
        log_path = os.path.join(args.out, f"sglang-{backend}.log")
        proc = launch(args.model, backend, cfg_path, log_path, args)
        watch = Watchdog(proc.pid, log_path)  # a bench that hangs gets the server's threads dumped
        try:
            seed = 1
            for L, g in zip(lengths, groups):
                for c in concs:
                    seed += 1
                    flush()
                    if srv is not None and seed > 2:
                        empty_bucket(srv)
                    bench(backend, L, g, c, seed, args, watch)
            scrape(os.path.join(args.out, f"metrics-{backend}.txt"))
        finally:
            watch.stop()
            stop(proc)
            if srv is not None:
                srv.stop()
            shutil.rmtree(file_dir, ignore_errors=True)
    print("\n" + table(args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
