"""Credentials from the standard AWS chain (environment, shared files, profile, STS, instance
profiles, web identity), kept current for as long as the server runs.

botocore resolves the chain. Temporary credentials come back refreshable: botocore renews them
before they expire whenever they are asked for. Static ones (keys in the environment or in a shared
credentials file) are resolved again when the files of the chain change (checked at most once a
second) and when the server rejects the keys (`refresh`, at most once every `MIN_REFRESH` seconds),
which is how a key rotated in `~/.aws/credentials` is picked up without a restart. Every transport
asks `current()` (cheap) and rebuilds its client or signs with the new keys when `version` moves.
The secret never leaves `Credentials`: its repr is redacted.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

MIN_REFRESH = 1.0  # seconds between forced re-resolutions (a burst of 403s resolves once)
FILE_CHECK = 1.0  # seconds between looks at the chain's files


@dataclass(frozen=True)
class Credentials:
    access_key_id: str | None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def _chain_files() -> list[str]:
    return [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", os.path.expanduser("~/.aws/credentials")),
            os.environ.get("AWS_CONFIG_FILE", os.path.expanduser("~/.aws/config"))]


def _stamp(paths: list[str]) -> tuple:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class CredentialSource:
    """The chain's current credentials; thread-safe."""

    def __init__(self, profile: str | None = None):
        self.profile = profile
        self.version = 0  # moves whenever the credentials handed out change
        self._lock = threading.Lock()
        self._files = _chain_files()
        self._resolved_at = 0.0
        self._checked_at = 0.0
        self._creds = Credentials(None)
        self._resolve()

    def _resolve(self) -> None:
        """Under the lock (or in __init__): run the chain again."""
        import botocore.session

        self._stamp = _stamp(self._files)
        self._source = botocore.session.Session(profile=self.profile).get_credentials()
        self._resolved_at = self._checked_at = time.monotonic()
        self._take()

    def _take(self) -> None:
        if self._source is None:
            creds = Credentials(None)
        else:
            f = self._source.get_frozen_credentials()  # refreshable ones renew themselves here
            creds = Credentials(f.access_key, f.secret_key, f.token)
        if creds != self._creds:
            self._creds = creds
            self.version += 1

    def current(self) -> Credentials:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= FILE_CHECK:
                self._checked_at = now
                if _stamp(self._files) != self._stamp:
                    self._resolve()
                    return self._creds
            self._take()
            return self._creds

    def refresh(self) -> bool:
        """The server rejected the keys: resolve the chain again (at once if its files changed, else
        at most every MIN_REFRESH seconds). True if the credentials changed, so that a retry may
        succeed."""
        with self._lock:
            if _stamp(self._files) == self._stamp and time.monotonic() - self._resolved_at < MIN_REFRESH:
                return False
            before = self.version
            self._resolve()
            return self.version != before


def resolve(profile: str | None = None) -> Credentials:
    """The chain's credentials now (for one-off clients: bucket creation, tools)."""
    return CredentialSource(profile).current()
