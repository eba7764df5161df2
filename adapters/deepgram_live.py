"""Deepgram's live transcription, `GET /v1/listen` (WebSocket), over our sessions.

The query string says how the audio comes (raw `linear16`, `mulaw`, `alaw` at `sample_rate`, Ogg/Opus,
or, with no `encoding`, any container the first bytes tell: a WAV file streamed with its header) and
what to send back; parameters it does not know are ignored, as Deepgram's SDKs send many. Out go
`Results` (interim and final), `SpeechStarted`, `UtteranceEnd` and, at the end, `Metadata`; in come
audio, `KeepAlive`, `Finalize` and `CloseStream`. Nothing is sent on open, and no message type the SDKs
do not know. `POST /v1/auth/grant` mints the short-lived access tokens its browser clients use.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from aiohttp import WSMessage, WSMsgType, web

import ws
from asr.audio import MAX_RATE, MIN_RATE, SAMPLE_RATE, RawAudio
from errors import ERROR_SHAPES, ApiError, client_json, quoted
from ops import auth, metrics
from protocol import Event
from sessions import REGISTRY, SessionOptions

from . import deepgram


API = "deepgram"
SCOPE = "deepgram"  # auth.TOKEN_SCOPES: what its granted tokens open
GRANT_TTL_S = (1, 3600, 30)  # ttl_seconds: bounds and Deepgram's default
MAX_FRAME_BYTES = 4 << 20  # one binary message: seconds of audio in any encoding
_RAW = {"linear16": "pcm_s16le", "mulaw": "mulaw", "alaw": "alaw"}  # -> asr.audio.RawAudio
_CONTAINED = {"opus": "ogg", "ogg-opus": "ogg"}  # Deepgram's Opus comes in Ogg pages
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_ENDPOINT_MS = (100, 5000)  # Deepgram's default endpointing is 10 ms: it would end every word
# How the stream ends, as Deepgram closes it (its NET- and DATA- codes): code and reason by end reason.
_CLOSES = {"stop": (1000, ""), "idle_timeout": (1011, "NET-0001"), "max_duration": (1011, "NET-0001"),
           "shutdown": (1001, ""), "not_reading": (1011, "NET-0000")}


@dataclass(frozen=True)
class Listen:
    """The query string, as this stream reads it."""

    encoding: str | None  # of _RAW or _CONTAINED; None: a container told by the first bytes
    sample_rate: int | None
    channels: int
    interim_results: bool
    endpoint_ms: int | None  # None: the server's own
    speech_final: bool  # endpointing=false: finals never say the speaker finished
    utterance_end_ms: int | None
    vad_events: bool
    punctuate: bool  # punctuate or smart_format: Whisper's cased, punctuated text; else lowercase words
    language: str | None  # "auto" to detect


def parse(query: Mapping[str, str], languages: frozenset[str]) -> Listen:
    """The parameters this server acts on; a bad value of one of them is a 400 before the upgrade."""
    encoding = query.get("encoding") or None
    if encoding is not None:
        encoding = encoding.lower()
        if encoding not in _RAW and encoding not in _CONTAINED:
            raise ApiError(400, "bad_option", f"encoding {quoted(encoding)} is not supported; use linear16, "
                           "mulaw, alaw, opus, or none for a container (WAV, Ogg, WebM, FLAC, MP3)")
    rate = _integer(query, "sample_rate", MIN_RATE, MAX_RATE)
    if encoding in _RAW and rate is None:
        raise ApiError(400, "bad_option", f"sample_rate is required with encoding={encoding}")
    endpointing = query.get("endpointing", "").lower()
    endpoint_ms, speech_final = None, True
    if endpointing in ("false", "0"):
        speech_final = False
    elif endpointing not in ("", "true"):
        endpoint_ms = _integer(query, "endpointing", 0, None)
        endpoint_ms = min(max(endpoint_ms, _ENDPOINT_MS[0]), _ENDPOINT_MS[1])
    return Listen(
        encoding=encoding, sample_rate=rate, channels=_integer(query, "channels", 1, 8) or 1,
        interim_results=_boolean(query, "interim_results"), endpoint_ms=endpoint_ms, speech_final=speech_final,
        utterance_end_ms=_integer(query, "utterance_end_ms", 1, 60000), vad_events=_boolean(query, "vad_events"),
        punctuate=_boolean(query, "punctuate") or _boolean(query, "smart_format"),
        language=_language(query.get("language"), languages))


def _boolean(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return False
    if value.lower() not in _BOOLEANS:
        raise ApiError(400, "bad_option", f"{name} must be true or false")
    return _BOOLEANS[value.lower()]


def _integer(query: Mapping[str, str], name: str, low: int, high: int | None) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, "bad_option", f"{name} must be an integer") from None
    if number < low or (high is not None and number > high):
        raise ApiError(400, "bad_option", f"{name} must be from {low}" + (f" to {high}" if high else " up"))
    return number


def _language(value: str | None, languages: frozenset[str]) -> str | None:
    """A BCP-47 tag's language (en-US: en); multi: detect."""
    if not value:
        return None
    if value.lower() == "multi":
        return "auto"
    code = re.split(r"[-_]", value)[0].lower()
    if code not in languages:
        raise ApiError(400, "bad_option", f"language {quoted(value)} is not supported by this server's model")
    return code


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/listen", listen)
    app.router.add_post("/v1/auth/grant", grant)
    for path in ("/v1/listen", "/v1/auth/grant"):
        app.setdefault(ERROR_SHAPES, {})[path] = deepgram.error


async def grant(request: web.Request) -> web.Response:
    """POST /v1/auth/grant {"ttl_seconds"}, with an API key: a token that opens Deepgram streams only."""
    body = await request.read()
    try:
        data = client_json(body) if body.strip() else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    low, high, default = GRANT_TTL_S
    ttl = default if data.get("ttl_seconds") is None else data["ttl_seconds"]
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not low <= ttl <= high:
        raise ApiError(400, "bad_option", f"ttl_seconds must be a number from {low} to {high}")
    access = request.app[auth.ACCESS]
    ttl = min(float(ttl), access.config.token_max_ttl_s)
    token, _ = access.mint(auth.grant(request), ttl, {}, None, scope=SCOPE)
    return web.json_response({"access_token": token, "expires_in": ttl},
                             headers={"Cache-Control": "no-store"})


async def listen(request: web.Request) -> web.StreamResponse:
    """Bad parameters, no credential and no capacity are refused before the upgrade, as Deepgram does:
    its SDKs raise on the status."""
    registry = request.app[REGISTRY]
    settings = parse(request.query, registry.languages)
    raw: dict[str, Any] = {"partials": settings.interim_results}
    if settings.endpoint_ms is not None:
        raw["endpoint_ms"] = settings.endpoint_ms
    if settings.language is not None:
        raw["language"] = settings.language
    options = auth.session_options(request, raw)
    registry.check_capacity(auth.client(request))
    return await ws.serve(request, lambda sock: DeepgramSocket(sock, request, settings, options),
                          protocols=auth.ws_protocols(request, "token"), max_msg_size=MAX_FRAME_BYTES)


def _word(text: str) -> str:
    """Deepgram's `word`: lowercase, without the punctuation Whisper attaches."""
    return re.sub(r"[^\w'-]+", "", text.lower()).strip("'-") or text.lower()


class DeepgramSocket(ws.SocketSession):
    api = API

    def __init__(self, sock: ws.Socket, request: web.Request, settings: Listen, options: SessionOptions) -> None:
        super().__init__(sock, request)
        self.settings, self.options = settings, options
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z"
        self._audio_hash = hashlib.sha256()
        model = self.registry.worker.engine.name
        self._model = {"name": model, "version": "livestt", "arch": "whisper"}
        self._model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"livestt:{model}"))
        self.request_id = ""
        self._last_word_end: float | None = None  # of the last final with words, until its UtteranceEnd
        self._onset = -1.0  # the latest speech.started

    async def run(self) -> None:
        try:
            session = self.start(self.options)
        except ApiError as e:  # the last slot went between the check and the upgrade
            await self.refuse([], 1013, e.code)
            return
        self.request_id = str(uuid.UUID(session.id))  # our session: /v1/sessions/<hex>
        s = self.settings
        if s.encoding in _RAW:
            self.raw = RawAudio(_RAW[s.encoding], s.sample_rate or SAMPLE_RATE, s.channels)
        elif s.encoding in _CONTAINED:
            self.use_container(_CONTAINED[s.encoding])
        else:  # a container, or raw 16-bit PCM if the stream starts with none and the rate was given
            self.expect_container(RawAudio("pcm_s16le", s.sample_rate, s.channels) if s.sample_rate else None)
        if s.utterance_end_ms is not None:
            session.add_sink(self._watch)
        await self.read()

    async def dispatch(self, message: WSMessage) -> bool:
        assert self.session is not None
        if message.type == WSMsgType.BINARY:
            if not message.data:  # Deepgram's older end of stream: an empty frame
                await self.end("stop")
                return True
            self._audio_hash.update(message.data)
            await self.audio(message.data)
            self._check_utterance_end()
            return False
        try:
            data = client_json(message.data)
        except ValueError:
            data = None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "KeepAlive":
            self.session.touch()
        elif kind == "Finalize":
            await self._finalize()
        elif kind == "CloseStream":
            await self.end("stop")
            return True
        elif kind == "Configure":
            self._send({"type": "ConfigureFailure", "request_id": self.request_id,
                        "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                        "description": "this server's model takes no keyterms"})
        else:
            metrics.error("event", "bad_message")
            self._send({"type": "Error", "variant": "SchemaError", "message": message.data[:1000],
                        "description": "expected KeepAlive, Finalize, CloseStream or Configure, as JSON"})
        return False

    async def _finalize(self) -> None:
        """Finalize: the utterance in progress ends now, and its Results say from_finalize. With nothing in
        progress, one empty Results says it, after the finals still on their way: clients wait for it."""
        assert self.session is not None
        if self.session.stream.flush():
            return
        await self.session.stream.finals_sent()
        clock = self.session.stream.samples / SAMPLE_RATE
        self._send(self._results(clock, 0.0, True, False, True, "", []))

    def _send(self, message: dict[str, Any]) -> None:
        self.put({"type": "deepgram.message", "message": message})

    # UtteranceEnd: a gap of utterance_end_ms after the last word, on the audio's clock -----------------

    def _watch(self, event: Event) -> None:
        if event["type"] == "speech.started":
            self._onset = event["start"]
        elif event["type"] == "transcript.final" and event["words"]:
            self._last_word_end = event["words"][-1]["end"]
            self._check_utterance_end()

    def _check_utterance_end(self) -> None:
        if self._last_word_end is None or self.session is None:
            return
        deadline = self._last_word_end + self.settings.utterance_end_ms / 1000
        if self._last_word_end < self._onset < deadline:  # speech went on within the gap
            self._last_word_end = None
        elif self.session.stream.samples / SAMPLE_RATE >= deadline:
            self._send({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": self._last_word_end})
            self._last_word_end = None

    # Out ------------------------------------------------------------------------------------------

    def encode(self, item: Event) -> list[str]:
        message = self._translate(item)
        return [json.dumps(message, separators=(",", ":"), ensure_ascii=False)] if message else []

    def _translate(self, item: Event) -> dict[str, Any] | None:
        kind, s = item["type"], self.settings
        if kind == "deepgram.message":
            return item["message"]
        if kind == "speech.started" and s.vad_events:
            return {"type": "SpeechStarted", "channel": [0, 1], "timestamp": item["start"]}
        if kind == "transcript.partial":
            clock = (self.session.stream.samples / SAMPLE_RATE) if self.session else item["start"]
            return self._results(item["start"], max(0.0, clock - item["start"]), False, False, False,
                                 item["text"], [])
        if kind == "transcript.final":
            cause = item["cause"]
            return self._results(item["start"], max(0.0, item["end"] - item["start"]), True,
                                 cause == "endpoint" and s.speech_final, cause == "flush", item["text"], item["words"])
        if kind == "session.ended":
            return {"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
                    "sha256": self._audio_hash.hexdigest(), "created": self.created,
                    "duration": round(self.session.stream.samples / SAMPLE_RATE, 3) if self.session else 0.0,
                    "channels": 1}
        return None

    def _results(self, start: float, duration: float, is_final: bool, speech_final: bool, from_finalize: bool,
                 text: str, words: list[dict[str, Any]]) -> dict[str, Any]:
        listed = [{"word": _word(w["word"]), "start": w["start"], "end": w["end"],
                   "confidence": w["probability"], "punctuated_word": w["word"]} for w in words]
        if not self.settings.punctuate:
            text = " ".join(w["word"] for w in listed) if listed else " ".join(_word(t) for t in text.split())
        confidence = round(sum(w["confidence"] for w in listed) / len(listed), 4) if listed else 0.0
        return {"type": "Results", "channel_index": [0, 1], "duration": round(duration, 3), "start": round(start, 3),
                "is_final": is_final, "speech_final": speech_final, "from_finalize": from_finalize,
                "channel": {"alternatives": [{"transcript": text, "confidence": confidence, "words": listed}]},
                "metadata": {"request_id": self.request_id, "model_info": self._model,
                             "model_uuid": self._model_uuid}}

    # Ends -----------------------------------------------------------------------------------------

    async def too_large(self) -> None:
        self._send({"type": "Error", "variant": "DataError", "message": "",
                    "description": f"a binary message may carry at most {MAX_FRAME_BYTES >> 20} MiB"})
        await self.fail(1009)

    def bad_audio(self, message: str) -> None:
        metrics.error("event", "bad_audio")
        self._send({"type": "Error", "variant": "DataError", "message": "", "description": message})
        self._close_code = 1008

    def close_frame(self, reason: str) -> tuple[int, str]:
        if reason == "error":
            return self._close_code, "DATA-0000"
        return _CLOSES.get(reason, (1000, ""))
