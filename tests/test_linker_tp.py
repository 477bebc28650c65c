"""`ObjectCacheLinker` at tensor parallelism 2: two processes, each one TP rank of SGLang 0.5.23's
real UnifiedRadixCache (testbed/unified.py, `tp_size=2`), joined by a 2-rank gloo group, against a
real S3 server.

Each rank has its own KV pool holding its own KV (different bytes per rank), and its linker's
fingerprint carries its tp_rank, so each rank stores under its own namespace. SGLang's linker
wrapper reduces across the attention-TP group: `_sync_restorable_prefix` intersects the ranks'
lookups (unified_cache_linker.py:349-368) and `finish_loads` MIN-reduces the load verdict
(:568-595); `check_hicache_events` agrees the offload counts (unified_radix_cache.py:3651-3667).

What this shows:
1. Rank intersection: rank 0 stores N pages of a prefix, rank 1 only the first M < N. Each rank's
   own lookup sees N and M pages; the match on both ranks reports M pages, both load exactly those
   M pages, each its own bytes, and `finish` aborts nothing.
2. Identical verdicts: one object of rank 0 is overwritten with same-size garbage. Rank 0's load
   fails, rank 1's lands (its own counters say so, and its device slots hold its bytes), yet both
   ranks' `finish` returns the request for abort, and neither waits long.

The parent test starts the two ranks as child processes (this file run as a script) and reads each
one's exit code and the JSON line it prints after `RESULT `; each child asserts what it can see on
its own, the parent what needs both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

from conftest import s3_tier
from sglang_objectcache.sglang.compat import sglang_version

pytestmark = [
    pytest.mark.skipif(sglang_version() != "0.5.23", reason="the external cache linker is SGLang 0.5.23's"),
]

PAGE, LAYERS = 16, 4
N, M = 8, 3  # scenario 1: rank 0 stores N pages of the prefix, rank 1 the first M
K = 6  # scenario 2: pages of the prefix both ranks store, one of rank 0's objects then corrupted
PAGES_PER_OBJECT = 2
BAD_PAGE = 2  # scenario 2: rank 0's object starting at this page is corrupted
WORLD = 2
LOAD_BOUND_S = 10.0  # start -> finish on each rank in scenario 2 (the linker's timeout is 10 s too)
CHILD_TIMEOUT_S = 90.0

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------------------------------------
# The parent: pytest
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(cfg: dict) -> list[tuple[int, dict | None, str]]:
    """Start both ranks, wait for both (killing both past the deadline); per rank: exit code,
    parsed RESULT, stderr tail."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with tempfile.TemporaryDirectory() as d:
        procs, files = [], []
        for rank in range(WORLD):
            out, err = open(os.path.join(d, f"out{rank}"), "w+"), open(os.path.join(d, f"err{rank}"), "w+")
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(WORLD),
                                           json.dumps(cfg)], stdout=out, stderr=err, env=env, cwd=REPO))
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0), err.seek(0)
            lines = [x for x in out.read().splitlines() if x.startswith("RESULT ")]
            res = json.loads(lines[-1][len("RESULT "):]) if lines else None
            results.append((p.returncode, res, err.read()[-4000:]))
            out.close(), err.close()
    return results


def _stored_pages(s3, bucket: str, root: str) -> int:
    """Pages in the data objects under a namespace (names end in `<first key>-<pages>`)."""
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root + "d/"):
        for o in page.get("Contents", []):
            total += int(o["Key"].rsplit("-", 1)[1])
    return total


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_two_tp_ranks_intersect_hits_and_share_one_load_verdict(s3_env, prefix):
    import boto3

    t0 = time.monotonic()
    cfg = {"tier": s3_tier(s3_env, prefix), "client": s3_env.client_kwargs(), "bucket": s3_env.bucket}
    results = _run_ranks(cfg)
    elapsed = time.monotonic() - t0
    for rank, (rc, res, err) in enumerate(results):
        hung = f" (killed after {CHILD_TIMEOUT_S:.0f}s: a hang)" if rc == -9 else ""
        assert rc == 0 and res is not None and res.get("ok"), (
            f"rank {rank}: exit {rc}{hung}\n"
            f"result: {json.dumps(res, indent=1) if res else None}\nstderr:\n{err}")
    r0, r1 = results[0][1], results[1][1]
    print(json.dumps({"elapsed_s": round(elapsed, 1), "rank0": r0, "rank1": r1}, indent=1))  # shown with -s

    # Two ranks of one deployment, two namespaces.
    assert (r0["fp_tp_rank"], r0["fp_tp_size"]) == (0, 2) and (r1["fp_tp_rank"], r1["fp_tp_size"]) == (1, 2)
    assert r0["attn_tp_group_size"] == r1["attn_tp_group_size"] == 2
    assert r0["ns_root"] != r1["ns_root"]
    s3 = boto3.client("s3", **s3_env.client_kwargs())
    assert _stored_pages(s3, s3_env.bucket, r0["ns_root"]) == N + K
    assert _stored_pages(s3, s3_env.bucket, r1["ns_root"]) == M + K

    # 1. Each rank saw its own store; the match on both is the intersection.
    s1 = (r0["s1"], r1["s1"])
    assert (s1[0]["local_lookup_pages"], s1[1]["local_lookup_pages"]) == (N, M)
    assert s1[0]["host_hit_length"] == s1[1]["host_hit_length"] == M * PAGE
    assert s1[0]["loaded_tokens"] == s1[1]["loaded_tokens"] == M * PAGE
    assert s1[0]["kv_equal"] and s1[1]["kv_equal"]
    assert s1[0]["failed"] == s1[1]["failed"] == []
    # the ranks loaded different bytes: each its own
    assert s1[0]["kv_digest"] != s1[1]["kv_digest"]

    # 2. One rank's bad object, one verdict.
    s2 = (r0["s2"], r1["s2"])
    assert s2[0]["host_hit_length"] == s2[1]["host_hit_length"] == K * PAGE
    assert s2[0]["local_failed_batches"] == 1 and s2[1]["local_failed_batches"] == 0
    assert s2[0]["failed"] == s2[1]["failed"] == ["bad"]
    assert s2[0]["start_to_finish_s"] < LOAD_BOUND_S and s2[1]["start_to_finish_s"] < LOAD_BOUND_S
    assert s2[1]["kv_equal"] and s2[1]["kv_equal_after_finish"]  # landed right, aborted anyway
    # rank 0's engine forgot its corrupt object; a later match intersects again
    assert (s2[0]["probe_local_lookup_pages"], s2[1]["probe_local_lookup_pages"]) == (BAD_PAGE, K)
    assert s2[0]["probe_host_hit_length"] == s2[1]["probe_host_hit_length"] == BAD_PAGE * PAGE
    assert elapsed < 60, f"the test took {elapsed:.1f}s"


# ---------------------------------------------------------------------------------------------
# A child: one TP rank
# ---------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    import torch

    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _digest(tensors) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]



def _data_objects(s3, bucket: str, root: str) -> dict[str, int]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root + "d/"):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def _rank_main(rank: int, world: int, cfg: dict, res: dict) -> None:
    from testbed import cpu_shims

    cpu_shims.install()
    import sglang.srt.mem_cache.memory_pool  # noqa: F401

    cpu_shims.install_cpu_hicache_patches()  # what the sglang_cpu fixture does

    from array import array

    import boto3
    import torch
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    from testbed.unified import (admit, build_unified_tree, consume, finish, flush, loaded_slots, make_req, match,
                                 start, store_and_flush)

    extra = {"tiers": [cfg["tier"]], "timeout": 10, "pages_per_object": PAGES_PER_OBJECT}
    bed = build_unified_tree("ObjectCacheLinker", "sglang_objectcache.sglang.linker", extra, layers=LAYERS,
                             page_size=PAGE, tp_size=world, tp_rank=rank, dist_timeout_s=30)
    tree, linker = bed.tree, bed.linker
    try:
        assert type(linker).__name__ == "ObjectCacheLinker", linker
        res.update(fp_tp_rank=linker.fp.tp_rank, fp_tp_size=linker.fp.tp_size, ns_root=linker.cache.ns.root,
                   attn_tp_group_size=torch.distributed.get_world_size(group=tree.attn_tp_group))
        assert (linker.fp.tp_rank, linker.fp.tp_size) == (rank, world)
        assert torch.distributed.get_world_size(group=tree.attn_tp_group) == world

        # ---- 1. rank intersection ----------------------------------------------------------
        tokens = list(range(1000, 1000 + N * PAGE))
        mine = tokens if rank == 0 else tokens[: M * PAGE]
        want = store_and_flush(bed, mine, seed=10 + rank)
        assert linker.counts["offload_pages"] == len(mine) // PAGE
        before = linker.counts["lookup_pages"]
        req = make_req("shared", tokens + [7])
        m = match(tree, req)  # each rank looks up its own store; SGLang intersects
        s1 = res["s1"] = dict(local_lookup_pages=linker.counts["lookup_pages"] - before,
                              device_prefix_len=m.device_prefix_len, host_hit_length=m.host_hit_length)
        assert s1["local_lookup_pages"] == (N if rank == 0 else M), s1
        assert m.device_prefix_len == 0 and m.host_hit_length == M * PAGE, s1
        s1["loaded_tokens"] = admit(tree, req)
        assert s1["loaded_tokens"] == M * PAGE, s1
        rows = loaded_slots(tree, req).clone()
        assert len(rows) == M * PAGE
        index = start(tree, bed.tp_worker)
        assert index >= 0
        got = [consume(bed.kv, bed.counter, index, layer, rows) for layer in range(LAYERS)]
        s1["failed"] = finish(tree, [req])
        s1["kv_equal"] = all(_same(k, want[i][0][: M * PAGE]) and _same(v, want[i][1][: M * PAGE])
                             for i, (k, v) in enumerate(got))
        s1["kv_digest"] = _digest(t for kv in got for t in kv)
        assert s1["kv_equal"], "rank's loaded KV differs from what it stored"
        assert s1["failed"] == [], s1
        assert linker._reserved == 0 and not tree.linker.private_load_indices
        flush(bed)

        # ---- 2. identical verdicts ---------------------------------------------------------
        s3 = boto3.client("s3", **cfg["client"])
        root = linker.cache.ns.root
        old = _data_objects(s3, cfg["bucket"], root)
        tokens2 = list(range(5000, 5000 + K * PAGE))
        want2 = store_and_flush(bed, tokens2, seed=20 + rank)
        s2 = res["s2"] = {}
        new = {k: v for k, v in _data_objects(s3, cfg["bucket"], root).items() if k not in old}
        assert len(new) == -(-K // PAGES_PER_OBJECT), new
        if rank == 0:  # rank 0's object of pages [BAD_PAGE, BAD_PAGE + PAGES_PER_OBJECT): same-size garbage
            keys = get_storage_hash_str(RadixKey(array("q", tokens2)), None, page_size=PAGE)  # SGLang's page keys
            victim = f"{root}d/{keys[BAD_PAGE]}-{PAGES_PER_OBJECT}"
            assert victim in new, (victim, sorted(new))
            s3.put_object(Bucket=cfg["bucket"], Key=victim, Body=b"\x5a" * new[victim])
            s2["corrupted"] = victim
        # no barrier needed: the match below all-reduces, so rank 1 cannot read before this
        bad = make_req("bad", tokens2 + [7])
        m = match(tree, bad)
        s2["host_hit_length"] = m.host_hit_length
        assert m.host_hit_length == K * PAGE, s2
        assert admit(tree, bad) == K * PAGE
        rows = loaded_slots(tree, bad).clone()
        t0 = time.monotonic()
        index = start(tree, bed.tp_worker)
        got = [consume(bed.kv, bed.counter, index, layer, rows) for layer in range(LAYERS)]  # never hangs
        s2["failed"] = finish(tree, [bad])
        s2["start_to_finish_s"] = round(time.monotonic() - t0, 3)
        s2["local_failed_batches"] = linker.counts["failed_batches"]
        s2["kv_equal"] = all(_same(k, want2[i][0]) and _same(v, want2[i][1]) for i, (k, v) in enumerate(got))
        # what stays in the slots after finish: the loader has stopped writing
        s2["kv_equal_after_finish"] = all(
            _same(bed.kv.k_buffer[i][rows], want2[i][0]) and _same(bed.kv.v_buffer[i][rows], want2[i][1])
            for i in range(LAYERS))
        assert s2["failed"] == ["bad"], s2  # the MIN-reduced verdict, on both ranks
        assert s2["start_to_finish_s"] < LOAD_BOUND_S, s2
        assert bad.skip_radix_cache_insert and bad.discard_output_reason is not None
        assert s2["local_failed_batches"] == (1 if rank == 0 else 0), s2  # rank 1's own load landed
        if rank == 1:
            assert s2["kv_equal"] and s2["kv_equal_after_finish"], s2
        assert linker._reserved == 0 and not tree.linker.private_load_indices
        # Nothing of the failed load joined the tree. Rank 0's engine forgot the corrupt object,
        # so its own lookup now stops at BAD_PAGE while rank 1's still sees K: the intersection again.
        before = linker.counts["lookup_pages"]
        pm = match(tree, make_req("probe", tokens2 + [9]))
        s2.update(probe_device_prefix_len=pm.device_prefix_len, probe_host_hit_length=pm.host_hit_length,
                  probe_local_lookup_pages=linker.counts["lookup_pages"] - before)
        assert pm.device_prefix_len == 0, s2
        assert s2["probe_local_lookup_pages"] == (BAD_PAGE if rank == 0 else K), s2
        assert pm.host_hit_length == BAD_PAGE * PAGE, s2
    finally:
        linker.close()


def _child(argv: list[str]) -> int:
    sys.path.insert(0, HERE)
    rank, world, cfg = int(argv[0]), int(argv[1]), json.loads(argv[2])
    res: dict = {"rank": rank}
    code = 0
    try:
        _rank_main(rank, world, cfg, res)
        res["ok"] = True
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        res.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        code = 1
    print("RESULT " + json.dumps(res), flush=True)
    sys.stderr.flush()
    if code:
        os._exit(code)  # a failed rank must not sit in a collective or an atexit hook
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
