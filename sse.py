"""Live events of any session as Server-Sent Events: caption displays, and WHIP publishers
(OBS, ffmpeg) that open no data channel."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ops import auth
import protocol
from errors import ApiError
from sessions import REGISTRY, EventQueue, write_or_drop

_KEEPALIVE_S = 15.0  # a comment line now and then keeps proxies from closing a quiet stream


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/sessions/{session_id}/events", session_events)


async def session_events(request: web.Request) -> web.StreamResponse:
    session = request.app[REGISTRY].get(request.match_info["session_id"])
    if session is None or session.ended or not auth.owns(request, session):
        raise ApiError(404, "unknown_session", "no such live session")
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)

    def not_reading() -> None:  # the subscriber is cut off; the session goes on
        if request.transport is not None:
            request.transport.abort()

    outbox = EventQueue(on_overflow=not_reading)
    session.add_sink(outbox.put)
    try:
        while True:
            try:
                event = await asyncio.wait_for(outbox.get(), _KEEPALIVE_S)
            except asyncio.TimeoutError:
                if session.ended:
                    break
                if not await write_or_drop(response.write(b": keep-alive\n\n"), request.transport):
                    break
                continue
            data = protocol.encode(event)
            if not await write_or_drop(
                    response.write(f"event: {event['type']}\ndata: {data}\n\n".encode()), request.transport):
                break
            if event["type"] == "session.ended":
                break
    except ConnectionResetError:
        pass  # the subscriber left; the session goes on
    finally:
        session.remove_sink(outbox.put)
    return response
