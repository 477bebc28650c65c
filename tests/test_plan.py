"""Fetch plans and per-layer readiness (no network)."""

from __future__ import annotations

import threading
import time

import pytest

from sglang_objectcache.engine.index import ObjectInfo
from sglang_objectcache.engine.plan import META, PlannedObject, plan_fetch
from sglang_objectcache.engine.readiness import LayerReadiness

L, P = 32, 256 << 10  # Llama-3.1-8B: 32 layers, 256 KiB per page per layer


def obj(n_pages: int, name: str = "o", checksums: bool = True) -> ObjectInfo:
    return ObjectInfo(name, tuple(f"{name}{i}" for i in range(n_pages)), L, P, 3000,
                      bytes(8 * L * n_pages) if checksums else b"")


def planned(*infos, trusted=True):
    return [PlannedObject(None, info, 0, list(range(len(info.keys))), trusted) for info in infos]


def test_layer_order_exact_coverage_and_range_sizes():
    infos = [obj(8, "a"), obj(8, "b"), obj(3, "c")]
    plan = plan_fetch(planned(*infos), L, 8 << 20)
    # group g of every object before group g+1 of any
    firsts = [r.l0 for r in plan.reads]
    assert firsts == sorted(firsts)
    for i, info in enumerate(infos):
        reads = sorted((r for r in plan.reads if r.obj == i), key=lambda r: r.start)
        # contiguous, exactly the data bytes, no footer read (checksums are in the index)
        assert reads[0].start == 0 and reads[-1].end == info.data_bytes
        assert all(a.end == b.start for a, b in zip(reads, reads[1:]))
        assert all(r.l0 != META for r in reads)
        block = len(info.keys) * P
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


def test_untrusted_objects_read_their_footer_first():
    a, b = obj(8, "a"), obj(8, "b", checksums=False)
    plan = plan_fetch(planned(a) + planned(b, trusted=True), L, 8 << 20)
    assert plan.reads[0].l0 == META and plan.reads[0].obj == 1  # b has no checksums in the index
    plan = plan_fetch(planned(a, trusted=False), L, 8 << 20)
    assert plan.reads[0] == plan.reads[0].__class__(0, a.data_bytes, a.size, META, META)


@pytest.mark.parametrize("range_mib", [1, 2, 4, 16])
def test_range_size_follows_the_target_without_merging_past_it(range_mib):
    plan = plan_fetch(planned(obj(8)), L, range_mib << 20)
    layers_per_read = max(1, (range_mib << 20) // (8 * P))
    assert all(r.l1 - r.l0 == layers_per_read for r in plan.reads)


def _band(plan, conc: int) -> int:
    """The widest span of layers among `conc` reads started together in plan order, as the
    scheduler starts them (each next read when one ends): the layers that land together."""
    return max(max(r.l1 for r in plan.reads[i:i + conc]) - min(r.l0 for r in plan.reads[i:i + conc])
               for i in range(0, len(plan.reads), conc))


def test_read_waves_cut_a_small_prefix_into_layer_bands():
    small = [obj(8, f"o{i}") for i in range(8)]  # a 4K-token Llama prefix: 8 objects, 512 MiB
    plain = plan_fetch(planned(*small), L, 16 << 20)
    waved = plan_fetch(planned(*small), L, 16 << 20, min_reads=4 * 32)
    assert len(plain.reads) == 32 and _band(plain, 32) == L  # every layer in flight at once
    assert len(waved.reads) == 128 and {r.l1 - r.l0 for r in waved.reads} == {2}
    assert _band(waved, 32) == 8  # 32 connections hold 8 layers at a time
    assert waved.nbytes == plain.nbytes and waved.pending_per_layer() == [8] * L
    # one layer per range is the floor, however many reads are asked for
    assert {r.l1 - r.l0 for r in plan_fetch(planned(*small), L, 16 << 20, min_reads=10_000).reads} == {1}


def test_read_waves_leave_a_large_prefix_alone():
    big = planned(*[obj(8, f"o{i}") for i in range(32)])  # 16K tokens: as many objects as connections
    assert plan_fetch(big, L, 16 << 20, min_reads=4 * 32).reads == plan_fetch(big, L, 16 << 20).reads


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


def test_a_small_first_range_brings_layer_zero_of_every_object_first():
    infos = [obj(8, "a"), obj(8, "b")]  # 2 MiB a layer: 16 MiB ranges hold 8 layers
    plan = plan_fetch(planned(*infos), L, 16 << 20, first_layers=1)
    # first the one-layer ranges of both objects, then the rest of the first group; the 8-layer
    # groups after it start where they would without it (aligned to the server's chunks)
    assert [(r.obj, r.l0, r.l1) for r in plan.reads[:2]] == [(0, 0, 1), (1, 0, 1)]
    for i, info in enumerate(infos):
        reads = sorted((r for r in plan.reads if r.obj == i), key=lambda r: r.start)
        assert [(r.l0, r.l1) for r in reads] == [(0, 1), (1, 8), (8, 16), (16, 24), (24, 32)]
        assert all(r.start % (16 << 20) == 0 for r in reads[2:])
        assert reads[0].start == 0 and reads[-1].end == info.data_bytes
        assert all(a.end == b.start for a, b in zip(reads, reads[1:]))
    assert plan.pending_per_layer() == [2] * L
    # off, or no smaller than a group: the plan is the plain one
    plain = plan_fetch(planned(*infos), L, 16 << 20)
    assert plan_fetch(planned(*infos), L, 16 << 20, first_layers=8).reads == plain.reads
    assert [(r.l0, r.l1) for r in plain.reads if r.obj == 0] == [(0, 8), (8, 16), (16, 24), (24, 32)]
