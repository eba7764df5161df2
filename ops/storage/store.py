"""Storage: one server's data folder, and with --storage-url the bucket its ended sessions go to. It
gives each new session a record, keeps the records in memory until their files are written, hands the
written ones to the uploader, runs crash recovery, retention and the probe in the background, and
answers the routes' lookups."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ops.storage import recovery
from ops.storage.catalog import Catalog, Found, unknown, visible
from ops.storage.files import session_folders, why
from ops.storage.health import StorageHealth
from ops.storage.record import SessionRecord, log_failure, storage_failed_event
from ops.storage.s3 import Bucket, BucketError
from ops.storage.shelf import BucketShelf, FolderShelf, Shelf
from ops.storage.upload import Uploader
from ops.storage.writer import Writer, call_soon

if TYPE_CHECKING:
    from sessions import Session

log = logging.getLogger("storage")


class Storage:
    def __init__(self, root: str | Path, *, record_audio: bool = False, retention_days: float = 0.0,
                 storage_url: str = "") -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)  # fails at startup, loudly, if it cannot
        self.record_audio = record_audio
        self.retention_days = retention_days
        self.writer = Writer()
        self.health = StorageHealth(self.root, self.writer)
        # With a bucket, ended sessions go there; the data folder keeps them until they have.
        self.bucket = Bucket(storage_url) if storage_url else None
        self.uploader = Uploader(self.root, self.bucket, self._busy) if self.bucket is not None else None
        self.local = FolderShelf(self.root, hidden=self.uploader.uploaded if self.uploader is not None else ())
        self.shelves: list[Shelf] = [self.local]
        if self.bucket is not None:
            self.shelves.append(BucketShelf(self.bucket))
        self.catalog = Catalog(self.shelves)
        self._live: dict[str, SessionRecord] = {}
        # Ended sessions whose files the disk refused: listed from memory, written once it takes them.
        self._unsaved: dict[str, SessionRecord] = {}
        self._unrecovered: list[tuple[str, str]] = []  # sessions a crash left open and the disk refused
        self._background: list[asyncio.Task] = []

    # Sessions (event loop) --------------------------------------------------------------------

    def attach(self, session: "Session") -> None:
        """A registry observer: called once per new session, before it emits anything. The record is
        the session's recorder, so each final is on disk before any transport's sink sees it."""
        try:
            record = SessionRecord(session, self.root, self.writer, self.health,
                                   record_audio=self.record_audio, done=self._done)
        except OSError as e:  # the session goes on, unsaved, and its client is told after session.started
            reason = why(e)
            self.health.failed("create", reason)
            log_failure(session.id, "create", reason)
            asyncio.get_running_loop().call_soon(session.emit, storage_failed_event(reason))
            return
        except Exception:  # the session goes on, unsaved
            log.exception("session %s: not stored", session.id)
            return
        self._live[session.id] = record
        session.add_recorder(record.on_event)
        if self.record_audio:
            session.add_audio_tap(record.on_audio)
        session.on_finish(record.finish)

    def _done(self, record: SessionRecord) -> None:
        session_id = record.session.id
        if self._live.get(session_id) is record:
            del self._live[session_id]
            if not record.written and not record.discarded:
                self._unsaved[session_id] = record
        if record.written and self.uploader is not None:
            self.uploader.submit(record.folder.name)

    def _busy(self) -> set[str]:
        """The sessions whose folders are not done with: live, or their closing files not written."""
        return set(self._live) | set(self._unsaved)

    def live_view(self) -> dict[str, dict[str, Any]]:
        """What the files do not say (yet) about the sessions this server has in memory."""
        view = {sid: {**r.meta, "status": "ended"} for sid, r in self._unsaved.items()}
        view.update((sid, {**r.meta, "utterances": r.finals, "status": "live"}) for sid, r in self._live.items())
        return view

    async def find(self, session_id: str, viewer: str | None) -> Found:
        """A stored session the viewer may see, and where it is kept: a 404 otherwise, as for an unknown id."""
        record = self._live.get(session_id) or self._unsaved.get(session_id)
        if record is not None:
            if not visible(viewer, record.meta["key_id"]):
                raise unknown()
            return self.local, record.folder.name
        return await self.catalog.find(session_id, viewer, self.live_view())

    def state(self) -> dict[str, str]:
        """For GET /health and /ready: the data folder's state, and the bucket's when there is one."""
        state = self.health.state()
        if self.bucket is not None:
            state["bucket"] = "ok" if self.bucket.failing is None else "failing"
            if self.bucket.failing is not None:
                state["bucket_error"] = self.bucket.failing
        return state

    # Startup, background work, shutdown ------------------------------------------------------

    async def start(self) -> None:
        # Listed now, before the server takes sessions: only these can have been left open by a crash.
        before = session_folders(self.root)
        if self.bucket is not None:
            await self.bucket.open()
            self.uploader.start()
        self._background = [asyncio.create_task(self._maintain(before)),
                            asyncio.create_task(self.health.probe(self._writes_work_again))]

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await self.writer.close()
        if self.uploader is not None:
            await asyncio.sleep(0)  # the closing files' callbacks hand the last sessions to the uploader
            await self.uploader.close()
            await self.bucket.close()

    async def _maintain(self, before: list[tuple[str, str]]) -> None:
        await self._complete(before)
        while self.retention_days > 0:
            for shelf in self.shelves:
                where = f" from {self.bucket.url}" if isinstance(shelf, BucketShelf) else ""
                # Sessions waiting for their upload are the bucket's to delete, once there.
                keep = self._busy() | set(self.uploader.pending if self.uploader is not None else ())
                try:
                    deleted = await recovery.sweep(shelf, self.retention_days, keep, self.catalog.forget)
                    if deleted:
                        log.info("retention: deleted %d session(s) older than %g day(s)%s", deleted,
                                 self.retention_days, where)
                except BucketError as e:
                    log.warning("retention: the sweep%s failed (%s); next one in %gs", where, e,
                                recovery.RETENTION_INTERVAL_S)
                except Exception:
                    log.exception("retention: the sweep failed; next one in %gs", recovery.RETENTION_INTERVAL_S)
            await asyncio.sleep(recovery.RETENTION_INTERVAL_S)

    async def _complete(self, folders: list[tuple[str, str]]) -> None:
        """Completes the sessions a crash left open; then, with a bucket, uploads what is ended."""
        try:
            recovered, self._unrecovered = await asyncio.to_thread(recovery.recover, self.root, folders)
            if recovered:
                log.info("storage: %d session(s) interrupted by a crash were completed", recovered)
        except Exception:
            log.exception("storage: completing interrupted sessions failed")
        if self.uploader is not None:
            try:
                await self.uploader.scan()
            except Exception:
                log.exception("storage: listing the sessions to upload failed")

    async def _writes_work_again(self) -> None:
        """What the disk refused is written now: ended sessions' files, sessions a crash left open."""
        for record in list(self._unsaved.values()):
            self._save_late(record)
        if self._unrecovered:
            unrecovered, self._unrecovered = self._unrecovered, []
            await self._complete(unrecovered)

    def _save_late(self, record: SessionRecord) -> None:
        """Writes the files of a session the disk refused when it ended; tried once."""
        if record.retried:
            return
        record.retried = True
        future = self.writer.submit(record.write_files, dict(record.meta))
        loop = asyncio.get_running_loop()

        def saved() -> None:
            if record.written and self._unsaved.get(record.session.id) is record:
                del self._unsaved[record.session.id]
                log.info("session %s: its files are written now", record.session.id)
                if self.uploader is not None:
                    self.uploader.submit(record.folder.name)

        future.add_done_callback(lambda _: call_soon(loop, saved))


STORAGE = web.AppKey("storage", Storage)
