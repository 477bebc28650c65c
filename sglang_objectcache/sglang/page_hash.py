"""SGLang's page hashes, built at startup rather than by the first request that reaches storage.

Both supported releases hash pages with a C++ extension (`sglang/srt/mem_cache/cpp_utils/
native_hash.py`) that torch compiles on first use, and first use is the first storage query, on
SGLang's prefetch thread. So, left alone:
- the first request that reaches storage waits for a compile (8 s on the GPU machine);
- a build that fails (no C++ compiler, ninja or OpenSSL's headers) raises in that thread and ends
  it; under `wait_complete` every later request that reaches storage then waits forever;
- on 0.5.17, a build killed half-way leaves torch's `lock` file in the build directory, and torch
  waits while it exists: every later server's first storage query waits forever, silently. (0.5.23
  serialises builds under a lock the kernel drops with its holder, and clears such leftovers.)

`ensure_built` loads the extension once per process before the backend serves: within a deadline,
clearing a leftover lock on 0.5.17 the way 0.5.23 does, and turning a failure into a startup error
that says what is missing. Once loaded, SGLang's own calls find it in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path

from ..errors import StartupError

log = logging.getLogger("sglang_objectcache")

NAME = "hicache_hash_cpp"
BUILD_TIMEOUT = 300.0  # seconds for a build, and for a build another process is running
# A torch lock this old, with no build of ours or of SGLang 0.5.23 holding the shared lock, was
# left by a dead build (one takes seconds); a younger one may be a plain 0.5.17 process's build.
STALE_AFTER = 60.0

_done = False
_lock = threading.Lock()


def build_directory() -> Path:
    """Where torch builds the extension (TORCH_EXTENSIONS_DIR, else its default root)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(NAME, False))
    except (ImportError, AttributeError):  # torch without the private helper: its documented layout
        import torch
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR")
        if not root:
            cu = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
            root = os.path.join(get_default_build_root(),
                                f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{cu}")
        return Path(root) / NAME


@contextlib.contextmanager
def _serialised(build_dir: Path):
    """SGLang 0.5.23's own build lock (the same file): one build at a time across processes, ours
    and 0.5.23's, released by the kernel if its holder dies."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".{build_dir.name}.sglang.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def clear_leftover_lock(build_dir: Path, deadline: float, stale_after: float = STALE_AFTER) -> bool:
    """Under `_serialised`: wait while torch's lock may belong to a live build, then remove it if
    it is still there (a dead build's). True if one was removed."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after:
            break
        if time.monotonic() >= deadline:
            return False  # young still: torch waits on it, and the caller's deadline reports it
        time.sleep(min(1.0, max(0.05, stale_after - age)))
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
        log.warning("objectcache: removed %s, left by a build of SGLang's page-hash extension that did not "
                    "finish (%.0f s old); torch would have waited on it forever", lock, age)
        return True
    return False


def _load(native_hash) -> None:
    native_hash.get_native_hash([0, 1, 2, 3], None, 4)  # loads (building if need be) the extension


def ensure_built(timeout: float = BUILD_TIMEOUT) -> None:
    """Load SGLang's page-hash extension in this process now; StartupError if it cannot be built or
    loaded within `timeout` seconds. Once per process; a release without it is left alone."""
    global _done
    with _lock:
        if _done:
            return
        try:
            from sglang.srt.mem_cache.cpp_utils import native_hash
        except ImportError:
            _done = True
            return
        recovers = importlib.util.find_spec("sglang.srt.utils.cpp_extension_loader") is not None  # 0.5.23
        build_dir = build_directory()
        deadline = time.monotonic() + timeout
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if recovers:
                    _load(native_hash)
                    return
                with _serialised(build_dir):
                    clear_leftover_lock(build_dir, deadline)
                    _load(native_hash)
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=run, daemon=True, name="objectcache-page-hash")
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise StartupError(
                f"SGLang's page-hash extension ({NAME}, compiled by torch on first use) was not ready after "
                f"{timeout:.0f} s; its build directory is {build_dir}. If no build is running, remove "
                f"{build_dir / 'lock'} and start again")
        if failure:
            raise StartupError(
                f"SGLang's page-hash extension ({NAME}) cannot be built or loaded: {_why(failure[0])}. "
                "SGLang's storage needs it for every page key: install a C++ compiler, ninja and OpenSSL's "
                f"headers (libssl-dev), or remove {build_dir} if an old build is broken") from None
        took = time.monotonic() - t0
        if took > 1.0:
            log.info("objectcache: SGLang's page-hash extension built in %.1f s (at startup, not on the first "
                     "request that reaches storage)", took)
        _done = True


def status() -> str:
    """One line for `objectcache version`: built, or what startup will do."""
    try:
        d = build_directory()
    except Exception as e:  # noqa: BLE001 - no torch here: nothing to say about SGLang's build
        return f"unknown ({type(e).__name__})"
    lock = d / "lock"
    if lock.exists():
        age = time.time() - lock.stat().st_mtime
        return (f"a build lock is in {d} ({age:.0f} s old): a build is running, or one died (startup "
                f"removes it once {STALE_AFTER:.0f} s old)")
    if any(d.glob(f"{NAME}*.so")):
        return f"built ({d})"
    return f"not built yet: startup builds it into {d} (a C++ compiler, ninja and OpenSSL's headers)"


def _why(e: BaseException) -> str:
    """The innermost cause's first lines, short: what the compiler or loader said."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}" if text else type(e).__name__
