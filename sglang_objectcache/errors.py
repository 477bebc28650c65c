"""Every error the package raises, in one place: modules import from here, never from each other.

    ObjectCacheError
    ├── ConfigError        a bad config, found at startup; the message names the key and the fix
    ├── StartupError       a tier cannot be used: unreachable server, missing bucket, bad credentials
    ├── UnsupportedSGLang  the installed SGLang is not a supported release
    ├── PatchError         the layer-wise patch cannot be applied, checked or reverted
    ├── CorruptObject      an object's bytes fail their footer, checksums or the reader's geometry
    └── StoreError         one request failed (never with credentials in the message)
        ├── NotFound       the object does not exist (also a FileNotFoundError)
        ├── AlreadyExists  a create-only put found the object there
        ├── AccessDenied   the server rejected the credentials (403): refreshed, then retried once
        └── Unavailable    the server could not be reached, or timed out

Config, startup, version and patch errors stop the server with their message. Store errors and
corrupt objects never reach SGLang: the engine turns them into misses and a log line.
The built-in bases (ValueError, RuntimeError, FileNotFoundError) let callers that catch those
keep working.
"""

from __future__ import annotations


class ObjectCacheError(Exception):
    """The root of this package's errors."""


class ConfigError(ObjectCacheError, ValueError):
    """A configuration problem found at startup. The message names the key and the fix."""


class StartupError(ObjectCacheError, RuntimeError):
    """A tier cannot be used: unreachable server, missing bucket, rejected credentials."""


class UnsupportedSGLang(ObjectCacheError, RuntimeError):
    """SGLang is missing, or a release this package does not support."""


class PatchError(ObjectCacheError, RuntimeError):
    """The layer-wise patch does not apply to (or cannot be removed from) the installed SGLang."""


class CorruptObject(ObjectCacheError, ValueError):
    """The object's bytes do not match its footer, its checksums or the reader's expectations."""


class StoreError(ObjectCacheError):
    """A request failed. Messages never carry credentials."""


class NotFound(StoreError, FileNotFoundError):
    """The object does not exist."""


class AlreadyExists(StoreError):
    """A create-only put found the object already there."""


class NameTaken(StoreError):
    """The object's name already holds an object this writer cannot use (other pages or geometry,
    or not written with the integrity key): retrying cannot help."""


class AccessDenied(StoreError):
    """The server rejected the request's credentials (403: a rotated key, an expired token)."""


class Unavailable(StoreError):
    """The server could not be reached, or timed out."""
