"""The engine's counters on SGLang's own Prometheus endpoint.

With `--enable-metrics`, SGLang's processes share a prometheus_client multiprocess directory
(`PROMETHEUS_MULTIPROC_DIR`) and its HTTP server's `/metrics` reads every process's values from
there. The backend lives in a scheduler process, so its numbers reach `/metrics` only as metric
objects of that process: a daemon thread copies `ObjectCacheStorage.stats()` into gauges every few
seconds. Names: `objectcache_<counter>` for the engine's counters, `objectcache_tier_<field>{tier}`
for each tier's, `objectcache_tier_requests{tier,verb}`, `objectcache_decisions{kind}` (load or
recompute); every one labelled with the rank.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable

log = logging.getLogger("sglang_objectcache")

INTERVAL = 5.0  # seconds between copies: a scrape sees numbers at most this old

# A name registers once per process (prometheus_client refuses a second), and a backend re-attached
# at runtime builds a second exporter: the gauges belong to the process, not to one exporter.
_GAUGES: dict[str, object] = {}
_GAUGES_LOCK = threading.Lock()


def metrics_enabled() -> bool:
    """SGLang was launched with --enable-metrics (or something set up a multiprocess directory)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return True
    try:
        from sglang.srt.server_args import get_global_server_args

        return bool(getattr(get_global_server_args(), "enable_metrics", False))
    except Exception:  # noqa: BLE001 - no server context (tests, tools)
        return False


def _name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", text)


class Exporter:
    """Copies a stats snapshot (`ObjectCache.snapshot()` shape) into prometheus_client gauges."""

    def __init__(self, stats: Callable[[], dict], rank: str, interval: float = INTERVAL):
        from prometheus_client import Gauge  # SGLang depends on it

        self._gauge_cls = Gauge
        self._stats, self._rank, self._interval = stats, rank, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _gauge(self, name: str, labels: tuple[str, ...], doc: str):
        with _GAUGES_LOCK:
            g = _GAUGES.get(name)
            if g is None:
                # liveall: one series per live process (SGLang's processes each hold their backend)
                g = self._gauge_cls(name, doc, ("rank", *labels), multiprocess_mode="liveall")
                _GAUGES[name] = g
        return g

    def update(self) -> None:
        snap = self._stats() or {}
        for key, value in (snap.get("counters") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._gauge(f"objectcache_{_name(key)}", (), f"objectcache engine counter {key} since start"
                            ).labels(self._rank).set(value)
        decisions = snap.get("decisions") or {}
        for kind in ("load", "partial", "recompute", "unmeasured"):
            if isinstance(decisions.get(kind), int):
                self._gauge("objectcache_decisions", ("kind",), "storage hits loaded, partly loaded, recomputed, "
                            "or loaded unmeasured, since start").labels(self._rank, kind).set(decisions[kind])
        for key, name, doc in (
                ("read_rates", "objectcache_read_rate_bytes_per_second", "bytes/s a tier's reads move past their "
                 "latency, as load-or-recompute expects them now (fitted to recent reads)"),
                ("read_latencies", "objectcache_read_latency_seconds", "seconds before a tier's read moves bytes, "
                 "as load-or-recompute expects it now (fitted to recent reads)")):
            for tier, value in (decisions.get(key) or {}).items():
                if isinstance(value, float):
                    self._gauge(name, ("tier",), doc).labels(self._rank, tier).set(value)
        cost = decisions.get("load_cost")
        if isinstance(cost, list) and len(cost) == 2:
            for term, value in zip(("fixed", "per_token"), cost):
                self._gauge("objectcache_load_cost_seconds", ("term",), "what a streamed load adds to its "
                            "forward beyond its bytes: fixed seconds, and seconds per token loaded (fitted)"
                            ).labels(self._rank, term).set(value)
        for key, value in (snap.get("linker") or {}).items():  # the 0.5.23 linker route's own counts
            if isinstance(value, int):
                self._gauge(f"objectcache_linker_{_name(key)}", (), f"objectcache linker: {key} since start"
                            ).labels(self._rank).set(value)
        for tier, fields in (snap.get("tiers") or {}).items():
            for key, value in fields.items():
                if key == "requests" and isinstance(value, dict):
                    g = self._gauge("objectcache_tier_requests", ("tier", "verb"),
                                    "requests sent to a tier since start, by kind")
                    for verb, n in value.items():
                        g.labels(self._rank, tier, verb).set(n)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._gauge(f"objectcache_tier_{_name(key)}", ("tier",), f"objectcache tier field {key}"
                                ).labels(self._rank, tier).set(value)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - metrics never take the backend down
                log.debug("objectcache: metrics update failed", exc_info=True)

    def start(self) -> Exporter:
        self.update()
        self._thread = threading.Thread(target=self._run, name="objectcache-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.update()  # the last numbers, for a scrape after shutdown
        except Exception:  # noqa: BLE001
            pass


def start_exporter(stats: Callable[[], dict], rank: str) -> Exporter | None:
    """An exporter when SGLang serves metrics, else None (nothing to export to)."""
    if not metrics_enabled():
        return None
    try:
        return Exporter(stats, rank).start()
    except Exception as e:  # noqa: BLE001 - prometheus_client missing or a name clash: run without
        log.warning("objectcache: metrics are not exported (%s)", e)
        return None
