"""Sessions, whatever their transport: options, lifecycle, limits, and where their events go."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
from aiohttp import web

from asr.segmenter import Segmenter, SegmenterConfig
from asr.audio import SAMPLE_RATE
from asr.stream import SpeechStream, StreamOptions
from asr.vad import WINDOW, SileroModel, SileroVAD, VadBatch
from asr.worker import DecodePool
from ops import metrics
import protocol
from config import Config
from errors import ApiError
from protocol import Event

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]

_FINISH_TIMEOUT_S = 15.0  # longest wait for the last final when a session ends
_BACKLOG = 256  # events kept for a sink that is not attached yet
WRITE_TIMEOUT_S = 10.0  # longest a client may leave one event unread before its connection is cut


@dataclass(frozen=True)
class Client:
    """Who opened a session: for the per-key limit and the audit log. Never a secret."""

    address: str = ""  # the peer, or what trusted proxies report (--trusted-proxies)
    key: str = ""  # the API key's id (auth.key_id), also for the tokens it minted; "" when open
    max_session_s: float | None = None  # a token's own limit, under --max-session-s


@dataclass(frozen=True)
class SessionOptions:
    language: str | None
    partials: bool
    endpoint_ms: int
    # Set by the vendors' APIs (adapters/), which take them from their own session settings.
    prompt: str = ""  # Whisper's initial prompt
    vad_threshold: float | None = None  # None: --vad-threshold
    preroll_ms: int | None = None  # None: --preroll-ms


def parse_options(raw: Mapping[str, Any], config: Config, languages: frozenset[str],
                  default_language: str | None) -> SessionOptions:
    """Options from a query string or JSON body; anything unknown or malformed is a 400."""
    unknown = set(raw) - set(protocol.OPTIONS)
    if unknown:
        raise ApiError(400, "unknown_option", f"unknown option(s): {', '.join(sorted(unknown))}")
    language = default_language
    if "language" in raw:
        value = raw["language"]
        if not isinstance(value, str) or not value:
            raise ApiError(400, "bad_option", "language must be a language code")
        if value == "auto":
            if len(languages) == 1:
                raise ApiError(400, "bad_option", "this model knows one language: detection is off")
            language = None
        elif value not in languages:
            raise ApiError(400, "bad_option",
                           f"language {value!r} is not supported by this model"
                           + ("" if len(languages) > 1 else " (English only)"))
        else:
            language = value
    partials = True
    if "partials" in raw:
        value = raw["partials"]
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            value = value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ApiError(400, "bad_option", "partials must be true or false")
        partials = value
    endpoint_ms = config.endpoint_ms
    if "endpoint_ms" in raw:
        value = raw["endpoint_ms"]
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            endpoint_ms = int(value)
        except (TypeError, ValueError):
            raise ApiError(400, "bad_option", "endpoint_ms must be an integer") from None
        if not 100 <= endpoint_ms <= 5000:
            raise ApiError(400, "bad_option", "endpoint_ms must be between 100 and 5000")
    return SessionOptions(language, partials, endpoint_ms)


def new_session_id(replica_id: str = "") -> str:
    """32 hex digits, as storage expects, that start with the replica's id: a balancer routes on it."""
    return replica_id + uuid.uuid4().hex[len(replica_id):]


class Session:
    """One live stream: audio in through feed(), events out to its sinks, ended exactly once."""

    def __init__(self, registry: "SessionRegistry", transport: str, options: SessionOptions,
                 stream_factory: Callable[[Sink], SpeechStream], hold_events: bool,
                 client: Client = Client(), api: str = "livestt") -> None:
        self.id = new_session_id(registry.config.replica_id)
        self.transport = transport
        self.api = api  # the protocol its client speaks: ours, or a vendor's (adapters/)
        self.client = client
        self.meter = metrics.SessionMeter(transport)
        metrics.api_session(api)
        self.options = options
        self.started = time.monotonic()
        self.last_audio = self.started
        self.reason: str | None = None
        self._registry = registry
        self._recorders: list[Sink] = []  # before every sink: what a client gets is already kept
        self._sinks: list[Sink] = []
        # Held for the transport's own channel when it opens after audio starts (WebRTC).
        self._backlog: deque[Event] | None = deque(maxlen=_BACKLOG) if hold_events else None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._finishers: list[Callable[[], Awaitable[None]]] = []  # after the last final, before the end
        self._audio_taps: list[Callable[[np.ndarray], None]] = []
        self._ended = asyncio.Event()
        self._ending = False
        self.stream = stream_factory(self.emit)
        self._end_task: asyncio.Task | None = None
        self._watchdog = asyncio.create_task(self._watch())

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def info(self) -> dict[str, Any]:
        """What session.started says of the session."""
        return {"session_id": self.id, "model": self._registry.worker.engine.name,
                "language": self.options.language, "sample_rate": SAMPLE_RATE}

    def started_event(self) -> Event:
        return protocol.session_started(**self.info())

    def add_sink(self, sink: Sink, replay: bool = False) -> None:
        """Subscribers get events from now on; `replay` also delivers what was held back."""
        if replay and self._backlog is not None:
            backlog, self._backlog = self._backlog, None
            for event in backlog:
                sink(event)
        self._sinks.append(sink)

    def add_recorder(self, recorder: Sink) -> None:
        """A sink that keeps what the session says (storage). It gets every event from now on before
        any sink of add_sink, whichever attached first: a final is on disk before a transport sends it."""
        self._recorders.append(recorder)

    def remove_sink(self, sink: Sink) -> None:
        for sinks in (self._recorders, self._sinks):
            if sink in sinks:
                sinks.remove(sink)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    def on_finish(self, finisher: Callable[[], Awaitable[None]]) -> None:
        """Awaited once the last final is out, before session.ended (storage: session.saved)."""
        self._finishers.append(finisher)

    def configure(self, options: SessionOptions) -> None:
        """New options for the audio that comes next: a vendor's client may change its session."""
        self.options = options
        self.stream.configure(*self._registry.stream_config(options))

    def touch(self) -> None:
        """A client's keep-alive: the idle clock starts again, as if audio had come."""
        self.last_audio = time.monotonic()

    def add_audio_tap(self, tap: Callable[[np.ndarray], None]) -> None:
        """Gets every 16 kHz mono block that feed() takes (storage: --record-audio)."""
        self._audio_taps.append(tap)

    def emit(self, event: Event) -> None:
        self.meter.event(event)
        if self._backlog is not None:
            self._backlog.append(event)
        for sink in [*self._recorders, *self._sinks]:
            try:
                sink(event)
            except Exception:  # one broken sink must not starve the others
                log.exception("session %s: sink failed", self.id)
                self.remove_sink(sink)

    def feed(self, pcm: np.ndarray) -> None:
        if self._ending:
            return
        self.last_audio = time.monotonic()
        for tap in self._audio_taps:
            tap(pcm)
        self.meter.received(pcm.size)  # first: the speech.stopped this audio brings is timed by it
        self.stream.feed(pcm)

    def end_soon(self, reason: str) -> None:
        """end() from a callback that cannot await; the task is held so it cannot be collected."""
        if not self._ending and self._end_task is None:
            self._end_task = asyncio.create_task(self.end(reason))

    async def end(self, reason: str) -> None:
        """Finalize speech in progress, send its final, then session.ended; idempotent."""
        if self._ending:
            await self._ended.wait()
            return
        self._ending = True
        self.reason = reason
        if asyncio.current_task() is not self._watchdog:
            self._watchdog.cancel()
        try:
            await asyncio.wait_for(self.stream.finish(), _FINISH_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("session %s: last final not ready in %ss", self.id, _FINISH_TIMEOUT_S)
        except Exception:
            log.exception("session %s: finishing failed", self.id)
        self.stream.close()
        for finisher in self._finishers:
            try:
                await finisher()
            except Exception:
                log.exception("session %s: finishing hook failed", self.id)
        # The slot is free before the client hears session.ended: it may reconnect at once.
        self._registry.remove(self)
        self.emit(protocol.session_ended(reason))
        for closer in self._closers:
            try:
                await closer()
            except Exception:
                log.exception("session %s: closing transport failed", self.id)
        self._ended.set()
        duration = time.monotonic() - self.started
        self.meter.ended(reason, duration)
        # The audit line: never the transcript's text.
        log.info("session %s ended: transport=%s api=%s client=%s key=%s reason=%s duration=%.1fs "
                 "audio=%.1fs utterances=%d", self.id, self.transport, self.api, self.client.address or "-",
                 self.client.key or "-", reason, duration, self.meter.samples / SAMPLE_RATE,
                 self.stream.utterances,
                 extra={"event": "session.ended", "session_id": self.id, "transport": self.transport,
                        "api": self.api, "client": self.client.address, "key": self.client.key, "reason": reason,
                        "duration_s": round(duration, 3),
                        "audio_s": round(self.meter.samples / SAMPLE_RATE, 3),
                        "utterances": self.stream.utterances})

    async def _watch(self) -> None:
        config = self._registry.config
        max_session_s = min(config.max_session_s, self.client.max_session_s or config.max_session_s)
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now - self.last_audio > config.idle_timeout_s:
                reason = "idle_timeout"
            elif now - self.started > max_session_s:
                reason = "max_duration"
            else:
                continue
            self.end_soon(reason)
            return


class EventQueue:
    """An ordered, bounded outbox for a sink that writes asynchronously (WebSocket, SSE).

    A reader slower than the session sheds partials first. When only events that must not be lost
    remain and the queue is still full, the reader is not reading: `on_overflow` is called (the
    transport cuts the connection). session.ended is always taken, so a writer can always end.
    """

    def __init__(self, limit: int = 512, on_overflow: Callable[[], None] | None = None) -> None:
        self._events: deque[Event] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self._on_overflow = on_overflow
        self._overflowed = False

    def put(self, event: Event) -> None:
        if len(self._events) >= self._limit and event["type"] != "session.ended":
            partial = next((e for e in self._events if e["type"] == "transcript.partial"), None)
            if partial is not None:
                self._events.remove(partial)
            if event["type"] == "transcript.partial":
                return
            if len(self._events) >= self._limit:
                if not self._overflowed and self._on_overflow is not None:
                    self._on_overflow()
                self._overflowed = True
                return
        self._events.append(event)
        self._ready.set()

    async def get(self) -> Event:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()


async def write_or_drop(write: Awaitable[Any], transport: asyncio.BaseTransport | None) -> bool:
    """One write to a client, or its connection cut: a client that takes nothing for WRITE_TIMEOUT_S
    is not reading, and must not hold its session, its buffers or a shutdown for ever."""
    try:
        await asyncio.wait_for(write, WRITE_TIMEOUT_S)
        return True
    except asyncio.TimeoutError:
        if transport is not None:
            transport.abort()
        return False


class SessionRegistry:
    """Creates sessions within the limit and knows every live one."""

    def __init__(self, config: Config, worker: DecodePool, vad_model: SileroModel) -> None:
        self.config = config
        self.worker = worker
        self.vad_model = vad_model
        self.vad_batch = VadBatch(vad_model)  # every session's VAD windows, decided together
        self.accepting = True
        self._sessions: dict[str, Session] = {}
        self.observers: list[Callable[[Session], None]] = []  # told of each new session (storage)
        self.idle_hooks: list[Callable[[], None]] = []  # called when the last session has ended
        self._segmenter_config = SegmenterConfig(
            threshold=config.vad_threshold,
            neg_threshold=max(0.05, config.vad_threshold - 0.15),
            min_speech_ms=config.min_speech_ms,
            preroll_ms=config.preroll_ms,
            endpoint_ms=config.endpoint_ms,
            max_utterance_s=config.max_utterance_s,
        )
        self._vad_refresh_windows = round(config.vad_refresh_ms * SAMPLE_RATE / 1000 / WINDOW)
        self._vad_lift_db = config.vad_lift_db

    # The model loads after the server starts listening (server.py): these follow it.
    @property
    def languages(self) -> frozenset[str]:
        return self.worker.engine.languages

    @property
    def default_language(self) -> str | None:
        return self.config.language or self.worker.engine.default_language

    @property
    def segmenter_config(self) -> SegmenterConfig:
        """How the server cuts speech into utterances (files are cut the same way)."""
        return self._segmenter_config

    def vad(self) -> SileroVAD:
        """A new stream's (or file's) VAD, as configured."""
        return SileroVAD(self.vad_model, self._vad_refresh_windows, self._vad_lift_db)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def options(self, raw: Mapping[str, Any]) -> SessionOptions:
        return parse_options(raw, self.config, self.languages, self.default_language)

    def check_capacity(self, client: Client = Client()) -> None:
        try:
            self._check_capacity(client)
        except ApiError as e:
            metrics.refused(e.code)
            raise

    def _check_capacity(self, client: Client) -> None:
        if not self.accepting:
            raise ApiError(503, "shutting_down", "the server is shutting down",
                           {"Retry-After": "5"})
        if len(self._sessions) >= self.config.max_sessions:
            raise ApiError(503, "session_limit",
                           f"all {self.config.max_sessions} sessions are in use; try again later",
                           {"Retry-After": "5"})
        limit = self.config.max_sessions_per_key
        if limit and client.key and sum(
                s.client.key == client.key for s in self._sessions.values()) >= limit:
            raise ApiError(429, "key_session_limit",
                           f"this API key has {limit} session(s) open, its limit; try again later",
                           {"Retry-After": "5"})

    def stream_config(self, options: SessionOptions) -> tuple[StreamOptions, SegmenterConfig]:
        """What a session's options make of its speech pipeline's settings."""
        segmenter_config = replace(
            self._segmenter_config, endpoint_ms=options.endpoint_ms,
            # A session's own endpoint moves the unfinished-clause endpoint by as much.
            unfinished_endpoint_ms=options.endpoint_ms
            + max(0, self.config.unfinished_endpoint_ms - self.config.endpoint_ms),
            verdict_wait_ms=self.config.verdict_wait_ms)
        if options.vad_threshold is not None:
            segmenter_config = replace(segmenter_config, threshold=options.vad_threshold,
                                       neg_threshold=max(0.05, options.vad_threshold - 0.15))
        if options.preroll_ms is not None:
            segmenter_config = replace(segmenter_config, preroll_ms=options.preroll_ms)
        stream_options = StreamOptions(
            language=options.language, partials=options.partials,
            partial_interval_ms=self.config.partial_interval_ms,
            early_final_ms=self.config.early_final_ms,
            sentence_endpoint_ms=round(options.endpoint_ms * self.config.sentence_endpoint),
            context_chars=self.config.context_chars,
            fragment_s=self.config.fragment_context_s,
            prompt=options.prompt,
        )
        return stream_options, segmenter_config

    def stream_factory(self, options: SessionOptions) -> Callable[[Sink], SpeechStream]:
        """How a session with these options builds its speech pipeline around its event sink."""
        stream_options, segmenter_config = self.stream_config(options)

        def stream(emit: Sink) -> SpeechStream:
            segmenter = Segmenter(self.vad(), segmenter_config)
            return SpeechStream(self.worker, segmenter, stream_options, emit, self.vad_batch)

        return stream

    def create(self, transport: str, options: SessionOptions, hold_events: bool = False,
               client: Client = Client(), api: str = "livestt") -> Session:
        self.check_capacity(client)
        session = Session(self, transport, options, self.stream_factory(options), hold_events, client, api)
        self._sessions[session.id] = session
        for observe in self.observers:
            observe(session)
        log.info("session %s started: transport=%s api=%s client=%s key=%s", session.id, transport, api,
                 client.address or "-", client.key or "-",
                 extra={"event": "session.started", "session_id": session.id, "transport": transport,
                        "api": api, "client": client.address, "key": client.key})
        return session

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        if not self._sessions:
            for idle in self.idle_hooks:
                idle()

    async def close_all(self, reason: str) -> None:
        self.accepting = False
        await asyncio.gather(*(s.end(reason) for s in list(self._sessions.values())))


REGISTRY = web.AppKey("registry", SessionRegistry)
