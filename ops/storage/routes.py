"""GET /v1/sessions, /v1/sessions/{id}, its transcript and its audio. Each key sees only the sessions
it opened (catalog.visible); another key's session answers 404, exactly as an unknown id. While the
bucket of --storage-url fails, what needs it answers 503 storage_unavailable."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from aiohttp import web

from ops import auth
from errors import ApiError
from ops.storage.catalog import unknown
from ops.storage.files import SESSION_ID, Unreadable, once
from ops.storage.formats import TEXT_FORMATS
from ops.storage.s3 import BucketError
from ops.storage.store import STORAGE, Storage

_DEFAULT_LIMIT, _MAX_LIMIT = 20, 100


def add_routes(app: web.Application) -> None:
    """Always, --data-dir or not: without it they answer 404 storage_off."""
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_get("/v1/sessions/{session_id}/transcript", get_transcript)
    app.router.add_get("/v1/sessions/{session_id}/audio", get_audio)


def _storage(request: web.Request) -> Storage:
    storage = request.app.get(STORAGE)
    if storage is None:
        raise ApiError(404, "storage_off", "this server stores no sessions (--data-dir is empty)")
    return storage


def _session_id(value: str) -> str:
    if not SESSION_ID.fullmatch(value):
        raise unknown()
    return value


def _viewer(request: web.Request) -> str | None:
    """Whose sessions the request sees: its key's id; None (everyone's) while access is open.
    Saved sessions need the key itself (auth.TOKEN_ROUTES), so the id is never a token's."""
    return auth.grant(request).key_id or None


def _query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    unknown_names = set(request.query) - allowed
    if unknown_names:
        raise ApiError(400, "unknown_option", f"unknown parameter(s): {', '.join(sorted(unknown_names))}")
    return dict(request.query)


def _positive_int(query: dict[str, str], name: str, default: int | None, most: int | None = None) -> int | None:
    if name not in query:
        return default
    value = query[name]
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) < 1 or (most is not None and int(value) > most):
        raise ApiError(400, "bad_option", f"{name} must be an integer from 1"
                       + (f" to {most}" if most is not None else ""))
    return int(value)


async def list_sessions(request: web.Request) -> web.Response:
    storage = _storage(request)
    query = _query(request, {"limit", "before", "page"})
    limit = _positive_int(query, "limit", _DEFAULT_LIMIT, _MAX_LIMIT)
    page = _positive_int(query, "page", None)
    before = query.get("before")
    if before is not None and page is not None:
        raise ApiError(400, "bad_option", "give before or page, not both")
    if before is not None and not SESSION_ID.fullmatch(before):
        raise ApiError(400, "bad_option", "before must be a session id")
    with _reading():
        body = await storage.catalog.page(limit, before, page, storage.live_view(), _viewer(request))
    return web.json_response(body)


async def get_session(request: web.Request) -> web.Response:
    storage = _storage(request)
    session_id = _session_id(request.match_info["session_id"])
    _query(request, set())
    with _reading():
        found = await storage.find(session_id, _viewer(request))
        return web.json_response(await storage.catalog.entry(found, storage.live_view()))


async def get_transcript(request: web.Request) -> web.Response:
    storage = _storage(request)
    session_id = _session_id(request.match_info["session_id"])
    fmt = _query(request, {"format"}).get("format", "json")
    if fmt != "json" and fmt not in TEXT_FORMATS:
        raise ApiError(400, "bad_option", "format must be json, txt, srt or vtt")
    with _reading():
        found = await storage.find(session_id, _viewer(request))
        body = await storage.catalog.transcript(found, fmt, storage.live_view())
    if fmt == "json":
        return web.json_response(body)
    return web.Response(text=body, content_type=TEXT_FORMATS[fmt][1], charset="utf-8")


async def get_audio(request: web.Request) -> web.StreamResponse:
    storage = _storage(request)
    session_id = _session_id(request.match_info["session_id"])
    _query(request, set())
    with _reading():
        shelf, name = await storage.find(session_id, _viewer(request))
        return await shelf.audio(name, request)


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """Retention may delete a session between finding and reading it: what cannot be read is not
    listed. A bucket that fails is the server's trouble, for now: 503."""
    try:
        yield
    except FileNotFoundError:
        raise unknown() from None
    except Unreadable as e:
        once(str(e), "storage: skipped a session: %s", e)
        raise unknown() from None
    except BucketError as e:
        raise ApiError(503, "storage_unavailable", f"the session store cannot be reached ({e}); try again "
                       "shortly", {"Retry-After": "5"}) from None
