"""Checkpoints of the manifest journal: what keeps a new instance's start short however long the
history (the `ManifestJournal` uses these methods; they share its state).

Checkpoints: the journal is folded into checkpoints under `<namespace>/k/`, named by a sequence
number (`<epoch>`), each the index of the instance that wrote it: its live objects and their key
hashes as columns, and a cover time: every manifest named before it is in the checkpoint. Any
instance that has applied `CHECKPOINT_AFTER` manifests (give or take a random share, so that not
all try at once) since the newest checkpoint it knows of writes the next one with a create-only
PUT, so exactly one writer wins each epoch, with nothing to coordinate; the others see the new
epoch and count again. `DELETE_DELAY` after its checkpoint lands, the winner deletes the
manifests it covers and older checkpoints: later than any new instance that read the previous
checkpoint could still be reading those manifests (its start takes at most the startup limit). A
new instance reads the newest checkpoint and the manifests after its cover: a start that does
not grow with the history.
"""

from __future__ import annotations

import asyncio
import logging

import msgpack

from ..errors import AlreadyExists, NotFound, StoreError

log = logging.getLogger("sglang_objectcache")

CHECKPOINT_AFTER = 500  # manifests since the newest checkpoint before an instance writes the next
DELETE_DELAY = 60.0  # seconds from a checkpoint to the deletion of what it covers (twice the startup limit)
# A manifest written at time t may become listable a little after one written at t+d by another
# instance; the journal re-lists this far back (names already seen are skipped), and a checkpoint
# covers only what lies further back than this.
MANIFEST_SKEW_MS = 60_000


def name_ms(path: str, prefix: str) -> int | None:
    """The milliseconds a manifest's name starts with; None for another name."""
    try:
        return int(path[len(prefix):].split("-")[0])
    except ValueError:
        return None


class Checkpoints:
    """Mixed into ManifestJournal: writing, loading and deleting checkpoints."""

    async def _checkpoints(self) -> list[tuple[int, str]]:
        """(epoch, name) of the checkpoints listed, oldest first."""
        async with self.slots.acquire(write=False):
            self.requests["list"] += 1
            listed = await self.store.list(self.ns.checkpoint_prefix)
        out = []
        for path, *_ in listed:
            try:
                out.append((int(path[len(self.ns.checkpoint_prefix):]), path))
            except ValueError:
                pass
        return sorted(out)

    async def load_checkpoint(self, newer_than: int = 0) -> bool:
        """Start from the newest readable checkpoint, if any: its objects into the index, its cover
        as the point from which manifests are read. Also how an instance that could not refresh
        for a while catches up on manifests deleted meanwhile (`newer_than` its newest known)."""
        for epoch, path in reversed(await self._checkpoints()):
            if epoch <= newer_than:
                break
            try:
                async with self.slots.acquire(write=False):
                    self.requests["get"] += 1
                    body = await self.store.get(path)
                doc = await asyncio.to_thread(msgpack.unpackb, bytes(body), raw=False)
                n = await asyncio.to_thread(self.index.load, doc)
                cover = int(doc["cover"])
            except NotFound:
                continue  # deleted meanwhile: an older one may still be there
            except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
                log.warning("s3 tier: skipping unreadable checkpoint %s: %s", path, e)
                continue
            self._epoch, self._since = max(self._epoch, epoch), 0
            self._cover = max(self._cover, cover)
            self._last_ms = max(self._last_ms, cover)
            log.info("s3 tier: checkpoint %d: %d objects", epoch, n)
            return True
        return False

    async def checkpoint(self) -> bool:
        """Write the next checkpoint (create-only: one writer wins each epoch) and, `delete_delay`
        later, delete what it covers. False where another instance wrote one first."""
        newest = max((e for e, _ in await self._checkpoints()), default=0)
        if newest > self._epoch:  # someone else did: count from it
            self._epoch, self._since = newest, 0
            return False
        cover = max(0, self._last_ms - MANIFEST_SKEW_MS)  # every manifest before it was listed and applied...
        for p in self._failed:  # ...except those still being retried
            cover = min(cover, name_ms(p, self.ns.manifest_prefix) or 0)
        cols = await asyncio.to_thread(self.index.export)
        body = await asyncio.to_thread(msgpack.packb, {"v": 1, "cover": cover, "writer": self.writer, **cols},
                                       use_bin_type=True)
        epoch = self._epoch + 1
        try:
            async with self.slots.acquire(write=True):
                self.requests["put"] += 1
                await self.store.put(f"{self.ns.checkpoint_prefix}{epoch:010d}", body, create_only=True)
        except AlreadyExists:
            self._epoch, self._since = epoch, 0
            return False
        self._epoch, self._since = epoch, 0
        log.info("s3 tier: wrote checkpoint %d (%d objects, %.1f MiB)", epoch, len(cols["names"]), len(body) / 2**20)
        self._tasks = [t for t in self._tasks if not t.done()]
        self.deleting = asyncio.create_task(self._delete_covered(epoch, cover))
        self._tasks.append(self.deleting)
        return True

    async def _delete_covered(self, epoch: int, cover: int) -> None:
        """After `delete_delay`: the manifests named before `cover` and the checkpoints before `epoch`."""
        await asyncio.sleep(self.delete_delay)
        try:
            async with self.slots.acquire(write=False):
                self.requests["list"] += 1
                old = [e.path for e in await self.store.list(self.ns.manifest_prefix)
                       if (name_ms(e.path, self.ns.manifest_prefix) or cover) < cover]
            old += [p for e, p in await self._checkpoints() if e < epoch]
            for i in range(0, len(old), 1000):
                async with self.slots.acquire(write=True):
                    self.requests["delete"] += 1
                    await self.store.delete(old[i:i + 1000])
            log.info("s3 tier: deleted %d manifests and checkpoints covered by checkpoint %d", len(old), epoch)
        except StoreError as e:
            log.warning("s3 tier: cannot delete what checkpoint %d covers (the next one will): %s", epoch, e)

    def _maybe_checkpoint(self) -> None:
        if self._since < self.checkpoint_after * self._jitter:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._checkpointing = asyncio.create_task(self._checkpoint_safely())

    async def _checkpoint_safely(self) -> None:
        try:
            await self.checkpoint()
        except StoreError as e:
            self._since = 0  # try again after as many manifests more
            log.warning("s3 tier: cannot write a checkpoint (will retry later): %s", e)
        except Exception:  # noqa: BLE001 - never take the refresh loop down
            self._since = 0
            log.exception("s3 tier: checkpoint failed")

