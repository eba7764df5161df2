"""Live speech-to-text server: WebRTC in, Whisper transcripts out on the data channel."""

from __future__ import annotations

import os

# numpy's OpenBLAS would start a thread per core for the small matrix products of Whisper's
# feature extractor, and those threads spin between calls, taking CPU from the decode workers.
# Parallelism here comes from the workers, so BLAS gets one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# CTranslate2's oneDNN keeps a compiled kernel for every input shape it meets, and live audio comes in
# every length: its cache is held to a size where it cannot grow the server's memory by much.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

import asyncio
import ctypes
import logging
import signal
import sys
import time

from aiohttp import web

import adapters
from asr.engine import DecodeOptions, WhisperEngine
from asr.threads import on_daemon_thread
from asr.vad import SileroModel
from asr.worker import DecodePool
from ops import auth
from ops import connections
from ops import fdlimit
from ops import metrics
import sse
import ws
from config import Config
from errors import ApiError, json_errors
from ops import storage
from rtc import signaling
from sessions import REGISTRY, SessionRegistry
from ops.tls import ssl_context

log = logging.getLogger("server")

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")


def build_app(config: Config) -> web.Application:
    """The app without its model: serve() loads it while the server already answers (GET /ready)."""
    registry = SessionRegistry(config, None, SileroModel())  # the decode pool comes with the model
    registry.idle_hooks.append(MemoryRelease(registry).soon)
    metrics.watch_vad(registry.vad_batch)
    app = web.Application(middlewares=[json_errors, auth.guard, ready_gate])
    app[REGISTRY] = registry
    access = auth.setup(app, config)  # POST /v1/tokens, CORS
    if access.enabled:
        log.info("access control on: %d API key(s); tokens signed with %s", access.key_count,
                 "a random secret (valid until restart, on this process only)" if access.random_secret
                 else "--token-secret")
    metrics.setup(app)  # GET /metrics
    signaling.add_routes(app)
    ws.add_routes(app)
    sse.add_routes(app)
    storage.install(app, registry)  # --data-dir: saved sessions, their routes, retention
    adapters.add_routes(app)  # the vendors' APIs and the legacy dialects
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    if os.path.isfile(os.path.join(WEB_DIR, "index.html")):
        app.router.add_get("/", lambda _: web.FileResponse(os.path.join(WEB_DIR, "index.html")))
        app.router.add_static("/web/", WEB_DIR)

    async def stop_worker(_: web.Application) -> None:
        if registry.worker is not None:
            await registry.worker.close()

    app.on_shutdown.append(drain)  # serve() drains before the listener closes; this is a backstop
    app.on_cleanup.append(stop_worker)
    return app


async def drain(app: web.Application) -> None:
    """SIGINT/SIGTERM: no new sessions; finals of speech in flight still reach their clients."""
    registry = app[REGISTRY]
    if registry.accepting:
        registry.accepting = False  # GET /ready answers 503 from now on
        log.info("shutting down: finalizing %d session(s)", len(registry))
        await registry.close_all("shutdown")


def state(app: web.Application) -> str:
    registry = app[REGISTRY]
    if registry.worker is None:
        return "loading"
    if not registry.accepting:
        return "shutting_down"
    # Sessions still run, but nothing they say is saved: a balancer should send them elsewhere.
    return "storage_failing" if storage.health(app)["storage"] == "failing" else "ready"


# Where sessions are opened, our protocol's and the vendors': a refusal there is a session refused.
SESSION_PATHS = frozenset({"/v1/rtc", "/v1/ws", "/v1/realtime", "/v1/realtime/calls", "/v1/listen",
                           "/v1/transcriptions", "/ws", "/ws/transcribe"})


@web.middleware
async def ready_gate(request: web.Request, handler):
    """Until the model is loaded, the API answers 503 (GET /health and /ready answer already)."""
    if auth.guarded(request.path) and request.app[REGISTRY].worker is None:
        if request.path in SESSION_PATHS:
            metrics.refused("not_ready")
        raise ApiError(503, "not_ready", "the model is still loading; try again shortly",
                       {"Retry-After": "2"})
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves, model loaded or not."""
    registry = request.app[REGISTRY]
    loaded = registry.worker is not None
    return web.json_response({
        "status": "ok", "ready": state(request.app) == "ready",
        "model": registry.worker.engine.name if loaded else registry.config.model,
        "languages": sorted(registry.languages) if loaded else [], "sessions": len(registry),
        **storage.health(request.app)})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when the model is loaded, sessions are taken and saved; 503 starting, stopping,
    or while writes to --data-dir fail."""
    registry = request.app[REGISTRY]
    current = state(request.app)
    body = {"status": current, "model": registry.config.model, "sessions": len(registry),
            **storage.health(request.app)}
    if current == "ready":
        return web.json_response(body)
    return web.json_response(body, status=503, headers={"Retry-After": "2"})


async def load_model(app: web.Application, config: Config) -> None:
    """The model, off the event loop; then the decode workers start and the server is ready."""
    # A daemon thread: a stop during a long load (a download) does not wait for it.
    engine = await asyncio.wrap_future(on_daemon_thread(load_engine, config, name="model-load"))
    # Finals are bounded per server: a few per session before the server calls itself overloaded.
    pool = DecodePool(engine, max_finals=4 * config.max_sessions, workers=config.decode_workers,
                      on_partial=metrics.partial_answered)
    metrics.watch_decodes(pool)
    registry = app[REGISTRY]
    pool.live = lambda: len(registry) > 0  # files keep a decode worker free for live sessions
    pool.start()
    registry.worker = pool


def decode_options(config: Config) -> DecodeOptions:
    return DecodeOptions(beam_size=config.beam_size, cpu_threads=config.cpu_threads, workers=config.decode_workers,
                         nice=config.decode_nice, window_s=config.decode_window_s,
                         busy_window_s=config.busy_decode_window_s, lift_dbfs=config.lift_dbfs or None)


def load_engine(config: Config) -> WhisperEngine:
    started = time.monotonic()
    engine = WhisperEngine(
        config.model, device=config.device, compute_type=config.compute_type,
        options=decode_options(config))
    engine.warm_up()
    log.info("model ready in %.1fs", time.monotonic() - started)
    return engine


async def serve(config: Config, tls) -> int:
    """Listens at once, loads the model, and on SIGINT/SIGTERM drains the sessions while the
    listener still answers (GET /ready: 503, new sessions: 503 shutting_down), then closes it."""
    app = build_app(config)
    # Connections under the header and body timeouts and the cap on those with no request yet.
    runner = connections.Runner(app, config, access_log=None, shutdown_timeout=20)
    await runner.setup()
    code = 0
    try:
        await web.TCPSite(runner, config.host, config.port, ssl_context=tls).start()
        log.info("serving on %s://%s:%d; loading the model", "https" if tls else "http",
                 config.host, config.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loading = asyncio.create_task(load_model(app, config))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            log.error("the model could not be loaded", exc_info=loading.exception())
            code = 1
        else:
            await stopping
        loading.cancel()
        stopping.cancel()
        await drain(app)
    finally:
        await runner.cleanup()
    return code


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    if config.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        # One object per line; a record's `extra` fields (the session audit) become its keys.
        handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s", timestamp="time",
                                           rename_fields={"levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    # These narrate every candidate pair and every decode at INFO.
    for noisy in ("aioice", "aiortc", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def cap_malloc_arenas(arenas: int = 2) -> None:
    """Two glibc malloc arenas instead of eight per core, unless MALLOC_ARENA_MAX says otherwise.

    Each decode worker would get its own arena, and each arena keeps the freed encoder and decoder
    buffers of its last decodes, so memory grows with the number of arenas. Whisper's buffers are
    few and large, so the threads that share an arena seldom wait on its lock.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to cap
        return
    m_arena_max = -8
    libc.mallopt(m_arena_max, arenas)


class MemoryRelease:
    """Once no session is left, glibc gives the memory it holds free back to the system (malloc_trim).

    glibc keeps the freed buffers of the busiest moment in its arenas; trimmed when the server is idle,
    its size returns to what it uses. Called a moment after the last session ends, so that a session
    that follows at once does not pay for it.
    """

    def __init__(self, registry: SessionRegistry, delay_s: float = 1.0) -> None:
        self._registry = registry
        self._delay_s = delay_s
        self._timer: asyncio.TimerHandle | None = None
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            self._trim = None

    def soon(self) -> None:
        if self._trim is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._release)

    def _release(self) -> None:
        self._timer = None
        if not len(self._registry):
            # On a thread: trimming a large heap walks it, and the loop may be serving requests meanwhile.
            asyncio.get_running_loop().run_in_executor(None, self._trim, 0)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop, or asyncio's where uvloop does not install (Windows).

    Each WebRTC peer's packets come on a UDP socket of its own, one per 20 ms frame, and asyncio's
    loop reads one datagram per socket per turn. Once a turn takes longer than a frame, packets pile
    up in every socket faster than they are read, the ICE consent checks queued behind them time
    out, and the connections close. uvloop (libuv) reads what waits, up to 32 datagrams a turn.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    cap_malloc_arenas()  # before any thread allocates
    config = Config.from_args(argv)
    setup_logging(config)
    fdlimit.raise_limit(config)
    tls = ssl_context(config)  # before anything listens: a bad certificate fails at once
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        code = runner.run(serve(config, tls))
    log.info("stopped")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
