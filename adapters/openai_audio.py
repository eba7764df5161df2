"""OpenAI's audio REST API over the file jobs: `POST /v1/audio/transcriptions` (every response format, word and
segment timestamps, `stream=true` as Server-Sent Events) and `GET /v1/models`, as the official SDKs call them.
Any model name is accepted: the server's own model answers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from adapters.jobs import FILE_JOBS, FileJobs, FileRequest, expect
from adapters.languages import name as language_name
from asr.batch import FileTranscript, Segment, separator
from errors import ERROR_SHAPES, ApiError
from ops.storage.formats import render_srt, render_vtt
from sessions import REGISTRY, write_or_drop

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
ALIAS = "whisper-1"  # listed too: apps check that the model they are configured with exists
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_CONTENT_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status: what its SDKs read besides the code."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")


def openai_error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """What OpenAI's SDKs read into their exceptions' `.message`, `.type`, `.param` and `.code`."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


@dataclass(frozen=True)
class Asked:
    """A transcription request's fields, checked."""

    file: FileRequest
    response_format: str
    granularities: tuple[str, ...]
    stream: bool
    logprobs: bool


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1/audio", "/v1/models"):
        app.setdefault(ERROR_SHAPES, {})[prefix] = openai_error
    app.router.add_post("/v1/audio/transcriptions", transcriptions, expect_handler=expect)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    jobs = request.app[FILE_JOBS]
    async with jobs.slot(request, "openai"):
        fields, data = await jobs.read_form(request)
        asked = parse(fields, request, jobs)
        audio = await jobs.decode(data)
        if asked.stream:
            return await _stream(request, jobs, audio, asked)
        result, saved = await jobs.transcribe(request, audio, asked.file)
        return render(result, asked, saved)


def _last(fields: dict[str, list[str]], *names: str) -> str | None:
    values = [v for n in names for v in fields.get(n, [])]
    return values[-1] if values else None


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.strip().lower() in _FALSE:
        return False
    if value.strip().lower() in _TRUE:
        return True
    raise ApiError(400, "invalid_value", f"{name} must be true or false", param=name)


def parse(fields: dict[str, list[str]], request: web.Request, jobs: FileJobs) -> Asked:
    """The form's fields, checked: a wrong value is a 400 naming its field. Fields the server has no use for
    (model, chunking_strategy, ...) are accepted and ignored."""
    response_format = (_last(fields, "response_format") or "json").strip()
    if response_format not in FORMATS:
        raise ApiError(400, "invalid_value", f"response_format must be one of {', '.join(FORMATS)}; "
                       f"got {response_format[:40]!r}", param="response_format")
    temperature = _last(fields, "temperature")
    if temperature is not None and temperature.strip():
        try:
            value = float(temperature)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:  # also refuses nan
            raise ApiError(400, "invalid_value", "temperature must be a number from 0 to 1", param="temperature")
    granularities = []
    for value in fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", []):
        for g in value.split(","):
            if g.strip() not in GRANULARITIES:
                raise ApiError(400, "invalid_value", "timestamp_granularities must be word and/or segment",
                               param="timestamp_granularities")
            granularities.append(g.strip())
    includes = fields.get("include[]", []) + fields.get("include", [])
    language = jobs.language(request, (_last(fields, "language") or "").strip() or None)
    return Asked(FileRequest("openai", language, (_last(fields, "prompt") or "").strip()), response_format,
                 tuple(dict.fromkeys(granularities)) or ("segment",), _flag(_last(fields, "stream"), "stream"),
                 "logprobs" in includes)


def _usage(result: FileTranscript) -> dict[str, Any]:
    return {"type": "duration", "seconds": result.duration}


def _logprobs(result: FileTranscript) -> list[dict[str, Any]]:
    return [{"token": w.word, "logprob": round(math.log(max(w.probability, 1e-6)), 4),
             "bytes": list(w.word.encode())} for w in result.words]


def _segment(i: int, s: Segment, language: str) -> dict[str, Any]:
    return {"id": i, "seek": int(s.start * 100), "start": s.start, "end": s.end,
            "text": separator(language) + s.text, "tokens": [], "temperature": 0.0,
            "avg_logprob": round(s.avg_logprob, 4), "compression_ratio": round(s.compression_ratio, 4),
            "no_speech_prob": 0.0}


def render(result: FileTranscript, asked: Asked, saved: str | None) -> web.Response:
    # Where the server saved the transcript, for those who want it again in another format.
    headers = {"X-Transcript": f"/v1/sessions/{saved}/transcript"} if saved else {}
    fmt = asked.response_format
    if fmt in _CONTENT_TYPES:
        cues = [{"text": s.text, "start": s.start, "end": s.end} for s in result.segments]
        body = {"text": result.text + "\n" if result.text else "", "srt": render_srt(cues),
                "vtt": render_vtt(cues)}[fmt]
        return web.Response(text=body, content_type=_CONTENT_TYPES[fmt], headers=headers)
    body: dict[str, Any] = {"text": result.text}
    if fmt == "verbose_json":
        body = {"task": "transcribe", "language": language_name(result.language), "duration": result.duration,
                "text": result.text}
        if "segment" in asked.granularities:
            body["segments"] = [_segment(i, s, result.language) for i, s in enumerate(result.segments)]
        if "word" in asked.granularities:
            body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in result.words]
    if asked.logprobs:
        body["logprobs"] = _logprobs(result)
    body["usage"] = _usage(result)
    return web.json_response(body, headers=headers)


async def _stream(request: web.Request, jobs: FileJobs, audio, asked: Asked) -> web.StreamResponse:
    """transcript.text.delta per segment as soon as it and all before it are decoded, then
    transcript.text.done with the whole text; a failure after the 200 is an `error` event."""
    segments: list[Segment] = []
    arrived = asyncio.Event()

    def on_segment(segment: Segment) -> None:
        segments.append(segment)
        arrived.set()

    work = asyncio.ensure_future(jobs.transcribe(request, audio, asked.file, on_segment))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(event: dict[str, Any]) -> bool:
        data = f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        try:
            return await write_or_drop(response.write(data), request.transport)
        except ConnectionError:
            return False

    sent = 0
    try:
        while True:
            finished = work.done()
            while sent < len(segments):
                segment = segments[sent]
                delta = separator(segment.language) + segment.text if sent else segment.text
                if not await send({"type": "transcript.text.delta", "delta": delta}):
                    return response
                sent += 1
            if finished:
                break
            arrived.clear()
            waiter = asyncio.ensure_future(arrived.wait())
            await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        try:
            result, _ = work.result()
        except ApiError as e:
            await send({"type": "error", "error": {"message": e.message, "type": error_type(e.status),
                                                   "param": e.param, "code": e.code}})
            return response
        done: dict[str, Any] = {"type": "transcript.text.done", "text": result.text, "usage": _usage(result)}
        if asked.logprobs:
            done["logprobs"] = _logprobs(result)
        await send(done)
        await response.write_eof()
    finally:
        work.cancel()
    return response


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "livestt"}


_CREATED = int(time.time())


def _model_ids(request: web.Request) -> list[str]:
    served = os.path.basename(request.app[REGISTRY].worker.engine.name.rstrip("/")) or ALIAS
    return list(dict.fromkeys([served, ALIAS]))


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(m) for m in _model_ids(request)]})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id not in _model_ids(request):
        raise ApiError(404, "model_not_found", f"the model {model_id[:80]!r} does not exist; this server "
                       f"serves {', '.join(_model_ids(request))}", param="model")
    return web.json_response(_model(model_id))
