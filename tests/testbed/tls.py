"""A real S3 server over TLS on loopback: SeaweedFS with an https port whose certificate (for
127.0.0.1 and localhost) is signed by a CA made here, plus a second CA that signed nothing (to
check that a wrong CA is refused). Needs the `openssl` command."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from pathlib import Path

from .servers import S3Server, _pick_ports, start_seaweedfs


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: Path) -> dict[str, str]:
    """ca, other_ca: PEM certificates of two CAs; cert, key: the server's, signed by ca."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("ca", "other_ca"):
        out[name], out[f"{name}_key"] = str(d / f"{name}.crt"), str(d / f"{name}.key")
        _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", out[f"{name}_key"], "-out", out[name],
             "-days", "2", "-subj", f"/CN=objectcache test {name}")
    out["key"], out["cert"] = str(d / "server.key"), str(d / "server.crt")
    csr, ext = str(d / "server.csr"), d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", out["key"], "-out", csr, "-subj", "/CN=localhost")
    _run("x509", "-req", "-in", csr, "-CA", out["ca"], "-CAkey", out["ca_key"], "-CAcreateserial", "-out",
         out["cert"], "-days", "2", "-extfile", str(ext))
    return out


def start_seaweedfs_tls(cert_dir: Path, **kw) -> tuple[S3Server, S3Server, dict[str, str]]:
    """(the server as started: stop() it; the same server seen through its https port; the
    certificates). Both ports serve the same buckets."""
    certs = make_certs(cert_dir)
    port = _pick_ports(1)[0]
    srv = start_seaweedfs(extra_args=[f"-s3.port.https={port}", f"-s3.cert.file={certs['cert']}",
                                      f"-s3.key.file={certs['key']}"], **kw)
    deadline = time.monotonic() + 30
    while True:  # the https listener may come up after the http one
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                srv.stop()
                raise RuntimeError(f"SeaweedFS's https port {port} never opened") from None
            time.sleep(0.2)
    return srv, dataclasses.replace(srv, endpoint=f"https://127.0.0.1:{port}"), certs
