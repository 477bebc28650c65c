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
- credentials: the plugin signs with the keys it was made with, so a rotation (the tier's
  CredentialSource moved) builds a new agent, and a failed read is retried once on it where the
  credentials changed meanwhile, before anything is called missing;
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
from .credentials import Credentials, CredentialSource

INSTALL = "pip install --no-deps nixl-cu12==1.5.1"
POLL_S = 50e-6


def available() -> str | None:
    """None where NIXL's OBJ plugin can be used, else why not (with the install line)."""
    try:
        import nixl_cu12._api  # noqa: F401
    except ImportError as e:
        return f"nixl-cu12 is not installed ({e}); {INSTALL}"
    return None


class _Failed(Exception):
    """NIXL failed a transfer and said only `what`."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class NixlRangeReader:
    _ids = itertools.count(1)
    _ids_lock = threading.Lock()

    def __init__(self, *, endpoint: str, bucket: str, region: str, credentials: CredentialSource,
                 request_timeout: float, max_retries: int, threads: int, ca_bundle: str | None = None):
        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"transport nixl needs an http:// or https:// endpoint, not {endpoint!r}")
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.bucket = bucket
        self.credentials = credentials
        self._params = {"bucket": bucket, "endpoint_override": endpoint, "scheme": u.scheme, "region": region,
                        "use_virtual_addressing": "false", "num_threads": str(max(1, threads))}
        if ca_bundle:
            self._params["ca_bundle"] = ca_bundle
        self._swap_lock = threading.Lock()
        self.agent, self._version = self._build(credentials.current()), credentials.version
        self.closed = False

    def _build(self, creds: Credentials):
        """An agent whose OBJ backend signs with `creds` (the plugin takes fixed keys: a rotation
        needs a new agent; transfers still on the old one finish there)."""
        from nixl_cu12._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        with self._ids_lock:
            name = f"objectcache-{os.getpid()}-{next(self._ids)}"
        agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[],
                                                   sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW))
        params = dict(self._params)
        if creds.access_key_id:
            params.update(access_key=creds.access_key_id, secret_key=creds.secret_access_key)
            if creds.session_token:
                params["session_token"] = creds.session_token
        # the AWS SDK reads its retry policy from the environment when the backend's client is made:
        # the tier's retries there (a dead server fails after them, not after the SDK's default
        # 25 s), and the environment as it was afterwards
        saved = {k: os.environ.get(k) for k in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")}
        os.environ.update(AWS_RETRY_MODE="standard", AWS_MAX_ATTEMPTS=str(self.max_retries + 1))
        try:
            agent.create_backend("OBJ", params)
        except Exception as e:  # noqa: BLE001 - the plugin did not load (the cu13 build, a missing library)
            raise StoreError(f"NIXL's OBJ plugin cannot be used: {type(e).__name__}; {INSTALL}") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return agent

    def _current(self) -> tuple[object, int]:
        """The agent for the credentials the source hands out now (a new one after a rotation)."""
        self.credentials.current()  # notices a changed file or renews a token; cheap otherwise
        with self._swap_lock:
            if self.credentials.version != self._version:
                version = self.credentials.version
                self.agent, self._version = self._build(self.credentials.current()), version
            return self.agent, self._version

    def _dev_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    def read_into(self, key: str, start: int, end: int, dst) -> int:
        """Bytes [start, end) of object `key` into `dst` (exactly end - start bytes), within
        `request_timeout`. Returns end - start: NIXL cannot tell a short read (the checks can).
        A failure is retried once with new credentials where they changed (a rotated key, an
        expired token: the plugin's errors do not say 403), before the HEAD that tells why."""
        view = np.frombuffer(dst, dtype=np.uint8)
        n = end - start
        if view.nbytes != n or n <= 0:
            raise ValueError(f"buffer of {view.nbytes} bytes for range {start}-{end}")
        deadline = time.monotonic() + self.request_timeout
        agent, version = self._current()
        try:
            return self._read(agent, key, start, end, view, deadline)
        except _Failed as f:
            if time.monotonic() < deadline and (self.credentials.version != version or self.credentials.refresh()):
                agent, _ = self._current()
                try:
                    return self._read(agent, key, start, end, view, deadline)
                except _Failed as again:
                    f = again
            if time.monotonic() > deadline:  # no time left to ask why: a miss now
                raise Unavailable(f"GET {key} bytes {start}-{end - 1}: nixl {f.what} after "
                                  f"{self.request_timeout:g} s") from None
            raise self._why(agent, key, start, end, f.what) from None

    def _read(self, a, key: str, start: int, end: int, view: np.ndarray, deadline: float) -> int:
        """One transfer on agent `a`; _Failed where NIXL failed it (opaquely)."""
        n, dev = end - start, self._dev_id()
        dram = a.register_memory([(view.ctypes.data, n, 0, "")], "DRAM", backends=["OBJ"])
        obj = a.register_memory([(0, end, dev, key)], "OBJ", backends=["OBJ"])
        handle = None
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
                raise _Failed(f"transfer {state}")
            return n
        except (StoreError, ValueError, _Failed):
            raise
        except Exception as e:  # noqa: BLE001 - nixlBackendError and friends: one opaque failure
            raise _Failed(type(e).__name__) from None
        finally:
            if handle is not None:
                try:
                    a.release_xfer_handle(handle)
                except Exception:  # noqa: BLE001 - a transfer still in flight at the deadline
                    pass
            a.deregister_memory(obj, backends=["OBJ"])
            a.deregister_memory(dram, backends=["OBJ"])

    def _why(self, agent, key: str, start: int, end: int, failure: str) -> StoreError:
        what = f"GET {key} bytes {start}-{end - 1}"
        try:
            found = agent.query_memory([(0, 0, 0, key)], "OBJ", mem_type="OBJ")
        except Exception:  # noqa: BLE001 - the server is away: the HEAD fails too
            return Unavailable(f"{what}: nixl {failure}; the server does not answer")
        if found and found[0] is None:
            return NotFound(f"{what}: no such object (nixl)")
        return StoreError(f"{what}: nixl {failure}")

    def close(self) -> None:
        self.closed = True
