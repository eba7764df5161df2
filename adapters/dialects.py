"""The WebSocket dialects of the simple servers people replace, each on the route its pages use, so that
those pages work unchanged. Audio is 16-bit PCM at 16 kHz unless said; a sample cut between two
messages waits for its other half.

- `GET /ws/transcribe`: in, binary PCM or `{"type": "audio", "data": "<base64>", "sampleRate": 16000}`,
  then `{"type": "stop"}`; out, `{"type": "connection", ...}` on open, `{"type": "transcription", "text",
  "timestamp", "isFinal"}`, `{"type": "error", "message"}`.
- `GET /v1/transcriptions`: in, `{"action": "start", "language": "en"}` (answered `{"session_id"}`), then
  binary audio (MediaRecorder's WebM/Opus chunks, or PCM), `{"action": "stop"}`; out, `{"partial"}`,
  `{"final"}`, `{"error"}`.
- `GET /ws`: in, `{"type": "audio", "payload": "<base64 PCM>"}`, `{"type": "control", "action": "stop"}`;
  out, `{"type": "transcript", "text", "is_final"}`, and after the stop `{"type": "saved", "key"}`, the
  route of the saved transcript.

Each is a session of ours: a page's partials are whole hypotheses, its finals each utterance's text.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

import protocol
import ws
from asr.audio import MAX_RATE, MIN_RATE, RawAudio
from errors import ApiError, client_json
from ops import auth, metrics
from protocol import Event
from sessions import Session, SessionOptions

_MAX_MESSAGE = 4 * protocol.MAX_AUDIO_BYTES  # base64 JSON of a 1 MiB audio message fits, as on /v1/ws


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws/transcribe", transcribe)
    app.router.add_get("/v1/transcriptions", transcriptions)
    app.router.add_get("/ws", legacy_ws)


def _options(request: web.Request, extra: dict[str, Any] | None = None) -> SessionOptions:
    """Our options in the query string (language, partials, endpoint_ms); other parameters, which these
    pages may send for their old servers, are ignored."""
    raw = {k: v for k, v in request.query.items() if k in protocol.OPTIONS}
    return auth.session_options(request, {**raw, **(extra or {})})


async def _serve(request: web.Request, make) -> web.StreamResponse:
    _options(request)  # a bad option of ours: a 400, no upgrade
    return await ws.serve(request, make, protocols=auth.ws_protocols(request), max_msg_size=_MAX_MESSAGE)


def _base64(value: Any) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (ValueError, binascii.Error):
        return None


def _json(data: str) -> Any:
    try:
        return client_json(data)
    except ValueError:
        return None


class _Dialect(ws.SocketSession):
    """What the three share: a session at once, errors in the dialect's shape, a close that says why."""

    def error_message(self, message: str) -> dict[str, Any]:
        return {"type": "error", "message": message}

    def say(self, message: dict[str, Any]) -> None:
        self.put({"type": "dialect.message", "message": message})

    def mistake(self, message: str) -> None:
        """A client's mistake, in the dialect's error shape; the session goes on."""
        metrics.error("event", "bad_message")
        self.say(self.error_message(message))

    async def open(self, options: SessionOptions) -> bool:
        """The session; False, after the dialect's error and the close, past the limits."""
        try:
            self.start(options)
        except ApiError as e:
            await self.refuse([json.dumps(self.error_message(e.message))], protocol.ERRORS[e.code].close or 1013,
                              e.code)
            return False
        return True

    def encode(self, item: Event) -> list[str]:
        if item["type"] == "dialect.message":
            return [json.dumps(item["message"], ensure_ascii=False)]
        if item["type"] == "error":
            return [json.dumps(self.error_message(item["message"]), ensure_ascii=False)]
        message = self.translate(item)
        return [json.dumps(message, ensure_ascii=False)] if message is not None else []

    def translate(self, event: Event) -> dict[str, Any] | None:
        raise NotImplementedError

    async def too_large(self) -> None:
        metrics.error("event", "too_large")
        self.say(self.error_message(f"audio messages must be at most {protocol.MAX_AUDIO_BYTES} bytes"))
        await self.fail(1009)

    def bad_audio(self, message: str) -> None:
        metrics.error("event", "bad_audio")
        self.say(self.error_message(message))
        self._close_code = 1003

    async def pcm(self, data: bytes, rate: Any = None) -> None:
        """PCM at `rate` when the message says one, else at the rate of the messages before it."""
        if rate is not None and self.raw is not None and rate != self.raw.rate:
            if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
                self.mistake(f"sampleRate must be an integer from {MIN_RATE} to {MAX_RATE}")
                return
            self.raw = RawAudio("pcm_s16le", rate)
        await self.audio(data)


class TranscribeSocket(_Dialect):
    """GET /ws/transcribe."""

    api = "ws-transcribe"

    async def run(self) -> None:
        if await self.open(_options(self.request)):
            await self.read()

    def opening(self, session: Session) -> list[Event]:
        return [{"type": "dialect.message", "message": {
            "type": "connection", "status": "connected", "model": session.info()["model"],
            "message": "connected: send 16 kHz 16-bit mono PCM, then {\"type\": \"stop\"}"}}]

    async def dispatch(self, message: WSMessage) -> bool:
        if message.type == WSMsgType.BINARY:
            await self.pcm(message.data)
            return False
        data = _json(message.data)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "stop":
            await self.end("stop")
            return True
        if kind == "audio":
            audio = _base64(data.get("data"))
            if audio is None:
                self.mistake("audio data must be base64 in 'data'")
            else:
                await self.pcm(audio, data.get("sampleRate"))
            return False
        self.mistake('expected binary PCM, {"type": "audio", "data": ...} or {"type": "stop"}')
        return False

    def translate(self, event: Event) -> dict[str, Any] | None:
        if event["type"] == "transcript.partial":
            text, final = event["text"], False
        elif event["type"] == "transcript.final" and event["text"]:
            text, final = event["text"], True
        else:
            return None
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"type": "transcription", "text": text, "timestamp": stamp, "isFinal": final}


class TranscriptionsSocket(_Dialect):
    """GET /v1/transcriptions: the session starts with the client's start action."""

    api = "v1-transcriptions"

    async def run(self) -> None:
        first = await self.first_message()
        if first is None:
            return
        start = _json(first.data) if first.type == WSMsgType.TEXT else None
        if isinstance(start, dict) and start.get("action") == "start":
            extra = {"language": start["language"]} if start.get("language") else {}
            first = None
        else:  # audio at once: the defaults
            extra = {}
        try:
            options = _options(self.request, extra)
        except ApiError as e:
            await self.refuse([json.dumps(self.error_message(e.message))], 1008, e.code)
            return
        if not await self.open(options):
            return
        rate = start.get("sample_rate") if isinstance(start, dict) else None
        # MediaRecorder's chunks, or raw PCM: the first bytes tell.
        self.expect_container(RawAudio("pcm_s16le", rate if isinstance(rate, int) and MIN_RATE <= rate <= MAX_RATE
                                       else 16000))
        await self.read(first)

    def opening(self, session: Session) -> list[Event]:
        return [{"type": "dialect.message", "message": {"session_id": session.id}}]

    def error_message(self, message: str) -> dict[str, Any]:
        return {"error": message}

    async def dispatch(self, message: WSMessage) -> bool:
        if message.type == WSMsgType.BINARY:
            await self.audio(message.data)
            return False
        data = _json(message.data)
        if isinstance(data, dict) and data.get("action") == "stop":
            await self.end("stop")
            return True
        self.mistake('expected binary audio or {"action": "stop"}')
        return False

    def translate(self, event: Event) -> dict[str, Any] | None:
        if event["type"] == "transcript.partial":
            return {"partial": event["text"]}
        if event["type"] == "transcript.final" and event["text"]:
            return {"final": event["text"]}
        return None


class LegacySocket(_Dialect):
    """GET /ws: base64 PCM in JSON; after the stop, where the transcript was saved."""

    api = "ws"

    def __init__(self, sock: ws.Socket, request: web.Request) -> None:
        super().__init__(sock, request)
        self._saved = False

    async def run(self) -> None:
        if await self.open(_options(self.request)):
            await self.read()

    async def dispatch(self, message: WSMessage) -> bool:
        if message.type == WSMsgType.BINARY:
            await self.pcm(message.data)
            return False
        data = _json(message.data)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "control" and data.get("action") == "stop":
            await self.end("stop")
            return True
        if kind == "audio":
            audio = _base64(data.get("payload"))
            if audio is None:
                self.mistake("audio payload must be base64 16 kHz 16-bit PCM")
            else:
                await self.pcm(audio)
            return False
        self.mistake('expected {"type": "audio", "payload": ...} or {"type": "control", "action": "stop"}')
        return False

    def translate(self, event: Event) -> dict[str, Any] | None:
        kind = event["type"]
        if kind == "transcript.partial":
            return {"type": "transcript", "text": event["text"], "is_final": False}
        if kind == "transcript.final" and event["text"]:
            return {"type": "transcript", "text": event["text"], "is_final": True}
        if kind == "session.saved":
            self._saved = True
            return {"type": "saved", "key": event["transcript"]}
        if kind == "session.ended" and event["reason"] == "stop" and not self._saved:
            return self.error_message("the transcript was not saved (the server keeps none, or could not write it)")
        return None


async def transcribe(request: web.Request) -> web.StreamResponse:
    return await _serve(request, lambda sock: TranscribeSocket(sock, request))


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, lambda sock: TranscriptionsSocket(sock, request))


async def legacy_ws(request: web.Request) -> web.StreamResponse:
    return await _serve(request, lambda sock: LegacySocket(sock, request))

