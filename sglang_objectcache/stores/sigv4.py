"""AWS Signature Version 4 for the one request the native reader sends: a GET with a Range.

Why not botocore's signer: it builds an AWSRequest and re-derives the signing key per call (about
0.2 ms); a read plan sends hundreds of ranges per request, from several threads. This signs only
host, x-amz-content-sha256 and x-amz-date (and the session token), with UNSIGNED-PAYLOAD, and keeps
the day's signing key. tests/test_rawhttp.py checks it against botocore's signature.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote

from .credentials import CredentialSource, Credentials

_ALGO = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class GetSigner:
    def __init__(self, host: str, region: str, creds: "CredentialSource | Credentials"):
        self.host = host  # as sent in the Host header: name[:port]
        self.region = region
        self.credentials = creds if isinstance(creds, CredentialSource) else None  # kept current
        self._fixed = creds if isinstance(creds, Credentials) else None
        self._day_key = ("", None, b"")  # one tuple: threads see day, secret and key together

    def path(self, bucket: str, key: str) -> str:
        """The path-style request path, encoded as S3 canonicalises it (each segment once)."""
        return "/" + quote(f"{bucket}/{key}", safe="/~")

    def headers(self, path: str, now: float | None = None) -> list[tuple[str, str]]:
        """Signed headers for GET `path` (already encoded); none without credentials."""
        c = self.credentials.current() if self.credentials is not None else self._fixed
        if not c.access_key_id:
            return []
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        day = stamp[:8]
        key_day, key_secret, key = self._day_key
        if key_day != day or key_secret is not c.secret_access_key:  # a racing thread computes the same key
            key = _hmac(f"AWS4{c.secret_access_key}".encode(), day)
            for part in (self.region, "s3", "aws4_request"):
                key = _hmac(key, part)
            self._day_key = (day, c.secret_access_key, key)
        hdrs = [("host", self.host), ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"), ("x-amz-date", stamp)]
        if c.session_token:
            hdrs.append(("x-amz-security-token", c.session_token))
        names = ";".join(n for n, _ in hdrs)
        canonical = "\n".join(["GET", path, "", *(f"{n}:{v}" for n, v in hdrs), "", names, "UNSIGNED-PAYLOAD"])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join([_ALGO, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        auth = f"{_ALGO} Credential={c.access_key_id}/{scope}, SignedHeaders={names}, Signature={sig}"
        return [*hdrs[1:], ("authorization", auth)]
