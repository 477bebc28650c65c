"""The shared-prefix benchmark: workload shape, the CPU replay (benchmarks/replay.py) through
SGLang's real HiCache on a real SeaweedFS, and the live client against a local server speaking
SGLang's streaming format."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_objectcache.bench import live, report
from sglang_objectcache.bench.workload import Request, WorkloadSpec, describe, generate, zipf_probs

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


# ---- workload ---------------------------------------------------------------------------------


def test_workload_is_deterministic_for_a_seed():
    spec = WorkloadSpec(num_groups=5, prompts_per_group=4, system_prompt_len=100, question_len=20, seed=7,
                        request_rate=10.0)
    a, b = generate(spec), generate(spec)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    c = generate(WorkloadSpec(num_groups=5, prompts_per_group=4, system_prompt_len=100, question_len=20, seed=8,
                              request_rate=10.0))
    assert [r.input_ids for r in a] != [r.input_ids for r in c]


def test_uniform_workload_has_the_requested_shape():
    spec = WorkloadSpec(num_groups=6, prompts_per_group=3, system_prompt_len=96, question_len=17, output_len=5)
    reqs = generate(spec)
    shape = describe(reqs)
    assert shape["requests"] == 18 and shape["group_sizes"] == {g: 3 for g in range(6)}
    for r in reqs:
        assert len(r.input_ids) == 96 + 17 and r.output_len == 5 and r.prefix_len == 96 and r.arrival == 0.0
    by_group: dict[int, list[Request]] = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r)
    systems = {g: rs[0].input_ids[:96] for g, rs in by_group.items()}
    for g, rs in by_group.items():
        assert all(r.input_ids[:96] == systems[g] for r in rs)  # the shared prefix
        assert len({tuple(r.input_ids[96:]) for r in rs}) == len(rs)  # distinct questions
    assert len({tuple(s) for s in systems.values()}) == 6
    # prefixes of different groups share no first page
    assert len({tuple(s[:16]) for s in systems.values()}) == 6
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # shuffled, like SGLang's
    ordered = generate(WorkloadSpec(num_groups=6, prompts_per_group=3, system_prompt_len=96, question_len=17,
                                    ordered=True))
    assert [r.group for r in ordered] == sorted(r.group for r in ordered)


def test_zipf_workload_favours_the_first_groups():
    spec = WorkloadSpec(num_groups=8, prompts_per_group=50, system_prompt_len=8, question_len=4,
                        group_distribution="zipf", zipf_alpha=1.2, seed=3)
    sizes = describe(generate(spec))["group_sizes"]
    assert sum(sizes.values()) == 400
    p = zipf_probs(8, 1.2)
    assert abs(sizes[0] / 400 - p[0]) < 0.08 and sizes[0] > sizes.get(7, 0)
    with pytest.raises(ValueError):
        WorkloadSpec(group_distribution="zipf")
    with pytest.raises(ValueError):
        WorkloadSpec(zipf_alpha=1.0)


def test_poisson_arrivals_follow_the_rate():
    reqs = generate(WorkloadSpec(num_groups=4, prompts_per_group=50, system_prompt_len=8, question_len=4,
                                 request_rate=20.0))
    span = reqs[-1].arrival
    assert all(b.arrival >= a.arrival for a, b in zip(reqs, reqs[1:]))
    assert 199 / 20 * 0.7 < span < 199 / 20 * 1.3
    assert generate(WorkloadSpec(request_rate=math.inf))[-1].arrival == 0.0


# ---- replay on SGLang 0.5.23's HiCache, a real SeaweedFS -----------------------------------------


def two_passes(groups: int, prefix: int, question: int) -> list[Request]:
    """Every group once, then every group again in the same order: each group's second request
    comes after the other groups pushed its prefix out of the small device and host pools."""
    reqs = generate(WorkloadSpec(num_groups=groups, prompts_per_group=2, system_prompt_len=prefix,
                                 question_len=question, ordered=True, seed=5))
    out = [r for r in reqs[0::2]] + [r for r in reqs[1::2]]
    for i, r in enumerate(out):
        r.index = i
    return out


@pytest.fixture
def replay_bed(sglang_cpu, seaweedfs, monkeypatch):
    """The replay's module on SGLang 0.5.23 with the server's credentials, a small geometry and the
    two-pass workload (whose second pass finds its prefixes evicted to storage)."""
    from sglang_objectcache.sglang.compat import sglang_version

    if sglang_version() != "0.5.23":  # 0.5.17 has the module but not the API the replay drives
        pytest.skip("replay drives SGLang 0.5.23's tree")
    monkeypatch.syspath_prepend(BENCHMARKS)
    import replay

    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    replay.setup_sglang()
    geo = replay.Geometry(layers=4, heads=2, head_dim=64, page_size=64)
    return replay, geo, two_passes(groups=6, prefix=512, question=64)


def test_replay_second_pass_hits_storage_with_verified_kv(replay_bed, seaweedfs):
    replay, geo, reqs = replay_bed
    device, host = replay.sizes_for(reqs, 1, geo.page_size, host_frac=0.3)
    assert host < 6 * 512  # the pools cannot hold every prefix
    names, _ = replay.available_backends(["objectcache", "seaweedfs"])
    for name in names:
        # each request's backups are written before the next: otherwise whether a prefix reaches
        # storage at all depends on how fast its write went against the host pool's evictions
        run = replay.run_backend(name, reqs, srv=seaweedfs, geo=geo, concurrency=1, device_tokens=device,
                                 host_tokens=host, prefetch_threshold=64, settle_writes=True)
        first, second = run.requests[:6], run.requests[6:]
        assert all(r.device_hit == r.host_hit == r.storage_hit == 0 for r in first), name
        assert all(r.corrupt_tokens == 0 for r in run.requests), name
        hits = [r for r in second if r.storage_hit > 0]
        assert len(hits) >= 3, (name, [(r.device_hit, r.host_hit, r.storage_hit) for r in second])
        for r in hits:
            assert r.storage_hit % geo.page_size == 0 and r.storage_hit <= 512 + 64
            assert r.verified_tokens >= r.storage_hit  # reused KV compared with the pattern, all equal
            assert r.fetch_s > 0 and r.first_batch_s is not None
            assert (r.first_layer_s is not None) == (name == "objectcache")
            if name == "objectcache":
                assert r.first_layer_s <= r.fetch_s
        s = replay.summarize(run)
        assert s["verified_storage_bytes"] >= sum(r.storage_hit for r in hits) * geo.bytes_per_token > 0
        assert s["bytes_read"] >= sum(r.storage_hit for r in hits) // 64 * 64 * geo.bytes_per_token
        assert s["bytes_written"] >= 6 * 512 * geo.bytes_per_token  # every prefix reached storage
        assert s["requests_issued"] and s["s3_requests"]["GET"] >= 1 and s["s3_requests"]["PUT"] >= 1
        assert s["ttft_modelled_ms_mean"] > 0


def test_replay_linker_row_streams_verified_kv_from_storage(replay_bed, seaweedfs):
    """The linker route's row (benchmarks/replay_linker.py) on the same workload: the second pass
    loads its prefixes from storage into device slots, layer by layer, and the KV is the pattern."""
    import replay_linker

    replay, geo, reqs = replay_bed
    device, _ = replay.sizes_for(reqs, 1, geo.page_size, host_frac=0.3)
    run = replay_linker.run_linker(reqs, srv=seaweedfs, geo=geo, concurrency=2, device_tokens=device)
    first, second = run.requests[:6], run.requests[6:]
    assert all(r.storage_hit == 0 for r in first)
    assert all(r.corrupt_tokens == 0 for r in run.requests)
    hits = [r for r in second if r.storage_hit > 0]
    assert len(hits) >= 3, [(r.device_hit, r.storage_hit) for r in second]
    for r in hits:
        assert r.verified_tokens >= r.storage_hit and r.storage_hit % geo.page_size == 0
        assert 0 < r.first_layer_s <= r.fetch_s < r.ttft_modelled_s
    s = replay.summarize(run)
    assert s["backend"] == "objectcache-linker" and s["host_hit_rate"] == 0
    assert s["verified_storage_bytes"] >= sum(r.storage_hit for r in hits) * geo.bytes_per_token > 0
    assert s["s3_requests"]["GET"] >= 1 and s["s3_requests"]["PUT"] >= 1


# ---- live client against SGLang's streaming format ------------------------------------------------


class FakeSGLang(BaseHTTPRequestHandler):
    """POST /generate with stream=true: SSE `data: {...}` events, a first-token delay, and
    cached_tokens_details saying the group's prefix came from storage the second time."""

    seen: dict[tuple, int] = {}
    lock = threading.Lock()
    delay = 0.05
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/generate" and body["stream"] is True
        ids, n_out = body["input_ids"], body["sampling_params"]["max_new_tokens"]
        key = tuple(ids[:32])
        with self.lock:
            seen = self.seen.get(key, 0)
            self.seen[key] = seen + 1
        cached = 32 if seen else 0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        time.sleep(self.delay)
        for i in range(1, n_out + 1):
            meta = {"prompt_tokens": len(ids), "completion_tokens": i, "cached_tokens": cached,
                    "cached_tokens_details": {"device": 0, "host": 0, "storage": cached,
                                              "storage_backend": "ObjectCacheStorage"}}
            ev = {"text": "x" * i, "output_ids": list(range(i)), "meta_info": meta}
            self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(0.002)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


@pytest.fixture
def fake_server():
    FakeSGLang.seen = {}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_live_client_measures_ttft_and_cache_breakdown(fake_server):
    reqs = generate(WorkloadSpec(num_groups=3, prompts_per_group=3, system_prompt_len=64, question_len=8,
                                 output_len=4, concurrency=3, seed=2))
    done = []
    results, wall = live.run(fake_server, reqs, concurrency=3, progress=lambda d, n: done.append(d))
    assert sorted(done) == list(range(1, 10))
    assert [r.index for r in results] == list(range(9)) and all(r.ok for r in results), results[0].error
    for r in results:
        assert FakeSGLang.delay <= r.ttft_s < r.latency_s
        assert r.output_tokens == 4 and len(r.itl_s) == 3
        assert r.storage_backend == "ObjectCacheStorage"
    s = live.summarize(results, wall)
    assert s["ok"] == 9 and s["cached_storage"] == 6 * 32 and s["cached_device"] == 0
    assert s["cached_tokens"] == s["cached_storage"]  # first of each group: no hit
    assert FakeSGLang.delay * 1e3 <= s["ttft_p50_ms"] <= s["ttft_p90_ms"] <= s["ttft_p99_ms"]
    assert s["request_throughput"] > 0 and s["output_throughput"] == pytest.approx(36 / wall)
    # the first of each group computed its prefix (32 of 72 prompt tokens: under half), the rest read it
    src = s["ttft_by_source"]
    assert src["storage"]["n"] == 6 and src["recompute"]["n"] == 3 and "cache" not in src
    assert src["storage"]["mean_ms"] >= FakeSGLang.delay * 1e3
    table = report.source_table([{**s, "label": "x", "system_prompt_len": 64, "concurrency": 3}])
    assert "| x | 64 | 3 | 6: " in table and " | 3: " in table and table.rstrip().endswith("| - |")


def test_live_client_reports_errors_without_raising():
    r = live.send("http://127.0.0.1:9", Request(0, 0, [1, 2, 3], 1, 0.0), timeout=2)
    assert not r.ok and r.error


def test_percentiles():
    assert live.percentile([], 50) == 0.0
    assert live.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert live.percentile([5.0], 99) == 5.0


# ---- the replay's verdict (benchmarks/verdict.py) -------------------------------------------

def _run(fetch, hits, ttft=None):
    return ({"fetch_ms_mean": fetch, "ttft_modelled_ms_mean": ttft or fetch,
             "storage_hit_requests": sum(h > 0 for h in hits)}, tuple(hits))


def test_verdict_needs_every_run_to_agree_and_the_same_storage_hits(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import verdict

    hits = (0, 64, 0, 64)
    runs = {"objectcache": [_run(50, hits), _run(60, hits), _run(55, hits)],
            "fast": [_run(100, hits), _run(90, hits), _run(80, hits)],  # every run: objectcache faster
            "noisy": [_run(40, hits), _run(70, hits), _run(50, hits)],  # runs disagree
            "never": [_run(10, (0, 0, 0, 0))] * 3,  # it never read: not a winner
            "other": [_run(10, (64, 0, 0, 64))] * 3}  # other requests hit storage
    rows = {r["peer"]: r for r in verdict.compare((512, 1), runs)}
    assert rows["fast"]["verdict"] == "objectcache faster in 3 of 3 runs"
    assert rows["fast"]["fetch_ratios"] == [0.5, 60 / 90, 55 / 80]
    assert rows["noisy"]["verdict"].startswith("within noise")
    assert rows["never"]["verdict"] == "not comparable: the peer never read from storage"
    assert rows["other"]["verdict"] == "not comparable: different requests hit storage"
    text = verdict.summary(list(rows.values()))
    assert "objectcache vs fast: faster at 1, slower at 0, within noise at 0 of 1 points" in text
    assert "not compared at 1" in text


def test_median_row_takes_the_median_of_each_number(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import verdict

    row = verdict.median_row([{"backend": "x", "fetch_ms_mean": v, "n": 24} for v in (9, 1, 5)])
    assert row == {"backend": "x", "fetch_ms_mean": 5, "n": 24, "runs": 3}
