"""OpenAI's Realtime API for transcription, over our sessions: the routes and the two transports.

- `GET /v1/realtime` (WebSocket; `intent`, `model` tolerated): GA, or beta with `OpenAI-Beta: realtime=v1`.
- `POST /v1/realtime/calls` (and the older `POST /v1/realtime`): WebRTC, the offer as raw SDP, multipart
  (`sdp`, `session`) or JSON; events on the client's data channel (`oai-events`).
- `POST /v1/realtime/calls/{call_id}/hangup`.
- `POST /v1/realtime/client_secrets` and the beta `POST /v1/realtime/transcription_sessions`: `ek_` keys
  that open Realtime sessions only, until they expire; the session they describe is where each starts.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import time
from dataclasses import replace
from typing import Any

from aiohttp import WSMessage, WSMsgType, hdrs, web

import protocol
import ws
from asr.audio import RawAudio
from errors import ERROR_SHAPES, ApiError, client_json
from ops import auth
from protocol import Event
from rtc import signaling
from sessions import REGISTRY, Session, SessionOptions, SessionRegistry

from .openai_audio import openai_error
from .realtime_events import Realtime, error_note, new_id
from .realtime_settings import Settings, SettingsError, apply_beta, apply_ga, beta_session, defaults, ga_session

API = "openai-realtime"
SCOPE = "openai-realtime"  # auth.TOKEN_SCOPES: what its client secrets open
WS_PROTOCOL = "realtime"  # the subprotocol OpenAI's browser clients offer, echoed
BETA_PROTOCOL = "openai-beta.realtime-v1"
MAX_EVENT_BYTES = 16 << 20  # an append carries up to 15 MiB of audio (OpenAI's limit)
SECRET_TTL_S = (10, 7200, 600)  # client_secrets' expires_after.seconds: bounds and default
BETA_SECRET_TTL_S = 60  # "all tokens expire after one minute"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/realtime", realtime_socket)
    app.router.add_post("/v1/realtime", create_call)
    app.router.add_post("/v1/realtime/calls", create_call)
    app.router.add_post("/v1/realtime/calls/{call_id}/hangup", hang_up)
    app.router.add_post("/v1/realtime/client_secrets", client_secret)
    app.router.add_post("/v1/realtime/transcription_sessions", transcription_session)
    app.setdefault(ERROR_SHAPES, {})["/v1/realtime"] = openai_error


# Settings to session options ----------------------------------------------------------------------

def _defaults(request: web.Request) -> Settings:
    registry = request.app[REGISTRY]
    return defaults(registry.config, registry.worker.engine.name)


def _initial(request: web.Request) -> Settings:
    """A new session's settings: the server's, then those its client secret was minted with."""
    settings = _defaults(request)
    minted = auth.grant(request).settings
    if minted:
        settings = apply_ga(settings, minted, request.app[REGISTRY].languages)
    return settings


def options_for(registry: SessionRegistry, grant: auth.Grant, settings: Settings) -> SessionOptions:
    """Our session options for Realtime settings; ApiError where they are bad or the token forbids them."""
    turns = settings.turns
    raw: dict[str, Any] = {
        # Partials cost decodes: only live deltas (server VAD, a live model) need them.
        "partials": turns is not None and settings.live,
        "endpoint_ms": turns.silence_duration_ms if turns is not None else registry.config.endpoint_ms}
    if settings.language:
        raw["language"] = settings.language
    options = auth.options_within(registry, grant, raw)
    return replace(options, prompt=settings.prompt, vad_threshold=turns.threshold if turns else None,
                   preroll_ms=turns.prefix_padding_ms if turns else None)


def _expires_at(registry: SessionRegistry, session: Session) -> int:
    limit = min(registry.config.max_session_s, session.client.max_session_s or registry.config.max_session_s)
    return int(time.time() + limit - (time.monotonic() - session.started))


def _bad_settings(e: SettingsError) -> ApiError:
    return ApiError(400, "bad_option", f"{e.param}: {e.message}" if e.param else e.message)


def _realtime(registry: SessionRegistry, grant: auth.Grant, session: Session, settings: Settings, beta: bool,
              post, append) -> Realtime:
    realtime = Realtime(session, settings, beta, registry.languages,
                        lambda s: options_for(registry, grant, s), post, append, _expires_at(registry, session))
    session.add_sink(realtime.observe)
    return realtime


def _encode(events: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in events]


# WebSocket ----------------------------------------------------------------------------------------

async def realtime_socket(request: web.Request) -> web.StreamResponse:
    """GET /v1/realtime: refused before the upgrade (the SDKs raise on the status) for bad settings or
    no capacity; `call_id` (a call's side channel) is not served."""
    registry = request.app[REGISTRY]
    if "call_id" in request.query:
        raise ApiError(400, "unknown_option", "call_id: attaching to a WebRTC call is not supported; its events "
                       "are on its data channel and at /v1/sessions/{id}/events")
    try:
        settings = _initial(request)
    except SettingsError as e:
        raise _bad_settings(e) from None
    grant = auth.grant(request)
    options = options_for(registry, grant, settings)
    registry.check_capacity(auth.client(request))
    offered = [p.strip() for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, [])
               for p in value.split(",")]
    beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "") or BETA_PROTOCOL in offered
    return await ws.serve(request, lambda sock: RealtimeSocket(sock, request, settings, options, beta),
                          protocols=auth.ws_protocols(request, WS_PROTOCOL), max_msg_size=MAX_EVENT_BYTES)


class RealtimeSocket(ws.SocketSession):
    api = API

    def __init__(self, sock: ws.Socket, request: web.Request, settings: Settings, options: SessionOptions,
                 beta: bool) -> None:
        super().__init__(sock, request)
        self.settings, self.options, self.beta = settings, options, beta
        self.realtime: Realtime | None = None
        self.raw = RawAudio(settings.encoding, settings.rate)

    async def run(self) -> None:
        try:
            self.start(self.options)
        except ApiError as e:  # the last slot went between the check and the upgrade
            event = {"type": "error", "event_id": new_id("event_"), "error": {
                "type": "server_error", "code": e.code, "message": e.message, "param": None, "event_id": None}}
            await self.refuse(_encode([event]), protocol.ERRORS[e.code].close or 1013, e.code)
            return
        await self.read()

    def opening(self, session: Session) -> list[Event]:
        self.realtime = _realtime(self.registry, auth.grant(self.request), session, self.settings, self.beta,
                                  self.put, self._append)
        return [self.realtime.created()]

    async def _append(self, data: bytes, settings: Settings) -> None:
        if self.raw is None or (self.raw.encoding, self.raw.rate) != (settings.encoding, settings.rate):
            self.raw = RawAudio(settings.encoding, settings.rate)
        await self.audio(data)

    async def dispatch(self, message: WSMessage) -> bool:
        assert self.realtime is not None
        if message.type == WSMsgType.BINARY:
            self.put(error_note("invalid_json", "binary messages are not taken: audio comes base64 in "
                                "input_audio_buffer.append"))
            return False
        await self.realtime.receive(message.data)
        return False

    def encode(self, item: Event) -> list[str]:
        assert self.realtime is not None
        return _encode(self.realtime.translator.translate(item))

    async def too_large(self) -> None:
        self.put(error_note("message_too_large", f"a message may carry at most {MAX_EVENT_BYTES >> 20} MiB"))
        await self.fail(1009)

    def bad_audio(self, message: str) -> None:  # raw PCM and G.711 always decode
        self._close_code = 1003

    def close_frame(self, reason: str) -> tuple[int, str]:
        return {"shutdown": 1001, "error": self._close_code}.get(reason, 1000), reason


# WebRTC -------------------------------------------------------------------------------------------

class RealtimeChannel:
    """The Realtime events on a call's data channel. The client's events are taken in order, one at a time:
    a commit may wait for the finals it closes."""

    def __init__(self, realtime_of, session: Session, post) -> None:
        self.realtime: Realtime = realtime_of(session, post)
        self._last: asyncio.Task | None = None

    def opening(self) -> list[str]:
        return _encode(self.realtime.translator.translate(self.realtime.created()))

    def encode(self, item: Event) -> list[str]:
        return _encode(self.realtime.translator.translate(item))

    def receive(self, message: str | bytes) -> None:
        self._last = asyncio.create_task(self._after(self._last, message))

    async def _after(self, previous: asyncio.Task | None, message: str | bytes) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await self.realtime.receive(message)


async def create_call(request: web.Request) -> web.Response:
    """POST /v1/realtime/calls: 201, the SDP answer, and Location: /v1/realtime/calls/rtc_<session id>."""
    registry = request.app[REGISTRY]
    body = await signaling.read_body(request, registry.config.max_offer_bytes)
    sdp, session_part = _offer(request.content_type, request.headers.get(hdrs.CONTENT_TYPE, ""), body)
    try:
        settings = _initial(request)
        if session_part is not None:
            settings = apply_ga(settings, session_part, registry.languages)
    except SettingsError as e:
        raise _bad_settings(e) from None
    grant = auth.grant(request)
    options = options_for(registry, grant, settings)

    def realtime_of(session: Session, post) -> Realtime:
        return _realtime(registry, grant, session, settings, False, post, None)

    session, answer = await signaling.open_peer(
        request, sdp, options, lambda session, post: RealtimeChannel(realtime_of, session, post), api=API)
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={hdrs.LOCATION: f"/v1/realtime/calls/rtc_{session.id}"})


def _offer(content_type: str, header: str, body: bytes) -> tuple[str, Any]:
    """The SDP offer and the session settings beside it, from each form an SDK sends."""
    if content_type in ("application/sdp", "text/plain"):
        return _text(body), None
    if content_type == "multipart/form-data":
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {header}\r\n\r\n".encode() + body)
        parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                 for part in message.iter_parts()} if message.is_multipart() else {}
        if not isinstance(parts.get("sdp"), bytes):
            raise ApiError(400, "bad_offer", "the multipart offer has no 'sdp' part")
        session = parts.get("session")
        return _text(parts["sdp"]), _json(session) if session else None
    if content_type == "application/json":
        data = _json(body)
        if not isinstance(data, dict) or not isinstance(data.get("sdp"), str):
            raise ApiError(400, "bad_offer", 'expected {"sdp": "...", "session": {...}}')
        return data["sdp"], data.get("session")
    raise ApiError(415, "unsupported_media_type", "send the offer as application/sdp, multipart/form-data "
                   "(sdp, session) or application/json")


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_sdp", "the offer is not UTF-8 text") from None


def _json(body: bytes | str) -> Any:
    try:
        return client_json(body)
    except ValueError:
        raise ApiError(400, "bad_json", "the session is not valid JSON") from None


async def hang_up(request: web.Request) -> web.Response:
    session = request.app[REGISTRY].get(request.match_info["call_id"].removeprefix("rtc_"))
    if session is None or session.api != API or not auth.owns(request, session):
        raise ApiError(404, "unknown_session", "no such call")
    await session.end("deleted")
    return web.Response(status=200)


# Client secrets -----------------------------------------------------------------------------------

async def _body(request: web.Request) -> dict[str, Any]:
    body = await request.read()
    if not body.strip():
        return {}
    data = _json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return data


def _mint(request: web.Request, settings: Settings, ttl_s: float) -> tuple[str, int]:
    options_for(request.app[REGISTRY], auth.grant(request), settings)  # refused now, not when it is used
    token, expires = request.app[auth.ACCESS].mint(auth.grant(request), ttl_s, {}, None, scope=SCOPE,
                                                   settings=ga_session(settings))
    return auth.CLIENT_SECRET_PREFIX + token, expires


async def client_secret(request: web.Request) -> web.Response:
    """POST /v1/realtime/client_secrets {"expires_after": {"anchor", "seconds"}, "session": {...}}."""
    data = await _body(request)
    low, high, ttl = SECRET_TTL_S
    after = data.get("expires_after")
    if after is not None:
        if not isinstance(after, dict):
            raise ApiError(400, "bad_option", "expires_after must be an object")
        ttl = after.get("seconds", ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not low <= ttl <= high:
            raise ApiError(400, "bad_option", f"expires_after.seconds must be a number from {low} to {high}")
    ttl = min(float(ttl), request.app[auth.ACCESS].config.token_max_ttl_s)
    try:
        settings = apply_ga(_defaults(request), data.get("session"), request.app[REGISTRY].languages)
    except SettingsError as e:
        raise _bad_settings(e) from None
    value, expires = _mint(request, settings, ttl)
    return web.json_response({"value": value, "expires_at": expires,
                              "session": ga_session(settings, "sess_" + new_id(""), expires)},
                             headers={hdrs.CACHE_CONTROL: "no-store"})


async def transcription_session(request: web.Request) -> web.Response:
    """POST /v1/realtime/transcription_sessions (beta): the session and its `client_secret`."""
    data = await _body(request)
    try:
        settings = apply_beta(_defaults(request), data, request.app[REGISTRY].languages)
    except SettingsError as e:
        raise _bad_settings(e) from None
    ttl = min(BETA_SECRET_TTL_S, request.app[auth.ACCESS].config.token_max_ttl_s)
    value, expires = _mint(request, settings, ttl)
    return web.json_response({**beta_session(settings, "sess_" + new_id(""), expires),
                              "client_secret": {"value": value, "expires_at": expires}},
                             headers={hdrs.CACHE_CONTROL: "no-store"})

