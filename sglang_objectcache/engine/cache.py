"""The engine's synchronous face: exists / fetch / get / put of pages, over the tiers.

Called from SGLang's prefetch, IO and backup threads (never its scheduler thread for I/O). CPU
work (copying pages in and out, checksums) runs on the calling thread, the copy threads or the
range reader's pull threads, overlapped with the network requests on the runtime loop; every
call has a deadline, after which what has not arrived is a miss. The work itself lives in its
rooms: reads in `read.py`, writes in `write.py`, tiers in `tiers.py` and `disk_tier.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import concurrent.futures as cf
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from .. import native
from ..config import DiskTierConfig, ObjectCacheConfig, S3TierConfig
from ..errors import NotFound, StartupError, StoreError, Unavailable
from ..format import SegmentFn
from ..keys import Fingerprint, Namespace
from ..stores.factory import build_range_reader, build_store, probe
from .disk_tier import DiskTier
from .decide import ReadMeter
from .events import RateLimitedLog, Stats
from .plan import PlannedObject
from .policy import POLICIES
from .read import ReadContext, ReadSession
from .runtime import Background, Runtime
from .scheduler import ReadScheduler
from .tiers import S3Tier, Tier
from .write import Writer

log = logging.getLogger("sglang_objectcache")


def integrity_key(cfg: ObjectCacheConfig) -> bytes | None:
    """The keyed integrity mode's secret, from its file or environment variable; None when off.
    StartupError naming the key (never the secret) when it cannot be had."""
    if cfg.integrity_key_file:
        where = "integrity_key_file"
        try:
            raw = Path(cfg.integrity_key_file).read_bytes().strip()
        except OSError as e:
            raise StartupError(f"integrity_key_file: cannot read {cfg.integrity_key_file} ({e.strerror}); "
                               "point it at a file holding the deployment's secret") from None
    elif cfg.integrity_key_env:
        where = f"integrity_key_env ({cfg.integrity_key_env})"
        raw = os.environ.get(cfg.integrity_key_env, "").encode().strip()
    else:
        return None
    if len(raw) < 16:
        raise StartupError(f"{where}: the secret is missing or shorter than 16 bytes; use at least 32 random "
                           "bytes (e.g. `openssl rand -hex 32`)")
    return raw


def build_tiers(cfg: ObjectCacheConfig, ns: Namespace) -> list[Tier]:
    tiers: list[Tier] = []
    for i, t in enumerate(cfg.tiers):
        store = build_store(t, f"tiers[{i}]")
        if isinstance(t, DiskTierConfig):
            tiers.append(DiskTier(t.name, store, ns, t.capacity))
            continue
        tiers.append(S3Tier(t.name, store, ns, max_connections=t.max_connections,
                            max_write_connections=t.max_write_connections,
                            refresh_interval=t.index_refresh_interval, flush_interval=t.manifest_flush_interval,
                            startup_timeout=max(cfg.timeout, 3 * t.request_timeout),
                            scheduler=ReadScheduler(POLICIES[cfg.fetch_policy], cfg.bandwidth, t.max_connections),
                            range_reader=build_range_reader(t, f"tiers[{i}]", cfg.read_range_bytes,
                                                            getattr(store, "credentials", None)),
                            capacity=t.capacity, max_age=t.max_age, gc_interval=t.gc_interval))
    return tiers


class ObjectCache:
    def __init__(self, cfg: ObjectCacheConfig, fp: Fingerprint):
        self.cfg = cfg
        if cfg.model_revision and fp.model_revision != cfg.model_revision:
            fp = dataclasses.replace(fp, model_revision=cfg.model_revision)
        mac_key = integrity_key(cfg)
        if mac_key is not None:
            fp = dataclasses.replace(fp, keyed=True)
        self.fp = fp
        self.digest = fp.digest
        s3 = next((t for t in cfg.tiers if isinstance(t, S3TierConfig)), None)
        self.ns = Namespace(s3.prefix if s3 else "", cfg.namespace or fp.model, self.digest)
        self.runtime = Runtime()
        self.stats = Stats()
        self._warn = RateLimitedLog()
        self._background = Background(self.runtime, self._background_failed)
        # Verifying and copying ranges that come back to the loop (store reads) into SGLang's
        # buffers: one native call per range that leaves the GIL (native/), so these run in parallel.
        self._copiers = cf.ThreadPoolExecutor(max_workers=cfg.copy_threads or min(8, os.cpu_count() or 1),
                                              thread_name_prefix="objectcache-copy")
        self._closed = False
        try:
            self.tiers = build_tiers(cfg, self.ns)
            for tier in self.tiers:
                tier.mac_key = mac_key
            for i, tier in enumerate(self.tiers):
                self.runtime.run(self._start_tier(i, tier), timeout=None)
        except BaseException:
            for tier in getattr(self, "tiers", []):
                try:
                    self.runtime.run(tier.stop(), timeout=5.0)
                except Exception:  # noqa: BLE001 - already failing; report the first error
                    pass
            self.runtime.close()
            self._copiers.shutdown(wait=False)
            raise
        self.writer = Writer(cfg, fp, self.ns, self.tiers, self.runtime, self._background, self.stats, self._warn,
                             mac_key)
        if self.writer.write_back is not None:
            wb = self.writer.write_back

            async def _start_write_back() -> None:
                wb.start()
                await wb.resume()  # copies owed from before a restart
            self.runtime.submit(_start_write_back())
        self._reads = ReadContext(self.tiers, self.ns.root, fp.n_layers, self.digest, cfg.read_range_bytes, cfg.verify_checksums,
                                  cfg.first_layer_hold, cfg.switch_interval, self.runtime.loop, self._copiers,
                                  self.writer.may_promote, self._on_read_event, mac_key,
                                  meters={t: ReadMeter() for t in self.tiers})
        log.info("objectcache ready: %s; namespace %s; tiers %s; copies %s; GIL switch interval while "
                 "reading: %s", fp.describe(), self.ns.root, ", ".join(t.name for t in self.tiers),
                 native.status(), f"{cfg.switch_interval * 1e3:.2g} ms" if cfg.switch_interval else "Python's")

    async def _start_tier(self, i: int, tier: Tier) -> None:
        await probe(tier.store, self.cfg.tiers[i], f"tiers[{i}]", self.ns.root)
        try:
            await tier.start()
        except (StoreError, asyncio.TimeoutError) as e:
            raise StartupError(f"tiers[{i}] ({tier.name}): cannot build the index: {e}") from None

    # ---- queries -------------------------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> int:
        """Length of the leading run of keys present in some tier that is up. No request is made."""
        up = [t for t in self.tiers if t.health.up()]
        n = 0
        for key in keys:
            if not any(key in t.index for t in up):
                break
            n += 1
        self.stats.add(exists_calls=1, exists_pages=len(keys), exists_hits=n)
        if n < len(keys):
            for t in up:
                t.nudge()
        return n

    # ---- reads ---------------------------------------------------------------------------

    def fetch(self, keys: Sequence[str], segments: SegmentFn, t_layer: float = 0.0, *,
              streamed: bool = False) -> ReadSession:
        """Start fetching pages in layer order and return at once: `.readiness.wait(layer)` blocks
        until that layer of every found page is in place and verified, `.wait(timeout)` gives one
        bool per key. Stops at the first page not stored. `t_layer`, the forward pass's compute
        time per layer for this request when known, lets the scheduler share bandwidth by need
        (the 0.5.17 patch set passes the decider's; 0 elsewhere). `streamed`: the caller uses each layer as it lands (SGLang's
        layer-wise path), so the first-layer hold applies; a caller that waits for the whole
        fetch gains nothing from it."""
        return ReadSession(self._reads, keys, segments, t_layer, streamed=streamed).start()

    def get(self, keys: Sequence[str], segments: SegmentFn, timeout: float | None = None) -> list[bool]:
        """Fill pages from storage; one bool per key, within the configured deadline (or `timeout`)."""
        return self.collect(self.fetch(keys, segments), timeout)

    def collect(self, session: ReadSession, timeout: float | None = None) -> list[bool]:
        """Wait for a started fetch within the configured deadline (or `timeout`) and count it as
        one read call: `get` is fetch plus collect; a caller that needs the layers as they land
        uses the two."""
        ok = session.wait(self.cfg.timeout if timeout is None else timeout)
        hits = sum(ok)
        if log.isEnabledFor(logging.DEBUG) and session.plan.reads:
            took = time.monotonic() - session.started
            first = session.readiness.ready_at[0]
            log.debug("objectcache: read %d of %d pages, %.0f MiB in %d requests, %.1f ms (%.2f GiB/s); "
                      "layer 0 ready after %s ms", hits, len(ok), session.plan.nbytes / 2**20,
                      len(session.plan.reads), took * 1e3, session.plan.nbytes / max(took, 1e-9) / 2**30,
                      f"{(first - session.started) * 1e3:.1f}" if first is not None else "-")
        self.stats.add(get_calls=1, get_pages=len(ok), get_hits=hits,
                       read_bytes=hits * self.fp.piece_bytes * self.fp.n_layers)
        return ok

    def _on_read_event(self, kind: str, o: PlannedObject | None, detail) -> None:
        """What a read session reports: counted, logged (rate-limited), and acted on."""
        if kind == "io_error":
            self.stats.add(errors=1, **{f"read_errors_{type(detail).__name__}": 1})
            self._warn.warn(f"io:{type(detail).__name__}", "objectcache: %s; pages are misses", detail)
            if isinstance(detail, NotFound):  # gone behind our back: no instance should claim it
                self.stats.add(vanished=1)
                if o.tier.index.remove(o.info.name) is not None:
                    self.runtime.submit(o.tier.forget(o.info.name))
            elif isinstance(detail, Unavailable):
                o.tier.health.failed(detail)
        elif kind == "timeout":
            self.stats.add(timeouts=detail)
            self._warn.warn("timeout", "objectcache: %d reads still pending after the %.1fs deadline; "
                            "their pages are misses", detail, self.cfg.timeout)
        elif kind == "corrupt":
            self.stats.add(corrupt=1)
            self._warn.warn("corrupt", "objectcache: %s in %s is corrupt (%s); treating as a miss",
                            o.info.name, o.tier.name, detail)
            o.tier.index.ban(o.info.name)  # thread-safe, and at once: the next call must not use it
            self.runtime.submit(o.tier.discard(o.info.name))
        elif kind == "copy_error":
            self._warn.warn("deliver", "objectcache: cannot copy %s into the pool: %s", o.info.name, detail)
        elif kind == "promote":
            self.writer.promote(o.info, detail)
        elif kind == "used":  # on the loop, which owns the tiers' recency
            try:
                self.runtime.loop.call_soon_threadsafe(o.tier.used, o.info.name)
            except RuntimeError:  # closing
                pass

    # ---- writes --------------------------------------------------------------------------

    def put(self, keys: Sequence[str], segments: SegmentFn) -> list[bool]:
        """Store pages; one bool per key. Keys already stored are not written again."""
        return self.writer.put(keys, segments)

    def _background_failed(self, what: str, e: BaseException) -> None:
        self.stats.add(background_errors=1, **{f"background_errors_{type(e).__name__}": 1})
        self._warn.warn(f"bg:{what}", "objectcache: %s failed: %s", what, e)

    # ---- admin ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Wait for background writes and publish pending manifests (tests, shutdown)."""
        end = time.monotonic() + (timeout if timeout is not None else self.cfg.timeout)
        self._background.wait(end)
        if self.writer.write_back is not None:
            self.runtime.run(self.writer.write_back.wait_idle(max(0.0, end - time.monotonic())),
                             timeout=max(0.1, end - time.monotonic()) + 1)
        for t in self.tiers:
            self.runtime.run(t.flush(), timeout=max(0.1, end - time.monotonic()))

    def clear(self) -> cf.Future:
        """Forget every page now; delete this namespace's objects in the background."""
        for t in self.tiers:
            t.index.clear()

        async def _clear() -> int:
            return sum(await asyncio.gather(*(t.clear() for t in self.tiers)))

        return self._background.spawn(_clear(), "clear")

    def snapshot(self) -> dict:
        return {"counters": self.stats.snapshot(), "tiers": {t.name: t.stats() for t in self.tiers},
                "namespace": self.ns.root}

    def close(self) -> None:
        """Within `shutdown_timeout`: let background work end, drain the copies owed below
        (write-back) and publish pending manifests; what is left is counted and logged."""
        if self._closed:
            return
        self._closed = True
        end = time.monotonic() + self.cfg.shutdown_timeout

        def left() -> float:
            return max(0.0, end - time.monotonic())
        self._background.wait(end)
        if self.writer.write_back is not None:
            try:
                self.runtime.run(self.writer.write_back.drain(left()), timeout=left() + 5.0)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        for t in self.tiers:  # an S3 tier's stop publishes its pending manifest
            try:
                self.runtime.run(t.stop(), timeout=max(1.0, left()))
            except Exception:  # noqa: BLE001
                pass
        self.runtime.close()
        self._copiers.shutdown(wait=True)
