"""Fetch plans: one request's matched pages as range reads in the order the GPU consumes layers.

The request's pages sit in a few objects (spans of consecutive pages, possibly in different
tiers). Each object is read in layer groups: a range holds whole layers of all its pages, about
`range_bytes` long (the paper aimed at 4-16 MiB per transfer and never merged layers past that, to
keep the first layer early). Reads are ordered by first layer across objects, so group 0 of every
object comes before group 1 of any. Every byte of every needed object is read exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .index import ObjectInfo



@dataclass
class PlannedObject:
    tier: object  # engine.tiers.Tier
    info: ObjectInfo
    first: int  # index in the request's key list of the first page wanted from this object
    slots: list[int]  # object slots wanted, consecutive, in request order


@dataclass(frozen=True)
class Read:
    obj: int  # index into FetchPlan.objects
    start: int
    end: int  # exclusive
    l0: int  # first layer
    l1: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class FetchPlan:
    objects: list[PlannedObject]
    reads: list[Read]
    n_layers: int

    def pending_per_layer(self) -> list[int]:
        """How many reads carry each layer: layer l is ready when all of them have arrived."""
        counts = [0] * self.n_layers
        for r in self.reads:
            for layer in range(r.l0, r.l1):
                counts[layer] += 1
        return counts

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)


def object_ranges(info: ObjectInfo, range_bytes: int) -> list[tuple[int, int, int, int]]:
    """(start, end, l0, l1) of one object: whole when its data fits one range (footer included,
    and checked), else layer groups of about range_bytes, aligned to layer blocks (the server
    stores an object in aligned chunks). A footer not held is asked for beside the data, never
    before it (`read.ReadSession`)."""
    if info.data_bytes <= range_bytes:
        return [(0, info.size, 0, info.n_layers)]
    block = info.n_pages * info.piece_bytes  # one layer of every page of the object
    per = max(1, range_bytes // block)
    return [(l0 * block, min(l0 + per, info.n_layers) * block, l0, min(l0 + per, info.n_layers))
            for l0 in range(0, info.n_layers, per)]


def plan_fetch(objects: list[PlannedObject], n_layers: int, range_bytes: int) -> FetchPlan:
    reads = []
    for i, o in enumerate(objects):
        reads.extend(Read(i, s, e, a, b) for s, e, a, b in object_ranges(o.info, range_bytes))
    reads.sort(key=lambda r: (r.l0, r.obj))  # by first layer, then request order
    return FetchPlan(objects, reads, n_layers)
