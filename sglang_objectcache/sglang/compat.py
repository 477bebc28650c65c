"""Everything that differs between the SGLang releases we support, in one place.

Supported: 0.5.17 (runs on the GPU machine) and 0.5.23 (newest). Both load `sglang.srt.plugins`
entry points before parsing arguments and share the factory, controller and host-pool names we
touch; what differs is listed here and tested in tests/test_plugin.py.
"""

from __future__ import annotations

import importlib.metadata
import os

from ..errors import UnsupportedSGLang

SUPPORTED = ("0.5.17", "0.5.23")
BACKEND_NAME = "objectcache"


def sglang_version() -> str:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedSGLang("sglang is not installed; pip install sglang==0.5.23 (or 0.5.17)") from None


def check_version() -> str:
    v = sglang_version()
    if v not in SUPPORTED and not os.environ.get("OBJECTCACHE_ALLOW_ANY_SGLANG"):
        raise UnsupportedSGLang(
            f"sglang {v} is not supported by sglang-objectcache (supported: {', '.join(SUPPORTED)}); "
            "install a supported release, or set OBJECTCACHE_ALLOW_ANY_SGLANG=1 at your own risk"
        )
    return v


def backend_arg():
    """The argparse metadata (`Arg`) of --hicache-storage-backend, made mutable in place.

    0.5.23 keeps evaluated `Annotated[...]` objects in ServerArgs.__annotations__, and the `Arg`
    in it (frozen, but with a mutable `choices` list) is what argparse is built from. 0.5.17's
    server_args uses `from __future__ import annotations`: the annotation is a string that
    `get_type_hints` re-evaluates on every parser build, so a fresh list each time. There we
    store the evaluated annotation back once; both then share the one-list mutation.
    """
    from typing import get_args, get_type_hints

    from sglang.srt.arg_groups.arg_utils import Arg
    from sglang.srt.server_args import ServerArgs

    name = "hicache_storage_backend"
    for klass in ServerArgs.__mro__:
        ann = getattr(klass, "__annotations__", {}).get(name)
        if ann is None:
            continue
        if isinstance(ann, str):  # 0.5.17
            ann = get_type_hints(klass, include_extras=True)[name]
            klass.__annotations__[name] = ann
        for meta in get_args(ann)[1:]:
            if isinstance(meta, Arg):
                return meta
    raise UnsupportedSGLang("cannot find --hicache-storage-backend in ServerArgs")


def storage_metrics(prefetch_pgs, backup_pgs, prefetch_bw, backup_bw):
    """SGLang's StorageMetrics (same module path in both releases), which its collector asserts."""
    from sglang.srt.observability.metrics_collector import StorageMetrics

    return StorageMetrics(prefetch_pgs=list(prefetch_pgs), backup_pgs=list(backup_pgs),
                          prefetch_bandwidth=list(prefetch_bw), backup_bandwidth=list(backup_bw))


def namespaced_storage_hashes() -> bool:
    """Whether the installed SGLang folds the request's namespace (extra_key: cache_salt, LoRA id)
    into every storage page key: 0.5.23 does (`storage_namespace_seed`); 0.5.17 hashes token ids
    only, unless `objectcache patch-sglang` added the same seed."""
    try:
        from sglang.srt.mem_cache import utils
    except Exception:  # noqa: BLE001 - an SGLang that cannot be imported here folds nothing we know of
        return False
    return hasattr(utils, "storage_namespace_seed")


def lora_enabled() -> bool | None:
    """Whether the server was launched with LoRA adapters; None where it cannot be told (no
    server arguments published in this process: tests, tools)."""
    try:
        from sglang.srt.server_args import get_global_server_args

        args = get_global_server_args()
    except Exception:  # noqa: BLE001 - no server context, or a release without the accessor
        return None
    return bool(getattr(args, "lora_paths", None)) or bool(getattr(args, "enable_lora", False))


def check_isolation(version: str) -> None:
    """Refuse a setup in which one tenant's storage KV could load for another: where storage
    hashes ignore the request's namespace, LoRA adapters would share keys for the same tokens
    (wrong KV). Salted tenants only share timing there (a salt does not change the KV); that is
    logged."""
    import logging

    if namespaced_storage_hashes():
        return
    if lora_enabled():
        from ..errors import ConfigError

        raise ConfigError(
            f"hicache storage with LoRA: SGLang {version} as installed computes storage page keys from "
            "token ids only, so two adapters serving the same tokens would load each other's KV from "
            "storage. Run `objectcache patch-sglang` (it folds the adapter into the keys, as SGLang "
            "0.5.23 does), or serve LoRA without --hicache-storage-backend")
    logging.getLogger("sglang_objectcache").warning(
        "objectcache: SGLang %s as installed computes storage page keys from token ids only: requests "
        "with different cache_salt share stored prefixes (the same KV bytes; a tenant can time whether "
        "another sent a prompt). Run `objectcache patch-sglang` where tenants must not learn of each "
        "other (docs/security.md)", version)
