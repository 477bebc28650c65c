"""Sharing policies on the fluid model: a deterministic, simulated clock (no network)."""

from __future__ import annotations

import os
import sys

import pytest

from sglang_objectcache.engine.policy import POLICIES, RequestState

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from fluid import best_serial, mean_added, simulate  # noqa: E402

L = 32
MiB = 1 << 20


def req(name, pages=64, arrival=0.0, t_layer=0.0005, group=4):
    """A request of `pages` 8 MiB pages in 8-page objects, read in groups of `group` layers."""
    objects = max(1, pages // 8)
    per_obj = min(8, pages)
    reads = [(group * per_obj * 256 * 1024, l0, l0 + group) for l0 in range(0, L, group) for _ in range(objects)]
    return RequestState(name, arrival, reads, L, t_layer)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_serving_one_at_a_time_beats_equal_sharing_by_2n_over_n_plus_1(n):
    rate = 1.0 * (1 << 30)  # 1 GiB/s: transfer-bound (512 MiB per request, 16 ms of compute)
    reqs = [req(f"r{i}") for i in range(n)]
    fair = mean_added(simulate(reqs, rate, POLICIES["fair"])[0])
    for name in ("srpt", "slack"):
        ours = mean_added(simulate(reqs, rate, POLICIES[name])[0])
        assert fair / ours == pytest.approx(2 * n / (n + 1), rel=0.05), name
    opt, _ = best_serial(reqs, rate) if n <= 4 else (None, None)
    if opt is not None:
        assert mean_added(simulate(reqs, rate, POLICIES["slack"])[0]) == pytest.approx(opt, rel=0.01)


def test_fair_gives_equal_shares():
    rate = 1 << 30
    out, _ = simulate([req("a"), req("b")], rate, POLICIES["fair"])
    assert out[0].transfer_end == pytest.approx(out[1].transfer_end)
    assert out[0].transfer_end == pytest.approx(2 * 512 * MiB / rate, rel=1e-6)


def test_slack_feeds_the_request_that_is_behind():
    """a computes 50 ms per layer, so its transfer can hide behind its compute; b is
    transfer-bound with more bytes. SRPT serves the smaller a first and b waits for all of it;
    slack gives a each layer group just before it is needed and serves b in between."""
    rate = 1 << 30
    a = req("a", pages=32, t_layer=0.050)
    b = req("b", pages=64, t_layer=0.0005)
    srpt = {o.name: o.added for o in simulate([a, b], rate, POLICIES["srpt"])[0]}
    slack = {o.name: o.added for o in simulate([a, b], rate, POLICIES["slack"])[0]}
    assert slack["b"] < srpt["b"] - 0.1  # b no longer waits for all of a's 256 MiB
    assert slack["a"] < 0.05  # a's transfer stays (almost) hidden behind its compute
    assert sum(slack.values()) < sum(srpt.values())
    assert sum(slack.values()) / 2 < best_serial([a, b], rate)[0]  # better than any serial order


@pytest.mark.parametrize("t_layer", [0.0005, 0.015])  # short suffix (transfer-bound), long suffix
@pytest.mark.parametrize("pages, stagger", [((16, 64), 0.01), ((64, 64), 0.0), ((32, 128, 8), 0.01),
                                            ((16, 64, 32, 128), 0.02), ((64, 16, 128, 32, 16, 64), 0.0)])
def test_slack_is_never_worse_than_srpt(pages, stagger, t_layer):
    rate = 1 << 30
    reqs = [req(f"r{i}", pages=p, arrival=stagger * i, t_layer=t_layer) for i, p in enumerate(pages)]
    slack = mean_added(simulate(reqs, rate, POLICIES["slack"])[0])
    srpt = mean_added(simulate(reqs, rate, POLICIES["srpt"])[0])
    assert slack <= srpt * 1.001


def test_writes_only_get_what_reads_leave():
    rate = 1 << 30
    reqs = [req("a"), req("b", arrival=0.2)]
    base, _ = simulate(reqs, rate, POLICIES["slack"])
    with_writes, writes_done = simulate(reqs, rate, POLICIES["slack"], write_bytes=256 * MiB)
    assert [o.added for o in with_writes] == pytest.approx([o.added for o in base])
    assert writes_done > 0  # they did finish, in the gaps


def test_staggered_arrival_and_first_layer():
    rate = 1 << 30
    out, _ = simulate([req("a"), req("b", arrival=0.1)], rate, POLICIES["slack"])
    a, b = out
    assert a.first_layer == pytest.approx(4 * 8 * 256 * 1024 * 8 / rate, rel=1e-6)  # 8 objects x one group
    assert b.first_layer > 0  # b waits for a (fewer bytes left) then starts


def test_request_state_answers_match_a_pass_over_the_reads():
    """bytes_left / bytes_for_next_layer / largest_read come from precomputed sums: they must equal
    the plain definitions at every step, for layer-ordered and unordered read lists."""
    import random

    from sglang_objectcache.engine.policy import RequestState

    rng = random.Random(3)
    for ordered in (True, False):
        reads = [(rng.randrange(1, 9) << 20, l, l + 2) for l in range(0, 32, 2) for _ in range(3)]
        if not ordered:
            rng.shuffle(reads)
        r = RequestState("r", 0.0, list(reads), 32, 0.001)
        assert r.largest_read == max(n for n, _, _ in reads)
        while not r.done:
            k = reads[r.next_read][1]
            assert r.bytes_left == r.left_in_read + sum(n for n, _, _ in reads[r.next_read + 1:])
            assert r.bytes_for_next_layer() == r.left_in_read + sum(
                n for n, l0, _ in reads[r.next_read + 1:] if l0 <= k)
            r.advance(r.left_in_read, 1.0)
        assert r.bytes_left == 0 and r.bytes_for_next_layer() == 0


def test_without_a_compute_time_slack_picks_as_srpt_does():
    """SGLang passes no compute time per layer (t_layer = 0): the README says `slack` then orders
    requests exactly as `srpt`. Same pick at every step of random mixes, part-way through reads too."""
    import random

    rng = random.Random(7)
    slack, srpt = POLICIES["slack"], POLICIES["srpt"]
    for trial in range(200):
        now = 10.0
        reqs = [req(f"r{i}", pages=8 * rng.randrange(1, 9), arrival=rng.uniform(0, now), t_layer=0.0,
                    group=rng.choice([1, 2, 4, 8])) for i in range(rng.randrange(2, 6))]
        for r in reqs:  # some reads already landed
            for _ in range(rng.randrange(0, len(r.reads) - 1)):
                r.advance(r.left_in_read, rng.uniform(r.arrival, now))
        rate = rng.choice([0.25, 1.0, 8.0]) * (1 << 30)
        assert slack.shares(reqs, now, rate) == srpt.shares(reqs, now, rate), trial
