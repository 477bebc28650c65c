"""Load or recompute, per request: is a storage hit worth reading, given what is measured now?

Measured inputs, no constants:
- `ReadMeter`: the time a read of n bytes takes from a tier now (latency + n x time per byte, fitted
  to the tier's recent busy periods), behind the bytes already promised to fetches in flight;
- `PrefillModel`: the GPU's prefill time for k new tokens over a context of c tokens, fitted live
  to SGLang's own forward timings (t = c0 + a*k + b*k*c, least squares over recent batches);
- `LoadCost`: what loading n tokens adds to a forward beyond waiting for their bytes (the host to
  GPU copies and their hand-overs), fitted to the forwards of batches that loaded;
- the request: hit tokens, new tokens, context before the hit.

`Decider.tokens_to_load` picks how much of the hit to load (0: recompute it all; a prefix of it:
load what pays, recompute the rest). Until both meters have data it answers as SGLang would (the
whole hit). `ReadMeter.stale` lets the caller treat a tier whose rate was measured long ago as
unmeasured, so that one load goes through and measures it again (a tier that recovered is seen).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np


class ReadMeter:
    """Expected time to read n more bytes from a tier now: latency + n x time per byte, both
    fitted (least squares: the mean) to the tier's recent busy periods. A busy period runs while at
    least one fetch is in flight; idle gaps do not dilute it and concurrent fetches add up.

    Why a fit and not a rate: on one H100 inside SGLang, fetches of one prefix length took from 0.9
    to 7.5 GiB/s (the server writing backups meanwhile), and small ones paid 15-25 ms before their
    bytes flowed. A rate that took the worst sample at once ("bad news counts at once") sat near the
    bottom of that spread and priced a 1 GiB load at 1 s where the loads took 0.2 s, so hits that
    paid were recomputed. One slow fetch now moves the mean as much as it weighs; a tier that stays
    slow (`slow_after` periods in a row, each over `slow` x what the fit expected), or that
    recovers (as many, each under 1/`slow` of it), loses its history at once; a fetch that landed
    nothing makes every load `inf` until one lands again."""

    MIN_FIT = 4  # periods before a latency is fitted, and before a period is judged slow or fast

    def __init__(self, keep: int = 16, forget: float = 30.0, window: float = 0.001, long: float = 1.0,
                 slow: float = 2.0, slow_after: int = 2, clock=time.monotonic):
        self._window, self._long, self._forget, self._clock = window, long, forget, clock
        self._slow, self._slow_after = slow, slow_after
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # fetch id -> bytes promised
        self._busy_since: float | None = None
        self._busy = 0.0
        self._landed = 0
        self._samples: deque = deque(maxlen=keep)  # (when, bytes, seconds) of busy periods
        self._slow_run = self._fast_run = 0
        self._dead = False  # the last period landed nothing
        self._fit: tuple[float, float] | None = None  # (latency s, seconds per byte)
        self.updated: float | None = None

    def started(self, fid: int, nbytes: int) -> None:
        with self._lock:
            if not self._inflight:
                self._busy_since = self._clock()
            self._inflight[fid] = nbytes

    def ended(self, fid: int, landed: int) -> None:
        """A fetch ended; `landed`: its bytes that arrived (a failed or late fetch counts its time
        and only what arrived, so a slow or failing tier drags the estimate up)."""
        with self._lock:
            if self._inflight.pop(fid, None) is None:
                return
            now = self._clock()
            self._landed += landed
            if not self._inflight and self._busy_since is not None:
                self._busy += now - self._busy_since
                self._busy_since = None
            busy = self._busy + (now - self._busy_since if self._busy_since is not None else 0.0)
            # a sample when reads go idle (all their bytes counted), or under sustained reads
            # every `long` seconds (then fetches still in flight are counted when they end)
            if busy >= self._window and (not self._inflight or busy >= self._long):
                self._sample(now, self._landed, busy)
                self._landed, self._busy = 0, 0.0
                if self._busy_since is not None:
                    self._busy_since = now

    def _sample(self, now: float, nbytes: int, seconds: float) -> None:
        self.updated = now
        if nbytes <= 0:  # nothing arrived: nothing will, until a fetch shows otherwise
            self._dead, self._slow_run, self._fast_run, self._fit = True, 0, 0, None
            self._samples.clear()
            return
        self._dead = False
        # a run of periods all far off the expectation, the same way: the tier changed. Judged where
        # the expectation is sound: a fit on a few periods, or periods of about this size (before
        # a latency is fitted, other sizes are off by design)
        sizes = [b for _, b, _ in self._samples]
        sound = len(sizes) >= self.MIN_FIT or (sizes and max(sizes + [nbytes]) < 1.5 * min(sizes + [nbytes]))
        expected = self._expect(nbytes, now) if sound else None
        slow = expected is not None and seconds > self._slow * expected
        fast = expected is not None and seconds * self._slow < expected
        self._slow_run = self._slow_run + 1 if slow else 0
        self._fast_run = self._fast_run + 1 if fast else 0
        self._samples.append((now, nbytes, seconds))
        run = max(self._slow_run, self._fast_run)
        if run >= self._slow_after:  # slow and staying slow, or recovered: forget the past
            while len(self._samples) > run:
                self._samples.popleft()
        self._fit = self._refit(now)

    def _refit(self, now: float) -> tuple[float, float] | None:
        rows = [(b, t) for at, b, t in self._samples if now - at <= self._forget]
        if not rows:
            return None
        b = np.array([r[0] for r in rows], dtype=float)
        t = np.array([r[1] for r in rows], dtype=float)
        if len(rows) >= self.MIN_FIT and b.max() >= 1.5 * b.min():  # sizes that tell latency from bandwidth
            slope, latency = np.polyfit(b, t, 1)
            if slope > 0 and latency >= 0:
                return float(latency), float(slope)
        return 0.0, float(t.sum() / b.sum())  # no latency term: all the time over all the bytes

    def _expect(self, nbytes: int, now: float) -> float | None:
        fit = self._fit if self._samples and now - self._samples[-1][0] <= self._forget else None
        return None if fit is None else fit[0] + nbytes * fit[1]

    @property
    def rate(self) -> float | None:
        """Bytes/s past the latency (0 after a fetch that landed nothing; None: not measured)."""
        with self._lock:
            if self._dead:
                return 0.0
            return None if self._fit is None else 1.0 / self._fit[1]

    @property
    def latency(self) -> float | None:
        with self._lock:
            return None if self._fit is None else self._fit[0]

    def outstanding(self) -> int:
        with self._lock:
            return sum(self._inflight.values())

    def stale(self, after: float) -> bool:
        """No measurement for `after` seconds and nothing in flight that would give one."""
        with self._lock:
            idle = not self._inflight
        return self.updated is not None and idle and self._clock() - self.updated > after

    def seconds(self, nbytes: int) -> float | None:
        """Expected time to read `nbytes` more now, behind the bytes already in flight."""
        with self._lock:
            if self._dead:
                return math.inf
            expect = self._expect(sum(self._inflight.values()) + nbytes, self._clock())
        return expect


class PrefillModel:
    """Forward time of a prefill batch: t = c0 + a * sum(k) + b * sum(k * ctx), over the last
    `keep` batches SGLang ran with nothing loaded from host or storage (those wait on copies).

    Fitted for relative error (a 64-token batch counts as much as an 8K one), with no negative
    coefficient, and robust: batches far off the fit (a first batch that waited for kernels to
    compile, a batch held up by the host) are dropped before the final fit. On one H100 a single
    such batch made 4K tokens look like hours of prefill, and every hit was loaded."""

    MIN_SAMPLES = 8
    MAX_SECONDS = 120.0  # no prefill forward takes longer; a longer one measured something else
    TRIM = 3.0  # a batch whose relative error is this many times the median is an outlier

    def __init__(self, keep: int = 256):
        self._rows: deque = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._coef: tuple[float, float, float] | None = None
        self._dirty = False

    def observe(self, tokens: int, token_ctx: int, seconds: float) -> None:
        """One batch: `tokens` new tokens in all, `token_ctx` = sum over its requests of new
        tokens times their context length (prefix + new), `seconds` its forward time."""
        if tokens <= 0 or not 0 < seconds <= self.MAX_SECONDS:
            return
        with self._lock:
            self._rows.append((1.0, float(tokens), float(token_ctx), seconds))
            self._dirty = True

    @staticmethod
    def _fit(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        """Least squares of relative error with every coefficient >= 0 (a feature whose
        coefficient comes out negative is dropped and the rest refitted)."""
        w = 1.0 / y
        active = [0, 1, 2]
        while active:
            try:
                c, *_ = np.linalg.lstsq(x[:, active] * w[:, None], np.ones_like(y), rcond=None)
            except np.linalg.LinAlgError:
                return None
            if (c >= 0).all():
                coef = np.zeros(3)
                coef[active] = c
                return coef if coef[1] > 0 or coef[2] > 0 else None
            del active[int(np.argmin(c))]
        return None

    def coefficients(self) -> tuple[float, float, float] | None:
        with self._lock:
            if self._dirty and len(self._rows) >= self.MIN_SAMPLES:
                m = np.array(self._rows)
                x, y = m[:, :3], m[:, 3]
                coef = self._fit(x, y)
                if coef is not None:
                    err = np.abs(x @ coef - y) / y
                    keep = err <= max(self.TRIM * float(np.median(err)), 0.05)
                    if self.MIN_SAMPLES <= keep.sum() < len(y):
                        refit = self._fit(x[keep], y[keep])
                        coef = refit if refit is not None else coef
                if coef is not None:
                    self._coef = tuple(float(v) for v in coef)
                self._dirty = False
            return self._coef

    def seconds(self, tokens: int, ctx: int) -> float | None:
        """Time to prefill `tokens` new tokens that end at context length `ctx`; None until fitted."""
        coef = self.coefficients()
        if coef is None:
            return None
        if tokens <= 0:
            return 0.0
        c0, a, b = coef
        return c0 + a * tokens + b * tokens * ctx


class LoadCost:
    """What loading n tokens adds to a forward besides waiting for their bytes: c + d x n, fitted
    to the batches that loaded (their forward time, less the time they waited for bytes, less what
    the prefill model says their compute takes).

    Why: on one H100 (sitting D, docs/benchmarks.md) a streamed 4K-token load with 64 new tokens
    ran 113-154 ms of forward after its bytes were in (a device hit's whole TTFT: 67-77 ms), and a
    1K-token partial load with 3K new tokens 15-56 ms more than computing them. The decision saw
    only the read and the compute, so it chose partial loads that lost to recompute."""

    MIN_SAMPLES = 4
    TRIM = 3.0  # a batch this many median absolute deviations off the fit is an outlier

    def __init__(self, keep: int = 32, forget: float = 300.0, clock=time.monotonic):
        self._rows: deque = deque(maxlen=keep)  # (when, tokens loaded, extra seconds)
        self._lock = threading.Lock()
        self._forget, self._clock = forget, clock
        self._fit: tuple[float, float] | None = None
        self._fit_rows = 0  # how many rows the fit was made of: fewer now means some aged out
        self._dirty = False

    def observe(self, tokens: int, extra: float) -> None:
        """A batch that loaded `tokens` tokens ran `extra` seconds past its modelled compute and
        its waits for bytes (negative: faster than modelled; kept, so the fit is not biased up)."""
        if tokens <= 0 or not math.isfinite(extra):
            return
        with self._lock:
            self._rows.append((self._clock(), float(tokens), float(extra)))
            self._dirty = True

    def coefficients(self) -> tuple[float, float] | None:
        """(c seconds, d seconds per token), both >= 0; None until `MIN_SAMPLES` recent batches."""
        with self._lock:
            now = self._clock()
            rows = [(n, y) for at, n, y in self._rows if now - at <= self._forget]
            if len(rows) < self.MIN_SAMPLES:
                return None
            if self._dirty or self._fit is None or len(rows) != self._fit_rows:
                n = np.array([r[0] for r in rows])
                y = np.array([r[1] for r in rows])
                fit = self._solve(n, y)
                resid = np.abs(fit[0] + fit[1] * n - y)
                mad = float(np.median(resid))
                keep = resid <= self.TRIM * mad if mad > 0 else np.ones_like(y, dtype=bool)
                if self.MIN_SAMPLES <= keep.sum() < len(y):
                    fit = self._solve(n[keep], y[keep])
                self._fit, self._fit_rows, self._dirty = fit, len(rows), False
            return self._fit

    @staticmethod
    def _solve(n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        if n.max() >= 1.5 * n.min():  # sizes that tell a constant from a per-token cost
            d, c = np.polyfit(n, y, 1)
            if d >= 0 and c >= 0:
                return float(c), float(d)
            if d >= 0:  # a negative constant: all of it per token
                return 0.0, max(float((n * y).sum() / (n * n).sum()), 0.0)
        return max(float(y.mean()), 0.0), 0.0  # one size, or cost falling with size: a constant

    def seconds(self, tokens: int) -> float:
        """What loading `tokens` tokens adds to the forward (0 until measured: as before)."""
        if tokens <= 0:
            return 0.0
        fit = self.coefficients()
        return 0.0 if fit is None else fit[0] + fit[1] * tokens


class Decider:
    """How many tokens of a storage hit to load. `margin`: a load must finish this fraction sooner
    than recompute to be chosen; `overlap`: the forward overlaps the load layer by layer (the
    0.5.17 patch), else it starts after the last byte; `cost`: what a load adds to the forward
    besides its bytes (measured; none if not given)."""

    def __init__(self, model: PrefillModel, page_size: int, *, margin: float = 0.1, overlap: bool = False,
                 cost: LoadCost | None = None):
        self.model, self.page_size, self.margin, self.overlap = model, page_size, margin, overlap
        self.cost = cost
        self.counters = dict(load=0, recompute=0, partial=0, unmeasured=0)
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def finish(self, load_s: float, rest_tokens: int, ctx: int, loaded: int = 0) -> float:
        """Expected time until the forward can end: reading `loaded` tokens takes `load_s`, and
        `rest_tokens` are computed over a context of `ctx` tokens. What the load adds to the
        forward (`cost`) runs beside the read when streamed, after it when not."""
        t_rest = (self.model.seconds(rest_tokens, ctx) or 0.0) + (self.cost.seconds(loaded) if self.cost else 0.0)
        return max(load_s, t_rest) if self.overlap else load_s + t_rest

    def tokens_to_load(self, hit: int, new_tokens: int, prefix: int,
                       load_seconds: Callable[[int], float | None], why: dict | None = None) -> int:
        """`hit` tokens of the request's `new_tokens` (those past what device and host hold, after
        `prefix` tokens) are in storage; `load_seconds(pages)` is the expected time to read the first
        `pages` pages of the hit now (None: not measured). Returns how many tokens to load: a
        multiple of the page size, at most `hit`; 0 recomputes them. `why`, if given, receives the
        expected seconds it compared (whole load, recompute, the chosen plan) for the log."""
        pages = hit // self.page_size
        if pages <= 0:
            return 0
        ctx = prefix + new_tokens
        whole = load_seconds(pages)
        if whole is None or self.model.coefficients() is None:
            self._count("unmeasured")
            return hit  # as SGLang would: the meters have nothing to go on yet
        recompute = self.finish(0.0, new_tokens, ctx)
        best, best_t = 0, recompute
        step = max(1, pages // 16)  # 16 candidates at most: the prefix of the hit that pays best
        for p in sorted({*range(step, pages + 1, step), pages}):
            t_load = whole if p == pages else load_seconds(p)
            t = self.finish(t_load or 0.0, new_tokens - p * self.page_size, ctx, p * self.page_size)
            if t < best_t:
                best, best_t = p * self.page_size, t
        if best and best_t > recompute * (1 - self.margin):
            best = 0  # not enough sooner to be worth the risk of a slow read
        if why is not None:
            why.update(load_s=whole, recompute_s=recompute, chosen_s=best_t if best else recompute, plan_tokens=best,
                       cost_s=self.cost.seconds(hit) if self.cost else 0.0)
        self._count("recompute" if best == 0 else "load" if best == hit else "partial")
        return best
