"""S3 through aioboto3: the reference transport, pure Python on our event loop.

It is slower than obstore (docs/benchmarks.md) but speaks every S3 dialect botocore knows, so it
stays selectable with `transport: aioboto3`. The client lives for the store's lifetime on the
runtime loop; `open()` must be awaited on that loop before use.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from ..errors import AccessDenied, AlreadyExists, NotFound, StoreError, Unavailable
from .base import Listed, ObjectMeta
from .credentials import Credentials


_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "TokenRefreshRequired", "Forbidden", "403"}


def _map(e: BaseException, what: str) -> StoreError:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnErr, ReadTimeoutError

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreError(f"{what}: NoSuchBucket")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(what)
        if code in ("PreconditionFailed", "412") or status == 412:
            return AlreadyExists(what)
        if status == 403 or code in _DENIED:
            return AccessDenied(f"{what}: {code or status}")
        return StoreError(f"{what}: {code or status}")
    if isinstance(e, (BotoConnErr, ReadTimeoutError, TimeoutError, OSError)):
        return Unavailable(f"{what}: {type(e).__name__}")
    return StoreError(f"{what}: {type(e).__name__}: {str(e)[:200]}")


class Aioboto3S3Store:
    def __init__(self, *, bucket: str, endpoint: str | None, region: str, creds: Credentials,
                 max_connections: int, request_timeout: float, connect_timeout: float,
                 max_retries: int, ca_bundle: str | None = None):
        self.name = f"s3(aioboto3):{bucket}"
        self._bucket = bucket
        self._kw = dict(endpoint_url=endpoint, region_name=region,
                        **({"verify": ca_bundle} if ca_bundle else {}),
                        aws_access_key_id=creds.access_key_id,
                        aws_secret_access_key=creds.secret_access_key,
                        aws_session_token=creds.session_token)
        self._cfg = dict(max_pool_connections=max_connections, connect_timeout=connect_timeout,
                         read_timeout=request_timeout, retries={"max_attempts": max_retries + 1,
                                                                "mode": "standard"},
                         s3={"addressing_style": "path"})
        self._stack: contextlib.AsyncExitStack | None = None
        self._client = None

    async def open(self) -> None:
        import aioboto3
        from aiobotocore.config import AioConfig

        self._stack = contextlib.AsyncExitStack()
        session = aioboto3.Session()
        self._client = await self._stack.enter_async_context(
            session.client("s3", config=AioConfig(**self._cfg), **self._kw))

    async def get(self, path: str, *, start: int | None = None, end: int | None = None):
        kw = {}
        if start is not None or end is not None:
            kw["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        try:
            r = await self._client.get_object(Bucket=self._bucket, Key=path, **kw)
            async with r["Body"] as body:
                return await body.read()
        except Exception as e:  # noqa: BLE001
            raise _map(e, f"GET {path}") from None

    async def put(self, path: str, data, *, create_only: bool = True) -> None:
        kw = {"IfNoneMatch": "*"} if create_only else {}
        try:
            await self._client.put_object(Bucket=self._bucket, Key=path, Body=bytes(data), **kw)
        except Exception as e:  # noqa: BLE001
            raise _map(e, f"PUT {path}") from None

    async def head(self, path: str) -> ObjectMeta:
        try:
            r = await self._client.head_object(Bucket=self._bucket, Key=path)
            return ObjectMeta(int(r["ContentLength"]), r["LastModified"].timestamp())
        except Exception as e:  # noqa: BLE001
            raise _map(e, f"HEAD {path}") from None

    async def list(self, prefix: str, *, start_after: str | None = None) -> list[Listed]:
        out: list[Listed] = []
        kw = {"Bucket": self._bucket, "Prefix": prefix}
        if start_after:
            kw["StartAfter"] = start_after
        try:
            async for page in self._client.get_paginator("list_objects_v2").paginate(**kw):
                out.extend(Listed(o["Key"], int(o["Size"]), o["LastModified"].timestamp())
                           for o in page.get("Contents", []))
        except Exception as e:  # noqa: BLE001
            raise _map(e, f"LIST {prefix}") from None
        return out

    async def delete(self, paths: Sequence[str]) -> None:
        paths = list(paths)
        try:
            for i in range(0, len(paths), 1000):
                await self._client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": p} for p in paths[i : i + 1000]], "Quiet": True})
        except Exception as e:  # noqa: BLE001
            raise _map(e, f"DELETE {len(paths)} objects") from None

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
