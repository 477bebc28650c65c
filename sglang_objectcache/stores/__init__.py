"""One small async store protocol, and the stores behind it (S3 through obstore or aioboto3,
a local disk directory). The engine above never knows which store it talks to."""

from .base import AlreadyExists, NotFound, ObjectStore, StoreError, Unavailable

__all__ = ["AlreadyExists", "NotFound", "ObjectStore", "StoreError", "Unavailable"]
