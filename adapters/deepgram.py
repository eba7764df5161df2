"""Deepgram's prerecorded API over the file jobs: `POST /v1/listen` with the audio file as the body (or raw
`encoding=linear16|mulaw|alaw` with `sample_rate`), answered in Deepgram's `metadata` / `results` shape, as its
SDKs' `transcribe_file` calls it. Query parameters the server has no use for are accepted and ignored.

A JSON body `{"url": ...}` asks the server to fetch the audio. It fetches only from the hosts of
--fetch-url-hosts (none by default): a server that fetched any URL would let its clients reach what only it
can reach, the machine's own services and its private network among them.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from adapters.jobs import FIELD_BYTES, FILE_JOBS, FileJobs, FileRequest, Raw, expect, is_json, read_limited
from asr.batch import FileTranscript, Segment
from asr.container import RAW_ENCODINGS
from errors import ERROR_SHAPES, ApiError, client_json
from sessions import REGISTRY

PATH = "/v1/listen"
_TRUE = ("true", "1", "yes", "on")
# Deepgram's err_code by status.
_ERR_CODES = {400: "Bad Request", 401: "INVALID_AUTH", 403: "INSUFFICIENT_PERMISSIONS", 404: "Not Found",
              408: "Request Timeout", 413: "PAYLOAD_TOO_LARGE", 429: "TOO_MANY_REQUESTS",
              503: "SERVICE_UNAVAILABLE"}
_PUNCTUATION = re.compile(r"[^\w\s'-]")


def error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """Deepgram's error body, for every error on its route (the middlewares' too)."""
    return {"err_code": _ERR_CODES.get(status, "INTERNAL_SERVER_ERROR" if status >= 500 else "Bad Request"),
            "err_msg": message, "request_id": str(uuid.uuid4())}


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, listen, expect_handler=expect)
    app.setdefault(ERROR_SHAPES, {})[PATH] = error


def _flag(query, name: str) -> bool:
    return query.get(name, "").strip().lower() in _TRUE


async def listen(request: web.Request) -> web.Response:
    jobs = request.app[FILE_JOBS]
    query = request.query
    async with jobs.slot(request, "deepgram"):
        asked = query.get("language", "").strip() or None
        detect = _flag(query, "detect_language") or (asked or "").lower() == "multi"
        language = jobs.language(request, "multi" if detect else asked)
        raw = _raw(query)
        data = await (_fetch(request, jobs) if is_json(request) else jobs.read_body(request))
        audio = await jobs.decode(data, raw)
        result, _ = await jobs.transcribe(request, audio, FileRequest("deepgram", language))
        model = request.app[REGISTRY].worker.engine.name
        return web.json_response(response(result, data, model, detect, _flag(query, "utterances"),
                                          _flag(query, "punctuate") or _flag(query, "smart_format")))


def _raw(query) -> Raw | None:
    """A headerless body when `encoding` names one; otherwise the body is a file, its container sniffed."""
    encoding = query.get("encoding", "").strip().lower()
    if encoding not in RAW_ENCODINGS:
        return None
    try:
        rate = int(query["sample_rate"])
        channels = int(query.get("channels", "1"))
    except KeyError:
        raise ApiError(400, "bad_option", f"encoding={encoding} needs sample_rate") from None
    except ValueError:
        raise ApiError(400, "bad_option", "sample_rate and channels must be integers") from None
    return Raw(encoding, rate, channels)


async def _fetch(request: web.Request, jobs: FileJobs) -> bytes:
    """The audio a JSON body's `url` points to, from an allowed host only."""
    body = await read_limited(request.content.readany, FIELD_BYTES,
                       lambda: ApiError(400, "bad_json", "the JSON body is too long"))
    try:
        url = client_json(body).get("url")
    except (ValueError, AttributeError):
        raise ApiError(400, "bad_json", "the body must be a JSON object with a url, or the audio itself") from None
    if not isinstance(url, str) or not url:
        raise ApiError(400, "bad_json", "the JSON body needs a url")
    parts = urlsplit(url)
    hosts = {h.lower() for h in jobs.config.fetch_url_hosts}
    if parts.scheme not in ("http", "https") or (parts.hostname or "").lower() not in hosts:
        raise ApiError(400, "url_not_allowed", "this server fetches no audio from that URL (--fetch-url-hosts): "
                       "send the audio itself as the request body")
    timeout = aiohttp.ClientTimeout(total=jobs.config.upload_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(url, allow_redirects=False) as r:  # a redirect could leave the allowed hosts
                if r.status != 200:
                    raise ApiError(400, "url_failed", f"the URL answered {r.status}")
                if r.content_length is not None and r.content_length > jobs.max_bytes:
                    raise jobs.too_large()
                return await read_limited(r.content.readany, jobs.max_bytes, jobs.too_large)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ApiError(400, "url_failed", f"the URL could not be fetched ({type(e).__name__})") from None


def _plain(text: str) -> str:
    """As Deepgram writes a transcript without punctuate or smart_format: lower case, no punctuation."""
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def _words(segment: Segment) -> list[dict[str, Any]]:
    return [{"word": _plain(w.word) or w.word.lower(), "start": w.start, "end": w.end,
             "confidence": w.probability, "punctuated_word": w.word} for w in segment.words]


def _confidence(words: list[dict[str, Any]]) -> float:
    return round(sum(w["confidence"] for w in words) / len(words), 4) if words else 0.0


def response(result: FileTranscript, data: bytes, model: str, detect: bool, utterances: bool,
             punctuated: bool) -> dict[str, Any]:
    words = [w for s in result.segments for w in _words(s)]
    channel: dict[str, Any] = {"alternatives": [{
        "transcript": result.text if punctuated else _plain(result.text), "confidence": _confidence(words),
        "words": words}]}
    if detect:
        channel["detected_language"] = result.language
    results: dict[str, Any] = {"channels": [channel]}
    if utterances:
        results["utterances"] = [
            {"start": s.start, "end": s.end, "confidence": _confidence(_words(s)), "channel": 0,
             "transcript": s.text if punctuated else _plain(s.text), "words": _words(s), "speaker": 0,
             "id": str(uuid.uuid4())} for s in result.segments]
    model_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "livestt:" + model))
    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"metadata": {"transaction_key": "deprecated", "request_id": str(uuid.uuid4()),
                         "sha256": hashlib.sha256(data).hexdigest(), "created": created,
                         "duration": result.duration, "channels": 1, "models": [model_id],
                         "model_info": {model_id: {"name": model, "version": "livestt", "arch": "whisper"}}},
            "results": results}

