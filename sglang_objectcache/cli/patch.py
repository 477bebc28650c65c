"""`objectcache patch-sglang [--check | --revert]`: the patch set for SGLang 0.5.17 (layer-wise
streaming, storage namespaces).

Checks the installed SGLang's version first, then applies `patches/sglang-<version>/` strictly
(every hunk matches exactly, or nothing is written); running it twice changes nothing.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("patch-sglang", help="apply the patch set (layer-wise streaming, storage namespaces) to the installed SGLang")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="report whether the patch is applied; write nothing")
    g.add_argument("--revert", action="store_true", help="restore SGLang's original files")
    p.set_defaults(fn=run)


def run(args) -> int:
    from ..errors import PatchError, UnsupportedSGLang
    from ..sglang.compat import sglang_version
    from ..sglang.patcher import apply, state

    try:
        version = sglang_version()
        st = state(version)
        if args.check:
            what = {"applied": "applied", "clean": "not applied",
                    "outdated": "from another release of sglang-objectcache; run `objectcache patch-sglang`"}
            print(f"sglang {version}: patch set {what[st]}")
            return 0 if st == "applied" else 1
        written = apply(version, reverse=args.revert)
    except (PatchError, UnsupportedSGLang, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verb = "reverted" if args.revert else "applied"
    if not written:
        print(f"sglang {version}: patch set already {verb}; nothing to do")
    for path in written:
        print(f"{verb}: {path}")
    return 0
