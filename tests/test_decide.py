"""Load or recompute (engine/decide.py): the meters and the choice, with injected clocks and
measurements (no SGLang, no server; the real-tree test is tests/test_load_or_recompute.py)."""

from __future__ import annotations

import logging
import math

import pytest

from sglang_objectcache.engine.decide import Decider, PrefillModel, ReadMeter

MiB = 2**20


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def fetch(m, clock, fid, nbytes, seconds, landed=None):
    m.started(fid, nbytes)
    clock.t += seconds
    m.ended(fid, nbytes if landed is None else landed)


def test_read_meter_measures_busy_time_and_adds_concurrent_fetches():
    clock = Clock()
    m = ReadMeter(window=0.01, clock=clock)
    assert m.rate is None and m.seconds(MiB) is None
    m.started(1, 8 * MiB)
    m.started(2, 8 * MiB)
    assert m.outstanding() == 16 * MiB
    clock.t += 0.5
    m.ended(1, 8 * MiB)
    assert m.rate is None, "a fetch still in flight: no sample yet"
    m.ended(2, 8 * MiB)
    assert m.rate == pytest.approx(32 * MiB)  # two fetches in half a second of busy time
    clock.t += 20.0  # idle time does not dilute the rate
    fetch(m, clock, 3, 16 * MiB, 0.5)
    assert m.rate == pytest.approx(32 * MiB)
    assert m.seconds(8 * MiB) == pytest.approx(0.25)
    m.started(4, 64 * MiB)  # sustained reads: a sample at least every `long` seconds of busy time
    assert m.seconds(8 * MiB) == pytest.approx(72 / 32), "behind the bytes in flight"
    m.started(5, 64 * MiB)
    clock.t += 2.0
    m.ended(4, 64 * MiB)
    assert m.rate == pytest.approx(32 * MiB)


def test_latency_and_bandwidth_are_told_apart():
    """Small fetches pay a fixed cost before their bytes flow: a rate would price a large load at
    the small fetches' poor average; the fit prices each size as it runs."""
    clock = Clock()
    m = ReadMeter(window=0.001, clock=clock)
    bw, lat = 4 * 1024 * MiB, 0.020  # 4 GiB/s after 20 ms
    for i, size in enumerate([64, 192, 512, 64, 1024, 192]):
        fetch(m, clock, i, size * MiB, lat + size * MiB / bw)
        clock.t += 0.5
    assert m.latency == pytest.approx(lat, rel=1e-6) and m.rate == pytest.approx(bw, rel=1e-6)
    assert m.seconds(1024 * MiB) == pytest.approx(0.270, rel=1e-6)  # the 64 MiB fetches ran at 1.9 GiB/s
    assert m.seconds(64 * MiB) == pytest.approx(lat + 64 * MiB / bw, rel=1e-6)


def test_one_slow_fetch_weighs_what_it_weighs_a_tier_that_changes_is_believed_at_once():
    clock = Clock()
    m = ReadMeter(window=0.001, clock=clock)
    for i in range(6):
        fetch(m, clock, i, 512 * MiB, 0.1)  # 5 GiB/s
    fetch(m, clock, 6, 512 * MiB, 0.5)  # one slow fetch among fast ones (the server busy writing)
    assert m.seconds(512 * MiB) == pytest.approx((6 * 0.1 + 0.5) / 7)  # the mean, not the worst
    fetch(m, clock, 7, 512 * MiB, 0.5)  # slow again: two in a row, each over 2x the expectation
    assert m.seconds(512 * MiB) == pytest.approx(0.5), "the faster past is forgotten"
    fetch(m, clock, 8, 512 * MiB, 0.1)  # it recovers: one fast fetch weighs what it weighs
    assert m.seconds(512 * MiB) == pytest.approx((2 * 0.5 + 0.1) / 3)
    fetch(m, clock, 9, 512 * MiB, 0.1)  # two in a row, each under half the expectation
    assert m.seconds(512 * MiB) == pytest.approx(0.1), "the slow past is forgotten"


def test_a_fetch_that_lands_nothing_stops_loads_until_one_lands_and_an_idle_tier_goes_stale():
    clock = Clock()
    m = ReadMeter(window=0.001, clock=clock)
    fetch(m, clock, 1, 8 * MiB, 0.1)
    fetch(m, clock, 2, 8 * MiB, 2.0, landed=0)  # nothing arrived: nothing will
    assert m.rate == 0 and m.seconds(MiB) == math.inf
    assert not m.stale(5.0)
    clock.t += 6.0
    assert m.stale(5.0)
    m.started(3, MiB)
    assert not m.stale(5.0), "a read in flight will measure it"
    clock.t += 0.5
    m.ended(3, MiB)
    assert m.rate == pytest.approx(2 * MiB) and m.seconds(MiB) == pytest.approx(0.5)
    clock.t += 31.0  # samples older than `forget` say nothing about now
    assert m.seconds(MiB) is None


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


def test_batches_that_loaded_are_not_prefill_samples():
    """observe_prefill sees a batch that waited on loads (hicache_consumer_index set): its time is
    not the GPU's, so it does not enter the prefill fit; a batch that computed everything does."""
    import time
    import types

    from sglang_objectcache.sglang.load_or_recompute import LoadOrRecompute

    backend = types.SimpleNamespace(cache=types.SimpleNamespace(_reads=types.SimpleNamespace(meters={})),
                                    fp=types.SimpleNamespace(n_layers=4, piece_bytes=1))
    lor = LoadOrRecompute(types.SimpleNamespace(page_size=64), backend, margin=0.1, overlap=False)
    mode = types.SimpleNamespace(is_extend=lambda: True, is_mixed=lambda: False)

    def batch(consumer, n):
        return types.SimpleNamespace(forward_mode=mode, hicache_consumer_index=consumer, reqs=[],
                                     extend_lens=[n], prefix_lens=[0], launch_ts=time.monotonic() - n * 1e-5)
    for n in (256, 512, 1024, 2048, 4096, 8192, 128, 64):
        lor.observe_prefill(batch(0, n))
    assert lor.model.coefficients() is None
    for n in (256, 512, 1024, 2048, 4096, 8192, 128, 64):
        lor.observe_prefill(batch(-1, n))
    assert lor.model.seconds(1000, 1000) == pytest.approx(0.01, rel=0.2)


def test_load_cost_is_fitted_to_what_loads_added():
    """Constant plus per-token, both >= 0, from batches of several sizes; one batch far off (a
    first load that waited for something else) does not move it; none measured: no cost."""
    from sglang_objectcache.engine.decide import LoadCost

    c = LoadCost()
    assert c.seconds(4096) == 0.0 and c.coefficients() is None
    for n in (1024, 4096, 2048, 8192, 1024, 4096, 512, 2048):
        c.observe(n, 0.02 + 25e-6 * n)
    c.observe(4096, 3.0)  # an outlier
    fixed, per_token = c.coefficients()
    assert fixed == pytest.approx(0.02, rel=0.05) and per_token == pytest.approx(25e-6, rel=0.05)
    assert c.seconds(4096) == pytest.approx(0.02 + 25e-6 * 4096, rel=0.05)
    assert c.seconds(0) == 0.0

    one = LoadCost()  # one size: a constant; costs that fall with size: no negative per-token term
    for _ in range(4):
        one.observe(4096, 0.1)
    assert one.coefficients() == pytest.approx((0.1, 0.0))
    falling = LoadCost()
    for n, y in ((1024, 0.2), (2048, 0.15), (4096, 0.1), (8192, 0.05)):
        falling.observe(n, y)
    fixed, per_token = falling.coefficients()
    assert per_token >= 0 and fixed >= 0


def test_load_cost_forgets_batches_older_than_its_window():
    """Batches past `forget` leave the fit even when nothing new arrives: a cost measured before a
    change (a slow spell) does not linger after it."""
    from sglang_objectcache.engine.decide import LoadCost

    clock = Clock()
    c = LoadCost(forget=300.0, clock=clock)
    for _ in range(2):
        c.observe(4096, 1.0)
    clock.t += 200
    for _ in range(4):
        c.observe(4096, 0.1)
    clock.t += 50
    assert c.seconds(4096) > 0.1  # all six are recent: the slow two weigh in
    clock.t += 100  # the first two are 350 s old now
    assert c.seconds(4096) == pytest.approx(0.1)


def test_load_cost_turns_a_partial_load_that_does_not_pay_into_recompute():
    """Sitting D's 4K point on one H100: 4096 new tokens prefill in about 114 ms; reading 1K of the
    hit takes 75 ms, so a partial load looks like max(75, 86 ms for the other 3K) = 86 ms. Such
    loads took 102-143 ms of forward: each added 15-56 ms. Measured, that cost makes it a recompute; a
    hit that pays by far is still loaded (most of it: the rest computes while it streams)."""
    from sglang_objectcache.engine.decide import LoadCost

    model = _model(114e-3 / 4096)
    read = lambda p: 0.075 * p / 16  # noqa: E731 - 16 pages of 64 tokens in 75 ms
    cost = LoadCost()
    d = Decider(model, page_size=64, overlap=True, margin=0.1, cost=cost)
    assert 0 < d.tokens_to_load(4096, 4096, 0, read) < 4096, "without a measured cost: a partial load"
    for n in (1024, 4096, 1024, 4096):
        cost.observe(n, 0.03 + 10e-6 * n)  # 40 ms for 1K tokens
    assert d.tokens_to_load(4096, 4096, 0, read) == 0
    # 64 new tokens over a 16K hit that reads in 0.3 s: recomputing takes 0.46 s; loading most pays
    assert d.tokens_to_load(16384, 16384 + 64, 0, lambda p: 0.3 * p / 256) >= 8192


def test_streamed_batches_measure_the_load_cost(caplog):
    """observe_prefill on a batch whose load was gated: its forward time less its waits for bytes
    less the modelled compute is what the load cost. A failed load, or a batch before the model is
    fitted, is not a sample, and none of them enters the prefill fit."""
    import time
    import types

    from sglang_objectcache.sglang.load_or_recompute import LoadOrRecompute

    gates = {}
    cc = types.SimpleNamespace(page_size=64, layer_done_counter=types.SimpleNamespace(
        events=[types.SimpleNamespace(oc_gate=gates.get(i)) for i in range(3)]))
    backend = types.SimpleNamespace(cache=types.SimpleNamespace(_reads=types.SimpleNamespace(meters={})),
                                    fp=types.SimpleNamespace(n_layers=4, piece_bytes=1))
    lor = LoadOrRecompute(cc, backend, margin=0.1, overlap=True)
    mode = types.SimpleNamespace(is_extend=lambda: True, is_mixed=lambda: False)

    def batch(consumer, n, seconds):
        return types.SimpleNamespace(forward_mode=mode, hicache_consumer_index=consumer, reqs=[],
                                     extend_lens=[n], prefix_lens=[0], launch_ts=time.monotonic() - seconds)

    def gate(tokens, stalled, failed=None):
        return types.SimpleNamespace(tokens=tokens, stalled=[stalled / 2, stalled / 2], failed=failed)

    cc.layer_done_counter.events[1].oc_gate = gate(4096, 0.05)
    lor.observe_prefill(batch(1, 64, 0.2))  # before the model: not a sample
    for n in (256, 512, 1024, 2048, 4096, 8192, 128, 64):
        lor.observe_prefill(batch(-1, n, 1e-5 * n))
    coef = lor.model.coefficients()
    for tokens in (1024, 4096, 2048, 8192):
        cc.layer_done_counter.events[1].oc_gate = gate(tokens, 0.03)
        with caplog.at_level(logging.DEBUG, logger="sglang_objectcache"):
            lor.observe_prefill(batch(1, 64, 64e-5 + 0.03 + 0.01 + 20e-6 * tokens))
    assert "streamed batch of 64 new tokens over 8192 loaded" in caplog.text
    # the GPU sittings read these lines back (benchmarks/gpu/load_cost.py): the format is what it parses
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "load_cost.py"
    spec = importlib.util.spec_from_file_location("load_cost", path)
    load_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_cost)
    parsed = [m.groups() for m in map(load_cost.LINE.search, caplog.text.splitlines()) if m]
    assert [int(g[1]) for g in parsed] == [1024, 4096, 2048, 8192]
    assert all(float(g[5]) == pytest.approx(10 + 20e-3 * int(g[1]), abs=2) for g in parsed)
    cc.layer_done_counter.events[2].oc_gate = gate(4096, 0.0, failed="timeout")
    lor.observe_prefill(batch(2, 64, 5.0))
    lor.observe_prefill(batch(0, 64, 5.0))  # loaded, but not streamed: no gate, no sample
    assert lor.model.coefficients() == coef
    fixed, per_token = lor.cost.coefficients()
    assert fixed == pytest.approx(0.01, abs=2e-3) and per_token == pytest.approx(20e-6, rel=0.1)
    assert lor.stats()["load_cost"] == [fixed, per_token]
