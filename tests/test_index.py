"""The index's compact tables against a plain dict model: adds, replacements, removals, bans,
merges, renumbering and checkpoint columns must all answer exactly as the dict would."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sglang_objectcache.engine import index as index_mod
from sglang_objectcache.engine.index import Index, ObjectInfo, pack_hashes

ROOT = "p/m/fp/"


def obj(name: str, keys: list[str], digest: int = 7) -> ObjectInfo:
    return ObjectInfo(ROOT + name, len(keys), 4, 8192, 300, digest, pack_hashes(keys))


class Model:
    """What the index must answer: key -> (name, slot), the newest announcement winning."""

    def __init__(self):
        self.by_key: dict[str, tuple[str, int]] = {}
        self.objects: dict[str, list[str]] = {}

    def add(self, name, keys):
        self.remove(name)  # a name announced again with other bytes is that object now
        self.objects[name] = keys
        for slot, k in enumerate(keys):
            self.by_key[k] = (name, slot)

    def remove(self, name):
        self.objects.pop(name, None)
        for k in [k for k, (n, _) in self.by_key.items() if n == name]:
            del self.by_key[k]


def agree(idx: Index, model: Model, keys) -> None:
    for k in keys:
        got = idx.lookup(k)
        want = model.by_key.get(k)
        assert (None if got is None else (got[0].name[len(ROOT):], got[1])) == want, k
        assert (k in idx) == (want is not None)
    assert idx.n_objects == len(model.objects)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_history_matches_a_dict(monkeypatch, seed):
    monkeypatch.setattr(index_mod, "MERGE_MIN", 16)  # merge and renumber often
    rng = random.Random(seed)
    idx, model = Index(ROOT), Model()
    pool = [f"k{i}" for i in range(400)]
    for step in range(3000):
        op = rng.random()
        if op < 0.6:
            name = f"o{rng.randrange(300)}"
            start = rng.randrange(len(pool) - 8)
            keys = pool[start:start + rng.randint(1, 8)]
            idx.add(obj(name, keys, digest=step + 1))  # a new digest: replaces an older object of the name
            model.add(name, keys)
        elif op < 0.9 and model.objects:
            name = rng.choice(sorted(model.objects))
            assert idx.remove(ROOT + name) is not None
            model.remove(name)
        else:
            assert idx.remove(ROOT + f"never{step}") is None
        if step % 97 == 0:
            agree(idx, model, pool)
    agree(idx, model, pool)
    # a checkpoint of it, loaded by a new index, answers the same
    fresh = Index(ROOT)
    assert fresh.load(idx.export()) == len(model.objects)
    agree(fresh, model, pool)
    assert fresh.n_pages == idx.n_pages


def test_replacing_a_key_then_removing_the_newer_object_is_a_miss_not_the_old_one():
    """The model's rule: a key belongs to its newest announcement; once that object goes, the key
    is not stored (the older object may still hold the page, but the index only says what it knows)."""
    idx = Index(ROOT)
    idx.add(obj("a", ["x", "y"]))
    idx.add(obj("b", ["y", "z"]))
    assert idx.lookup("y")[0].name == ROOT + "b"
    idx.remove(ROOT + "b")
    assert idx.lookup("x")[0].name == ROOT + "a"
    assert idx.lookup("z") is None


def test_announcing_the_same_object_again_costs_nothing():
    idx = Index(ROOT)
    for _ in range(1000):
        idx.add(obj("a", ["x", "y"]))
    assert idx.n_objects == 1 and len(idx._names) == 1 and idx.n_pages == 2


def test_names_outside_the_root_stay_outside():
    idx = Index(ROOT)
    other = ObjectInfo("q/other/d/x-1", 1, 4, 8192, 300, 1, pack_hashes(["x"]))
    idx.add(other)
    assert idx.lookup("x")[0].name == "q/other/d/x-1"
    assert idx.has_object("q/other/d/x-1") and not idx.has_object(ROOT + "q/other/d/x-1")


def test_checkpoint_columns_that_do_not_fit_are_refused():
    idx = Index(ROOT)
    idx.add(obj("a", ["x", "y"]))
    cols = idx.export()
    with pytest.raises(ValueError):
        Index(ROOT).load({**cols, "names": []})
    with pytest.raises(ValueError):
        Index(ROOT).load({**cols, "keys": np.frombuffer(cols["keys"], np.uint64)[::-1].tobytes()})  # out of order


def test_loading_a_checkpoint_into_a_held_index_adds_to_it():
    a, b = Index(ROOT), Index(ROOT)
    a.add(obj("a", ["x", "y"]))
    b.add(obj("b", ["z"]))
    assert b.load(a.export()) == 1
    assert b.lookup("x")[0].name == ROOT + "a" and b.lookup("z")[0].name == ROOT + "b"


def test_wire_entries_of_both_manifest_versions():
    info = obj("a", ["x", "y"], digest=99)
    assert ObjectInfo.from_wire(ROOT, info.to_wire(ROOT)) == info
    v1 = ["a", 4, 8192, 300, ["x", "y"], bytes(8 * 4 * 2)]
    old = ObjectInfo.from_wire(ROOT, v1)
    assert old.hashes == info.hashes and old.n_pages == 2 and old.digest != 0
    with pytest.raises(ValueError):
        ObjectInfo.from_wire(ROOT, ["a", 4, 8192, 300, ["x", "y"], bytes(8)])  # v1 table of the wrong size
