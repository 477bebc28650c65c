"""Operator commands over the S3 tier of a config: see, size, collect and check what is stored.

    objectcache ls objectcache.yaml [--json]
    objectcache du objectcache.yaml [--json]
    objectcache gc objectcache.yaml [--namespace MODEL/FP] [--dry-run] [--capacity SIZE] [--older-than AGE]
    objectcache verify objectcache.yaml [--namespace MODEL/FP] [--sample N]

A namespace is `<prefix>/<model>/<fingerprint>/`: one model, dtype and geometry (docs/format.md).
`gc` runs the same pass as the backend's collector and takes the same lease, so it never runs
beside another collector unless told to (`--force`). Tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

PARTS = {"d": "data", "m": "manifests", "k": "checkpoints", "g": "leases", "c": "clock"}


@dataclass
class NamespaceUsage:
    root: str
    objects: int = 0  # data objects
    bytes: dict = field(default_factory=dict)  # part -> bytes
    counts: dict = field(default_factory=dict)  # part -> objects
    last_write: float = 0.0  # newest data object's Last-Modified

    def row(self) -> dict:
        return {"namespace": self.root, "objects": self.objects, "bytes": sum(self.bytes.values()),
                "data_bytes": self.bytes.get("data", 0), "last_write": self.last_write,
                "bytes_by_part": self.bytes, "objects_by_part": self.counts}


class Progress:
    """A counter on stderr, redrawn at most 10 times a second; silent when stderr is not a terminal."""

    def __init__(self, what: str, total: int | None = None):
        self.what, self.total, self.n, self._t = what, total, 0, 0.0
        self.on = sys.stderr.isatty()

    def step(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.on and now - self._t > 0.1:
            self._t = now
            of = f"/{self.total}" if self.total else ""
            print(f"\r{self.what}: {self.n}{of}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.on:
            print(f"\r{self.what}: {self.n}{'/' + str(self.total) if self.total else ''} done", file=sys.stderr)


def _s3(cfg):
    from ..config import S3TierConfig

    t = next((t for t in cfg.tiers if isinstance(t, S3TierConfig)), None)
    if t is None:
        raise SystemExit("error: the config has no s3 tier")
    return t


async def _usage(store, prefix: str) -> dict[str, NamespaceUsage]:
    """Every namespace under `prefix`, from one listing."""
    out: dict[str, NamespaceUsage] = {}
    base = f"{prefix}/" if prefix else ""
    progress = Progress("listing")
    for e in await store.list(base):
        rest = e.path[len(base):].split("/")
        if len(rest) < 4:
            continue
        root = base + "/".join(rest[:2]) + "/"
        part = PARTS.get(rest[2], "other")
        u = out.setdefault(root, NamespaceUsage(root))
        u.bytes[part] = u.bytes.get(part, 0) + e.size
        u.counts[part] = u.counts.get(part, 0) + 1
        if part == "data":
            u.objects += 1
            u.last_write = max(u.last_write, e.modified)
        progress.step()
    progress.done()
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _load(args):
    from ..config import load_config_file
    from ..errors import ConfigError

    try:
        return load_config_file(args.config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _store(t):
    from ..stores.factory import build_store

    return build_store(t, "tiers[s3]")


def _namespace_usage(args) -> dict[str, NamespaceUsage]:
    """Every namespace under the config's S3 prefix, from one listing."""
    t = _s3(_load(args))

    async def run():
        store = _store(t)
        try:
            return await _usage(store, t.prefix)
        finally:
            await store.close()
    return asyncio.run(run())


def cmd_ls(args) -> int:
    usage = _namespace_usage(args)
    if args.json:
        print(json.dumps([u.row() for u in usage.values()], indent=1))
        return 0
    rows = [["NAMESPACE", "OBJECTS", "BYTES", "LAST WRITE (UTC)"]]
    rows += [[u.root, str(u.objects), _size(sum(u.bytes.values())), _when(u.last_write)] for u in usage.values()]
    _table(rows)
    return 0


def cmd_du(args) -> int:
    usage = _namespace_usage(args)
    if args.json:
        print(json.dumps({"namespaces": [u.row() for u in usage.values()],
                          "total_bytes": sum(sum(u.bytes.values()) for u in usage.values())}, indent=1))
        return 0
    parts = ["data", "manifests", "checkpoints", "other"]
    rows = [["NAMESPACE"] + [p.upper() for p in parts] + ["TOTAL"]]
    for u in usage.values():
        rows.append([u.root] + [_size(u.bytes.get(p, 0)) for p in parts] + [_size(sum(u.bytes.values()))])
    rows.append(["total"] + [_size(sum(u.bytes.get(p, 0) for u in usage.values())) for p in parts]
                + [_size(sum(sum(u.bytes.values()) for u in usage.values()))])
    _table(rows)
    return 0


def _namespaces(usage: dict, wanted: str | None, prefix: str) -> list[str]:
    if wanted is None:
        return list(usage)
    root = (f"{prefix}/" if prefix else "") + wanted.strip("/") + "/"
    if root not in usage:
        raise SystemExit(f"error: no namespace {root} (see `objectcache ls`)")
    return [root]


def _tier(t, root: str):
    from ..engine.tiers import S3Tier
    from ..keys import Namespace

    model, fp = root[:-1].split("/")[-2:]
    ns = Namespace(t.prefix, model, fp)
    assert ns.root == root, (ns.root, root)
    return S3Tier(t.name, _store(t), ns, max_connections=t.max_connections,
                  max_write_connections=t.max_write_connections, refresh_interval=3600.0,
                  flush_interval=3600.0, startup_timeout=max(60.0, 3 * t.request_timeout),
                  capacity=t.capacity, max_age=t.max_age, gc_interval=t.gc_interval)


def cmd_gc(args) -> int:
    from ..config import parse_duration, parse_size
    from ..errors import ConfigError

    t = _s3(_load(args))
    try:
        capacity = parse_size(args.capacity, "--capacity") if args.capacity else t.capacity
        max_age = parse_duration(args.older_than, "--older-than") if args.older_than else t.max_age
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if capacity is None and max_age is None:
        raise SystemExit("error: nothing to collect by: give --capacity or --older-than, or set capacity or "
                         "max_age on the s3 tier")

    async def run():
        store = _store(t)
        try:
            roots = _namespaces(await _usage(store, t.prefix), args.namespace, t.prefix)
        finally:
            await store.close()
        out = []
        for root in roots:
            tier = _tier(t, root)
            await tier.journal.start(tier.startup_timeout)
            try:
                if not args.force and not args.dry_run and not await tier.collector.take_lease():
                    out.append({"namespace": root, "skipped": "another collector holds the lease (--force to run anyway)"})
                    continue
                r = await tier.collector.run_once(capacity=capacity, max_age=max_age, dry_run=args.dry_run)
                out.append({"namespace": root, **r.to_dict()})
            finally:
                await tier.stop()
        return out
    rows = asyncio.run(run())
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = [["NAMESPACE", "OBJECTS", "BYTES", "UNINDEXED", "DELETED" + (" (DRY RUN)" if args.dry_run else ""),
              "DELETED BYTES", "PAST MAX AGE"]]
    for r in rows:
        if "skipped" in r:
            table.append([r["namespace"], "-", "-", "-", r["skipped"], "", ""])
        else:
            table.append([r["namespace"], str(r["objects"]), _size(r["bytes"]), str(r["unindexed"]), str(r["deleted"]),
                          _size(r["deleted_bytes"]), str(r["expired"])])
    _table(table)
    return 0


def cmd_verify(args) -> int:
    from ..errors import CorruptObject, StoreError
    from ..format import decode_header, verify_piece

    t = _s3(_load(args))

    async def run():
        store = _store(t)
        try:
            roots = _namespaces(await _usage(store, t.prefix), args.namespace, t.prefix)
            names = [e.path for root in roots for e in await store.list(root + "d/")]
            if args.sample and args.sample < len(names):
                names = random.sample(names, args.sample)
            bad, progress = [], Progress("verifying", len(names))
            for name in names:
                try:
                    data = await store.get(name)
                    h = decode_header(data)
                    for layer in range(h.n_layers):
                        for slot in range(h.n_pages):
                            verify_piece(h, data, 0, layer, slot)
                except (CorruptObject, StoreError) as e:
                    bad.append({"object": name, "error": str(e)})
                progress.step()
            progress.done()
            return len(names), bad
        finally:
            await store.close()
    checked, bad = asyncio.run(run())
    if args.json:
        print(json.dumps({"checked": checked, "failed": bad}, indent=1))
    else:
        print(f"checked {checked} objects: {len(bad)} failed")
        for b in bad:
            print(f"  {b['object']}: {b['error']}")
    return 1 if bad else 0


def add_parsers(sub) -> None:
    def common(p, namespace: bool = False):
        p.add_argument("config", help="the objectcache YAML/JSON config (its s3 tier)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if namespace:
            p.add_argument("--namespace", help="MODEL/FINGERPRINT below the prefix (default: every namespace)")

    p = sub.add_parser("ls", help="namespaces in the bucket: objects, bytes, last write")
    common(p)
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("du", help="bytes per namespace: data, manifests, checkpoints")
    common(p)
    p.set_defaults(fn=cmd_du)
    p = sub.add_parser("gc", help="garbage-collect namespaces by capacity and age (as the backend's collector)")
    common(p, namespace=True)
    p.add_argument("--dry-run", action="store_true", help="report what would go; delete nothing")
    p.add_argument("--capacity", help="byte budget per namespace (default: the config's)")
    p.add_argument("--older-than", help="delete objects unused this long, e.g. 30d (default: the config's max_age)")
    p.add_argument("--force", action="store_true", help="run even if another collector holds the lease")
    p.set_defaults(fn=cmd_gc)
    p = sub.add_parser("verify", help="read objects and check them against their footers")
    common(p, namespace=True)
    p.add_argument("--sample", type=int, default=0, help="check this many objects at random (default: all)")
    p.set_defaults(fn=cmd_verify)


def main(argv=None) -> int:  # for `python -m sglang_objectcache.cli.ops`
    ap = argparse.ArgumentParser(prog="objectcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.fn(args)
