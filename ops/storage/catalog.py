"""Stored sessions read back for the routes: found by listing the data folder, never by a path made
from a request, and shown only to the key that opened them.

`live` arguments are Storage.live_view(): what the files do not say (yet) about the sessions this
server has in memory. Everything here runs on worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from errors import ApiError
from ops.storage.files import (AUDIO, FINALS, FOLDER, Unreadable, folder_time, is_regular, iso, once, read_file,
                               read_finals, read_meta, session_folders)
from ops.storage.formats import RENDER, TEXT_FORMATS


def visible(viewer: str | None, owner: str | None) -> bool:
    """viewer: the request's key id, None while access is open (every session is then visible).
    A session with no owner (opened while access was open) is visible only while it is open."""
    return viewer is None or owner == viewer


def unknown() -> ApiError:
    """Another key's session answers as an unknown one: its id reveals nothing."""
    return ApiError(404, "unknown_session", "no such stored session")


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._owners: dict[str, str | None] = {}  # folder name -> key id; a session's owner never changes

    def forget(self, name: str) -> None:
        """A folder retention deleted."""
        self._owners.pop(name, None)

    def find(self, session_id: str, viewer: str | None) -> Path:
        """The folder of a stored session the viewer may see."""
        for name, found in session_folders(self.root):
            if found == session_id:
                try:
                    if visible(viewer, self.owner(name, found, {})):
                        return self.root / name
                except Unreadable as e:  # not listed, so not found either
                    once(name, "storage: skipped %s: %s", name, e)
        raise unknown()

    def owner(self, name: str, session_id: str, live: dict[str, dict[str, Any]]) -> str | None:
        """The id of the key that opened a stored session; None when access was open, or for a
        session saved before owners were recorded. Unreadable for a session that cannot be listed."""
        if session_id in live:
            return live[session_id].get("key_id")
        if name in self._owners:
            return self._owners[name]
        folder = self.root / name
        meta = read_meta(folder)
        owner = meta.get("key_id") if meta is not None else None
        owner = owner if isinstance(owner, str) and owner else None
        if meta is not None and meta.get("ended"):
            self._owners[name] = owner  # complete: its owner and its readability stay as they are
        else:
            read_finals(folder / FINALS)  # an unfinished session is listed from its finals
        return owner

    def entry(self, folder: Path, live: dict[str, dict[str, Any]]) -> dict[str, Any]:
        session_id = FOLDER.fullmatch(folder.name).group(2)
        meta = live[session_id] if session_id in live else read_meta(folder) or {}
        status = meta.get("status") or ("ended" if meta.get("ended") else "interrupted")
        started = folder_time(folder.name)
        entry = {
            "session_id": session_id, "status": status,
            "transport": meta.get("transport"), "key_id": meta.get("key_id"),
            "started": meta.get("started") or iso(started), "ended": meta.get("ended"),
            "reason": meta.get("reason") or ("interrupted" if status == "interrupted" else None),
            "error": meta.get("error"), "model": meta.get("model"), "language": meta.get("language"),
            "utterances": meta.get("utterances"),
            "transcript": f"/v1/sessions/{session_id}/transcript",
            "audio": f"/v1/sessions/{session_id}/audio" if is_regular(folder / AUDIO) else None,
        }
        if status == "interrupted":
            entry["utterances"] = len(read_finals(folder / FINALS))
        return entry

    def page(self, limit: int, before: str | None, page: int | None,
             live: dict[str, dict[str, Any]], viewer: str | None) -> dict[str, Any]:
        folders = []
        for name, sid in session_folders(self.root):
            try:
                if visible(viewer, self.owner(name, sid, live)):
                    folders.append((name, sid))
            except Unreadable as e:
                once(name, "storage: skipped %s: %s", name, e)
        if before is not None:
            index = next((i for i, (_, sid) in enumerate(folders) if sid == before), None)
            if index is None:
                raise ApiError(404, "unknown_session", "before: no such stored session")
            first = index + 1
        else:
            first = ((page or 1) - 1) * limit
        chosen = folders[first : first + limit]
        sessions = []
        for name, _ in chosen:
            try:
                sessions.append(self.entry(self.root / name, live))
            except Unreadable as e:  # broken since it was found readable: left out of this page
                once(name, "storage: skipped %s: %s", name, e)
        body: dict[str, Any] = {"sessions": sessions, "total": len(folders), "limit": limit, "next": None}
        if first + limit < len(folders):
            body["next"] = (f"/v1/sessions?limit={limit}&page={page + 1}" if page is not None
                            else f"/v1/sessions?limit={limit}&before={chosen[-1][1]}")
        if page is not None:
            body["page"] = page
        return body

    def transcript(self, folder: Path, fmt: str, live: dict[str, dict[str, Any]]) -> str | dict[str, Any]:
        if fmt == "json":
            return {**self.entry(folder, live), "finals": read_finals(folder / FINALS)}
        if FOLDER.fullmatch(folder.name).group(2) not in live:
            path = folder / TEXT_FORMATS[fmt][0]
            try:
                data = read_file(path)
            except Unreadable as e:
                once(str(path), "storage: %s: %s; served from %s", folder.name, e, FINALS)
                data = None
            if data is not None:
                return data.decode("utf-8", "replace")
            # Interrupted, not yet completed: the log says the same.
        return RENDER[fmt](read_finals(folder / FINALS))
