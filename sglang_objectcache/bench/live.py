"""Live mode: stream the workload to a running SGLang server and measure what users see.

POST /generate with `input_ids` and `stream: true`; SGLang answers with server-sent events
(`data: {...}` lines, then `data: [DONE]`). TTFT is the time to the first event that carries output;
the last event's `meta_info` has `cached_tokens` and `cached_tokens_details` (device / host /
storage), which say where each request's prefix came from. Standard library only (http.client and
threads), so it runs on a GPU machine with nothing else installed.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .workload import Request


@dataclass
class LiveResult:
    index: int
    group: int
    prompt_tokens: int
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    cached_tokens: int = 0
    cached_device: int = 0
    cached_host: int = 0
    cached_storage: int = 0
    storage_backend: str = ""
    itl_s: list[float] = field(default_factory=list)


def _events(resp: http.client.HTTPResponse):
    """The JSON payloads of an SSE stream, one per `data:` line, until [DONE] or EOF."""
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def send(url: str, req: Request, *, timeout: float = 600.0, ignore_eos: bool = True) -> LiveResult:
    """One streamed /generate call; never raises (errors are in the result)."""
    u = urllib.parse.urlsplit(url)
    res = LiveResult(req.index, req.group, len(req.input_ids))
    body = json.dumps({"input_ids": req.input_ids, "stream": True,
                       "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0.0,
                                           "ignore_eos": ignore_eos}}).encode()
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", (u.path.rstrip("/") or "") + "/generate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read(300).decode('utf-8', 'replace')}"
            return res
        last_t, last = None, None
        for ev in _events(resp):
            now = time.perf_counter()
            n_out = ev.get("meta_info", {}).get("completion_tokens", 0) or len(ev.get("output_ids") or [])
            if last_t is None and (n_out or ev.get("text")):
                res.ttft_s = now - t0
            elif last_t is not None:
                res.itl_s.append(now - last_t)
            last_t, last = now, ev
        res.latency_s = time.perf_counter() - t0
        if last is None:
            res.error = "empty stream"
            return res
        meta = last.get("meta_info", {})
        res.output_tokens = int(meta.get("completion_tokens", 0))
        res.cached_tokens = int(meta.get("cached_tokens", 0) or 0)
        det = meta.get("cached_tokens_details") or {}
        res.cached_device = int(det.get("device", 0) or 0)
        res.cached_host = int(det.get("host", 0) or 0)
        res.cached_storage = int(det.get("storage", 0) or 0)
        res.storage_backend = str(det.get("storage_backend", "") or "")
        if res.ttft_s == 0.0:
            res.ttft_s = res.latency_s
        res.ok = True
    except (OSError, http.client.HTTPException, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return res


def run(url: str, reqs: list[Request], *, concurrency: int, request_rate_paced: bool = True,
        progress: Callable[[int, int], None] | None = None, timeout: float = 600.0) -> tuple[list[LiveResult], float]:
    """Send the stream with at most `concurrency` in flight, each no earlier than its arrival time.
    Returns the results (in stream order) and the wall time."""
    results: list[LiveResult | None] = [None] * len(reqs)
    slots = threading.Semaphore(concurrency)
    done = [0]
    lock = threading.Lock()
    t0 = time.perf_counter()

    def one(r: Request) -> None:
        try:
            results[r.index] = send(url, r, timeout=timeout)
        finally:
            slots.release()
            with lock:
                done[0] += 1
                if progress:
                    progress(done[0], len(reqs))

    threads = []
    for r in reqs:
        if request_rate_paced:
            delay = r.arrival - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
        slots.acquire()
        th = threading.Thread(target=one, args=(r,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return [r for r in results if r is not None], time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0 for an empty list."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def source(r: LiveResult) -> str:
    """Where a request's prefix came from: `storage` (any of it), `cache` (device or host held at
    least half the prompt), else `recompute` (SGLang computed the prefix)."""
    if r.cached_storage > 0:
        return "storage"
    return "cache" if 2 * r.cached_tokens >= r.prompt_tokens else "recompute"


def by_source(ok: list[LiveResult]) -> dict:
    """TTFT per prefix source: the comparison that matters (a storage hit against a recompute of
    the same prefix), which the means over all requests blur with device and host hits."""
    out = {}
    for name in ("storage", "recompute", "cache"):
        t = [r.ttft_s for r in ok if source(r) == name]
        if t:
            out[name] = {"n": len(t), "mean_ms": statistics.fmean(t) * 1e3, "p50_ms": percentile(t, 50) * 1e3,
                         "p90_ms": percentile(t, 90) * 1e3, "max_ms": max(t) * 1e3}
    return out


def summarize(results: list[LiveResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": [r.error for r in results if not r.ok][:5],
        "wall_s": wall_s,
        "ttft_mean_ms": (statistics.fmean(ttft) * 1e3) if ttft else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p90_ms": percentile(ttft, 90) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "input_throughput": prompt / wall_s if wall_s else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / wall_s if wall_s else 0.0,
        "prompt_tokens": prompt,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "cached_device": sum(r.cached_device for r in ok),
        "cached_host": sum(r.cached_host for r in ok),
        "cached_storage": sum(r.cached_storage for r in ok),
        "storage_backend": next((r.storage_backend for r in ok if r.storage_backend), ""),
        "ttft_by_source": by_source(ok),
    }


def results_json(results: list[LiveResult]) -> list[dict]:
    return [asdict(r) for r in results]
