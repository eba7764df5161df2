"""Where stored sessions are kept: the data folder, and with --storage-url the bucket. Both answer the same
questions about a session folder, by its name (`2026-11-21T09-30-00Z_5f0c...`), so that the catalog, the
audio route and retention ask them without knowing which one they ask.

- FolderShelf: the data folder. Live sessions, and the ended ones that are kept there: all of them
  without a bucket; with one, those not uploaded yet.
- BucketShelf: the bucket. Only whole sessions are there: a folder whose session.json has not arrived (an
  upload under way, or one cut short) is not listed.

Reads raise Unreadable for what is there but cannot be read, and the bucket's BucketError when it fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Container

import aiohttp
from aiohttp import web

from errors import ApiError
from ops.storage.files import (AUDIO, FINALS, FOLDER, META, Unreadable, folder_time, is_regular, last_write, once,
                               parse_finals, parse_iso, parse_meta, read_file, read_finals, read_meta,
                               session_folders)
from ops.storage.s3 import Bucket, OutOfRange

log = logging.getLogger("storage")

_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")  # one range: what is passed on to the bucket
_CHUNK = 64 * 1024
_CACHED_METAS = 4096  # session.json of bucket sessions kept in memory: they never change once there


def no_audio() -> ApiError:
    return ApiError(404, "no_audio", "this session's audio was not recorded")


class Shelf:
    """What the catalog, the audio route and retention need of a place that keeps sessions."""

    whole_only = False  # True: only sessions whose session.json is there are listed

    async def names(self) -> list[tuple[str, str]]:
        """(folder name, session id) of every session kept here, newest first."""
        raise NotImplementedError

    async def find(self, session_id: str) -> str | None:
        """The folder name of a session kept here; None when it is not."""
        return next((name for name, found in await self.names() if found == session_id), None)

    async def read(self, name: str, file: str) -> bytes | None:
        """A file of a session folder; None when it is not there."""
        raise NotImplementedError

    async def meta(self, name: str) -> dict[str, Any] | None:
        """Its session.json; None when there is none (yet)."""
        raise NotImplementedError

    async def finals(self, name: str) -> list[dict[str, Any]]:
        """The finals of its finals.jsonl."""
        raise NotImplementedError

    async def has_audio(self, name: str, meta: dict[str, Any]) -> bool:
        raise NotImplementedError

    async def audio(self, name: str, request: web.Request) -> web.StreamResponse:
        """The response that serves its recording; 404 no_audio when there is none."""
        raise NotImplementedError

    async def age(self, name: str) -> float | None:
        """For retention: when it ended (its last write when it has no end time), as a Unix time; None
        when it is gone."""
        raise NotImplementedError

    async def delete(self, name: str) -> bool:
        """Deletes the whole session folder; False when some of it is left."""
        raise NotImplementedError


class FolderShelf(Shelf):
    """The data folder. `hidden`: folders left out of the listing (uploaded, and soon removed)."""

    def __init__(self, root: Path, hidden: Container[str] = ()) -> None:
        self.root = root
        self.hidden = hidden

    async def names(self) -> list[tuple[str, str]]:
        found = await asyncio.to_thread(session_folders, self.root)
        return [(name, sid) for name, sid in found if name not in self.hidden]

    async def read(self, name: str, file: str) -> bytes | None:
        return await asyncio.to_thread(read_file, self.root / name / file)

    async def meta(self, name: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(read_meta, self.root / name)

    async def finals(self, name: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(read_finals, self.root / name / FINALS)

    async def has_audio(self, name: str, meta: dict[str, Any]) -> bool:
        return await asyncio.to_thread(is_regular, self.root / name / AUDIO)

    async def audio(self, name: str, request: web.Request) -> web.StreamResponse:
        path = self.root / name / AUDIO
        if not await asyncio.to_thread(is_regular, path):
            raise no_audio()
        return web.FileResponse(path, headers={"Content-Type": "audio/ogg"})

    async def age(self, name: str) -> float | None:
        return await asyncio.to_thread(self._age, self.root / name)

    @staticmethod
    def _age(folder: Path) -> float | None:
        if not os.path.lexists(folder):
            return None
        try:
            ended = parse_iso((read_meta(folder) or {}).get("ended"))
        except Unreadable:
            ended = None
        # No end time (a crash, another server's live session, an unreadable session.json):
        # the last write is the age.
        return ended.timestamp() if ended is not None else last_write(folder).timestamp()

    async def delete(self, name: str) -> bool:
        folder = self.root / name
        return await asyncio.to_thread(lambda: (shutil.rmtree(folder, ignore_errors=True),
                                                not os.path.lexists(folder))[1])


class BucketShelf(Shelf):
    """The bucket of --storage-url. A session's session.json goes up last and never changes after, so it
    is kept in memory once read (up to _CACHED_METAS of them)."""

    whole_only = True

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._metas: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._index: dict[str, str] = {}  # session id -> folder name, from the last listing

    async def names(self) -> list[tuple[str, str]]:
        found = []
        for name in await self.bucket.folders():
            m = FOLDER.fullmatch(name)
            if m is None:
                continue  # not a session's: never touched
            if folder_time(name) is None:
                once(f"s3:{name}", "storage: skipped %s in the bucket: its name holds no valid time", name)
                continue
            found.append((name, m.group(2)))
        found.sort(reverse=True)
        self._index = {sid: name for name, sid in found}
        return found

    async def find(self, session_id: str) -> str | None:
        name = self._index.get(session_id)
        if name is None or await self.bucket.get(name, META) is None:  # unknown, or deleted since
            name = next((n for n, sid in await self.names() if sid == session_id), None)
        return name

    async def read(self, name: str, file: str) -> bytes | None:
        return await self.bucket.get(name, file)

    async def meta(self, name: str) -> dict[str, Any] | None:
        meta = self._metas.get(name)
        if meta is not None:
            self._metas.move_to_end(name)
            return meta
        meta = parse_meta(await self.bucket.get(name, META))
        if meta is not None:
            self._metas[name] = meta
            while len(self._metas) > _CACHED_METAS:
                self._metas.popitem(last=False)
        return meta

    async def finals(self, name: str) -> list[dict[str, Any]]:
        data = await self.bucket.get(name, FINALS)
        if data is None:  # a whole session has one: this one was deleted since it was found
            raise FileNotFoundError(FINALS)
        return parse_finals(data, self.bucket.key(name, FINALS))

    async def has_audio(self, name: str, meta: dict[str, Any]) -> bool:
        return meta.get("audio") == AUDIO

    async def audio(self, name: str, request: web.Request) -> web.StreamResponse:
        asked = request.headers.get("Range", "").replace(" ", "")
        byte_range = asked if _RANGE.fullmatch(asked) else None  # several ranges: the whole file, as allowed
        try:
            found = await self.bucket.open_object(name, AUDIO, byte_range)
        except OutOfRange:
            raise ApiError(416, "bad_range", "the range is outside the recording") from None
        if found is None:
            raise no_audio()
        body = found["Body"]
        try:
            partial = byte_range is not None and bool(found.get("ContentRange"))
            headers = {"Content-Type": "audio/ogg", "Accept-Ranges": "bytes",
                       "Content-Length": str(found["ContentLength"])}
            if partial:
                headers["Content-Range"] = found["ContentRange"]
            response = web.StreamResponse(status=206 if partial else 200, headers=headers)
            await response.prepare(request)
            try:
                while chunk := await body.read(_CHUNK):
                    await response.write(chunk)
            except (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                # The client left, or the bucket stopped sending: the connection closes, so that the
                # client cannot take what it got for the whole file.
                log.info("storage: %s of %s cut short: %s", AUDIO, name, e)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response
        finally:
            body.close()

    async def age(self, name: str) -> float | None:
        meta = None
        try:
            meta = await self.meta(name)
        except Unreadable as e:  # aged by its last write
            once(f"s3:{name}", "storage: %s in the bucket: %s", name, e)
        ended = parse_iso((meta or {}).get("ended"))
        if ended is not None:
            return ended.timestamp()
        # An upload under way or cut short: its newest object is its age.
        objects = await self.bucket.objects(name)
        return max((o["LastModified"].timestamp() for o in objects), default=None)

    async def delete(self, name: str) -> bool:
        await self.bucket.delete(name)
        self._metas.pop(name, None)
        return True
