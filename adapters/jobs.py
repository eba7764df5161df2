"""File jobs, whichever vendor's route brought them: the limits, the body read within them, decoding off the
event loop, the batch transcription (asr/batch.py), and what a session leaves behind: metrics and the saved
transcript. The vendor adapters only translate requests into FileRequest and transcripts into their shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from ops import auth
from ops import connections
from ops import metrics
from asr import container
from asr.batch import FileOptions, FileTranscriber, FileTranscript, Segment
from config import Config
from errors import ApiError, shape_of
from sessions import REGISTRY, Client, SessionRegistry

log = logging.getLogger("files")

FIELD_BYTES = 64 * 1024  # a form field other than the file: a prompt is a few hundred characters
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and fields on top of the file itself
_WATCH_S = 0.5  # how often a transcription looks whether its client is still there
_AUDIO_SLICE = 30 * 16000  # samples handed to a recorder at once: the loop stays responsive


@dataclass(frozen=True)
class FileRequest:
    """What a vendor route asks of a file."""

    route: str  # openai, deepgram: for metrics and logs
    language: str | None  # None: detect
    prompt: str = ""


@dataclass(frozen=True)
class Raw:
    """A headerless body: its encoding, rate and channels, as the client declared them."""

    encoding: str
    rate: int
    channels: int = 1


class FileJobs:
    """The file routes' shared work. At most --max-file-jobs files are read, decoded or transcribed at once."""

    def __init__(self, registry: SessionRegistry, config: Config) -> None:
        self.registry = registry
        self.config = config
        self.max_bytes = int(config.max_upload_mb * 1024 * 1024)
        self.active = 0

    # -- admission and bodies --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, request: web.Request, route: str) -> AsyncIterator[None]:
        """Holds one of the file slots for a whole request, from its body to its answer; counts its outcome."""
        if not self.registry.accepting:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if self.active >= self.config.max_file_jobs:
            metrics.file_done(route, "file_limit")
            raise ApiError(429, "file_limit", f"{self.config.max_file_jobs} file(s) are being transcribed, this "
                           "server's limit; try again shortly", {"Retry-After": "5"})
        declared = request.content_length
        if declared is not None and declared > self.max_bytes + _FORM_OVERHEAD:
            metrics.file_done(route, "file_too_large")
            raise self.too_large()
        # A file takes longer to arrive than an SDP offer.
        if isinstance(request.protocol, connections.GuardedHandler):
            request.protocol.allow_slow_body(request.content, self.config.upload_timeout_s)
        self.active += 1
        metrics.FILES_ACTIVE.inc()
        try:
            yield
        except ApiError as e:
            metrics.file_done(route, e.code)
            raise
        finally:
            self.active -= 1
            metrics.FILES_ACTIVE.dec()

    def too_large(self) -> ApiError:
        return ApiError(413, "file_too_large", f"the file is larger than {self.config.max_upload_mb:g} MiB, this "
                        "server's limit (--max-upload-mb)", param="file")

    async def read_body(self, request: web.Request) -> bytes:
        """A raw body, refused with 413 as soon as it passes the limit."""
        return await read_limited(request.content.readany, self.max_bytes, self.too_large)

    async def read_form(self, request: web.Request,
                        file_field: str = "file") -> tuple[dict[str, list[str]], bytes | None]:
        """A multipart form: its text fields (each name may repeat) and the file's bytes."""
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError):
            raise ApiError(400, "invalid_request", "the body must be multipart/form-data") from None
        fields: dict[str, list[str]] = {}
        data = None
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "invalid_request", "nested multipart forms are not accepted")
                if part.name == file_field:
                    data = await read_limited(lambda: part.read_chunk(1 << 16), self.max_bytes, self.too_large)
                    continue
                value = await read_limited(lambda: part.read_chunk(1 << 14), FIELD_BYTES,
                                    lambda: ApiError(400, "invalid_value", f"the field {part.name!r} is too long",
                                                     param=part.name))
                try:
                    fields.setdefault(part.name or "", []).append(value.decode())
                except UnicodeDecodeError:
                    raise ApiError(400, "invalid_value", f"the field {part.name!r} is not UTF-8 text",
                                   param=part.name) from None
        except (ValueError, AssertionError, KeyError, HttpProcessingError):
            raise ApiError(400, "invalid_request", "the multipart form could not be parsed") from None
        return fields, data

    # -- options ---------------------------------------------------------------------------------

    def language(self, request: web.Request, asked: str | None, param: str = "language") -> str | None:
        """The language to transcribe in: a code the model knows, None to detect. A token that fixes the
        language allows only that one."""
        bound = auth.grant(request).options.get("language")
        if bound is not None:
            if asked and asked.lower() != str(bound).lower():
                raise ApiError(403, "option_not_allowed", f"this token allows only language={bound!r}", param=param)
            asked = bound
        languages = self.registry.languages
        if not asked:
            return self.registry.default_language
        if asked.lower() in ("auto", "multi"):
            return None if len(languages) > 1 else self.registry.default_language
        code = asked.lower().replace("_", "-").split("-")[0]
        if code not in languages:
            raise ApiError(400, "unsupported_language", f"language {asked!r} is not supported by this model"
                           + ("" if len(languages) > 1 else " (English only)"), param=param)
        return code

    # -- the work ----------------------------------------------------------------------------------

    async def decode(self, data: bytes | None, raw: Raw | None = None) -> container.FileAudio:
        """The file as 16 kHz mono, decoded on a thread: 400 for what is no audio, 413 past --max-file-s."""
        if not data:
            raise ApiError(400, "invalid_value", "the file is empty" if data is not None else "no file was sent",
                           param="file")
        try:
            if raw is not None:
                return await asyncio.to_thread(container.decode_raw, data, raw.encoding, raw.rate, raw.channels,
                                               self.config.max_file_s)
            return await asyncio.to_thread(container.decode, data, self.config.max_file_s)
        except container.TooLong as e:
            raise ApiError(413, "audio_too_long", f"{e} (--max-file-s)", param="file") from None
        except container.BadAudio as e:
            raise ApiError(400, "invalid_value", f"{e}. Supported formats: {', '.join(container.FORMATS)}",
                           param="file") from None

    async def transcribe(self, request: web.Request, audio: container.FileAudio, asked: FileRequest,
                         on_segment: Callable[[Segment], None] | None = None) -> tuple[FileTranscript, str | None]:
        """The file's transcript, and the id under which it was saved (None when it was not). Ends early, and
        decodes nothing more, when the client goes away."""
        worker = self.registry.worker
        transcriber = FileTranscriber(worker, self.registry.vad, self.registry.segmenter_config)
        options = FileOptions(asked.language, prompt=asked.prompt, batch=self.config.file_batch,
                              context_chars=self.config.context_chars, narrowband=audio.narrowband)
        started = time.monotonic()
        work = asyncio.ensure_future(transcriber.transcribe(audio.samples, options, on_segment))
        watch = asyncio.ensure_future(_client_leaves(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()
            raise ApiError(499, "client_gone", "the client went away")
        try:
            result = work.result()
        except Exception:
            log.exception("a file could not be transcribed")
            raise ApiError(500, "decode_failed", "the file could not be transcribed") from None
        seconds = time.monotonic() - started
        metrics.file_done(asked.route, "ok", result.duration, seconds)
        saved = await self._save(request, audio.samples, result)
        log.info("file transcribed: route=%s client=%s key=%s audio=%.1fs in %.1fs segments=%d", asked.route,
                 auth.client(request).address or "-", auth.client(request).key or "-", result.duration, seconds,
                 len(result.segments), extra={"event": "file.transcribed", "route": asked.route,
                                              "audio_s": result.duration, "seconds": round(seconds, 3)})
        return result, saved

    async def _save(self, request: web.Request, audio: np.ndarray, result: FileTranscript) -> str | None:
        """The transcript saved as a session's is (--data-dir): its own folder, finals, transcript files."""
        if not self.registry.observers:
            return None
        record = FileRecord(auth.client(request), self.registry.worker.engine.name, result.language)
        for observe in self.registry.observers:
            observe(record)
        for i, segment in enumerate(result.segments, 1):
            record.emit(final_event(i, segment, result.language))
        for tap in record.audio_taps:
            for at in range(0, audio.size, _AUDIO_SLICE):
                tap(audio[at:at + _AUDIO_SLICE])
                await asyncio.sleep(0)
        record.reason = "file"
        for finisher in record.finishers:
            try:
                await finisher()
            except Exception:
                log.exception("file %s: saving its transcript failed", record.id)
        return record.id if record.saved else None


def final_event(utterance: int, segment: Segment, language: str) -> dict[str, Any]:
    """A segment as the live sessions' transcript.final, which storage keeps."""
    return {"type": "transcript.final", "utterance": utterance, "text": segment.text, "start": segment.start,
            "end": segment.end, "language": language,
            "words": [{"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                      for w in segment.words]}


class FileRecord:
    """A transcribed file as storage sees a session (ops/storage attaches to it as to any): its id, who sent
    it, its finals, and the hooks that write its folder."""

    transport = "file"

    def __init__(self, client: Client, model: str, language: str) -> None:
        self.id = uuid.uuid4().hex
        self.client = client
        self.reason: str | None = None
        self.saved = False
        self._model, self._language = model, language
        self.recorders: list[Callable[[dict[str, Any]], None]] = []
        self.audio_taps: list[Callable[[np.ndarray], None]] = []
        self.finishers: list[Callable[[], Awaitable[None]]] = []

    def info(self) -> dict[str, Any]:
        return {"session_id": self.id, "model": self._model, "language": self._language, "sample_rate": 16000}

    def add_recorder(self, recorder: Callable[[dict[str, Any]], None]) -> None:
        self.recorders.append(recorder)

    def add_audio_tap(self, tap: Callable[[np.ndarray], None]) -> None:
        self.audio_taps.append(tap)

    def on_finish(self, finisher: Callable[[], Awaitable[None]]) -> None:
        self.finishers.append(finisher)

    def emit(self, event: dict[str, Any]) -> None:
        if event["type"] == "session.saved":
            self.saved = True
        elif event["type"] == "error":
            log.warning("file %s: %s", self.id, event.get("message"))
        for recorder in self.recorders:
            recorder(event)


async def read_limited(read: Callable[[], Awaitable[bytes]], limit: int, too_large: Callable[[], ApiError]) -> bytes:
    data = bytearray()
    while chunk := await read():
        data += chunk
        if len(data) > limit:
            raise too_large()
    return bytes(data)


async def _client_leaves(request: web.Request) -> None:
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(_WATCH_S)


FILE_JOBS = web.AppKey("file_jobs", FileJobs)


async def expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue`: a body declared past the limit is refused before the client sends it."""
    declared = request.content_length
    jobs = request.app[FILE_JOBS]
    if declared is not None and declared > jobs.max_bytes + _FORM_OVERHEAD:
        response = jobs.too_large().response(shape_of(request))
        response.force_close()
        return response
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own: the answer proper has not begun
    return None


def setup(app: web.Application) -> FileJobs:
    jobs = FileJobs(app[REGISTRY], app[REGISTRY].config)
    app[FILE_JOBS] = jobs
    return jobs


def is_json(request: web.Request) -> bool:
    return request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower() == "application/json"
