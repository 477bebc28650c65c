"""``python tests/testbed seaweedfs|ceph [--dir D] [--port P]`` (from the repository root)

Starts a real S3 server on 127.0.0.1, prints its endpoint, bucket and keys as shell ``export``
lines on stdout once it is usable, and serves until Ctrl-C / SIGTERM / SIGHUP, then stops the
server (deleting its state unless --dir was given). Run it in its own terminal, or in the
background with stdout to a file that you source once it is written:

    python tests/testbed seaweedfs > s3.env &
    until [ -s s3.env ]; do sleep 0.2; done; . ./s3.env
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time

# Run as a directory (`python tests/testbed`), this file is a script, not part of a package: put
# tests/ on sys.path so that `testbed` imports as the package it is.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed.servers import (  # noqa: E402
    DEFAULT_ACCESS_KEY,
    DEFAULT_BUCKET,
    DEFAULT_SECRET_KEY,
    S3Server,
    start_ceph_rgw,
    start_seaweedfs,
)


def export_lines(server: S3Server) -> str:
    env = {
        "AWS_ENDPOINT_URL": server.endpoint,
        **server.env(),
        "S3_BUCKET": server.bucket,
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/testbed",
                                 description="Run a real S3 server on 127.0.0.1 until Ctrl-C.")
    ap.add_argument("kind", choices=["seaweedfs", "ceph"])
    ap.add_argument("--dir", help="state dir (kept at exit); default: a temp dir, deleted at exit")
    ap.add_argument("--port", type=int, help="S3 port (default: a free one)")
    ap.add_argument("--bucket", default=DEFAULT_BUCKET)
    ap.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    ap.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    ap.add_argument("--osd-store", default="memstore", choices=["memstore", "bluestore"],
                    help="ceph only (default memstore: RAM, capped at --osd-size-gb)")
    ap.add_argument("--osd-size-gb", type=int, help="ceph only (default 4 memstore, 20 bluestore)")
    a = ap.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    t0 = time.monotonic()
    common = dict(data_dir=a.dir, port=a.port, bucket=a.bucket, access_key=a.access_key,
                  secret_key=a.secret_key)
    try:
        if a.kind == "seaweedfs":
            server = start_seaweedfs(**common)
        else:
            server = start_ceph_rgw(**common, osd_store=a.osd_store, osd_size_gb=a.osd_size_gb)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        sys.stdout.write(export_lines(server))
        sys.stdout.flush()
        print(f"# {server.kind} ready in {time.monotonic() - t0:.1f} s at {server.endpoint}, "
              f"state in {server.data_dir}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            if not server.is_running():
                print(f"error: {server.kind} died; log: {server.log_path}", file=sys.stderr)
                return 1
    finally:
        server.stop()
        print(f"# {server.kind} stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
