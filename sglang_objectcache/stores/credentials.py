"""Credentials from the standard AWS chain (environment, shared files, profile, ...).

botocore (already here through aioboto3) resolves the chain once; both transports then use the
same keys. The secret never leaves this object: its repr is redacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Credentials:
    access_key_id: str | None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)


def resolve(profile: str | None = None) -> Credentials:
    import botocore.session

    session = botocore.session.Session(profile=profile)
    creds = session.get_credentials()
    if creds is None:
        return Credentials(None)
    frozen = creds.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token)
