"""What exists where: page key -> (object, slot), for one tier.

Filled by this process's own writes, by scanning a disk tier at start, and by other instances'
manifests and checkpoints for the S3 tier. `batch_exists` is answered from here without a
request. A stale "present" costs one miss: reads check every byte against the object's footer,
and a read that finds the object gone removes it (and, for the S3 tier, tells the other instances).

Memory is the point of the layout (about 350 bytes per 8-page object, `benchmarks/index.py`): a
long-running namespace holds millions of pages, and every process of every instance holds this
index. So it keeps no Python object per page or per object:

- keys as 64-bit hashes (`keys.key_hash`) in a sorted numpy table, with a small dict of recent
  additions merged into it in batches; a value packs (object id << 16 | slot);
- objects as columns (array.array) by object id, and one name string each;
- no checksums: those stay in each object's footer, which a read gets with the data
  (`tiers.Tier.header`, docs/design.md says why this adds no round trip), and an 8-byte digest of
  the checksum table that says which bytes were announced.
"""

from __future__ import annotations

import struct
import threading
from array import array
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..format import Header
from ..keys import key_hash

MERGE_MIN = 4096  # recent additions kept in a dict before they join the sorted table
SLOT_BITS = 16  # a value is (object id << SLOT_BITS) | slot
MAX_SLOTS = 1 << SLOT_BITS
FOREIGN = "\x00"  # marks a held name outside the index's root (kept whole)


def pack_hashes(keys: Sequence[str]) -> bytes:
    return struct.pack(f"<{len(keys)}Q", *(key_hash(k) for k in keys))


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """An object as the index knows it: enough to plan range reads. `hashes` (the page keys'
    hashes, packed u64) travel with an object being written or announced; the index does not keep
    them per object, so objects it returns have none."""

    name: str
    n_pages: int
    n_layers: int
    piece_bytes: int
    meta_bytes: int  # footer + trailer after the data
    digest: int = 0  # Header.digest: which bytes (0: unknown)
    hashes: bytes = field(repr=False, default=b"")

    @property
    def data_bytes(self) -> int:
        return self.n_layers * self.n_pages * self.piece_bytes

    @property
    def size(self) -> int:
        return self.data_bytes + self.meta_bytes

    @classmethod
    def from_header(cls, name: str, h: Header) -> "ObjectInfo":
        return cls(name, h.n_pages, h.n_layers, h.piece_bytes, h.meta_bytes, h.digest, pack_hashes(h.keys))

    def same_shape(self, other: "ObjectInfo") -> bool:
        return (self.n_pages, self.n_layers, self.piece_bytes, self.meta_bytes) == (
            other.n_pages, other.n_layers, other.piece_bytes, other.meta_bytes)

    def to_wire(self, root: str) -> list:
        """A manifest entry (format v2: docs/format.md)."""
        return [self.name[len(root):], self.n_layers, self.piece_bytes, self.meta_bytes, self.hashes, self.digest]

    @classmethod
    def from_wire(cls, root: str, w: list) -> "ObjectInfo":
        """A manifest entry, v2 (key hashes and a digest) or v1 (keys and the checksum table)."""
        rel, n_layers, piece, meta, keys, tail = w[:6]
        if isinstance(keys, (bytes, bytearray)):
            hashes, digest = bytes(keys), int(tail)
        else:
            from ..gil_held import xxh3_64
            from ..format import readonly_address

            sums = bytes(tail)
            if len(sums) != 8 * int(n_layers) * len(keys):
                raise ValueError(f"manifest entry {rel}: checksum table of the wrong size")
            hashes, digest = pack_hashes(keys), xxh3_64(readonly_address(sums), len(sums)) if sums else 0
        if not isinstance(rel, str) or len(hashes) % 8 or not 0 < len(hashes) // 8 < MAX_SLOTS:
            raise ValueError(f"manifest entry {rel!r}: bad name or key count")
        return cls(root + rel, len(hashes) // 8, int(n_layers), int(piece), int(meta), digest, hashes)


class Index:
    def __init__(self, root: str = "") -> None:
        self.root = root  # names are held without it
        self._lock = threading.Lock()
        self._names: list[str | None] = []  # by object id; None once removed
        self._ids: dict[str, int] = {}  # name (without root) -> object id, live objects only
        self._pages, self._layers = array("H"), array("H")
        self._piece, self._meta = array("I"), array("I")
        self._digest = array("Q")
        self._used = array("I")  # seconds since the epoch (server time) of the last known use; 0: unknown
        self._alive = array("B")
        self._keys = np.empty(0, np.uint64)  # sorted key hashes
        self._vals = np.empty(0, np.uint64)  # (object id << SLOT_BITS) | slot
        self._recent: dict[int, int] = {}  # key hash -> value, newer than the sorted table
        self._banned: dict[str, int] = {}  # name -> the digest it failed against
        self._live_pages = 0
        self.added_bytes = 0  # bytes of the objects ever added (new ones only): what was written since

    # ---- names ----------------------------------------------------------------------------

    def _rel(self, name: str) -> str:
        """A name as held: without the root; one outside it (never ours) marked, kept whole."""
        return name[len(self.root):] if name.startswith(self.root) else FOREIGN + name

    def _full(self, rel: str) -> str:
        return rel[1:] if rel.startswith(FOREIGN) else self.root + rel

    def _info(self, oid: int) -> ObjectInfo:
        return ObjectInfo(self._full(self._names[oid]), self._pages[oid], self._layers[oid], self._piece[oid],
                          self._meta[oid], self._digest[oid])

    # ---- changes --------------------------------------------------------------------------

    def add(self, info: ObjectInfo, used: int = 0) -> None:
        """Index an object under its key hashes (info.hashes), last used at second `used`. The same
        object announced again costs nothing; one announced with another digest or shape replaces
        the old entry."""
        n = len(info.hashes) // 8
        if n != info.n_pages or not 0 < n < MAX_SLOTS:
            raise ValueError(f"{info.name}: {n} key hashes for {info.n_pages} pages")
        rel = self._rel(info.name)
        with self._lock:
            banned = self._banned.get(rel)
            if banned is not None:
                if banned == info.digest:
                    return
                del self._banned[rel]  # announced with other bytes: the object was rewritten
            old = self._ids.get(rel)
            if old is not None:
                if self._digest[old] == info.digest and self._info(old).same_shape(info):
                    self._used[old] = max(self._used[old], used)
                    return
                self._drop(old)
            oid = len(self._names)
            self._names.append(rel)
            self._ids[rel] = oid
            self._pages.append(n)
            self._layers.append(info.n_layers)
            self._piece.append(info.piece_bytes)
            self._meta.append(info.meta_bytes)
            self._digest.append(info.digest)
            self._used.append(used)
            self._alive.append(1)
            self._live_pages += n
            self.added_bytes += info.size
            base = oid << SLOT_BITS
            for slot, h in enumerate(struct.unpack(f"<{n}Q", info.hashes)):
                self._recent[h] = base | slot
            if len(self._recent) > max(MERGE_MIN, len(self._keys) >> 3):
                self._merge()

    def _drop(self, oid: int) -> None:
        """Under the lock: object `oid` is no longer held (its keys stop resolving at once; the
        table forgets them at the next merge)."""
        rel = self._names[oid]
        self._names[oid] = None
        self._ids.pop(rel, None)
        self._alive[oid] = 0
        self._live_pages -= self._pages[oid]

    def _merge(self) -> None:
        """Under the lock: fold the recent additions into the sorted table (a recent value of a key
        replaces the table's), in time linear in the table (lookups wait for it); keys of removed
        objects leave once they are a quarter of the table, and ids are renumbered once most are
        dead."""
        if self._recent:
            n = len(self._recent)
            rk = np.fromiter(self._recent.keys(), np.uint64, n)
            rv = np.fromiter(self._recent.values(), np.uint64, n)
            self._recent = {}
            order = np.argsort(rk)
            rk, rv = rk[order], rv[order]
            pos = np.searchsorted(self._keys, rk)
            known = pos < len(self._keys)
            known[known] = self._keys[pos[known]] == rk[known]
            if known.any():
                self._vals = self._vals.copy()
                self._vals[pos[known]] = rv[known]
            fresh = ~known
            self._keys = np.insert(self._keys, pos[fresh], rk[fresh])
            self._vals = np.insert(self._vals, pos[fresh], rv[fresh])
        if (len(self._names) - len(self._ids)) * 4 > len(self._names):
            self._compact()

    def _compact(self) -> None:
        """Under the lock, right after a merge: drop the keys of removed objects and give live
        objects dense ids again."""
        alive = np.frombuffer(self._alive, np.uint8).astype(bool)
        keep = alive[(self._vals >> SLOT_BITS).astype(np.int64)]
        self._keys, self._vals = self._keys[keep], self._vals[keep]
        new_id = np.cumsum(alive, dtype=np.int64) - 1
        oid = (self._vals >> SLOT_BITS).astype(np.int64)
        self._vals = (new_id[oid].astype(np.uint64) << SLOT_BITS) | (self._vals & (MAX_SLOTS - 1))
        live = np.flatnonzero(alive)
        for col in ("_pages", "_layers", "_piece", "_meta", "_digest", "_used"):
            old = getattr(self, col)
            setattr(self, col, array(old.typecode, np.frombuffer(old, old.typecode)[live].tobytes()
                                     if len(old) else b""))
        self._names = [self._names[i] for i in live]
        self._ids = {rel: i for i, rel in enumerate(self._names)}
        self._alive = array("B", b"\x01" * len(self._names))

    def remove(self, name: str) -> ObjectInfo | None:
        with self._lock:
            oid = self._ids.get(self._rel(name))
            if oid is None:
                return None
            info = self._info(oid)
            self._drop(oid)
            return info

    def ban(self, name: str) -> None:
        """Forget an object found corrupt, and ignore it if a manifest announces it again with the
        same digest (another digest describes other bytes: those are tried)."""
        rel = self._rel(name)
        with self._lock:
            oid = self._ids.get(rel)
            self._banned[rel] = self._digest[oid] if oid is not None else 0
            if oid is not None:
                self._drop(oid)

    def clear(self) -> None:
        with self._lock:
            added = self.added_bytes
            self.__init__(self.root)
            self.added_bytes = added

    # ---- queries --------------------------------------------------------------------------

    def _find(self, h: int) -> int | None:
        """Under the lock: the live value of key hash h."""
        v = self._recent.get(h)
        if v is None:
            i = int(np.searchsorted(self._keys, np.uint64(h)))
            if i == len(self._keys) or int(self._keys[i]) != h:
                return None
            v = int(self._vals[i])
        return v if self._alive[v >> SLOT_BITS] else None

    def lookup(self, key: str) -> tuple[ObjectInfo, int] | None:
        h = key_hash(key)
        with self._lock:
            v = self._find(h)
            return None if v is None else (self._info(v >> SLOT_BITS), v & (MAX_SLOTS - 1))

    def __contains__(self, key: str) -> bool:
        h = key_hash(key)
        with self._lock:
            return self._find(h) is not None

    def touch(self, name: str, second: int) -> None:
        """The object was used (written, read) at `second` (since the epoch): what garbage
        collection orders by."""
        with self._lock:
            oid = self._ids.get(self._rel(name))
            if oid is not None and second > self._used[oid]:
                self._used[oid] = second

    def used(self, name: str) -> int | None:
        """The second of the object's last known use (0: unknown); None if not held."""
        with self._lock:
            oid = self._ids.get(self._rel(name))
            return None if oid is None else self._used[oid]

    def has_object(self, name: str) -> bool:
        return self._rel(name) in self._ids

    def get(self, name: str) -> ObjectInfo | None:
        with self._lock:
            oid = self._ids.get(self._rel(name))
            return None if oid is None else self._info(oid)

    def objects(self) -> list[ObjectInfo]:
        """Every object held (without key hashes)."""
        with self._lock:
            return [self._info(oid) for oid in self._ids.values()]

    @property
    def n_pages(self) -> int:
        return self._live_pages

    @property
    def n_objects(self) -> int:
        return len(self._ids)

    # ---- checkpoints ----------------------------------------------------------------------

    def export(self) -> dict:
        """The live objects and their keys as columns (a checkpoint's body, docs/format.md)."""
        with self._lock:
            self._merge()
            if len(self._names) != len(self._ids):  # checkpoints hold live objects only, with dense ids
                self._compact()
            return {"names": list(self._names), "pages": self._pages.tobytes(), "layers": self._layers.tobytes(),
                    "piece": self._piece.tobytes(), "meta": self._meta.tobytes(), "digest": self._digest.tobytes(),
                    "used": self._used.tobytes(), "keys": self._keys.tobytes(), "vals": self._vals.tobytes()}

    def load(self, cols: dict) -> int:
        """Add the objects of a checkpoint (`export`'s columns) to what is held; returns how many.
        ValueError where the columns do not fit together."""
        names = cols["names"]
        n = len(names)
        pages, layers = array("H", cols["pages"]), array("H", cols["layers"])
        piece, meta, digest = array("I", cols["piece"]), array("I", cols["meta"]), array("Q", cols["digest"])
        used = array("I", cols["used"]) if "used" in cols else array("I", bytes(4 * n))
        keys, vals = np.frombuffer(cols["keys"], np.uint64), np.frombuffer(cols["vals"], np.uint64)
        if any(len(c) != n for c in (pages, layers, piece, meta, digest, used)) or len(keys) != len(vals) or \
                not all(isinstance(x, str) for x in names):
            raise ValueError("checkpoint columns of different lengths")
        if len(keys) and (int((vals >> SLOT_BITS).max()) >= n or (keys[1:] <= keys[:-1]).any()):
            raise ValueError("checkpoint key table out of order or out of range")
        with self._lock:
            if not self._names:  # the usual case, a new instance: take the columns as they are
                self._names, self._ids = list(names), {rel: i for i, rel in enumerate(names)}
                self._pages, self._layers, self._piece, self._meta, self._digest = pages, layers, piece, meta, digest
                self._used = used
                self._alive = array("B", b"\x01" * n)
                self._keys, self._vals = keys.copy(), vals.copy()
                self._live_pages = sum(pages)
                return n
        # something is held already: add the checkpoint's objects one by one (rare: a restart of the journal)
        per: dict[int, list] = {}
        for k, v in zip(keys.tolist(), vals.tolist()):
            per.setdefault(v >> SLOT_BITS, [None] * pages[v >> SLOT_BITS])[v & (MAX_SLOTS - 1)] = k
        for i, rel in enumerate(names):
            hashes = per.get(i)
            if hashes is not None and None not in hashes:
                self.add(ObjectInfo(self._full(rel), pages[i], layers[i], piece[i], meta[i], digest[i],
                                    struct.pack(f"<{len(hashes)}Q", *hashes)), used[i])
        return n
