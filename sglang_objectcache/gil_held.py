"""memmove and xxh3-64 that keep the GIL while they run.

Why: inside SGLang the scheduler thread runs Python almost without pause. A call that releases the
GIL (ctypes.memmove, xxhash for large inputs, numpy copies) must win it back afterwards, and with
such a neighbour that waits up to a switch interval (5 ms) each time. The verify-and-copy path
makes two such calls per 128-256 KiB, so it collapsed. Measured on the 2-core VM with one
GIL-hogging thread (`benchmarks/gil.py`):
- ctypes.memmove of 128 KiB pieces fell from 4.75 to 0.02 GiB/s;
- a whole engine read fell from 0.66 to 0.08 GiB/s.

Holding the GIL for ~20 µs per piece instead costs other threads nothing noticeable. The copy
threads then take turns rather than run in parallel, but one core copies and hashes faster than
the servers we read from deliver.

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
