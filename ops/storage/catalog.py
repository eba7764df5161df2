"""Stored sessions read back for the routes: found by listing the shelves (the data folder, then the
bucket), never by a path made from a request, and shown only to the key that opened them. A session on
two shelves (uploaded, its local copy not removed yet) is the first shelf's.

`live` arguments are Storage.live_view(): what the files do not say (yet) about the sessions this
server has in memory.
"""

from __future__ import annotations

import asyncio
from typing import Any

from errors import ApiError
from ops.storage.files import FOLDER, Unreadable, folder_time, iso, once
from ops.storage.formats import RENDER, TEXT_FORMATS
from ops.storage.shelf import Shelf

_AT_ONCE = 16  # session.json files read at once to list sessions that are not known yet

Found = tuple[Shelf, str]  # a session: the shelf that keeps it, and its folder's name


def visible(viewer: str | None, owner: str | None) -> bool:
    """viewer: the request's key id, None while access is open (every session is then visible).
    A session with no owner (opened while access was open) is visible only while it is open."""
    return viewer is None or owner == viewer


def unknown() -> ApiError:
    """Another key's session answers as an unknown one: its id reveals nothing."""
    return ApiError(404, "unknown_session", "no such stored session")


class _Unlisted(Exception):
    """A folder in the bucket without its session.json: an upload under way, or one cut short."""


class Catalog:
    def __init__(self, shelves: list[Shelf]) -> None:
        self.shelves = shelves
        self._owners: dict[str, str | None] = {}  # folder name -> key id; a session's owner never changes

    def forget(self, name: str) -> None:
        """A folder retention deleted."""
        self._owners.pop(name, None)

    async def find(self, session_id: str, viewer: str | None, live: dict[str, dict[str, Any]]) -> Found:
        """The stored session the viewer may see."""
        for shelf in self.shelves:
            name = await shelf.find(session_id)
            if name is None:
                continue
            try:
                if visible(viewer, await self.owner(shelf, name, session_id, live)):
                    return shelf, name
            except Unreadable as e:  # not listed, so not found either
                once(name, "storage: skipped %s: %s", name, e)
            except _Unlisted:
                pass
            raise unknown()
        raise unknown()

    async def owner(self, shelf: Shelf, name: str, session_id: str, live: dict[str, dict[str, Any]]) -> str | None:
        """The id of the key that opened a stored session; None when access was open, or for a
        session saved before owners were recorded. Unreadable for a session that cannot be listed."""
        if session_id in live:
            return live[session_id].get("key_id")
        if name in self._owners:
            return self._owners[name]
        meta = await shelf.meta(name)
        owner = meta.get("key_id") if meta is not None else None
        owner = owner if isinstance(owner, str) and owner else None
        if meta is not None and meta.get("ended"):
            self._owners[name] = owner  # complete: its owner and its readability stay as they are
        elif shelf.whole_only:
            raise _Unlisted()
        else:
            await shelf.finals(name)  # an unfinished session is listed from its finals
        return owner

    async def _visible(self, live: dict[str, dict[str, Any]], viewer: str | None) -> list[tuple[Shelf, str, str]]:
        """(shelf, folder name, session id) of every session the viewer may see, newest first."""
        listings = await asyncio.gather(*(shelf.names() for shelf in self.shelves))
        seen: set[str] = set()
        found = []
        for shelf, names in zip(self.shelves, listings):
            for name, sid in names:
                if name not in seen:
                    seen.add(name)
                    found.append((shelf, name, sid))
        found.sort(key=lambda f: f[1], reverse=True)
        at_once = asyncio.Semaphore(_AT_ONCE)

        async def shown(shelf: Shelf, name: str, sid: str) -> bool:
            try:
                async with at_once:
                    return visible(viewer, await self.owner(shelf, name, sid, live))
            except Unreadable as e:
                once(name, "storage: skipped %s: %s", name, e)
            except _Unlisted:
                pass
            return False

        keep = await asyncio.gather(*(shown(*f) for f in found))
        return [f for f, kept in zip(found, keep) if kept]

    async def entry(self, found: Found, live: dict[str, dict[str, Any]]) -> dict[str, Any]:
        shelf, name = found
        session_id = FOLDER.fullmatch(name).group(2)
        meta = live[session_id] if session_id in live else await shelf.meta(name) or {}
        status = meta.get("status") or ("ended" if meta.get("ended") else "interrupted")
        started = folder_time(name)
        entry = {
            "session_id": session_id, "status": status,
            "transport": meta.get("transport"), "key_id": meta.get("key_id"),
            "started": meta.get("started") or iso(started), "ended": meta.get("ended"),
            "reason": meta.get("reason") or ("interrupted" if status == "interrupted" else None),
            "error": meta.get("error"), "model": meta.get("model"), "language": meta.get("language"),
            "utterances": meta.get("utterances"),
            "transcript": f"/v1/sessions/{session_id}/transcript",
            "audio": f"/v1/sessions/{session_id}/audio" if await shelf.has_audio(name, meta) else None,
        }
        if status == "interrupted":
            entry["utterances"] = len(await shelf.finals(name))
        return entry

    async def page(self, limit: int, before: str | None, page: int | None,
                   live: dict[str, dict[str, Any]], viewer: str | None) -> dict[str, Any]:
        folders = await self._visible(live, viewer)
        if before is not None:
            index = next((i for i, (_, _, sid) in enumerate(folders) if sid == before), None)
            if index is None:
                raise ApiError(404, "unknown_session", "before: no such stored session")
            first = index + 1
        else:
            first = ((page or 1) - 1) * limit
        chosen = folders[first : first + limit]

        async def described(shelf: Shelf, name: str) -> dict[str, Any] | None:
            try:
                return await self.entry((shelf, name), live)
            except (Unreadable, FileNotFoundError) as e:  # broken or deleted since it was listed
                once(name, "storage: skipped %s: %s", name, e)
                return None

        entries = await asyncio.gather(*(described(shelf, name) for shelf, name, _ in chosen))
        sessions = [e for e in entries if e is not None]
        body: dict[str, Any] = {"sessions": sessions, "total": len(folders), "limit": limit, "next": None}
        if first + limit < len(folders):
            body["next"] = (f"/v1/sessions?limit={limit}&page={page + 1}" if page is not None
                            else f"/v1/sessions?limit={limit}&before={chosen[-1][2]}")
        if page is not None:
            body["page"] = page
        return body

    async def transcript(self, found: Found, fmt: str, live: dict[str, dict[str, Any]]) -> str | dict[str, Any]:
        shelf, name = found
        if fmt == "json":
            return {**await self.entry(found, live), "finals": await shelf.finals(name)}
        if FOLDER.fullmatch(name).group(2) not in live:
            file = TEXT_FORMATS[fmt][0]
            try:
                data = await shelf.read(name, file)
            except Unreadable as e:
                once(f"{name}/{file}", "storage: %s: %s; served from its finals", name, e)
                data = None
            if data is not None:
                return data.decode("utf-8", "replace")
            # Interrupted, not yet completed: the log says the same.
        return RENDER[fmt](await shelf.finals(name))
