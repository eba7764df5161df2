"""The vendors' APIs, translated onto the server's own pieces: OpenAI's audio REST and Deepgram's prerecorded
`POST /v1/listen` over the file jobs (jobs.py), which do the work once for both."""

from __future__ import annotations

from aiohttp import web

from adapters import deepgram, jobs, openai_audio


def add_routes(app: web.Application) -> None:
    """After the registry is in the app: the routes, and the file jobs they share."""
    jobs.setup(app)
    openai_audio.add_routes(app)
    deepgram.add_routes(app)
