"""GET /metrics in the Prometheus text format: sessions, audio, utterances, latency, the decode
pool, errors and refusals. Counters are process-wide (prometheus-client's default registry)."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any, Iterator

import prometheus_client
from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from asr.audio import SAMPLE_RATE

TRANSPORTS = ("webrtc", "websocket")
_ARRIVALS_KEPT_S = 15.0  # audio timeline kept to date a speech end: the endpoint and a split's cut

prometheus_client.disable_created_metrics()  # no *_created series: counters start with the process

SESSIONS_ACTIVE = Gauge("stt_sessions_active", "Sessions open now", ["transport"])
SESSIONS = Counter("stt_sessions", "Sessions opened", ["transport"])
API_SESSIONS = Counter("stt_api_sessions", "Sessions opened, by the API their client speaks (livestt, or a "
                       "vendor's: openai-realtime, deepgram, ...)", ["api"])
SESSIONS_ENDED = Counter("stt_sessions_ended", "Sessions ended, by reason", ["transport", "reason"])
SESSIONS_REFUSED = Counter("stt_sessions_refused", "Sessions refused for capacity, by code "
                           "(session_limit, key_session_limit, shutting_down, not_ready)", ["code"])
SESSION_SECONDS = Histogram("stt_session_duration_seconds", "Session length",
                            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200))
AUDIO_SECONDS = Counter("stt_audio_received_seconds", "Audio received, in seconds", ["transport"])
UTTERANCES = Counter("stt_utterances", "Utterances (each gets one transcript.final)", ["transport"])
FINAL_LATENCY = Histogram(
    "stt_final_latency_seconds",
    "From the arrival of an utterance's last speech sample to its transcript.final "
    "(includes the endpoint silence)",
    buckets=(0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2, 3, 5, 10, 30))
PARTIAL_LATENCY = Histogram(
    "stt_partial_latency_seconds",
    "From the arrival of the newest audio a partial covers to its hypothesis",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5))
CONNECTIONS_CLOSED = Counter("stt_connections_closed", "HTTP connections the server closed to keep its "
                             "limits, by reason (header_timeout, pending_limit)", ["reason"])
ERRORS = Counter("stt_errors", "Errors, by code: HTTP error responses (source=http) and error "
                 "events sent to clients (source=event)", ["source", "code"])
STORAGE_OPS = ("create", "append", "fsync", "audio", "save", "recover", "probe")
STORAGE_ERRORS = Counter("stt_storage_errors", "Writes to --data-dir that failed, by operation "
                         f"({', '.join(STORAGE_OPS)})", ["op"])
BUCKET_OPS = ("upload", "read", "delete", "check")
BUCKET_ERRORS = Counter("stt_storage_bucket_errors", "Calls to the --storage-url bucket that failed, by "
                        f"operation ({', '.join(BUCKET_OPS)})", ["op"])
UPLOADS = Counter("stt_storage_uploads", "Ended sessions whose files reached the --storage-url bucket")
UPLOADS_PENDING = Gauge("stt_storage_uploads_pending", "Ended sessions in --data-dir waiting to be uploaded "
                        "to the --storage-url bucket")

FILES = Counter("stt_files", "Files sent to the transcription routes, by route (openai, deepgram) and outcome "
                "(ok, or the error code)", ["route", "outcome"])
FILES_ACTIVE = Gauge("stt_files_active", "Files being read, decoded or transcribed now")
FILE_AUDIO_SECONDS = Counter("stt_file_audio_seconds", "Audio of the files transcribed, in seconds")
FILE_SECONDS = Histogram("stt_file_transcription_seconds", "From a decoded file to its transcript",
                         buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
for _route in ("openai", "deepgram"):
    FILES.labels(_route, "ok")

for _reason in ("header_timeout", "pending_limit"):  # every series exists from the start, at 0
    CONNECTIONS_CLOSED.labels(_reason)
for _transport in TRANSPORTS:
    SESSIONS_ACTIVE.labels(_transport)
    SESSIONS.labels(_transport)
    AUDIO_SECONDS.labels(_transport)
    UTTERANCES.labels(_transport)
for _op in STORAGE_OPS:
    STORAGE_ERRORS.labels(_op)
for _op in BUCKET_OPS:
    BUCKET_ERRORS.labels(_op)


class SessionMeter:
    """One session's share of the metrics; sessions.Session calls it as audio and events pass."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.samples = 0
        self._audio = AUDIO_SECONDS.labels(transport)
        # (samples received once a chunk was in, monotonic time it came): dates any recent sample.
        self._arrivals: deque[tuple[int, float]] = deque()
        self._speech_end: dict[int, float] = {}  # utterance -> when its last speech sample came
        self._ended = False
        SESSIONS.labels(transport).inc()
        SESSIONS_ACTIVE.labels(transport).inc()

    def received(self, samples: int) -> None:
        """Before the audio goes into the pipeline: its speech.stopped may come within the call."""
        self.samples += samples
        self._audio.inc(samples / SAMPLE_RATE)
        self._arrivals.append((self.samples, time.monotonic()))
        horizon = self.samples - _ARRIVALS_KEPT_S * SAMPLE_RATE
        while len(self._arrivals) > 1 and self._arrivals[1][0] <= horizon:
            self._arrivals.popleft()

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "speech.stopped":
            UTTERANCES.labels(self.transport).inc()
            arrived = self._arrival(event["end"])
            if arrived is not None:
                self._speech_end[event["utterance"]] = arrived
        elif kind == "transcript.final":
            arrived = self._speech_end.pop(event["utterance"], None)
            if arrived is not None:
                FINAL_LATENCY.observe(time.monotonic() - arrived)
        elif kind == "error":
            error("event", str(event.get("code")))

    def _arrival(self, seconds: float) -> float | None:
        """When the sample at `seconds` on the session's timeline arrived."""
        position = seconds * SAMPLE_RATE
        for samples, at in self._arrivals:
            if samples >= position:
                return at
        return None

    def ended(self, reason: str, duration_s: float) -> None:
        if self._ended:
            return
        self._ended = True
        SESSIONS_ACTIVE.labels(self.transport).dec()
        SESSIONS_ENDED.labels(self.transport, reason).inc()
        SESSION_SECONDS.observe(duration_s)


def file_done(route: str, outcome: str, audio_s: float = 0.0, seconds: float | None = None) -> None:
    """A file request is answered: `outcome` is ok or its error code."""
    FILES.labels(route, outcome).inc()
    if outcome == "ok":
        FILE_AUDIO_SECONDS.inc(audio_s)
        if seconds is not None:
            FILE_SECONDS.observe(seconds)


def api_session(api: str) -> None:
    API_SESSIONS.labels(api).inc()


def refused(code: str) -> None:
    SESSIONS_REFUSED.labels(code).inc()


def connection_closed(reason: str) -> None:
    CONNECTIONS_CLOSED.labels(reason).inc()


def error(source: str, code: str) -> None:
    ERRORS.labels(source, code).inc()


def storage_error(op: str) -> None:
    STORAGE_ERRORS.labels(op).inc()


def bucket_error(op: str) -> None:
    BUCKET_ERRORS.labels(op).inc()


class _DecodeCollector(Collector):
    """The decode pool's own counters (asr/worker.py), read at scrape time."""

    def __init__(self) -> None:
        self.pool: Any = None

    def collect(self) -> Iterator[Any]:
        pool = self.pool
        if pool is None:
            return
        yield GaugeMetricFamily("stt_decode_queue_depth", "Decodes waiting (finals, early finals, "
                                "partials)", value=pool.depth)
        yield CounterMetricFamily("stt_decode_busy_seconds", "Time spent decoding (summed over "
                                  "decode workers)", value=pool.busy_seconds)
        yield CounterMetricFamily("stt_decodes", "Decodes run", value=pool.decodes)
        yield CounterMetricFamily("stt_decodes_short_window", "Decodes that attended over the busy window "
                                  "(--busy-decode-window-s): partials while other decodes ran or waited, "
                                  "finals in a burst", value=pool.busy_window_decodes)
        yield CounterMetricFamily("stt_decodes_greedy", "Finals and early finals decoded greedily "
                                  "because other finals waited for a decode worker", value=pool.greedy_decodes)
        yield CounterMetricFamily("stt_decodes_batched", "Finals of bursts decoded together in one batch",
                                  value=pool.batched_decodes)
        yield CounterMetricFamily("stt_partials_shed", "Partials dropped as stale before decoding",
                                  value=pool.shed_partials)


_DECODES = _DecodeCollector()
prometheus_client.REGISTRY.register(_DECODES)


class _VadCollector(Collector):
    """Silero VAD's batches across streams, read at scrape time: windows / calls is the mean batch."""

    def __init__(self) -> None:
        self.batch: Any = None

    def collect(self) -> Iterator[Any]:
        if self.batch is None:
            return
        yield CounterMetricFamily("stt_vad_windows", "32 ms audio windows decided by Silero VAD",
                                  value=self.batch.windows)
        yield CounterMetricFamily("stt_vad_calls", "onnxruntime calls that decided them, each for every "
                                  "stream with a window waiting", value=self.batch.calls)


_VAD = _VadCollector()
prometheus_client.REGISTRY.register(_VAD)


def watch_vad(batch: Any) -> None:
    _VAD.batch = batch


def watch_decodes(pool: Any) -> None:
    """Exports the decode pool's counters at each scrape."""
    _DECODES.pool = pool


def partial_answered(seconds: float) -> None:
    """The decode pool's `on_partial`: a partial's text came `seconds` after the stream asked for it."""
    PARTIAL_LATENCY.observe(seconds)


async def _count_errors(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every HTTP error response, by the code of its JSON body."""
    if response.status < 400 or request.path == "/ready":  # a 503 there is an answer, not an error
        return
    code = f"http_{response.status}"
    body = getattr(response, "body", None)
    if isinstance(body, (bytes, bytearray)) and response.content_type == "application/json":
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            pass
    error("http", code)


async def metrics(request: web.Request) -> web.Response:
    # The classic text format (version 0.0.4) unless the scraper asks for OpenMetrics.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(prometheus_client.REGISTRY), headers={"Content-Type": content_type})


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.on_response_prepare.append(_count_errors)
