"""Build a store from its tier config, and check at startup that it is usable.

Startup problems become one StartupError that names the key, the cause and the fix; the secret
key never appears in it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import urllib.parse

from ..config import DiskTierConfig, S3TierConfig, TierConfig
from ..errors import ConfigError, StartupError, StoreError, Unavailable
from .base import ObjectStore, RangeReader

log = logging.getLogger("sglang_objectcache")


def pick_transport(t: S3TierConfig) -> str:
    """The control transport: obstore when installed (5x faster reads, docs/benchmarks.md), else
    aioboto3. `nixl` moves range reads only (build_range_reader); the rest goes through obstore."""
    if t.transport not in ("auto", "nixl"):
        return t.transport
    return "obstore" if importlib.util.find_spec("obstore") else "aioboto3"


def build_store(t: TierConfig, where: str) -> ObjectStore:
    if isinstance(t, DiskTierConfig):
        from .disk import DiskStore

        try:
            return DiskStore(t.path, budget_bytes=t.capacity)
        except OSError as e:
            raise ConfigError(f"{where}.path: cannot use {t.path!r} ({e.strerror}); pick a writable "
                              "directory") from None
    from .credentials import CredentialSource
    from .refreshing import RefreshingStore

    try:
        source = CredentialSource(t.profile)
    except Exception as e:  # noqa: BLE001 - botocore raises ProfileNotFound and friends
        raise ConfigError(f"{where}.profile: {type(e).__name__}: {e}") from None
    kw = dict(bucket=t.bucket, endpoint=t.endpoint, region=t.region,
              max_connections=t.max_connections, request_timeout=t.request_timeout,
              connect_timeout=t.connect_timeout, max_retries=t.max_retries, ca_bundle=t.ca_bundle)
    transport = pick_transport(t)
    if transport == "obstore":
        kw["sign_payload"] = t.sign_payload  # botocore picks for itself: signed over http, not over https
        if not importlib.util.find_spec("obstore"):
            raise ConfigError(f"{where}.transport: obstore is not installed; pip install obstore, or "
                              "set transport: aioboto3")
        from .s3_obstore import ObstoreS3Store

        return RefreshingStore(lambda creds: ObstoreS3Store(creds=creds, **kw), source)
    from .s3_aioboto3 import Aioboto3S3Store

    return RefreshingStore(lambda creds: Aioboto3S3Store(creds=creds, **kw), source)


def build_range_reader(t: S3TierConfig, where: str, staging_bytes: int,
                       credentials=None) -> RangeReader | None:
    """The native range reader for this tier (native_reader.py), or None: `native_reads: off`, the
    default AWS endpoint, no native helper, or for https:// no native TLS (OpenSSL headers at build
    time) (auto only; `on` makes those errors).
    `staging_bytes`: the size of a whole-range receive buffer (the planned range size);
    `credentials`: the tier store's CredentialSource, shared (else one of its own)."""
    if t.transport == "nixl":
        from .credentials import CredentialSource
        from .native_reader import NativeRangeReader
        from .nixl_reader import NixlRangeReader

        if not t.endpoint:
            raise ConfigError(f"{where}.transport: nixl needs an endpoint (http:// or https://)")
        nixl = NixlRangeReader(endpoint=t.endpoint, bucket=t.bucket, region=t.region,
                               credentials=credentials or CredentialSource(t.profile),
                               request_timeout=t.request_timeout, max_retries=t.max_retries,
                               threads=t.max_connections, ca_bundle=t.ca_bundle)
        return NativeRangeReader(nixl, threads=t.max_connections, staging_bytes=staging_bytes)
    if t.native_reads == "off" or not (t.endpoint or "").startswith(("http://", "https://")):
        return None
    from .. import native
    from .credentials import CredentialSource
    from .native_reader import NativeRangeReader
    from .rawhttp import RawRangeReader

    if native.http_get() is None:
        if t.native_reads == "on":
            raise ConfigError(f"{where}.native_reads: the native helper cannot be built ({native.status()}); "
                              "install a C compiler or set native_reads: auto")
        return None
    if t.endpoint.startswith("https://") and native.tls() is None:
        if t.native_reads == "on":
            raise ConfigError(f"{where}.native_reads: the native https reader cannot be built "
                              f"({native.tls_status()}); install OpenSSL's headers (libssl-dev) or set "
                              "native_reads: auto")
        return None
    http = RawRangeReader(endpoint=t.endpoint, bucket=t.bucket, region=t.region,
                          creds=credentials or CredentialSource(t.profile),
                          request_timeout=t.request_timeout, connect_timeout=t.connect_timeout,
                          max_idle=t.max_connections, max_retries=t.max_retries, ca_bundle=t.ca_bundle)
    return NativeRangeReader(http, threads=t.max_connections, staging_bytes=staging_bytes)


def _create_bucket(t: S3TierConfig, where: str) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    from .credentials import resolve

    c = resolve(t.profile)
    s3 = boto3.client("s3", endpoint_url=t.endpoint, region_name=t.region, verify=t.ca_bundle,
                      aws_access_key_id=c.access_key_id, aws_secret_access_key=c.secret_access_key,
                      aws_session_token=c.session_token,
                      config=Config(connect_timeout=t.connect_timeout, read_timeout=t.request_timeout,
                                    retries={"max_attempts": 1}))
    try:
        s3.create_bucket(Bucket=t.bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        raise StartupError(f"{where}.create_bucket: the server refused to create bucket {t.bucket!r} ({code}); "
                           "create it yourself, or use credentials allowed to") from None
    except BotoCoreError as e:
        raise StartupError(f"{where}.create_bucket: cannot create bucket {t.bucket!r}: {type(e).__name__}") from None


_STATUS = re.compile(r"status code: (\d{3})\b|\((\d{3})\)")


def _tls_refusal(t: S3TierConfig) -> str | None:
    """Why the https endpoint's certificate is refused (a verification error), or None where the
    handshake works or the failure is not TLS's: a transport's "error sending request" says neither."""
    import socket
    import ssl

    u = urllib.parse.urlsplit(t.endpoint)
    ctx = ssl.create_default_context(cafile=t.ca_bundle) if t.ca_bundle else ssl.create_default_context()
    try:
        with socket.create_connection((u.hostname, u.port or 443), timeout=t.connect_timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=u.hostname):
                return None
    except ssl.SSLCertVerificationError as e:
        return f"certificate verify failed: {e.verify_message}"
    except (OSError, ssl.SSLError):
        return None


async def probe(store: ObjectStore, t: TierConfig, where: str, root: str, *, create: bool = True) -> None:
    """One LIST under a name that never exists: an empty answer means endpoint, bucket and
    credentials work (a HEAD could not tell a missing bucket from a missing key). `create`: a
    missing bucket may be created where the tier says `create_bucket: true` (never by a check)."""
    if hasattr(store, "open"):
        await store.open()
    if isinstance(t, DiskTierConfig):
        return
    for attempt in (1, 2):
        try:
            await store.list(f"{root}.probe")
            return
        except Unavailable as e:
            tls = _tls_refusal(t) if (t.endpoint or "").startswith("https://") else None
            if tls:
                raise StartupError(
                    f"{where}.endpoint: {t.endpoint}: TLS {tls}; set ca_bundle to the CA that signed the "
                    "server's certificate (verification is never turned off)") from None
            raise StartupError(
                f"{where}.endpoint: cannot reach {t.endpoint or 'the default AWS endpoint'} ({e}); "
                "start the server or fix the endpoint") from None
        except StoreError as e:
            text = str(e)
            # the message echoes the listed name, whose hex digest may hold "404" or "403": drop it,
            # and read the HTTP status only where the transport states it
            path = f"{root}.probe"
            low = text.replace(path, "").replace(urllib.parse.quote(path + "/", safe=""), "").lower()
            status = (m.group(1) or m.group(2)) if (m := _STATUS.search(low)) else None
            # An S3 LIST answers 404 only when the bucket itself is missing, and says NoSuchBucket.
            if "nosuchbucket" in low:
                if t.create_bucket and create and attempt == 1:
                    _create_bucket(t, where)
                    continue
                raise StartupError(
                    f"{where}.bucket: bucket {t.bucket!r} does not exist at {t.endpoint}; create it "
                    "or set create_bucket: true") from None
            if status == "404":
                raise StartupError(
                    f"{where}.endpoint: {t.endpoint} answered 404 without an S3 error (no NoSuchBucket): it "
                    "does not look like an S3 endpoint; check the host, port and path") from None
            if status == "403" or any(s in low for s in ("forbidden", "accessdenied", "signature",
                                                         "invalidaccesskey", "unauthenticated", "permission")):
                raise StartupError(
                    f"{where}: the server rejected the credentials (from the AWS chain: "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or profile); fix them") from None
            raise StartupError(f"{where}: startup check failed: {text}") from None
