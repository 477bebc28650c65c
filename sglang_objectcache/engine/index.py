"""What exists where: page key -> (object, slot), for one tier.

Filled by this process's own writes, by scanning a disk tier at start, and by other instances'
manifests for the S3 tier. `batch_exists` is answered from here without a request. A stale
"present" costs one miss: reads verify every byte against the object's checksums, and a read that
finds the object gone removes it (and, for the S3 tier, tells the other instances).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..format import Header


@dataclass(frozen=True)
class ObjectInfo:
    """An object as the index knows it: enough to plan range reads and to verify every piece
    without first fetching the object's footer (the checksums travel in the manifest)."""

    name: str
    keys: tuple[str, ...]
    n_layers: int
    piece_bytes: int
    meta_bytes: int  # footer + trailer after the data
    checksums: bytes = field(repr=False, default=b"")

    @property
    def data_bytes(self) -> int:
        return self.n_layers * len(self.keys) * self.piece_bytes

    @property
    def size(self) -> int:
        return self.data_bytes + self.meta_bytes

    @classmethod
    def from_header(cls, name: str, h: Header) -> "ObjectInfo":
        return cls(name, h.keys, h.n_layers, h.piece_bytes, h.meta_bytes, h.checksums)

    def header(self, fingerprint: str) -> Header:
        """The footer this object must have, as far as the index knows."""
        return Header(fingerprint, self.keys, self.n_layers, self.piece_bytes, self.checksums, self.meta_bytes)

    def to_wire(self, root: str) -> list:
        return [self.name[len(root):], self.n_layers, self.piece_bytes, self.meta_bytes, list(self.keys),
                self.checksums]

    @classmethod
    def from_wire(cls, root: str, w: list) -> "ObjectInfo":
        info = cls(root + w[0], tuple(w[4]), int(w[1]), int(w[2]), int(w[3]), bytes(w[5]))
        if len(info.checksums) != 8 * info.n_layers * len(info.keys):
            raise ValueError(f"manifest entry {w[0]}: checksum table of the wrong size")
        return info


class Index:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[ObjectInfo, int]] = {}
        self._objects: dict[str, ObjectInfo] = {}
        self._banned: dict[str, bytes] = {}  # name -> the checksums it failed against

    def add(self, info: ObjectInfo) -> None:
        with self._lock:
            if info.name in self._banned:
                if self._banned[info.name] == info.checksums:
                    return
                del self._banned[info.name]  # announced with other checksums: the object was rewritten
            self._objects[info.name] = info
            for slot, key in enumerate(info.keys):
                self._by_key[key] = (info, slot)

    def remove(self, name: str) -> ObjectInfo | None:
        with self._lock:
            info = self._objects.pop(name, None)
            if info is not None:
                for key in info.keys:
                    cur = self._by_key.get(key)
                    if cur is not None and cur[0].name == name:
                        del self._by_key[key]
            return info

    def ban(self, name: str) -> None:
        """Forget an object found corrupt, and ignore it if a manifest announces it again with the
        same checksums (other checksums describe other bytes: those are tried)."""
        with self._lock:
            info = self._objects.get(name)
            self._banned[name] = info.checksums if info is not None else b""
        self.remove(name)

    def lookup(self, key: str) -> tuple[ObjectInfo, int] | None:
        return self._by_key.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def has_object(self, name: str) -> bool:
        return name in self._objects

    def clear(self) -> None:
        with self._lock:
            self._banned.clear()
            self._by_key.clear()
            self._objects.clear()

    @property
    def n_pages(self) -> int:
        return len(self._by_key)

    @property
    def n_objects(self) -> int:
        return len(self._objects)
