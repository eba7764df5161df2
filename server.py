"""Live speech-to-text server: WebRTC in, Whisper transcripts out on the data channel."""

from __future__ import annotations

import logging
import os
import sys
import time

from aiohttp import web

from asr.engine import DecodeOptions, WhisperEngine
from asr.vad import SileroModel
from asr.worker import DecodeWorker
import sse
import ws
from config import Config
from errors import json_errors
from rtc import signaling
from sessions import REGISTRY, SessionRegistry
from tls import ssl_context

log = logging.getLogger("server")

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


def build_app(config: Config, engine: WhisperEngine) -> web.Application:
    # Finals are bounded per server: a few per session before the server calls itself overloaded.
    worker = DecodeWorker(engine, max_finals=4 * config.max_sessions)
    registry = SessionRegistry(config, worker, SileroModel())
    app = web.Application(middlewares=[json_errors])
    app[REGISTRY] = registry
    signaling.add_routes(app)
    ws.add_routes(app)
    sse.add_routes(app)
    app.router.add_get("/health", health)
    if os.path.isfile(os.path.join(WEB_DIR, "index.html")):
        app.router.add_get("/", lambda _: web.FileResponse(os.path.join(WEB_DIR, "index.html")))
        app.router.add_static("/web/", WEB_DIR)

    async def start(_: web.Application) -> None:
        worker.start()

    async def drain(_: web.Application) -> None:
        # SIGINT/SIGTERM: no new sessions; finals of speech in flight still reach their clients.
        log.info("shutting down: finalizing %d session(s)", len(registry))
        await registry.close_all("shutdown")

    async def stop_worker(_: web.Application) -> None:
        await worker.close()

    app.on_startup.append(start)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(stop_worker)
    return app


async def health(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.json_response({"status": "ok", "model": registry.worker.engine.name,
                              "languages": sorted(registry.languages), "sessions": len(registry)})


def load_engine(config: Config) -> WhisperEngine:
    started = time.monotonic()
    engine = WhisperEngine(
        config.model, device=config.device, compute_type=config.compute_type,
        options=DecodeOptions(beam_size=config.beam_size, cpu_threads=config.cpu_threads,
                              window_s=config.decode_window_s),
    )
    engine.warm_up()
    log.info("model ready in %.1fs", time.monotonic() - started)
    return engine


def main(argv: list[str] | None = None) -> None:
    config = Config.from_args(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # These narrate every candidate pair and every decode at INFO.
    for noisy in ("aioice", "aiortc", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    tls = ssl_context(config)  # before the model loads: a bad certificate fails at once
    engine = load_engine(config)
    app = build_app(config, engine)
    log.info("serving on %s://%s:%d", "https" if tls else "http", config.host, config.port)
    web.run_app(app, host=config.host, port=config.port, ssl_context=tls, print=None,
                access_log=None, shutdown_timeout=20)
    log.info("stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
