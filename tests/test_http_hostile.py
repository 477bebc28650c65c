"""The native reader parses what the network sends: every malformed or hostile response in the
corpus is a clean miss (a store error), never a crash, a read outside the bytes received, or bytes
taken for the range asked. Run once in this process and once with the helper built under
AddressSanitizer where the compiler has it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sglang_objectcache.errors import StoreError

START, END = 100, 200  # the range every case asks for
BODY = bytes(range(100))

CORPUS: dict[str, bytes] = {
    "no status code": b"HTTP/1.1\r\n\r\n",
    "status code cut short": b"HTTP/1.1 20\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2060 Partial\r\nContent-Length: 100\r\n\r\n" + BODY,
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "garbage": bytes(range(256)) * 4 + b"\r\n\r\n",
    "empty Content-Length, number on the next line":
        b"HTTP/1.1 206 Partial\r\nContent-Length:\r\n100\r\nContent-Range: bytes 100-199/1000\r\n\r\n" + BODY,
    "Content-Length not a number": b"HTTP/1.1 206 P\r\nContent-Length: 1e2\r\nContent-Range: bytes 100-199/1000\r\n\r\n"
        + BODY,
    "negative Content-Length": b"HTTP/1.1 206 P\r\nContent-Length: -5\r\nContent-Range: bytes 100-199/1000\r\n\r\n",
    "Content-Length overflows": b"HTTP/1.1 206 P\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "two Content-Lengths that disagree":
        b"HTTP/1.1 206 P\r\nContent-Length: 100\r\nContent-Length: 50\r\nContent-Range: bytes 100-199/1000\r\n\r\n"
        + BODY,
    "Content-Length over the range": b"HTTP/1.1 206 P\r\nContent-Length: 5000\r\nContent-Range: bytes 100-5099/9000"
        b"\r\n\r\n" + BODY,
    "206 without Content-Range": b"HTTP/1.1 206 Partial\r\nContent-Length: 100\r\n\r\n" + BODY,
    "Content-Range of other bytes": b"HTTP/1.1 206 P\r\nContent-Length: 100\r\nContent-Range: bytes 0-99/1000\r\n\r\n"
        + BODY,
    "Content-Range longer than its body":
        b"HTTP/1.1 206 P\r\nContent-Length: 100\r\nContent-Range: bytes 100-299/1000\r\n\r\n" + BODY,
    "Content-Range malformed": b"HTTP/1.1 206 P\r\nContent-Length: 100\r\nContent-Range: bytes 100/1000\r\n\r\n"
        + BODY,
    "200 for a range in mid-object (Range ignored)": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + BODY,
    "chunked": b"HTTP/1.1 206 P\r\nTransfer-Encoding: chunked\r\nContent-Range: bytes 100-199/1000\r\n\r\n64\r\n"
        + BODY + b"\r\n0\r\n\r\n",
    "body cut short, then closed": b"HTTP/1.1 206 P\r\nContent-Length: 100\r\nContent-Range: bytes 100-199/1000"
        b"\r\n\r\n" + BODY[:40],
    "header block past the buffer": b"HTTP/1.1 206 P\r\n" + b"X-Pad: " + b"a" * (64 << 10) + b"\r\n\r\n",
    "header block never ends": b"HTTP/1.1 206 P\r\nContent-Length: 100\r\n" + b"X: y\r\n" * 100,
    "closed at once": b"",
    "server error with a long body": b"HTTP/1.1 500 Oops\r\nContent-Length: 100000\r\n\r\n" + b"e" * 100000,
    "error status, no Content-Length": b"HTTP/1.1 403 Forbidden\r\n\r\n<Code>AccessDenied</Code>",
}
GOOD = b"HTTP/1.1 206 Partial\r\nContent-Length: 100\r\nContent-Range: bytes 100-199/1000\r\n\r\n" + BODY


class FakeServer:
    """Answers every request on 127.0.0.1 with `self.response`, then closes the connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.response = GOOD
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.settimeout(2)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                c.sendall(self.response)
            except OSError:
                pass
            finally:
                c.close()

    def close(self):
        self.sock.close()


def run_corpus() -> dict[str, str]:
    """Each case's outcome: 'error: ...' for a clean store error, else what went wrong."""
    from sglang_objectcache.stores.credentials import Credentials
    from sglang_objectcache.stores.rawhttp import RawRangeReader

    srv = FakeServer()
    r = RawRangeReader(endpoint=srv.endpoint, bucket="b", region="us-east-1", creds=Credentials(None),
                       request_timeout=1.0, connect_timeout=1.0, max_idle=0, max_retries=0)
    out = {}
    try:
        for name, response in {"good": GOOD, **CORPUS}.items():
            srv.response = response
            dst = np.zeros(END - START, np.uint8)
            try:
                n = r.read_into("k", START, END, dst)
                out[name] = "ok" if n == END - START and dst.tobytes() == BODY else f"returned {n} bytes"
            except StoreError as e:
                out[name] = f"error: {e}"
    finally:
        r.close()
        srv.close()
    return out


def test_every_hostile_response_is_a_clean_miss():
    out = run_corpus()
    assert out.pop("good") == "ok", "the harness reads a good response"
    wrong = {k: v for k, v in out.items() if not v.startswith("error: ")}
    assert not wrong, wrong
    assert "AccessDenied" in out["error status, no Content-Length"]


ASAN_RUN = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import test_http_hostile as t
out = t.run_corpus()
assert out.pop("good") == "ok", out
bad = {k: v for k, v in out.items() if not v.startswith("error: ")}
assert not bad, bad
print("corpus clean under ASan:", len(out))
"""


def test_the_corpus_under_address_sanitizer(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    libasan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not libasan or not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("the compiler has no AddressSanitizer runtime")
    import hashlib
    from importlib import resources

    from sglang_objectcache import native

    srcs = {n: resources.files(native.__name__).joinpath(n).read_bytes() for n in native.SOURCES}
    tag = hashlib.sha256(b"".join(srcs.values()) + sys.platform.encode() + os.uname().machine.encode()).hexdigest()[:16]
    d = tmp_path / "asan"
    d.mkdir(mode=0o700)
    for n, b in srcs.items():
        (d / n).write_bytes(b)
    so = d / f"objectcache-{tag}.so"
    r = subprocess.run([cc, "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-shared", "-fPIC",
                        "-std=c99", "-o", str(so), *(str(d / n) for n in srcs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build with -fsanitize=address: {r.stderr[:200]}")
    so.with_suffix(".sha256").write_text(hashlib.sha256(so.read_bytes()).hexdigest())
    env = {**os.environ, "OBJECTCACHE_NATIVE_DIR": str(d), "LD_PRELOAD": libasan,
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "PYTHONPATH": os.getcwd()}
    root = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", ASAN_RUN, root], capture_output=True, text=True, env=env, timeout=300)
    assert "AddressSanitizer" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 0 and "corpus clean under ASan" in p.stdout, (p.stdout[-500:], p.stderr[-2000:])


def test_an_ipv6_endpoint_keeps_its_brackets_in_the_host_header():
    from sglang_objectcache.stores.credentials import Credentials
    from sglang_objectcache.stores.rawhttp import RawRangeReader

    r = RawRangeReader(endpoint="http://[::1]:9000", bucket="b", region="us-east-1", creds=Credentials(None),
                       request_timeout=1.0, connect_timeout=1.0, max_idle=0)
    try:
        assert r.addr == ("::1", 9000) and r.signer.host == "[::1]:9000"
    finally:
        r.close()
