"""Range GETs over HTTP/1.1, each body received by native code straight into a caller's buffer.

The read path's fast transport: a blocking call, made from the native reader's pull threads
(`native_reader.py`), that releases the GIL once per range (`native/httpget.c`). `https://`
endpoints go through the same code built against the system's OpenSSL (`native/tls.c`): the
handshake runs once per connection, the peer verified against the system's CAs or `ca_bundle`.
Connections are kept alive in a small pool; a reused connection that the server had closed is
retried once on a fresh one. Anything else that goes wrong closes the connection and raises the
store vocabulary (NotFound, Unavailable, StoreError), never with the credentials in it. Everything
but ranged GETs stays with obstore.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from .. import native
from ..errors import AccessDenied, NotFound, StoreError, Unavailable
from .base import APPLIED, CLOSED, SHORT, RangePieces
from .credentials import Credentials
from .sigv4 import GetSigner

_HDR_CAP = 16 << 10
_MESSAGES = {-2: "malformed HTTP response", -5: "chunked body",
             -9: "the response is not the range asked for"}  # -1, -3, -4 are told apart below
# read_pieces receives adjacent pieces up to this much at a time: few enough system calls, and
# small enough to stay in a core's cache while they are checked and copied
BOUNCE_BYTES = int(os.environ.get("OBJECTCACHE_BOUNCE_BYTES", 1 << 20))
_PIECE_ENDS = (0, -6, -7, -8)  # native codes that end read_pieces without an error


class _Conn:
    """A kept connection: the socket, and its TLS state for https (`handle` is what the native
    functions take: the fd, or the SSL*)."""

    __slots__ = ("sock", "ssl", "handle", "_tls")

    def __init__(self, sock: socket.socket, ssl: int | None, tls):
        self.sock, self.ssl = sock, ssl
        self.handle = ssl if ssl is not None else sock.fileno()
        self._tls = tls

    def close(self) -> None:
        if self.ssl is not None:
            self._tls.free(self.ssl)
            self.ssl = None
        self.sock.close()


class RawRangeReader:
    def __init__(self, *, endpoint: str, bucket: str, region: str, creds: Credentials,
                 request_timeout: float, connect_timeout: float, max_idle: int, max_retries: int = 2,
                 ca_bundle: str | None = None):
        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"the native reader speaks http:// and https://, not {endpoint!r}")
        default_port = 443 if u.scheme == "https" else 80
        self.addr = (u.hostname, u.port or default_port)
        name = f"[{u.hostname}]" if ":" in u.hostname else u.hostname  # an IPv6 literal keeps its brackets
        host = name if u.port in (None, default_port) else f"{name}:{u.port}"
        self._tls = self._ctx = None
        if u.scheme == "https":
            self._tls = native.tls()
            if self._tls is None:
                raise RuntimeError(f"native https reader unavailable: {native.tls_status()}")
            err = ctypes.create_string_buffer(512)
            self._ctx = self._tls.ctx(ca_bundle.encode() if ca_bundle else None, err, len(err))
            if not self._ctx:
                raise StoreError(f"TLS set-up for {endpoint}: {err.value.decode(errors='replace')}")
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in u.hostname else socket.AF_INET, u.hostname)
                self._is_ip = True
            except OSError:
                self._is_ip = False
        self.bucket = bucket
        self.signer = GetSigner(host, region, creds)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.max_retries = max_retries
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread header buffer and info array
        self._fn, self._pieces_fn = native.http_get(), native.http_get_pieces()
        if self._fn is None:
            raise RuntimeError(f"native helper unavailable: {native.status()}")
        self._get = self._tls.get if self._tls is not None else self._fn
        self.closed = False

    def read_into(self, key: str, start: int, end: int, dst) -> int:
        """Bytes [start, end) of object `key` into `dst` (a writable buffer of exactly end - start
        bytes); returns how many came: fewer where the object ends sooner (truncated), for the
        caller's checks to catch. Blocking; releases the GIL while the bytes move."""
        view = np.frombuffer(dst, dtype=np.uint8)
        if view.nbytes != end - start or end <= start:
            raise ValueError(f"buffer of {view.nbytes} bytes for range {start}-{end}")

        def call(sock, req, loc):
            return self._get(sock.handle, req, len(req), view.ctypes.data, view.nbytes, loc.hdr, _HDR_CAP, loc.info)
        rc, info = self._request(key, start, end, call)
        return info[2]

    def read_pieces(self, key: str, start: int, end: int, pieces: RangePieces, gate, layers=None) -> int:
        """Bytes [start, end) of object `key`, never held whole: each piece is received into a
        small per-thread buffer, checked, and copied to its targets inside `gate`
        (native.CopyGate). Where `layers` (engine/readiness.LayerReadiness) is given, each layer
        of the range counts as arrived there once its pieces are in place. Returns APPLIED, SHORT
        (the object ends sooner: nothing copied), CLOSED (the gate closed first: nothing more
        copied) or the index of the first piece that failed its check (those before it are in
        place). Blocking, one GIL release per range."""
        if end <= start:
            raise ValueError(f"range {start}-{end}")
        fn, hash_fn = self._pieces_fn
        if self._tls is not None:
            fn = self._tls.pieces

        def call(sock, req, loc):
            if loc.bounce.nbytes < max(pieces.piece_len, BOUNCE_BYTES):
                loc.bounce = np.empty(max(pieces.piece_len, BOUNCE_BYTES), dtype=np.uint8)
            return fn(sock.handle, req, len(req), end - start, loc.hdr, _HDR_CAP, loc.info,
                      pieces.offsets.ctypes.data, len(pieces.offsets), pieces.piece_len,
                      None if pieces.expect is None else pieces.expect.ctypes.data,
                      None if pieces.expect is None else hash_fn, pieces.copies.ctypes.data,
                      pieces.first.ctypes.data, loc.bounce.ctypes.data, loc.bounce.nbytes, gate.address,
                      None if layers is None else layers.address, 0 if layers is None else layers.n_layers,
                      pieces.l0, pieces.per_layer)
        rc, info = self._request(key, start, end, call, ends=_PIECE_ENDS)
        return {0: APPLIED, -6: info[6], -7: CLOSED, -8: SHORT}[rc]

    def _request(self, key: str, start: int, end: int, call, ends=(0,)):
        """One signed range GET made by `call(sock, request, thread_buffers)` (a native function's
        return code): retried once on a stale kept connection and, for server errors and refused
        connections, with backoff. Returns (rc, info) for a code in `ends` (0: the connection may be
        kept), raises the store vocabulary otherwise."""
        path = self.signer.path(self.bucket, key)

        def signed() -> bytes:
            lines = [f"GET {path} HTTP/1.1", f"Host: {self.signer.host}", f"Range: bytes={start}-{end - 1}",
                     *(f"{n}: {v}" for n, v in self.signer.headers(path)), "", ""]
            return "\r\n".join(lines).encode()
        req = signed()
        signed_with = getattr(self.signer.credentials, "version", None)  # what the request carries
        refreshed = False
        loc = self._local
        if not hasattr(loc, "hdr"):
            loc.hdr = ctypes.create_string_buffer(_HDR_CAP)
            loc.info = (ctypes.c_int64 * 10)()  # in: [7] the request's deadline, [8] its first byte (httpget.c)
            loc.bounce = np.empty(0, dtype=np.uint8)
        stale_retried, retries = False, 0
        while True:
            try:
                sock, reused = self._take()
            except Unavailable as e:
                err = e
            else:
                loc.info[7] = time.monotonic_ns() + int(self.request_timeout * 1e9)  # the whole request
                loc.info[8] = start
                rc = call(sock, req, loc)
                info = list(loc.info)
                if rc in ends and (rc != 0 or info[0] in (200, 206)):
                    if rc == 0:
                        self._give(sock, bool(info[3]) and info[0] == 206)
                    else:  # the body was left unread
                        sock.close()
                    return rc, info
                sock.close()
                if rc == -1 and reused and not stale_retried and info[4] in (0, _errno.ECONNRESET, _errno.EPIPE):
                    stale_retried = True  # the server closed an idle keep-alive connection: once more
                    continue
                err = self._error(rc, info, loc.hdr, key, start, end)
            # a rotated key or an expired token: once more, with what the chain gives now (another
            # thread may have resolved it first, while this request was on its way)
            creds = self.signer.credentials
            if isinstance(err, AccessDenied) and not refreshed and creds is not None \
                    and (creds.version != signed_with or creds.refresh()):
                refreshed, req = True, signed()
                continue
            # a server error or a refused connection may pass; a timeout has used its time already
            if isinstance(err, Unavailable) and "timed out" not in str(err) and retries < self.max_retries:
                time.sleep(0.05 * 2 ** retries)
                retries += 1
                continue
            raise err

    def _error(self, rc: int, info, hdr, key: str, start: int, end: int) -> StoreError:
        what = f"GET {key} bytes {start}-{end - 1}"
        if rc == -3:  # an error status, with the body's start after the header block
            status, body = info[0], hdr.raw[info[1]:info[1] + info[5]].decode("latin-1")
            code = re.search(r"<Code>([^<]{1,64})</Code>", body)
            text = f"HTTP {status}" + (f" {code.group(1)}" if code else "")
            if status == 404 or (code and code.group(1) in ("NoSuchKey", "NoSuchBucket")):
                return NotFound(f"{what}: {text}")
            if status == 403:
                return AccessDenied(f"{what}: {text}")
            if status in (500, 502, 503, 504):
                return Unavailable(f"{what}: {text}")
            return StoreError(f"{what}: {text}")
        if rc == -1:
            why = _errno.errorcode.get(info[4]) or "closed by the server"
            if info[4] in (_errno.EAGAIN, _errno.EWOULDBLOCK):
                why = f"timed out after {self.request_timeout:g} s"
            return Unavailable(f"{what}: {why}")
        if rc == -4:
            return StoreError(f"{what}: server announced {info[2]} bytes for {end - start}")
        return StoreError(f"{what}: {_MESSAGES.get(rc, f'error {rc}')}")

    def _take(self) -> tuple[_Conn, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        try:
            sock = socket.create_connection(self.addr, timeout=self.connect_timeout)
        except socket.timeout:
            raise Unavailable(f"connect {self.addr[0]}:{self.addr[1]}: timed out after "
                              f"{self.connect_timeout:g} s") from None
        except OSError as e:
            raise Unavailable(f"connect {self.addr[0]}:{self.addr[1]}: {e.strerror or e}") from None
        sock.setblocking(True)  # the native call blocks; SO_RCVTIMEO/SO_SNDTIMEO bound each wait
        tv = struct.pack("ll", int(self.request_timeout), int(self.request_timeout % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is None:
            return _Conn(sock, None, None), False
        err = ctypes.create_string_buffer(512)
        ssl = self._tls.open(self._ctx, sock.fileno(), self.addr[0].encode(), int(self._is_ip), err, len(err))
        if not ssl:
            sock.close()
            why = err.value.decode(errors="replace")
            if "certificate verify failed" in why:  # no retry can fix it: a wrong CA or host name
                raise StoreError(f"TLS {self.addr[0]}:{self.addr[1]}: {why}; give the CA that signed the "
                                 "server's certificate as ca_bundle")
            raise Unavailable(f"TLS {self.addr[0]}:{self.addr[1]}: {why}")
        return _Conn(sock, ssl, self._tls), False

    def check(self) -> None:
        """One connection (with its TLS handshake), kept: raises what a read would."""
        self._give(self._take()[0], True)

    def _give(self, sock: _Conn, keep: bool) -> None:
        with self._lock:
            if keep and not self.closed and len(self._idle) < self.max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
        if self._ctx:
            self._tls.ctx_free(self._ctx)
            self._ctx = None
