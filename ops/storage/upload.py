"""Ended sessions from the data folder to the bucket of --storage-url.

A session is uploaded once its closing files are on disk: its files one by one, session.json last, so
that a folder in the bucket with a session.json is whole. Its local copy is then left out of the local
listing at once, and removed _GRACE_S later, when the readers that found it there are done with it.

While the bucket fails, sessions wait in the data folder (on disk, as without a bucket), the first one is
tried again after a growing pause, and the bucket's state says so in /health. At startup, the ended
sessions still in the data folder are uploaded: those a crash left open once recovery has completed them,
and those whose upload a crash or a failing bucket held back. At shutdown, those waiting get _CLOSE_S.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ops import metrics
from ops.storage.files import (AUDIO, FINALS, META, FOLDER, Unreadable, is_regular, once, read_meta,
                               session_folders, why)
from ops.storage.formats import TEXT_FORMATS
from ops.storage.s3 import Bucket, BucketError

log = logging.getLogger("storage")

_GRACE_S = 10.0  # an uploaded session's local copy is removed this long after its upload
_RETRY_S = (1.0, 2.0, 5.0, 10.0, 20.0)  # pauses after consecutive failed uploads; the last one repeats
_CLOSE_S = 10.0  # at shutdown: the time sessions still waiting have to reach the bucket
_FILES = (FINALS, *(name for name, _ in TEXT_FORMATS.values()), AUDIO)  # uploaded in this order, then META
_REMOVING = ".uploaded"  # a local copy being removed is renamed `.<folder>.uploaded` first


def _files(folder: Path) -> list[str] | None:
    """The files of an ended session folder to upload, session.json last; None when the folder holds
    no ended session (gone, or not completed yet). Worker thread."""
    meta = read_meta(folder)
    if meta is None or not meta.get("ended"):
        return None
    return [file for file in _FILES if is_regular(folder / file)] + [META]


def _remove(root: Path, name: str) -> None:
    """Removes a local copy, renamed first: a crash halfway leaves no half session to be listed,
    completed and uploaded again over the whole one. Worker thread."""
    trash = root / f".{name}{_REMOVING}"
    try:
        os.rename(root / name, trash)
    except FileNotFoundError:  # deleted already (retention)
        return
    shutil.rmtree(trash, ignore_errors=True)


def _ended(root: Path, skip: set[str]) -> list[str]:
    """Folders of ended sessions in the data folder, oldest first; also removes the local copies a
    crash left half removed. Worker thread."""
    with os.scandir(root) as entries:
        leftovers = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(_REMOVING)
                     and FOLDER.fullmatch(e.name[1 : -len(_REMOVING)])]
    for name in leftovers:
        shutil.rmtree(root / name, ignore_errors=True)
    found = []
    for name, session_id in session_folders(root):
        if session_id in skip or name in skip:
            continue
        try:
            meta = read_meta(root / name)
        except Unreadable:  # left as it is; the listing says why, once
            continue
        if meta is not None and meta.get("ended"):
            found.append(name)
    return found[::-1]


class Uploader:
    """`busy()`: the session ids whose folders are not done with (live, or their files not written)."""

    def __init__(self, root: Path, bucket: Bucket, busy: Callable[[], set[str]]) -> None:
        self.root = root
        self.bucket = bucket
        self._busy = busy
        self.pending: dict[str, None] = {}  # folder names, in the order they came
        # Folder name -> when it was uploaded (monotonic): left out of the local listing from then on,
        # removed _GRACE_S later, forgotten _GRACE_S after that (a listing begun before is done by then).
        self.uploaded: dict[str, float] = {}
        self._removed: set[str] = set()
        self._wake = asyncio.Event()
        self._emptied = asyncio.Event()
        self._emptied.set()
        self._failures = 0
        self._task: asyncio.Task | None = None

    def submit(self, name: str) -> None:
        """Event loop: a session folder whose closing files are written."""
        if name in self.pending or name in self.uploaded:
            return
        self.pending[name] = None
        self._changed()
        self._wake.set()

    async def scan(self) -> None:
        """Every ended session in the data folder that is not uploaded yet."""
        skip = self._busy() | set(self.pending) | set(self.uploaded)
        for name in await asyncio.to_thread(_ended, self.root, skip):
            self.submit(name)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Gives the sessions still waiting _CLOSE_S to go up, then removes the uploaded local copies."""
        if self.pending and self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._emptied.wait(), _CLOSE_S)
            except asyncio.TimeoutError:
                log.warning("storage: %d ended session(s) not uploaded to %s yet: the next start uploads them "
                            "from %s", len(self.pending), self.bucket.url, self.root)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for name in list(self.uploaded):
            if name not in self._removed:
                await self._remove(name)

    # The loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self.bucket.check()  # /health tells a wrong bucket or wrong credentials from the start
        except BucketError:
            self._failures += 1  # the bucket logged it
        while True:
            try:
                await self._step()
            except Exception:  # a bug: the sessions stay on disk, and the uploads go on after a pause
                log.exception("storage: uploading to %s failed", self.bucket.url)
                await self._pause(_RETRY_S[-1])

    async def _step(self) -> None:
        """Uploads the first session waiting, or waits for one (checking a failing bucket meanwhile)."""
        await self._tidy()
        if not self.pending:
            if self.bucket.failing is None:
                await self._pause(self._next_tidy_s())
                return
            try:  # nothing to upload: a check tells when the bucket works again
                await self.bucket.check()
            except BucketError:
                self._failures += 1
                await self._pause(self._retry_s())
            else:
                self._failures = 0
            return
        name = next(iter(self.pending))
        try:
            uploaded = await self._upload(name)
        except BucketError:
            self._failures += 1
            await self._pause(self._retry_s())
            return
        self._failures = 0
        self.pending.pop(name, None)
        if uploaded:
            self.uploaded[name] = time.monotonic()
            metrics.UPLOADS.inc()
            log.debug("storage: %s uploaded to %s", name, self.bucket.url)
        self._changed()

    def _retry_s(self) -> float:
        return _RETRY_S[min(max(self._failures, 1), len(_RETRY_S)) - 1]

    def _next_tidy_s(self) -> float | None:
        """Until the next local copy is due to be removed or forgotten; None: none is."""
        if not self.uploaded:
            return None
        now = time.monotonic()
        return max(0.0, min(when + (2 if name in self._removed else 1) * _GRACE_S - now
                            for name, when in self.uploaded.items()))

    async def _pause(self, seconds: float | None) -> None:
        """Until `seconds` pass (None: no end) or a session is submitted."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _changed(self) -> None:
        metrics.UPLOADS_PENDING.set(len(self.pending))
        if self.pending:
            self._emptied.clear()
        else:
            self._emptied.set()

    async def _upload(self, name: str) -> bool:
        """True once every file of the session is in the bucket; False when there is nothing (more) to
        upload: the folder is gone or broken. BucketError when the bucket fails."""
        folder = self.root / name
        try:
            files = await asyncio.to_thread(_files, folder)
            if files is None:
                return False
            for file in files:
                await self.bucket.put(name, file, folder / file)
        except FileNotFoundError:  # deleted meanwhile (retention)
            return False
        except (OSError, Unreadable) as e:  # stays in the data folder, for a person to look at
            once(name, "storage: cannot upload %s: %s; it stays in %s", name, why(e), self.root)
            return False
        return True

    async def _tidy(self) -> None:
        """Removes the local copies uploaded _GRACE_S ago, and forgets them _GRACE_S later."""
        now = time.monotonic()
        for name, when in list(self.uploaded.items()):
            if now - when >= 2 * _GRACE_S:
                del self.uploaded[name]
                self._removed.discard(name)
            elif now - when >= _GRACE_S and name not in self._removed:
                await self._remove(name)

    async def _remove(self, name: str) -> None:
        self._removed.add(name)
        try:
            await asyncio.to_thread(_remove, self.root, name)
        except OSError as e:  # listed from the data folder again once forgotten: the same session
            once(name, "storage: cannot remove %s, uploaded: %s", name, why(e))
