"""Load or recompute (engine/decide.py): the meters and the choice, with injected clocks and
measurements (no SGLang, no server; the real-tree test is tests/test_load_or_recompute.py)."""

from __future__ import annotations

import math

import pytest

from sglang_objectcache.engine.decide import Decider, PrefillModel, ReadMeter

MiB = 2**20


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_read_meter_measures_busy_time_and_adds_concurrent_fetches():
    clock = Clock()
    m = ReadMeter(alpha=1.0, window=0.01, clock=clock)
    assert m.rate is None and m.seconds(MiB) is None
    m.started(1, 8 * MiB)
    m.started(2, 8 * MiB)
    assert m.outstanding() == 16 * MiB
    clock.t += 0.5
    m.ended(1, 8 * MiB)
    assert m.rate is None, "a fetch still in flight: no sample yet"
    m.ended(2, 8 * MiB)
    assert m.rate == pytest.approx(32 * MiB)  # two fetches in half a second of busy time
    clock.t += 60.0  # idle time does not dilute the rate
    m.started(3, 4 * MiB)
    clock.t += 0.5
    m.ended(3, 4 * MiB)
    assert m.rate == pytest.approx(8 * MiB)
    assert m.seconds(8 * MiB) == pytest.approx(1.0)
    m.started(4, 64 * MiB)  # sustained reads: a sample at least every `long` seconds of busy time
    m.started(5, 64 * MiB)
    clock.t += 2.0
    m.ended(4, 64 * MiB)
    assert m.rate == pytest.approx(32 * MiB)


def test_bad_news_counts_at_once_good_news_is_smoothed_and_an_idle_tier_goes_stale():
    clock = Clock()
    m = ReadMeter(alpha=0.5, window=0.01, clock=clock)
    m.started(1, 8 * MiB)
    clock.t += 0.1
    m.ended(1, 8 * MiB)
    assert m.rate == pytest.approx(80 * MiB)
    m.started(2, 8 * MiB)
    clock.t += 1.0
    m.ended(2, 2 * MiB)  # a slow fetch: its rate replaces the estimate at once
    assert m.rate == pytest.approx(2 * MiB)
    m.started(3, 8 * MiB)
    clock.t += 0.1
    m.ended(3, 8 * MiB)  # one fast fetch after it moves the estimate only part of the way
    assert m.rate == pytest.approx((2 + 80) / 2 * MiB)
    m.started(4, 8 * MiB)
    clock.t += 2.0
    m.ended(4, 0)  # nothing arrived: nothing will
    assert m.rate == 0 and m.seconds(MiB) == math.inf
    assert not m.stale(5.0)
    clock.t += 6.0
    assert m.stale(5.0)
    m.started(5, MiB)
    assert not m.stale(5.0), "a read in flight will measure it"
    clock.t += 0.5
    m.ended(5, MiB)
    assert m.rate == pytest.approx(2 * MiB), "after `forget` seconds a sample replaces the old rate"


def test_prefill_model_fits_sglangs_forward_times():
    truth = (0.004, 2e-5, 3e-10)  # c0, per token, per token x context
    m = PrefillModel()
    assert m.seconds(1000, 1000) is None
    for k, ctx in [(512, 512), (1024, 4096), (2048, 2048), (4096, 16384), (256, 8192), (8192, 8192),
                   (1024, 1024), (3000, 12000), (64, 64)]:
        m.observe(k, k * ctx, truth[0] + truth[1] * k + truth[2] * k * ctx)
    c0, a, b = m.coefficients()
    assert (c0, a, b) == pytest.approx(truth, rel=1e-3)
    assert m.seconds(2000, 10000) == pytest.approx(truth[0] + truth[1] * 2000 + truth[2] * 2000 * 10000, rel=1e-3)
    assert m.seconds(0, 10000) == 0.0


def test_prefill_model_ignores_batches_that_measured_something_else():
    """On one H100 a batch timed at hours (and first batches that waited for kernels to compile)
    made the fit predict hours for a 4K prefill, and every storage hit was loaded."""
    truth = (0.004, 2e-5, 3e-10)
    shapes = [(512, 512), (1024, 4096), (2048, 2048), (4096, 16384), (256, 8192), (8192, 8192),
              (1024, 1024), (3000, 12000), (64, 64), (64, 4160), (4160, 4160), (64, 8256)]
    m = PrefillModel()
    m.observe(64, 64 * 64, 9970.0)  # longer than any prefill: not a forward time
    m.observe(4160, 4160 * 4160, 40.0)  # the first batch of a shape, behind a kernel compile
    m.observe(64, 64 * 64, 5.0)
    for k, ctx in shapes * 2:
        m.observe(k, k * ctx, truth[0] + truth[1] * k + truth[2] * k * ctx)
    for k, ctx in [(4096, 4096), (8192, 8192), (16384, 16384), (64, 8256)]:
        want = truth[0] + truth[1] * k + truth[2] * k * ctx
        assert m.seconds(k, ctx) == pytest.approx(want, rel=0.05), (k, ctx)


def test_prefill_model_has_no_negative_terms():
    """Per-token cost only (no context term, no constant): the fit must not trade a negative
    constant for a larger slope, which would make short prefills look free."""
    m = PrefillModel()
    for k in (64, 128, 512, 1024, 4096, 8192, 256, 2048, 64, 128):
        m.observe(k, k * k, 1e-4 * k)
    c0, a, b = m.coefficients()
    assert c0 >= 0 and a > 0 and b >= 0
    assert m.seconds(64, 64) == pytest.approx(64e-4, rel=0.05)
    assert m.seconds(8192, 8192) == pytest.approx(8192e-4, rel=0.05)


def _model(per_token: float) -> PrefillModel:
    m = PrefillModel()
    for k in (256, 512, 1024, 2048, 4096, 8192, 128, 64):
        m.observe(k, k * k, per_token * k)
    return m


def test_load_when_it_ends_sooner_recompute_when_not():
    d = Decider(_model(1e-4), page_size=64)  # 10K tokens/s of prefill
    page_s = 0.001  # reading one page takes 1 ms: 64 tokens for 1 ms against 6.4 ms of prefill
    assert d.tokens_to_load(1024, 2048, 0, lambda p: p * page_s) == 1024
    slow = 0.02  # 20 ms a page: slower than recomputing it
    assert d.tokens_to_load(1024, 2048, 0, lambda p: p * slow) == 0
    assert d.counters["load"] == 1 and d.counters["recompute"] == 1


def test_the_margin_keeps_a_load_that_barely_pays_as_recompute():
    d = Decider(_model(1e-4), page_size=64, margin=0.1)
    # the whole hit: 16 pages; loading takes 95% of its recompute time
    per_page = 0.95 * 64 * 1e-4
    assert d.tokens_to_load(1024, 1024, 0, lambda p: p * per_page) == 0
    d.margin = 0.0
    assert d.tokens_to_load(1024, 1024, 0, lambda p: p * per_page) == 1024


def test_overlapped_a_partial_hit_loads_what_pays():
    """Streamed layer by layer, the forward runs while the load lands: the best is to load as much
    as arrives while the rest computes."""
    d = Decider(_model(1e-4), page_size=64, overlap=True, margin=0.0)
    per_page = 0.02  # a page reads in 20 ms, computes in 6.4 ms
    got = d.tokens_to_load(64 * 64, 64 * 64, 0, lambda p: p * per_page)
    assert 0 < got < 64 * 64 and got % 64 == 0
    assert d.counters["partial"] == 1


def test_without_measurements_it_loads_as_sglang_would():
    d = Decider(PrefillModel(), page_size=64)
    assert d.tokens_to_load(1024, 2048, 0, lambda p: 1.0) == 1024  # no prefill fit yet
    d = Decider(_model(1e-4), page_size=64)
    assert d.tokens_to_load(1024, 2048, 0, lambda p: None) == 1024  # no read rate yet
    assert d.counters["unmeasured"] == 1
    assert d.tokens_to_load(40, 2048, 0, lambda p: 0.0) == 0  # less than a page


def test_per_request_tables_stay_bounded():
    """Requests that never reach the decision (no storage hit) or never fetch leave entries
    behind: a server running for months must not grow them without bound."""
    import collections

    from sglang_objectcache.sglang import load_or_recompute as lor

    table = collections.OrderedDict()
    for i in range(lor.KEEP * 3):
        lor._put(table, f"r{i}", i)
    assert len(table) == lor.KEEP and next(iter(table)) == f"r{lor.KEEP * 2}"


def test_loads_that_take_longer_in_sglang_than_the_meters_say_are_scaled_and_back():
    """On one H100 the batches that loaded took about twice what the read meters predicted; the
    decision keeps loading only while the calibrated estimate still pays, and recovers."""
    d = Decider(_model(1e-4), page_size=64)  # serial: recompute of 1024 tokens = 102 ms
    page_s = 0.004  # 16 pages: 64 ms expected
    assert d.tokens_to_load(1024, 1024, 0, lambda p: p * page_s) == 1024
    for _ in range(12):  # each loading batch took 5x what was expected
        d.calibrate(0.064, 0, 1024, 0.32)
    assert 4.5 < d.load_scale <= 5.0
    why = {}
    assert d.tokens_to_load(1024, 1024, 0, lambda p: p * page_s, why) == 0
    assert why["load_s"] == pytest.approx(0.064 * d.load_scale)
    for _ in range(12):  # the tier (or SGLang) got quick again
        d.calibrate(0.064, 0, 1024, 0.064)
    assert d.load_scale < 1.2
    assert d.tokens_to_load(1024, 1024, 0, lambda p: p * page_s) == 1024


def test_compute_bound_batches_say_nothing_about_the_load():
    d = Decider(_model(1e-4), page_size=64, overlap=True)
    d.calibrate(0.010, 2048, 4096, 0.150)  # the 2048 computed tokens took ~205 ms: the forward's own time
    assert d.load_scale == 1.0
    d.calibrate(0.100, 0, 4096, 0.400)  # a load alone, 4x late: counted (smoothed, bounded)
    assert d.load_scale == pytest.approx(0.7 + 0.3 * 4.0)
    d.calibrate(0.001, 0, 4096, 10.0)  # absurd ratios are bounded
    assert d.load_scale <= Decider.SCALE_BOUNDS[1]


def test_sglangs_loading_batches_calibrate_the_decision():
    """observe_prefill sees a batch that waited on loads (hicache_consumer_index set): the one
    request's result came this long after its decision; that feeds the decider, not the prefill fit."""
    import time
    import types

    from sglang_objectcache.sglang.load_or_recompute import LoadOrRecompute

    backend = types.SimpleNamespace(cache=types.SimpleNamespace(_reads=types.SimpleNamespace(meters={})),
                                fp=types.SimpleNamespace(n_layers=4, piece_bytes=1))
    lor = LoadOrRecompute(types.SimpleNamespace(page_size=64), backend, margin=0.1, overlap=False)
    lor._plans["r1"] = (time.monotonic() - 0.3, 0.1, 0, 1024)
    mode = types.SimpleNamespace(is_extend=lambda: True, is_mixed=lambda: False)
    batch = types.SimpleNamespace(forward_mode=mode, hicache_consumer_index=0, reqs=[types.SimpleNamespace(rid="r1")],
                                  extend_lens=[64], prefix_lens=[1024], launch_ts=time.monotonic() - 0.05)
    lor.observe_prefill(batch)
    assert lor.decider.load_scale == pytest.approx(0.7 + 0.3 * 3.0, rel=0.05)
    assert lor.model.coefficients() is None and "r1" not in lor._plans
    assert lor.stats()["load_scale"] == lor.decider.load_scale
