"""The vendors' APIs and the legacy WebSocket dialects, each a thin translation over the server's own pieces:
live ones over `Session` and `SpeechStream`, whole files over the file jobs (jobs.py)."""

from __future__ import annotations

from aiohttp import web

from adapters import deepgram, deepgram_live, dialects, jobs, openai_audio, openai_realtime


def add_routes(app: web.Application) -> None:
    """After the registry is in the app: the routes, and the file jobs they share."""
    jobs.setup(app)
    openai_audio.add_routes(app)  # files: /v1/audio/transcriptions, /v1/models
    openai_realtime.add_routes(app)  # live: the Realtime WebSocket, WebRTC calls, client secrets
    deepgram.add_routes(app)  # files: POST /v1/listen
    deepgram_live.add_routes(app)  # live: GET /v1/listen and its token grant
    dialects.add_routes(app)  # live: /ws/transcribe, /v1/transcriptions, /ws
