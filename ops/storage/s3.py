"""The bucket of --storage-url: an S3-compatible object store, reached with aiobotocore on the event loop.

Objects are `<prefix>/<folder>/<file>`: one folder per session, named and laid out as in the data folder.
The standard variables configure the client: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or any source
botocore knows: a profile, a web identity, an instance role), AWS_ENDPOINT_URL for a server other than AWS
(SeaweedFS, MinIO, Ceph, R2: addressed by path then), and AWS_REGION.

Every failure raises BucketError, whose text says why in a few words; an object that is not there is
None, not a failure. The bucket keeps its own state for /health: `failing` is set by a call that fails
and cleared by the next one that succeeds, and each failure is counted by op in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from ops import metrics

log = logging.getLogger("storage")

URL = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?")
PART = 8 * 1024 * 1024  # a larger file goes up in parts of this size, each read when it is sent
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0
_ATTEMPTS = 3  # botocore's own retries of a call (throttling, 5xx, a dropped connection)
_TYPES = {".json": "application/json", ".jsonl": "application/x-ndjson", ".txt": "text/plain; charset=utf-8",
          ".srt": "application/x-subrip", ".vtt": "text/vtt", ".opus": "audio/ogg"}


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` as ("bucket", "some/prefix"); ValueError for anything else."""
    m = URL.fullmatch(url)
    if m is None:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    return m.group(1), "/".join(part for part in (m.group(2) or "").split("/") if part)


class BucketError(Exception):
    """The bucket could not be reached, or refused: the text says why (no traceback is logged)."""


class OutOfRange(Exception):
    """A byte range the object does not have (the bucket answered 416)."""


def _reason(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        details = response["Error"]
        return f"{details.get('Code') or 'error'}: {details.get('Message') or 'no message'}"
    return str(error) or type(error).__name__


def _code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


_MISSING = ("NoSuchKey", "404", "NotFound")
_ANSWERS = (*_MISSING, "InvalidRange")  # what the bucket says of an object: no failure of the bucket


def _read_part(path: Path, offset: int, size: int) -> bytes:
    """Part of a regular file, following no link (worker thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name}: not a regular file")
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class Bucket:
    def __init__(self, url: str, environ: Mapping[str, str] = os.environ) -> None:
        self.url = url.rstrip("/")
        self.name, self.prefix = split_url(url)
        self.endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None
        self.region = environ.get("AWS_REGION") or None  # None: botocore's AWS_DEFAULT_REGION, profile, default
        # None: botocore's own chain (a profile, a web identity, the instance's role).
        self._credentials = {arg: environ.get(var) or None for arg, var in (
            ("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("aws_session_token", "AWS_SESSION_TOKEN"))}
        self.failing: str | None = None  # why the last call failed, until one succeeds
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()

    # The client -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Makes the client; nothing is sent yet, so a bucket that is down does not stop the server."""
        from aiobotocore.session import get_session
        from botocore.config import Config

        config = Config(
            connect_timeout=_CONNECT_TIMEOUT_S, read_timeout=_READ_TIMEOUT_S,
            retries={"mode": "standard", "max_attempts": _ATTEMPTS},
            # Virtual-host addressing needs a DNS name per bucket, which S3-compatible servers seldom have.
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            # Checksums only where S3 requires them: several S3-compatible servers refuse the newer ones.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        self._client = await self._stack.enter_async_context(get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=self.region, config=config, **self._credentials))

    async def close(self) -> None:
        await self._stack.aclose()

    def key(self, name: str, file: str = "") -> str:
        """The object key of a session folder's file; with file empty, the folder's own prefix."""
        return "/".join(part for part in (self.prefix, name) if part) + "/" + file

    @contextlib.asynccontextmanager
    async def _op(self, op: str) -> AsyncIterator[None]:
        """One call: its failure becomes a BucketError, is counted, and marks the bucket failing."""
        try:
            yield
        except BucketError as e:
            self._failed(op, str(e))
            raise
        except Exception as e:  # botocore's, aiohttp's, a timeout, a refused connection
            if _code(e) in _ANSWERS:  # an answer: the bucket works
                self._works()
                raise
            reason = _reason(e)
            self._failed(op, reason)
            raise BucketError(reason) from None
        else:
            self._works()

    def _works(self) -> None:
        if self.failing is not None:
            self.failing = None
            log.info("storage: %s works again", self.url)

    def _failed(self, op: str, reason: str) -> None:
        metrics.bucket_error(op)
        if self.failing is None:
            log.error("storage: %s failed (%s); ended sessions wait in the data folder until it works again",
                      self.url, reason)
        self.failing = reason

    # Calls ------------------------------------------------------------------------------------

    async def check(self) -> None:
        """Whether the bucket answers: raises BucketError when it does not."""
        async with self._op("check"):
            await self._client.head_bucket(Bucket=self.name)

    async def put(self, name: str, file: str, path: Path) -> None:
        """Uploads a local file, whole: one request, or parts for a large file. OSError when the file
        cannot be read, BucketError when the bucket fails."""
        key = self.key(name, file)
        content_type = _TYPES.get(Path(file).suffix, "application/octet-stream")
        size = (await asyncio.to_thread(os.lstat, path)).st_size
        if size <= PART:
            data = await asyncio.to_thread(_read_part, path, 0, size)
            async with self._op("upload"):
                await self._client.put_object(Bucket=self.name, Key=key, Body=data, ContentType=content_type)
            return
        async with self._op("upload"):
            upload = await self._client.create_multipart_upload(Bucket=self.name, Key=key,
                                                                ContentType=content_type)
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, PART), 1):
                data = await asyncio.to_thread(_read_part, path, offset, PART)
                async with self._op("upload"):
                    sent = await self._client.upload_part(Bucket=self.name, Key=key, UploadId=upload_id,
                                                          PartNumber=number, Body=data)
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            async with self._op("upload"):
                await self._client.complete_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id,
                                                             MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):  # the parts sent would otherwise be kept, and billed
                await self._client.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload_id)
            raise

    async def get(self, name: str, file: str) -> bytes | None:
        """A file's bytes; None when it is not there."""
        try:
            async with self._op("read"):
                response = await self._client.get_object(Bucket=self.name, Key=self.key(name, file))
                async with response["Body"] as body:
                    return await body.read()
        except Exception as e:
            if _code(e) in _MISSING:
                return None
            raise

    async def open_object(self, name: str, file: str, byte_range: str | None = None) -> dict[str, Any] | None:
        """A file to stream: botocore's GetObject response (Body, ContentLength, ContentRange when a
        range was honoured), or None when it is not there. The caller closes its Body."""
        extra = {"Range": byte_range} if byte_range else {}
        try:
            async with self._op("read"):
                return await self._client.get_object(Bucket=self.name, Key=self.key(name, file), **extra)
        except Exception as e:
            if _code(e) in _MISSING:
                return None
            if _code(e) == "InvalidRange":
                raise OutOfRange(byte_range) from None
            raise

    async def folders(self) -> list[str]:
        """The names of the folders under the prefix, in no particular order."""
        found = []
        async with self._op("read"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=self.key(""), Delimiter="/")
            async for page in pages:
                found += [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", ())]
        return found

    async def objects(self, name: str) -> list[dict[str, Any]]:
        """The objects of one folder, as ListObjectsV2 gives them (Key, LastModified, Size)."""
        found = []
        async with self._op("read"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.key(name))
            async for page in pages:
                found += page.get("Contents", ())
        return found

    async def delete(self, name: str) -> None:
        """Deletes a folder and everything in it."""
        objects = await self.objects(name)
        async with self._op("delete"):
            for first in range(0, len(objects), 1000):  # DeleteObjects takes 1000 keys at most
                batch = [{"Key": o["Key"]} for o in objects[first : first + 1000]]
                answer = await self._client.delete_objects(Bucket=self.name, Delete={"Objects": batch, "Quiet": True})
                errors = answer.get("Errors") or []
                if errors:
                    raise BucketError(f"{errors[0].get('Code')}: {errors[0].get('Message')} ({errors[0].get('Key')})")
