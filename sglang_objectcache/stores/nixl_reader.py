"""Range GETs through NVIDIA NIXL's OBJ plugin (`transport: nixl`): C++ threads of the AWS SDK,
outside the GIL, TLS included; the ObjectCache paper's prototype moved its KV this way.

Same door as `rawhttp.py` for the native reader's pull threads (`read_into`: one range into a
buffer), so staging, verification and copies stay the engine's: every piece is checked after it
lands, as for any whole-range read. What NIXL does not do, done here:
- a deadline: NIXL has no timeout knobs, so the poll loop gives up at `request_timeout`, releases
  the transfer and raises Unavailable (the read is a miss); the AWS SDK's own retries are the
  tier's, through AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, set while the backend is made and restored;
- per-object status: a failed transfer raises one opaque error, so a HEAD (`query_memory`) tells
  a missing object (NotFound, and the index heals) from anything else;
- short reads: NIXL reports a range past an object's end as done; the engine's checksums then
  find the missing bytes, as for any truncated object.
Every registered object gets a process-unique devId (the plugin's devId-to-key map keeps the last
registration). Control requests (list, delete, conditional put) stay with the tier's transport.

Install: `pip install --no-deps nixl-cu12==1.5.1` (plain `nixl` pulls CUDA torch, and its cu13
OBJ plugin cannot load without NVIDIA's cuObject client).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from ..errors import NotFound, StoreError, Unavailable
from .credentials import Credentials

INSTALL = "pip install --no-deps nixl-cu12==1.5.1"
POLL_S = 50e-6


def available() -> str | None:
    """None where NIXL's OBJ plugin can be used, else why not (with the install line)."""
    try:
        import nixl_cu12._api  # noqa: F401
    except ImportError as e:
        return f"nixl-cu12 is not installed ({e}); {INSTALL}"
    return None


class NixlRangeReader:
    _ids = itertools.count(1)
    _ids_lock = threading.Lock()

    def __init__(self, *, endpoint: str, bucket: str, region: str, creds: Credentials,
                 request_timeout: float, max_retries: int, threads: int, ca_bundle: str | None = None):
        from nixl_cu12._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"transport nixl needs an http:// or https:// endpoint, not {endpoint!r}")
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.bucket = bucket
        with self._ids_lock:
            name = f"objectcache-{os.getpid()}-{next(self._ids)}"
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[],
                                                        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW))
        params = {"bucket": bucket, "endpoint_override": endpoint, "scheme": u.scheme, "region": region,
                  "use_virtual_addressing": "false", "num_threads": str(max(1, threads))}
        if creds.access_key_id:
            params.update(access_key=creds.access_key_id, secret_key=creds.secret_access_key)
            if creds.session_token:
                params["session_token"] = creds.session_token
        if ca_bundle:
            params["ca_bundle"] = ca_bundle
        # the AWS SDK reads its retry policy from the environment when the backend's client is made:
        # the tier's retries there (a dead server fails after them, not after the SDK's default
        # 25 s), and the environment as it was afterwards
        saved = {k: os.environ.get(k) for k in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")}
        os.environ.update(AWS_RETRY_MODE="standard", AWS_MAX_ATTEMPTS=str(max_retries + 1))
        try:
            self.agent.create_backend("OBJ", params)
        except Exception as e:  # noqa: BLE001 - the plugin did not load (the cu13 build, a missing library)
            raise StoreError(f"NIXL's OBJ plugin cannot be used: {type(e).__name__}; {INSTALL}") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.closed = False

    def _dev_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    def read_into(self, key: str, start: int, end: int, dst) -> int:
        """Bytes [start, end) of object `key` into `dst` (exactly end - start bytes), within
        `request_timeout`. Returns end - start: NIXL cannot tell a short read (the checks can)."""
        view = np.frombuffer(dst, dtype=np.uint8)
        n = end - start
        if view.nbytes != n or n <= 0:
            raise ValueError(f"buffer of {view.nbytes} bytes for range {start}-{end}")
        a, dev = self.agent, self._dev_id()
        dram = a.register_memory([(view.ctypes.data, n, 0, "")], "DRAM", backends=["OBJ"])
        obj = a.register_memory([(0, end, dev, key)], "OBJ", backends=["OBJ"])
        handle = None
        deadline = time.monotonic() + self.request_timeout
        try:
            handle = a.initialize_xfer("READ", a.get_xfer_descs([(view.ctypes.data, n, 0)], "DRAM"),
                                       a.get_xfer_descs([(start, n, dev)], "OBJ"), a.name, backends=["OBJ"])
            state = a.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise Unavailable(f"GET {key} bytes {start}-{end - 1}: timed out after "
                                      f"{self.request_timeout:g} s (nixl)")
                time.sleep(POLL_S)
                state = a.check_xfer_state(handle)
            if state != "DONE":
                raise StoreError(f"GET {key} bytes {start}-{end - 1}: nixl transfer {state}")
            return n
        except (StoreError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - nixlBackendError and friends: one opaque failure
            if time.monotonic() > deadline:  # no time left to ask why: a miss now
                raise Unavailable(f"GET {key} bytes {start}-{end - 1}: nixl {type(e).__name__} after "
                                  f"{self.request_timeout:g} s") from None
            raise self._why(key, start, end, e) from None
        finally:
            if handle is not None:
                try:
                    a.release_xfer_handle(handle)
                except Exception:  # noqa: BLE001 - a transfer still in flight at the deadline
                    pass
            a.deregister_memory(obj, backends=["OBJ"])
            a.deregister_memory(dram, backends=["OBJ"])

    def _why(self, key: str, start: int, end: int, e: Exception) -> StoreError:
        what = f"GET {key} bytes {start}-{end - 1}"
        try:
            found = self.agent.query_memory([(0, 0, 0, key)], "OBJ", mem_type="OBJ")
        except Exception:  # noqa: BLE001 - the server is away: the HEAD fails too
            return Unavailable(f"{what}: nixl {type(e).__name__}; the server does not answer")
        if found and found[0] is None:
            return NotFound(f"{what}: no such object (nixl)")
        return StoreError(f"{what}: nixl {type(e).__name__}")

    def close(self) -> None:
        self.closed = True
