"""The wire protocol in one place: every event the server sends, every message a client sends, every
error code. docs/protocol.md describes it for clients, and tests/test_protocol.py holds the two together.

Events are JSON-ready dicts, built only by the constructors here and in asr/events.py (which the speech
package needs without the server): a new field is one edit, and everything that carries events (storage,
metrics, SSE, the outboxes) handles dicts as they are. Client messages are parsed only here, into Start,
Audio or Stop; what a client gets wrong raises ClientError, whose code says how the session goes on.
"""

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypedDict, get_args

from asr.audio import MAX_RATE, MIN_RATE, SAMPLE_RATE
from asr.events import (DECODE_FAILED, OVERLOADED, ErrorEvent, Event, SpeechStartedEvent, SpeechStoppedEvent,
                        TranscriptFinalEvent, TranscriptPartialEvent, Word, error, speech_started, speech_stopped,
                        transcript_final, transcript_partial, word)
from errors import client_json, quoted

__all__ = [
    "Event", "EVENTS", "event_type", "encode", "ErrorEvent", "SessionStartedEvent", "SpeechStartedEvent",
    "TranscriptPartialEvent", "SpeechStoppedEvent", "TranscriptFinalEvent", "Word", "SessionSavedEvent",
    "SessionEndedEvent", "session_started", "speech_started", "transcript_partial", "speech_stopped",
    "transcript_final", "word", "error", "session_saved", "session_ended", "END_REASONS", "WS_CLOSE_ON_END",
    "ErrorUse", "ERRORS", "ClientError", "Start", "Audio", "Stop", "OPTIONS", "ENCODINGS", "MAX_AUDIO_BYTES",
    "ws_start", "ws_message", "too_large", "channel_message", "rtc_offer", "rtc_answer",
]


# Events: server to client ------------------------------------------------------------------------

class SessionStartedEvent(TypedDict):
    type: Literal["session.started"]
    session_id: str
    model: str
    language: str | None  # None: detected per utterance
    sample_rate: int  # of the session's audio timeline, whatever the client sends


class SessionSavedEvent(TypedDict):
    type: Literal["session.saved"]
    session_id: str
    transcript: str  # the route of its saved transcript


class SessionEndedEvent(TypedDict):
    type: Literal["session.ended"]
    reason: str  # one of END_REASONS


# Every event the server sends; the speech stream's own are defined in asr/events.py.
EVENTS = (SessionStartedEvent, SpeechStartedEvent, TranscriptPartialEvent, SpeechStoppedEvent,
          TranscriptFinalEvent, ErrorEvent, SessionSavedEvent, SessionEndedEvent)

END_REASONS = {  # session.ended's reason, and what it means
    "stop": "the client sent stop",
    "deleted": "DELETE /v1/rtc/{session_id}",
    "peer_closed": "the client closed its connection, channel or track",
    "connection_failed": "the WebRTC connection failed",
    "ice_timeout": "ICE did not connect within --ice-timeout-s",
    "idle_timeout": "no audio for --idle-timeout-s",
    "max_duration": "the session reached --max-session-s, or its token's limit",
    "shutdown": "the server is stopping",
    "error": "a WebSocket stream that could not go on (an error event says why)",
    "not_reading": "a client that left its events unread (a WebSocket, or a data channel that acknowledges "
                   "nothing): its connection was cut, so it never sees this",
    "bad_offer": "an offer that could not be negotiated: the client got a 400, never this event",
}
WS_CLOSE_ON_END = {"shutdown": 1001}  # a WebSocket's close code by end reason; else 1000, or the error's


def event_type(event: type) -> str:
    """The `type` an event class stands for: "session.started" for SessionStartedEvent."""
    return get_args(event.__annotations__["type"])[0]


def session_started(session_id: str, model: str, language: str | None, sample_rate: int) -> SessionStartedEvent:
    return {"type": "session.started", "session_id": session_id, "model": model, "language": language,
            "sample_rate": sample_rate}


def session_saved(session_id: str) -> SessionSavedEvent:
    return {"type": "session.saved", "session_id": session_id, "transcript": f"/v1/sessions/{session_id}/transcript"}


def session_ended(reason: str) -> SessionEndedEvent:
    return {"type": "session.ended", "reason": reason}


def encode(event: Event) -> str:
    """An event as one compact JSON text, the same on the data channel, the WebSocket and SSE."""
    return json.dumps(event, separators=(",", ":"))


# Error codes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorUse:
    """Where a code is used: as a JSON error response with these HTTP statuses, and/or as an error event
    that the session outlives (close None) or that a WebSocket close with this code follows."""

    meaning: str
    http: tuple[int, ...] = ()
    event: bool = False
    close: int | None = None


def _http(meaning: str, *status: int) -> ErrorUse:
    return ErrorUse(meaning, http=status)


def _event(meaning: str, *status: int, close: int | None = None) -> ErrorUse:
    return ErrorUse(meaning, http=status, event=True, close=close)


# WebSocket close codes (RFC 6455): 1001 going away, 1003 unsupported data, 1008 policy, 1013 try later.
ERRORS: dict[str, ErrorUse] = {
    # Requests refused before any session exists.
    "bad_sdp": _http("an offer that is not SDP, or lacks a DTLS fingerprint, ICE credentials or valid ports", 400),
    "no_audio": _http("an offer that sends no audio; a saved session's audio that was not recorded", 400, 404),
    "no_opus": _http("an offer whose audio does not offer Opus", 400),
    "too_many_tracks": _http("an offer of more than 16 media sections", 400),
    "bad_json": _http("a request body that is not the JSON it should be", 400),
    "bad_offer": _http('a JSON offer that is not {"type": "offer", "sdp": "..."}', 400),
    "bad_request": _http("a request that is not valid HTTP/1.1; the connection closes", 400),
    "unauthorized": _http("no credential, where API keys are configured", 401),
    "invalid_token": _http("a credential that is wrong, malformed or in the wrong place", 401),
    "token_expired": _http("a session token past its expiry", 401),
    "forbidden_origin": _http("a page of an origin not in --allowed-origins", 403),
    "key_required": _http("a session token on a route that needs an API key", 403),
    "token_not_allowed": _http("a token minted for one API (an OpenAI client secret) on another API's route", 403),
    "unknown_session": _http("a session that is unknown, ended, or another key's", 404),
    "storage_off": _http("saved sessions asked of a server with an empty --data-dir", 404),
    "not_found": _http("a route that does not exist", 404),
    "method_not_allowed": _http("a method the route does not take", 405),
    "header_timeout": _http("a request head slower than --header-timeout-s; the connection closes", 408),
    "body_timeout": _http("a request body slower than --body-timeout-s; the connection closes", 408),
    "uri_too_long": _http("a request line over 8190 bytes; the connection closes", 414),
    "unsupported_media_type": _http("an offer that is neither application/sdp nor application/json", 415),
    "headers_too_large": _http("a header over 8190 bytes, or more than 128; the connection closes", 431),
    "internal": _http("a fault of the server's own, logged", 500),
    "client_gone": _http("the client left mid-request: logged, and answered to nobody", 500),
    "http_error": _http("any other error of the HTTP layer, with its own status and reason"),
    "bad_range": _http("a Range header outside the saved recording", 416),
    "not_ready": _http("the model is still loading", 503),
    "storage_unavailable": _http("saved sessions asked while the bucket of --storage-url cannot be reached", 503),
    # Options and limits: an HTTP error, or on a WebSocket start message an error event and the close.
    "unknown_option": _event("an option, start field or parameter the server does not know", 400, close=1008),
    "bad_option": _event("an option or parameter with a bad value", 400, close=1008),
    "option_not_allowed": _event("an option value the session token does not allow", 403, close=1008),
    "too_large": _event("an offer over --max-offer-bytes; a WebSocket audio message over 1 MiB", 413, close=1008),
    "key_session_limit": _event("--max-sessions-per-key reached for this key", 429, close=1013),
    "session_limit": _event("--max-sessions reached", 503, close=1013),
    "shutting_down": _event("the server is stopping", 503, close=1001),
    # A WebSocket start or stream the server cannot take: the error event, then the close.
    "unsupported_rate": _event("a start message's sample_rate outside 8000 to 48000 Hz", close=1003),
    "unsupported_encoding": _event("a start message's encoding other than pcm_s16le or webm", close=1003),
    "bad_audio": _event("WebM audio that cannot be decoded; the finals of what came before", close=1003),
    # Client messages the session outlives.
    "bad_message": _event("a message that is not JSON"),
    "unknown_message": _event("a message of a type the client may not send"),
    "already_started": _event("a second WebSocket start message"),
    "bad_base64": _event("WebSocket audio JSON whose data (or payload) is not base64; dropped"),
    "odd_length": _event("16-bit PCM of an odd byte count; dropped"),
    # What the server could not do for the session, which goes on.
    OVERLOADED: _event("an utterance the server could not queue; its final comes with empty text"),
    DECODE_FAILED: _event("an utterance whose transcription failed; its final comes with empty text"),
    "storage_failed": _event("the session's transcript is not being saved (told once per session)"),
}


class ClientError(Exception):
    """What a client got wrong: answered with an error event of this code (or an HTTP error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def close(self) -> int | None:
        """The WebSocket close code that follows the error event; None: the session goes on."""
        return ERRORS[self.code].close


# Client messages: client to server ---------------------------------------------------------------

OPTIONS = ("language", "partials", "endpoint_ms")  # session options: query string, JSON offer or start
ENCODINGS = ("pcm_s16le", "webm")
_START_FIELDS = {"type", "sample_rate", "encoding", *OPTIONS}
MAX_AUDIO_BYTES = 1 << 20  # one audio message: 32 s of 16 kHz PCM is already more than any client needs


@dataclass(frozen=True)
class Start:
    """The WebSocket's optional first message: how its audio comes, and the session's options."""

    encoding: str = "pcm_s16le"
    sample_rate: int = SAMPLE_RATE  # of pcm_s16le; a WebM stream says its own
    options: Mapping[str, Any] = field(default_factory=dict)  # as sent: sessions.parse_options checks them


@dataclass(frozen=True)
class Audio:
    data: bytes  # pcm_s16le at the start's rate, or the next chunk of the WebM stream


@dataclass(frozen=True)
class Stop:
    """The client is done: the finals of everything received, then session.ended (stop)."""


def ws_start(data: str | bytes) -> Start | None:
    """The WebSocket's first message, when it is a start. Anything else is not: the session starts with
    the defaults (16 kHz PCM), and that message is then read as any other (ws_message)."""
    message = _json(data) if isinstance(data, str) else None
    if not isinstance(message, dict) or message.get("type") != "start":
        return None
    unknown = set(message) - _START_FIELDS
    if unknown:
        raise ClientError("unknown_option", f"unknown start field(s): {', '.join(sorted(unknown))}")
    encoding = message.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ClientError("unsupported_encoding", f"encoding must be one of {', '.join(ENCODINGS)}")
    rate = message.get("sample_rate", SAMPLE_RATE)
    if encoding == "pcm_s16le" and (
            not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE):
        raise ClientError("unsupported_rate", f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE}")
    return Start(encoding, rate, {k: v for k, v in message.items() if k in OPTIONS})


def ws_message(data: str | bytes) -> Audio | Stop:
    """A WebSocket message once the session has started: binary (bytes) is audio, text is JSON."""
    if isinstance(data, bytes):
        return _audio(data)
    message = _json(data)
    if message is _NOT_JSON:
        raise ClientError("bad_message", "message is not valid JSON")
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "stop" or (kind == "control" and message.get("action") == "stop"):
        return Stop()
    if kind == "audio":
        payload = message.get("data", message.get("payload"))
        try:
            if not isinstance(payload, str):
                raise ValueError
            audio = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            raise ClientError("bad_base64", "audio data must be a base64 string in 'data' or 'payload'") from None
        return _audio(audio)
    if kind == "start":
        raise ClientError("already_started", "the session has already started")
    raise _unknown(kind, "audio, stop")


def channel_message(data: str | bytes) -> Stop:
    """A message on the WebRTC data channel: JSON, text or binary."""
    message = _json(data)
    if message is _NOT_JSON:
        raise ClientError("bad_message", "message is not valid JSON")
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "stop":
        return Stop()
    raise _unknown(kind, "stop")


def rtc_offer(body: bytes) -> tuple[str, dict[str, Any]]:
    """A JSON offer's SDP and the session options beside it."""
    data = _json(body)
    if data is _NOT_JSON:
        raise ClientError("bad_json", "the body is not valid JSON")
    if not isinstance(data, dict) or data.get("type") != "offer" or not isinstance(data.get("sdp"), str):
        raise ClientError("bad_offer", 'expected {"type": "offer", "sdp": "..."}')
    return data["sdp"], {k: v for k, v in data.items() if k not in ("type", "sdp")}


def rtc_answer(sdp: str, session_id: str) -> dict[str, Any]:
    """The answer to a JSON offer (an SDP offer gets the SDP alone)."""
    return {"type": "answer", "sdp": sdp, "session_id": session_id}


def too_large() -> ClientError:
    """An audio message over MAX_AUDIO_BYTES, whether read whole or cut short by the transport."""
    return ClientError("too_large", f"audio messages must be at most {MAX_AUDIO_BYTES} bytes")


_NOT_JSON = object()


def _json(data: str | bytes) -> Any:
    """What the client sent, or _NOT_JSON."""
    try:
        return client_json(data)
    except ValueError:  # UnicodeDecodeError is one
        return _NOT_JSON


def _audio(data: bytes) -> Audio:
    if len(data) > MAX_AUDIO_BYTES:
        raise too_large()
    return Audio(data)


def _unknown(kind: Any, allowed: str) -> ClientError:
    return ClientError("unknown_message", f"unknown message type {quoted(kind)}; the client may send: {allowed}")
