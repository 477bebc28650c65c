"""Batched copy-and-checksum: one native call per range or object, with the GIL released.

Why: inside SGLang the scheduler thread runs Python almost without pause, so a thread that gives up
the GIL may wait a whole switch interval (5 ms) to get it back. Copying and hashing piece by piece
(two calls per 128-256 KiB) either gave the GIL up twice per piece, or, holding it, serialised every
copy thread and starved the I/O loop. `copyhash.c` does all of a range's checksums and copies in one
ctypes.CDLL call: the GIL is released once per range, and the copy threads run in parallel.

The C file is compiled on first use with the system C compiler (`$CC`, else `cc`; SGLang's own
JIT kernels need one too) into a cache directory (`$OBJECTCACHE_NATIVE_DIR`, else
`$XDG_CACHE_HOME/sglang_objectcache` or `~/.cache/sglang_objectcache`), keyed by the source's hash.
The directory is created private to the user; a cached build is loaded only if it and its directory
belong to the user and nobody else can write them, and its content matches the SHA-256 recorded when
it was built (`.sha256` beside it); a broken or foreign build is rebuilt, never loaded.
Without a compiler the same operations run piece by piece in Python (`gil_held`), with a warning:
correct, slower under contention. The checksum is xxhash's own XXH3_64bits, passed in as a function
pointer, so both paths give identical values.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import gil_held

log = logging.getLogger("sglang_objectcache")

_lock = threading.Lock()
_state: dict = {}  # "fn": the C function or None, "why": the reason it is missing


def _cache_dir() -> Path:
    if os.environ.get("OBJECTCACHE_NATIVE_DIR"):
        return Path(os.environ["OBJECTCACHE_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sglang_objectcache"


def _private(path: Path, *, is_dir: bool) -> None:
    """A file we load code from must be ours and writable by nobody else, and so must its
    directory; RuntimeError otherwise (the helper is then not used)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{path} belongs to uid {st.st_uid}, not to this user; not loading code from it")
    if st.st_mode & 0o022:
        raise RuntimeError(f"{path} is writable by group or others (mode {st.st_mode & 0o777:o}); not loading "
                           "code from it")
    if is_dir and not path.is_dir():
        raise RuntimeError(f"{path} is not a directory")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _built(srcs: dict[str, bytes], so: Path, flags: Sequence[str] = ()) -> Path:
    """The compiled helper for these sources: the cached build when its checks pass (private
    directory and file, content as recorded when it was built), else a fresh build."""
    so.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(so.parent, is_dir=True)
    stamp = so.with_suffix(".sha256")
    if so.exists():
        try:
            _private(so, is_dir=False)
            if stamp.read_text().strip() == _digest(so):
                return so
            log.warning("objectcache: cached native helper %s does not match its recorded hash; rebuilding", so)
        except FileNotFoundError:
            log.warning("objectcache: cached native helper %s has no recorded hash; rebuilding", so)
        except RuntimeError as e:  # someone else's file in our directory: replaced, never loaded
            log.warning("objectcache: %s; rebuilding", e)
    _compile(srcs, so, flags)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    tmp.write_text(_digest(so))
    os.replace(tmp, stamp)
    return so


def _hash_pointer() -> int | None:
    try:
        import xxhash._xxhash as ext

        return ctypes.cast(ctypes.CDLL(ext.__file__).XXH3_64bits, ctypes.c_void_p).value
    except (AttributeError, OSError, ImportError):
        return None


SOURCES = ("copyhash.c", "httpget.c", "layers.c")
TLS_SOURCES = ("httpget.c", "layers.c", "tls.c")  # with -DOC_TLS, linked with the system's OpenSSL
TLS_FLAGS = ("-DOC_TLS", "-lssl", "-lcrypto")


def _compile(srcs: dict[str, bytes], so: Path, flags: Sequence[str] = ()) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install cc)")
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        files = []
        for name, src in srcs.items():
            files.append(Path(tmp) / name)
            files[-1].write_bytes(src)
        out = Path(tmp) / so.name
        defines = [f for f in flags if f.startswith("-D")]
        libs = [f for f in flags if not f.startswith("-D")]
        r = subprocess.run([*cc.split(), "-O3", "-shared", "-fPIC", "-std=c99", *defines, "-o", str(out),
                            *map(str, files), *libs], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[:500]}")
        os.chmod(out, 0o644)
        os.replace(out, so)  # atomic: concurrent builders (TP ranks) each install a whole file


def _load():
    """The C function, built if needed; None (and the reason in _state) if it cannot be."""
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, why, hash_fn = None, None, None
        try:
            if os.environ.get("OBJECTCACHE_NATIVE", "1") == "0":
                raise RuntimeError("disabled by OBJECTCACHE_NATIVE=0")
            hash_fn = _hash_pointer()
            if hash_fn is None:
                raise RuntimeError("xxhash does not export XXH3_64bits")
            srcs = {n: resources.files(__name__).joinpath(n).read_bytes() for n in SOURCES}
            so = _built(srcs, _cache_dir() / f"objectcache-{_tag(srcs)}.so")
            lib = ctypes.CDLL(str(so))  # CDLL: calls release the GIL
            fn = lib.oc_copy_hash
            fn.restype = ctypes.c_int64
            fn.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
            get = lib.oc_http_get
            get.restype = ctypes.c_int64
            get.argtypes = (ctypes.c_ssize_t, ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
            _state["http_get"] = get
            pieces = lib.oc_http_get_pieces
            pieces.restype = ctypes.c_int64
            pieces.argtypes = (ctypes.c_ssize_t, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int64)
            _state["http_get_pieces"] = pieces
            # a few atomic adds: called with the GIL held (PyDLL), so no hand-over per arrival
            arrived = ctypes.PyDLL(str(so)).oc_layers_arrived
            arrived.restype = None
            arrived.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
            _state["layers_arrived"] = arrived
            wait = lib.oc_layer_wait
            wait.restype = ctypes.c_int64
            wait.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
            _state["layer_wait"] = wait
            close = lib.oc_gate_close
            close.restype = ctypes.c_int64
            close.argtypes = (ctypes.c_void_p,)
            _state["gate_close"] = close
        except Exception as e:  # noqa: BLE001 - any failure means the Python path
            fn, why = None, str(e)
            log.warning("objectcache: native copy helper unavailable (%s); copies and checksums run piece "
                        "by piece in Python, slower inside SGLang", why)
        _state.update(fn=fn, why=why, hash=hash_fn if fn else None)
        return fn


_tls_state: dict = {}


def _tag(srcs: dict[str, bytes], flags: Sequence[str] = ()) -> str:
    return hashlib.sha256(b"".join(srcs.values()) + " ".join(flags).encode() + sys.platform.encode()
                          + os.uname().machine.encode()).hexdigest()[:16]


class Tls:
    """The native reader's https functions (`tls.c`, and `httpget.c` built with -DOC_TLS)."""

    def __init__(self, lib):
        def fn(name, res, *args):
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
            return f
        p, i64, vp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p
        self.ctx = fn("oc_tls_ctx", p, ctypes.c_char_p, vp, i64)
        self.ctx_free = fn("oc_tls_ctx_free", None, p)
        self.open = fn("oc_tls_open", p, p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, vp, i64)
        self.free = fn("oc_tls_free", None, p)
        self.get = fn("oc_https_get", i64, p, ctypes.c_char_p, i64, vp, i64, vp, i64, vp)
        self.pieces = fn("oc_https_get_pieces", i64, p, ctypes.c_char_p, i64, i64, vp, i64, vp, vp, i64,
                         ctypes.c_uint64, vp, vp, vp, vp, vp, i64, vp, vp, i64, i64, i64)


def tls() -> Tls | None:
    """The https range reader, built on first use; None (reason: `tls_status()`) where it cannot
    be (no compiler, no OpenSSL headers, or the plain helper is unavailable)."""
    if _load() is None:
        return None
    with _lock:
        if "tls" in _tls_state:
            return _tls_state["tls"]
        t, why = None, None
        try:
            srcs = {n: resources.files(__name__).joinpath(n).read_bytes() for n in TLS_SOURCES}
            so = _built(srcs, _cache_dir() / f"objectcache-tls-{_tag(srcs, TLS_FLAGS)}.so", TLS_FLAGS)
            t = Tls(ctypes.CDLL(str(so)))
        except Exception as e:  # noqa: BLE001 - https reads then go through obstore
            why = str(e)
            log.info("objectcache: native https reader unavailable (%s); https reads go through obstore", why)
        _tls_state.update(tls=t, why=why)
        return t


def tls_status() -> str:
    t = tls()
    return "native TLS (system OpenSSL)" if t else f"obstore: {_tls_state.get('why') or _state.get('why')}"


def http_get():
    """The native range GET (`httpget.c`), or None where the helper cannot be built."""
    return _state.get("http_get") if _load() is not None else None


def http_get_pieces():
    """The native range GET that checks and copies each piece as it arrives (`httpget.c`), and the
    address of XXH3_64bits it checks with; None where the helper cannot be built."""
    return (_state["http_get_pieces"], _state["hash"]) if _load() is not None else None


def layer_words():
    """(arrived, wait) of `layers.c`, the per-layer readiness counted where bytes land; None where
    the helper cannot be built."""
    return (_state["layers_arrived"], _state["layer_wait"]) if _load() is not None else None


class CopyGate:
    """The gate between one fetch and the threads that copy into its pages (`httpget.c`): each
    piece's copies run inside it, and `close()` returns once none runs and none will start, even
    while a read is still blocked on the network."""

    def __init__(self):
        self._word = np.zeros(1, dtype=np.int64)
        self.address = self._word.ctypes.data

    def close(self) -> None:
        """Idempotent; every caller returns only once no copy runs (CDLL: it waits, at most one
        piece's copies, without the GIL)."""
        _state["gate_close"](self.address)


def status() -> str:
    """One line for `objectcache version` and the startup log."""
    fn = _load()
    return "native (one GIL release per range)" if fn else f"python fallback: {_state['why']}"


def _copy_piecewise(copies: Sequence[tuple[int, int, int]]) -> None:
    """The fallback's copies: one GIL-held memmove per segment."""
    for dst, src, n in copies:
        gil_held.memmove(dst, src, n)


def _u64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64)


def verify_and_copy(pieces: Sequence[int], piece_len: int, expect: Sequence[int] | None,
                    copies: Sequence[tuple[int, int, int]], first: Sequence[int] | None = None) -> int:
    """Check each piece (an address of piece_len bytes) against `expect` (None: no check) and do
    the (dst, src, len) copies. Returns -1, or the index of the first bad piece: it and the pieces
    after it are not copied. With `first` (piece i's copies are copies[first[i]:first[i + 1]]) each
    piece is copied right after its check, so those before a bad one may be in place; without it
    every piece is checked first and a bad one leaves every target untouched."""
    fn = _load()
    if fn is None:
        if expect is not None:
            for i, (addr, want) in enumerate(zip(pieces, expect)):
                if gil_held.xxh3_64(addr, piece_len) != want:
                    return i
        _copy_piecewise(copies)
        return -1
    return verify_and_copy_arrays(_u64(pieces), piece_len, None if expect is None else _u64(expect),
                                  _u64(copies), None if first is None else np.asarray(first, dtype=np.int64))


def verify_and_copy_arrays(pieces: np.ndarray, piece_len: int, expect: np.ndarray | None,
                           copies: np.ndarray, first: np.ndarray | None) -> int | None:
    """`verify_and_copy` for arrays built without Python loops (engine/reader.py): pieces and
    expect uint64 [n], copies uint64 [k, 3], first int64 [n + 1] or None. Returns -1 or the first
    bad piece's index; None where the helper is unavailable (the caller takes the list path)."""
    fn = _load()
    if fn is None:
        return None
    if expect is None:
        return fn(copies.ctypes.data, len(copies), None, 0, piece_len, None, None, None, 1, None)
    return fn(copies.ctypes.data, len(copies), pieces.ctypes.data, len(pieces), piece_len, expect.ctypes.data,
              None, _state["hash"], 1, None if first is None else first.ctypes.data)


def copy_and_hash(copies: Sequence[tuple[int, int, int]], pieces: Sequence[int], piece_len: int) -> list[int]:
    """Do the (dst, src, len) copies, then return each piece's xxh3-64."""
    fn = _load()
    if fn is None:
        _copy_piecewise(copies)
        return [gil_held.xxh3_64(a, piece_len) for a in pieces]
    cp, pc = _u64(copies), _u64(pieces)
    out = np.empty(len(pieces), dtype=np.uint64)
    fn(cp.ctypes.data, len(copies), pc.ctypes.data, len(pieces), piece_len, None, out.ctypes.data,
       _state["hash"], 0, None)
    return out.tolist()
