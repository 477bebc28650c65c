"""Fetch plans and per-layer readiness (no network)."""

from __future__ import annotations

import threading
import time

import pytest

from sglang_objectcache.engine.index import ObjectInfo
from sglang_objectcache.engine.plan import PlannedObject, plan_fetch
from sglang_objectcache.engine.readiness import LayerReadiness

L, P = 32, 256 << 10  # Llama-3.1-8B: 32 layers, 256 KiB per page per layer


def obj(n_pages: int, name: str = "o") -> ObjectInfo:
    return ObjectInfo(name, n_pages, L, P, 3000)


def planned(*infos):
    return [PlannedObject(None, info, 0, list(range(info.n_pages))) for info in infos]


def test_layer_order_exact_coverage_and_range_sizes():
    infos = [obj(8, "a"), obj(8, "b"), obj(3, "c")]
    plan = plan_fetch(planned(*infos), L, 8 << 20)
    # group g of every object before group g+1 of any
    firsts = [r.l0 for r in plan.reads]
    assert firsts == sorted(firsts)
    for i, info in enumerate(infos):
        reads = sorted((r for r in plan.reads if r.obj == i), key=lambda r: r.start)
        # contiguous, exactly the data bytes, no footer in any range (it is asked for beside them)
        assert reads[0].start == 0 and reads[-1].end == info.data_bytes
        assert all(a.end == b.start for a, b in zip(reads, reads[1:]))
        block = info.n_pages * P
        assert all(r.start % block == 0 and r.nbytes <= 8 << 20 for r in reads)
    # 8-page objects: 4 layers (8 MiB) per range; the 3-page object: 10 layers (7.5 MiB) per range
    assert {r.nbytes for r in plan.reads if r.obj == 0} == {8 << 20}
    assert max(r.l1 - r.l0 for r in plan.reads if r.obj == 2) == 10
    assert plan.pending_per_layer() == [3] * L
    assert plan.nbytes == sum(i.data_bytes for i in infos)


def test_small_objects_are_read_whole_with_their_footer():
    info = obj(1, "s")  # 8 MiB of data fits one range
    plan = plan_fetch(planned(info), L, 8 << 20)
    assert [(r.start, r.end, r.l0, r.l1) for r in plan.reads] == [(0, info.size, 0, L)]


@pytest.mark.parametrize("range_mib", [1, 2, 4, 16])
def test_range_size_follows_the_target_without_merging_past_it(range_mib):
    plan = plan_fetch(planned(obj(8)), L, range_mib << 20)
    layers_per_read = max(1, (range_mib << 20) // (8 * P))
    assert all(r.l1 - r.l0 == layers_per_read for r in plan.reads)


@pytest.fixture(params=["native", "python"])
def counts(request, monkeypatch):
    """Readiness counted by the native helper (shared with the pull threads), or in Python."""
    from sglang_objectcache import native

    if request.param == "python":
        monkeypatch.setattr(native, "layer_words", lambda: None)
    elif native.layer_words() is None:
        pytest.skip("native helper unavailable")


@pytest.mark.usefixtures("counts")
def test_readiness_releases_layers_in_order_and_counts():
    r = LayerReadiness(4, [2, 2, 1, 1])
    assert not r.is_ready(0) and r.ready_layers == 0
    r.arrived(0, 2)
    assert r.ready_layers == 0  # layers 0 and 1 still wait for a second range
    r.arrived(2, 4)
    assert r.is_ready(2) and r.is_ready(3) and r.ready_layers == 0
    r.arrived(0, 2)
    assert r.ready_layers == 4 and r.wait_all(0)


@pytest.mark.usefixtures("counts")
def test_readiness_failure_releases_every_waiter_and_reports_nothing_ready():
    r = LayerReadiness(3, [1, 1, 1])
    r.arrived(0, 1)
    results = []
    threads = [threading.Thread(target=lambda layer=layer: results.append(r.wait(layer, 10))) for layer in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    r.fail("corrupt object x")
    for t in threads:
        t.join(5)
    assert results == [False, False] and r.failed == "corrupt object x"
    assert not r.wait(0, 0) and not r.wait_all(0)
    r.arrived(1, 3)  # late arrivals change nothing
    assert r.ready_layers == 1 and not r.is_ready(2)


@pytest.mark.usefixtures("counts")
def test_readiness_wait_times_out():
    r = LayerReadiness(2, [1, 1])
    t0 = time.monotonic()
    assert not r.wait(1, 0.1) and time.monotonic() - t0 < 1
