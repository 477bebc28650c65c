"""`sglang.srt.plugins` entry point: makes `--hicache-storage-backend objectcache` a real choice.

SGLang runs this before it parses arguments (launch_server, `sglang serve`) and again in every
scheduler process. Three hooks, all needed because SGLang hard-codes backend names:
1. the argparse choice list gets "objectcache";
2. the factory's built-in if-chain (which raises for unknown names) builds our class with the
   host pool;
3. the controller's zero-copy list (another hard-coded list) selects batch_get_v1/batch_set_v1.
"""

from __future__ import annotations

import logging
import os

from ..errors import UnsupportedSGLang
from .compat import BACKEND_NAME, backend_arg, check_version

log = logging.getLogger("sglang_objectcache")

_FACTORY = "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory._create_builtin_backend"
_ATTACH = "sglang.srt.managers.cache_controller.HiCacheController.attach_storage_backend"


def _build(orig, cls, backend_name, backend_class, storage_config, mem_pool_host, *a, **kw):
    if backend_name == BACKEND_NAME:
        return backend_class(storage_config, mem_pool_host)
    return orig(cls, backend_name, backend_class, storage_config, mem_pool_host, *a, **kw)


def _attach(orig, self, storage_backend, *a, **kw):
    result = orig(self, storage_backend, *a, **kw)
    # streaming state belongs to one attached objectcache: a runtime re-attach (of another
    # backend, or objectcache with another config) must not keep the old one, nor its thread
    old = getattr(self, "oc_layerwise", None)
    self.oc_layerwise = None
    self.oc_decide = None
    if old is not None:
        old.close()
    if storage_backend == BACKEND_NAME:
        from . import load_or_recompute
        from .layerwise import attach

        self.page_get_func = self._page_get_zero_copy
        self.page_set_func = self._page_set_zero_copy
        self.oc_layerwise = attach(self, self.storage_backend)  # None unless SGLang is patched
        self.oc_decide = load_or_recompute.attach(self, self.storage_backend)  # likewise
        if self.oc_decide is not None and self.oc_layerwise is None:  # whole prefetch: bounded by its deadline
            self.page_get_func = self.oc_decide.bounded(self._page_get_zero_copy, self.storage_backend)
    return result


def register() -> None:
    level = os.environ.get("OBJECTCACHE_LOG_LEVEL")
    if level:  # e.g. DEBUG: one line per read call with its size, rate and first-layer latency
        try:
            log.setLevel(level.upper())
        except ValueError:
            log.error("objectcache: OBJECTCACHE_LOG_LEVEL=%r is not a logging level (DEBUG, INFO, ...)", level)
    try:
        check_version()
    except UnsupportedSGLang as e:
        log.error("objectcache plugin not registered: %s", e)
        return
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    arg = backend_arg()
    if BACKEND_NAME not in arg.choices:
        arg.choices.append(BACKEND_NAME)
    if BACKEND_NAME not in StorageBackendFactory._registry:
        StorageBackendFactory.register_backend(
            BACKEND_NAME, "sglang_objectcache.sglang.backend", "ObjectCacheStorage")
    if not getattr(register, "_hooked", False):
        HookRegistry.register(_FACTORY, _build, HookType.AROUND)
        HookRegistry.register(_ATTACH, _attach, HookType.AROUND)
        register._hooked = True
