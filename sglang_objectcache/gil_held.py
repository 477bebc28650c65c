"""memmove and xxh3-64 that keep the GIL while they run: the fallback of `native/`.

The read and write paths verify and copy whole ranges in one native call that releases the GIL
once (`native/copyhash.c`). Where that helper cannot be built (no C compiler), they work piece by
piece with these instead. Why keep the GIL: inside SGLang the scheduler thread runs Python almost
without pause, and a call that releases the GIL must then win it back, waiting up to a switch
interval (5 ms). Per piece (128-256 KiB) that collapsed the read rate to 0.02 GiB/s next to a
busy thread (a probe on the 2-core VM, since removed; docs/history.md). Holding it serialises the copy
threads instead, which is slower than the native path on a many-core machine but never collapses.

Both functions take raw addresses. The libc and the xxhash extension are loaded through
`ctypes.PyDLL`, whose calls do not release the GIL. Where a symbol cannot be found, the
GIL-releasing versions are used instead, which are correct, only slower under contention.
"""

from __future__ import annotations

import ctypes
import logging

import xxhash

log = logging.getLogger("sglang_objectcache")


def _libc_memmove():
    try:
        f = ctypes.PyDLL(None).memmove
    except (AttributeError, OSError):
        log.warning("objectcache: libc memmove not found; copies release the GIL")
        return ctypes.memmove
    f.restype = ctypes.c_void_p
    f.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return f


def _xxh3():
    try:
        import xxhash._xxhash as ext

        f = ctypes.PyDLL(ext.__file__).XXH3_64bits
    except (AttributeError, OSError, ImportError):
        log.warning("objectcache: XXH3_64bits not exported by xxhash; checksums release the GIL")
        return lambda addr, n: xxhash.xxh3_64_intdigest((ctypes.c_char * n).from_address(addr))
    f.restype = ctypes.c_uint64
    f.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return f


memmove = _libc_memmove()  # memmove(dst, src, n)
xxh3_64 = _xxh3()  # xxh3_64(addr, n) -> int, the same value as xxhash.xxh3_64_intdigest
