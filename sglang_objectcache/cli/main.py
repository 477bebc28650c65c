"""`objectcache`: check a config, look inside an object, report versions.

    objectcache check-config objectcache.yaml [--probe]
    objectcache inspect /var/cache/objectcache/<...>/d/<key>-8 [--verify]
    objectcache version
    objectcache patch-sglang [--check | --revert]
    objectcache ls|du|gc|verify objectcache.yaml ...   (operator commands: cli/ops.py)
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def _check_config(args) -> int:
    from ..config import load_config_file
    from ..errors import ConfigError

    try:
        cfg = load_config_file(args.file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"write_policy={cfg.write_policy} pages_per_object={cfg.pages_per_object} "
          f"read_range_bytes={cfg.read_range_bytes} timeout={cfg.timeout}s verify={cfg.verify_checksums}")
    for i, t in enumerate(cfg.tiers):
        print(f"tiers[{i}]: {t}")
    if not args.probe:
        return 0
    from ..errors import StartupError
    from ..stores.factory import build_store, probe

    async def run() -> None:
        import uuid

        from ..errors import StoreError

        for i, t in enumerate(cfg.tiers):
            where = f"tiers[{i}]"
            if t.kind == "s3":
                print(f"{where}: checking {t.name} at {t.endpoint or 'AWS'} (each request times out after "
                      f"{t.request_timeout:g} s) ...", file=sys.stderr, flush=True)
            store = build_store(t, where)
            try:
                await probe(store, t, where, "objectcache-check/", create=False)  # a check creates nothing
                name = f"objectcache-check/{uuid.uuid4().hex}"
                try:  # read, write and delete, with one probe object it removes
                    await store.put(name, b"objectcache check", create_only=False)
                    if bytes(await store.get(name)) != b"objectcache check":
                        raise StartupError(f"{where}: a probe object read back different bytes")
                    await store.delete([name])
                except StoreError as e:
                    raise StartupError(f"{where}: listing works but writing or deleting a probe object does not "
                                       f"({e}); the backend needs read, write, list and delete") from None
            finally:
                await store.close()
            print(f"tiers[{i}]: reachable (list, write, read, delete)")

    try:
        asyncio.run(run())
    except (StartupError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _inspect(args) -> int:
    from ..errors import CorruptObject
    from ..format import decode_meta, verify_piece

    try:
        data = open(args.path, "rb").read()
    except OSError as e:
        print(f"error: cannot read {args.path} ({e.strerror})", file=sys.stderr)
        return 2
    try:
        h = decode_meta(data)
    except CorruptObject as e:
        print(f"corrupt: {e}")
        return 1
    print(f"fingerprint {h.fingerprint}\npages {h.n_pages} layers {h.n_layers} piece {h.piece_bytes} bytes\n"
          f"data {h.data_bytes} bytes + footer {h.meta_bytes} bytes = {h.size} (file {len(data)})")
    for k in h.keys:
        print(f"  {k}")
    if args.verify:
        try:
            if len(data) != h.size:
                raise CorruptObject(f"file is {len(data)} bytes, header says {h.size}")
            for layer in range(h.n_layers):
                for slot in range(h.n_pages):
                    verify_piece(h, data, 0, layer, slot)
        except CorruptObject as e:
            print(f"corrupt: {e}")
            return 1
        print("all checksums match")
    return 0


def _version(_args) -> int:
    from .. import __version__
    from ..errors import PatchError, UnsupportedSGLang
    from ..sglang.compat import SUPPORTED, sglang_version

    try:
        v = sglang_version()
        ok = "supported" if v in SUPPORTED else f"NOT supported (supported: {', '.join(SUPPORTED)})"
    except UnsupportedSGLang as e:
        v, ok = "-", str(e)
    print(f"sglang-objectcache {__version__}; sglang {v}: {ok}")
    from ..sglang.patcher import available_versions, state

    if v in available_versions():
        try:
            st = state(v)
            print("patch set (layer-wise streaming, storage namespaces): "
                  f"{'not applied' if st == 'clean' else st} (objectcache patch-sglang)")
        except PatchError as e:
            print(f"patch set: {e}")
    from .. import native

    from ..stores import nixl_reader

    print(f"copies and checksums: {native.status()}")
    print(f"https range reads: {native.tls_status()}")
    print(f"transport nixl: {nixl_reader.available() or 'available (nixl-cu12)'}")
    if v != "-":
        from ..sglang import page_hash

        print(f"SGLang's page-hash extension: {page_hash.status()}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="objectcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check-config", help="validate a YAML/JSON config; --probe also reaches every tier")
    p.add_argument("file")
    p.add_argument("--probe", action="store_true",
                   help="also reach every tier: list, write, read and delete one probe object (creates nothing else)")
    p.set_defaults(fn=_check_config)
    p = sub.add_parser("inspect", help="print an object's header; --verify checks every piece")
    p.add_argument("path")
    p.add_argument("--verify", action="store_true", help="check every piece against its checksum")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser("version", help="package and SGLang versions")
    p.set_defaults(fn=_version)
    from .bench import add_parser as _add_bench

    _add_bench(sub)
    from . import ops, patch

    patch.add_parser(sub)
    ops.add_parsers(sub)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
