"""OpenAI Realtime transcription over one of our sessions, whatever carries it (a WebSocket, a data channel).

`Realtime` takes the client's events: settings become session options, appended audio is fed, a commit
flushes the utterance in progress, a clear discards it. What it has to say goes into the transport's
ordered outbox beside the session's own events, and `Translator` turns that one ordered stream into
OpenAI's events: each utterance the VAD finds is an item (server VAD), or the audio between two commits
is (turn_detection null). Deltas only ever add text; `completed.transcript` is the item's whole text.
"""

from __future__ import annotations

import base64
import binascii
import math
import random
import string
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from asr.audio import SAMPLE_RATE
from errors import ApiError, client_json, quoted
from ops import metrics
from protocol import Event
from sessions import Session, SessionOptions

from .realtime_settings import Settings, SettingsError, apply_beta, apply_ga, beta_session, ga_session

_ALPHABET = string.ascii_letters + string.digits
MIN_COMMIT_SAMPLES = SAMPLE_RATE // 10  # OpenAI refuses to commit less than 100 ms of audio
# Events of OpenAI's conversational sessions, which a transcription session does not take.
_CONVERSATION = ("response.", "conversation.", "output_audio_buffer.")
# A session that ends on its own: the client is told why before the socket closes.
_END_ERRORS = {"idle_timeout": "no audio came for the server's idle timeout",
               "max_duration": "the session reached its maximum duration",
               "shutdown": "the server is restarting"}


def new_id(prefix: str) -> str:
    """OpenAI's id form: a prefix and 21 letters or digits (event_, item_)."""
    return prefix + "".join(random.choices(_ALPHABET, k=21))


def session_id(session: Session) -> str:
    """The Realtime session id names our session: sess_<id> is /v1/sessions/<id>."""
    return f"sess_{session.id}"


def _note(kind: str, **fields: Any) -> Event:
    """An item for the outbox, in order with the session's events, that only Translator reads."""
    return {"type": f"openai.{kind}", **fields}


def _error(code: str, message: str, param: str | None = None, event_id: str | None = None,
           kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


def error_note(code: str, message: str, param: str | None = None, kind: str = "invalid_request_error") -> Event:
    """An `error` event for the outbox, from a transport."""
    metrics.error("event", code)
    return _note("event", event=_error(code, message, param, kind=kind))


class Realtime:
    """The client's side of one Realtime session."""

    def __init__(self, session: Session, settings: Settings, beta: bool, languages: frozenset[str],
                 options: Callable[[Settings], SessionOptions], post: Callable[[Event], None],
                 append: Callable[[bytes, Settings], Awaitable[None]] | None, expires_at: int = 0) -> None:
        """`options`: our session options for settings (ApiError where a token forbids them); `post`: into
        the outbox; `append`: feeds audio in the settings' format (None where audio comes on a track);
        `expires_at`: when the session reaches its longest duration (epoch seconds)."""
        self.session = session
        self.expires_at = expires_at
        self.settings = settings
        self.beta = beta
        self.languages = languages
        self._options, self._post, self._append = options, post, append
        self._mark = 0  # the stream's sample where the uncommitted audio begins
        self.translator = Translator(session_id(session), settings, beta)

    def created(self) -> Event:
        """The first thing the client hears."""
        kind = "transcription_session.created" if self.beta else "session.created"
        return _note("event", event={"type": kind, "session": self._reported()})

    def observe(self, event: Event) -> None:
        """A session sink: with server VAD, an utterance that ends commits the audio before it."""
        if event["type"] == "speech.stopped" and self.settings.turns is not None:
            self._mark = self.session.stream.samples

    async def receive(self, data: str | bytes) -> None:
        """One client event. A mistake gets an `error` event; the session goes on."""
        try:
            message = client_json(data)
        except ValueError:
            self._refuse(SettingsError(None, "The message is not valid JSON.", "invalid_json"))
            return
        if not isinstance(message, dict):
            self._refuse(SettingsError(None, "Each message must be a JSON object.", "invalid_json"))
            return
        event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
        kind = message.get("type")
        handlers = {"session.update": self._update, "transcription_session.update": self._update,
                    "input_audio_buffer.append": self._append_audio, "input_audio_buffer.commit": self._commit,
                    "input_audio_buffer.clear": self._clear}
        try:
            handler = handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                if isinstance(kind, str) and kind.startswith(_CONVERSATION):
                    raise SettingsError("type", f"{kind} is not supported: this server transcribes, it does not "
                                        "converse", "unsupported")
                raise SettingsError("type", f"Invalid value: {quoted(kind)}. The client may send session.update, "
                                    "transcription_session.update and input_audio_buffer.append, .commit, .clear")
            await handler(message)
        except SettingsError as e:
            self._refuse(e, event_id)

    def _refuse(self, e: SettingsError, event_id: str | None = None) -> None:
        metrics.error("event", e.code)
        self._post(_note("event", event=_error(e.code, e.message, e.param, event_id)))

    def _reported(self) -> dict[str, Any]:
        sid = session_id(self.session)
        if self.beta:
            return beta_session(self.settings, sid, self.expires_at)
        return ga_session(self.settings, sid, self.expires_at)

    async def _update(self, message: dict[str, Any]) -> None:
        beta = message["type"] == "transcription_session.update"
        settings = (apply_beta if beta else apply_ga)(self.settings, message.get("session"), self.languages)
        try:
            options = self._options(settings)
        except ApiError as e:
            raise SettingsError("session", e.message, e.code) from None
        self.settings, self.beta = settings, self.beta or beta
        self.session.configure(options)
        self._post(_note("settings", settings=settings, beta=self.beta))
        kind = "transcription_session.updated" if self.beta else "session.updated"
        self._post(_note("event", event={"type": kind, "session": self._reported()}))

    async def _append_audio(self, message: dict[str, Any]) -> None:
        audio = message.get("audio")
        try:
            if not isinstance(audio, str):
                raise ValueError
            data = base64.b64decode(audio, validate=True)
        except (ValueError, binascii.Error):
            raise SettingsError("audio", "Invalid 'audio': expected base64-encoded audio bytes.") from None
        if self._append is None:
            raise SettingsError("type", "input_audio_buffer.append is not taken over WebRTC: the audio comes "
                                "on the call's track", "unsupported")
        await self._append(data, self.settings)

    async def _commit(self, message: dict[str, Any]) -> None:
        stream = self.session.stream
        if self.settings.turns is not None and stream.flush():
            self._mark = stream.samples  # the utterance's own events commit it
            return
        buffered = stream.samples - self._mark
        if buffered < MIN_COMMIT_SAMPLES:
            raise SettingsError(None, "Error committing input audio buffer: buffer too small. Expected at least "
                                f"100ms of audio, but buffer only has {buffered / SAMPLE_RATE * 1000:.2f}ms of audio.",
                                "input_audio_buffer_commit_empty")
        self._mark = stream.samples
        if self.settings.turns is None:
            stream.flush()
            await stream.finals_sent()
        through = stream.utterance  # none in progress now: its finals, and all before, are out
        self._post(_note("commit", through=through, item_id=new_id("item_"), seconds=buffered / SAMPLE_RATE))

    async def _clear(self, message: dict[str, Any]) -> None:
        stream = self.session.stream
        stream.discard()
        self._mark = stream.samples
        self._post(_note("clear", through=stream.utterance))


@dataclass
class _Item:
    id: str
    sent: str = ""  # the text its deltas have carried
    committed: bool = False


class Translator:
    """The outbox, in order, as OpenAI's events: each gets its event_id here."""

    def __init__(self, session_id: str, settings: Settings, beta: bool) -> None:
        self.session_id = session_id
        self.settings, self.beta = settings, beta
        self._items: dict[int, _Item] = {}  # utterance -> its item, until its final (server VAD)
        self._previous: str | None = None  # the last item committed
        self._pending: list[tuple[int, Event, tuple[str, str] | None]] = []  # finals awaiting a commit
        self._failure: tuple[str, str] | None = None  # why the next final's decode failed
        self._cleared = 0  # utterances up to this one were cleared: their finals, late or not, are dropped

    def translate(self, item: Event) -> list[dict[str, Any]]:
        kind = item["type"]
        if kind == "openai.event":
            out = [item["event"]]
        elif kind == "openai.settings":
            self.settings, self.beta = item["settings"], item["beta"]
            out = []
        elif kind == "openai.commit":
            out = self._commit(item["through"], item["item_id"], item["seconds"])
        elif kind == "openai.clear":
            self._cleared = max(self._cleared, item["through"])
            self._pending = [p for p in self._pending if p[0] > item["through"]]
            self._items = {n: i for n, i in self._items.items() if i.committed}
            out = [{"type": "input_audio_buffer.cleared"}]
        elif kind == "speech.started":
            out = self._started(item)
        elif kind == "transcript.partial":
            out = self._partial(item)
        elif kind == "speech.stopped":
            out = self._stopped(item)
        elif kind == "transcript.final":
            out = self._final(item)
        elif kind == "error":
            out = self._server_error(item)
        elif kind == "session.ended" and item["reason"] in _END_ERRORS:
            out = [_error(item["reason"], _END_ERRORS[item["reason"]], kind="server_error"
                          if item["reason"] == "shutdown" else "invalid_request_error")]
        else:
            out = []
        return [{"type": e["type"], "event_id": new_id("event_"), **e} for e in out]

    # Server VAD: each utterance is an item ---------------------------------------------------------

    def _started(self, event: Event) -> list[dict[str, Any]]:
        if self.settings.turns is None:
            return []
        item = self._items[event["utterance"]] = _Item(new_id("item_"))
        start = max(0, _ms(event["start"]) - self.settings.turns.prefix_padding_ms)
        return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": start, "item_id": item.id}]

    def _partial(self, event: Event) -> list[dict[str, Any]]:
        item = self._items.get(event["utterance"])
        if item is None or item.committed or not self.settings.live:
            return []
        return self._delta(item, event["stable"])

    def _stopped(self, event: Event) -> list[dict[str, Any]]:
        item = self._items.get(event["utterance"])
        if item is None:
            return []
        return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": _ms(event["end"]), "item_id": item.id},
                *self._committed(item)]

    def _committed(self, item: _Item) -> list[dict[str, Any]]:
        item.committed = True
        previous, self._previous = self._previous, item.id
        out: list[dict[str, Any]] = [{"type": "input_audio_buffer.committed", "previous_item_id": previous,
                                      "item_id": item.id}]
        body = {"id": item.id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        if self.beta:
            out.append({"type": "conversation.item.created", "previous_item_id": previous, "item": body})
        else:
            out += [{"type": "conversation.item.added", "previous_item_id": previous, "item": body},
                    {"type": "conversation.item.done", "previous_item_id": previous, "item": body}]
        return out

    def _final(self, event: Event) -> list[dict[str, Any]]:
        failure, self._failure = self._failure, None
        item = self._items.pop(event["utterance"], None)
        if item is None:  # the client commits its turns: the final waits for the commit that takes it
            if event["utterance"] > self._cleared:
                self._pending.append((event["utterance"], event, failure))
            return []
        out = [] if item.committed else self._committed(item)
        seconds = max(0.0, event["end"] - event["start"])
        return out + self._transcribed(item, event["text"], event["words"], seconds, failure)

    def _server_error(self, event: Event) -> list[dict[str, Any]]:
        if event["code"] in ("overloaded", "decode_failed"):  # the next final is that utterance's, with no text
            self._failure = (event["code"], event["message"])
            return []
        return [_error(event["code"], event["message"], kind="server_error")]

    # The client commits: the audio between two commits is an item -------------------------------------

    def _commit(self, through: int, item_id: str, seconds: float) -> list[dict[str, Any]]:
        taken = [p for p in self._pending if p[0] <= through]
        self._pending = [p for p in self._pending if p[0] > through]
        text = " ".join(e["text"] for _, e, _ in taken if e["text"])
        words = [w for _, e, _ in taken for w in e["words"]]
        failures = [f for _, _, f in taken if f is not None]
        item = _Item(item_id)
        return self._committed(item) + self._transcribed(item, text, words, seconds,
                                                          failures[0] if failures and not text else None)

    # Both ------------------------------------------------------------------------------------------

    def _transcribed(self, item: _Item, text: str, words: list[dict[str, Any]], seconds: float,
                     failure: tuple[str, str] | None) -> list[dict[str, Any]]:
        if failure is not None:
            return [{"type": "conversation.item.input_audio_transcription.failed", "item_id": item.id,
                     "content_index": 0, "error": {"type": "transcription_error", "code": failure[0],
                                                   "message": failure[1], "param": None}}]
        logprobs = _logprobs(words) if self.settings.logprobs else None
        if self.settings.live:
            out = self._delta(item, text) if text.startswith(item.sent) else []
        else:
            out = [{"type": "conversation.item.input_audio_transcription.delta", "item_id": item.id,
                    "content_index": 0, "delta": text, "logprobs": logprobs}] if text else []
        return out + [{"type": "conversation.item.input_audio_transcription.completed", "item_id": item.id,
                       "content_index": 0, "transcript": text,
                       "usage": {"type": "duration", "seconds": round(seconds, 3)}, "logprobs": logprobs}]

    def _delta(self, item: _Item, text: str) -> list[dict[str, Any]]:
        """What `text` adds to what the item's deltas carried, if it goes on from there at a word's edge."""
        sent = item.sent
        if len(text) <= len(sent) or not text.startswith(sent) or (sent and text[len(sent)] != " "
                                                                   and not sent.endswith(" ")):
            return []
        item.sent = text
        return [{"type": "conversation.item.input_audio_transcription.delta", "item_id": item.id,
                 "content_index": 0, "delta": text[len(sent):], "logprobs": None}]


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _logprobs(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"token": w["word"], "logprob": round(math.log(max(w["probability"], 1e-6)), 4),
             "bytes": list(w["word"].encode())} for w in words]
