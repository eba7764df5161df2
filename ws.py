"""WebSocket transport: one socket bound to one session, whatever protocol the client speaks.

SocketSession keeps the rules every WebSocket protocol shares: reading pauses while finals wait, the
outbox is bounded and a client that does not read is cut off, every write has a timeout, a message too
large ends the session after the finals of what came before, and the close frame follows the last event.
Our own protocol (GET /v1/ws) is NativeSession here; the vendors' (adapters/) are its siblings.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import numpy as np
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from asr.audio import SAMPLE_RATE, SNIFF_BYTES, RawAudio, StreamDecoder, sniff
from ops import auth
from ops import metrics
import protocol
from errors import ApiError
from protocol import ClientError, Event
from sessions import REGISTRY, Client, EventQueue, Session, SessionOptions, SessionRegistry, write_or_drop

log = logging.getLogger(__name__)

MAX_PENDING_FINALS = 2  # past this, a sender faster than real time waits: the socket is not read
_FEED_SLICE = SAMPLE_RATE // 2  # feed big messages in slices so the loop stays responsive
_CLOSE_FLUSH_S = 5.0  # longest wait for a slow reader to take the last events
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/ws", websocket_session)


async def websocket_session(request: web.Request) -> web.StreamResponse:
    query = dict(request.query)
    auth.session_options(request, query)  # a bad (or, for a token, another) option: no upgrade
    return await serve(request, lambda ws: NativeSession(ws, request, query),
                       protocols=auth.ws_protocols(request),  # echoes "livestt" when a browser sent a token
                       max_msg_size=4 * protocol.MAX_AUDIO_BYTES)


async def serve(request: web.Request, make: Callable[["Socket"], "SocketSession"], *,
                protocols: tuple[str, ...], max_msg_size: int) -> web.WebSocketResponse:
    """Upgrades the request and runs one SocketSession over the socket until it is done."""
    registry = request.app[REGISTRY]
    if not registry.accepting:
        # Draining: 503 before the upgrade, which a load balancer can still send to another replica.
        registry.check_capacity(auth.client(request))
    ws = Socket(
        protocols=protocols,
        heartbeat=max(1.0, registry.config.idle_timeout_s / 3),  # pings; no pong closes the socket
        max_msg_size=max_msg_size,  # aiohttp stops reading a message past this; below, the protocol answers
        timeout=_CLOSE_FLUSH_S,  # for the client's answer to our close frame
    )
    await ws.prepare(request)
    try:
        await make(ws).run()
    finally:
        ws.stop_heartbeat()
        # Whatever the client left unread by now it will never read; closing would wait for it for ever.
        if request.transport is not None and request.transport.get_write_buffer_size():
            request.transport.abort()
    return ws


class Socket(web.WebSocketResponse):
    """aiohttp's socket, with two of its habits changed.

    - A message over max_msg_size: aiohttp would close with 1009 at once. The session ends first, as for
      any message too large: an error, the finals of what came before, the end, then the close.
    - Its heartbeat timer is re-armed when the client's close frame arrives after ours, and that timer
      holds the whole connection until it fires: once the socket is done, it is stopped for good.
    """

    too_large = False

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.too_large and not self.closed:
            self.too_large = True  # receive() returns the error; the session closes the socket after its end
            return False
        return await super().close(code=code, message=message, drain=drain)

    def stop_heartbeat(self) -> None:
        self._heartbeat = None  # what aiohttp checks before it re-arms the timer
        cancel = getattr(self, "_cancel_heartbeat", None)
        if cancel is not None:
            cancel()


def too_big(message: WSMessage) -> bool:
    """The message aiohttp stopped reading past max_msg_size."""
    return (message.type == WSMsgType.ERROR and isinstance(message.data, WebSocketError)
            and message.data.code == WSCloseCode.MESSAGE_TOO_BIG)


class SocketSession:
    """Reads one socket into a session; writes the session's events back in order.

    A protocol says how a message becomes audio or an action (`dispatch`), how each item of the outbox
    becomes messages (`encode`: the session's events, and whatever the protocol put there itself, in
    order), and how the socket closes (`close_frame`).
    """

    transport = "websocket"
    api = "livestt"

    def __init__(self, ws: Socket, request: web.Request) -> None:
        self.ws = ws
        self.request = request  # its credential decides the options a token allows
        self.registry: SessionRegistry = request.app[REGISTRY]
        self.client: Client = auth.client(request)
        self.session: Session | None = None
        self.outbox = EventQueue(on_overflow=self._not_reading)
        self.raw: RawAudio | None = RawAudio()
        self.decoder: StreamDecoder | None = None
        self._sniffed: bytearray | None = None  # the stream's first bytes, while its container is unknown
        self._fallback: RawAudio | None = None  # what the stream is if those bytes begin no container
        self._close_code = 1000
        self._decoder_error = False
        self._dropped = False  # the client stopped reading and its connection was cut
        self._writer: asyncio.Task | None = None

    async def first_message(self) -> WSMessage | None:
        """The client's first text or binary message; None when it closed first, or sent nothing within
        --idle-timeout-s: no session watches this socket yet, so it is closed here rather than left open."""
        try:
            # Not receive(timeout=...): each pong the heartbeat brings would restart that timer.
            first = await asyncio.wait_for(self.ws.receive(), self.registry.config.idle_timeout_s)
        except asyncio.TimeoutError:
            await self.ws.close(code=1000, message=b"idle_timeout")
            return None
        return first if first.type in (WSMsgType.TEXT, WSMsgType.BINARY) else None

    # What a protocol defines ---------------------------------------------------------------------

    async def run(self) -> None:
        raise NotImplementedError

    async def dispatch(self, message: WSMessage) -> bool:
        """Acts on one text or binary message; True when the session is over and reading must stop."""
        raise NotImplementedError

    def opening(self, session: Session) -> list[Event]:
        """What the client hears first, before any event of its session."""
        return []

    def encode(self, item: Event) -> list[str]:
        """The messages an outbox item becomes."""
        return [protocol.encode(item)]

    async def too_large(self) -> None:
        """A message over the socket's max_msg_size: it cannot be read, so the session ends."""
        raise NotImplementedError

    def bad_audio(self, message: str) -> None:
        """Audio that cannot be decoded: the protocol's error. The session then ends (`error`)."""
        raise NotImplementedError

    def close_frame(self, reason: str) -> tuple[int, str]:
        """The close code and reason that follow the session's end."""
        return protocol.WS_CLOSE_ON_END.get(reason, self._close_code), reason

    # The session ---------------------------------------------------------------------------------

    def start(self, options: SessionOptions) -> Session:
        """The session, within the limits (ApiError past them); its opening goes out before its events."""
        self.session = session = self.registry.create(self.transport, options, client=self.client, api=self.api)
        for item in self.opening(session):
            self.outbox.put(item)
        session.add_sink(self.outbox.put)
        session.on_close(self._close)
        self._writer = asyncio.create_task(self._write())
        return session

    async def read(self, first: WSMessage | None = None) -> None:
        """Until the session is over; `first`: a message already received that is yet to be acted on."""
        assert self.session is not None
        try:
            if first is not None and await self._dispatch(first):
                return
            while not self.session.ended:
                await self.session.stream.wait_capacity(MAX_PENDING_FINALS)
                if await self._dispatch(await self.ws.receive()):
                    return
        finally:
            if self._writer is not None:
                await self._writer

    async def _dispatch(self, message: WSMessage) -> bool:
        if too_big(message):
            await self.too_large()
            return True
        if message.type in _CLOSED:
            await self.end("not_reading" if self._dropped else "peer_closed")
            return True
        if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return False
        return await self.dispatch(message)

    async def end(self, reason: str) -> None:
        """Every byte received is transcribed first, unless the audio itself failed."""
        assert self.session is not None
        if self.decoder is not None and reason != "error":
            await self.decoder.close()
            # The decoder may have failed meanwhile; its end_soon("error") may not have run yet.
            reason = "error" if self._decoder_error else reason
        await self.session.end(reason)

    async def fail(self, close_code: int) -> None:
        """The stream cannot go on: the finals of what came before, then the end and this close."""
        self._close_code = close_code
        await self.end("error")

    def put(self, item: Event) -> None:
        """A message of the protocol's own, in order with the session's events."""
        self.outbox.put(item)

    # Audio ---------------------------------------------------------------------------------------

    def expect_container(self, fallback: RawAudio | None = None) -> None:
        """The stream's container is told by its first bytes (WAV, Ogg, WebM, FLAC, MP3); with none of them,
        the audio is `fallback`, or, with no fallback, cannot be decoded."""
        self.raw, self._fallback = None, fallback
        self._sniffed = bytearray()

    def use_container(self, format: str) -> None:
        assert self.session is not None
        self.raw = None
        self.decoder = StreamDecoder(self._decoded, self._decoder_failed, format=format)

    async def audio(self, data: bytes) -> None:
        """Audio as the client sent it, cut anywhere, to the session in order."""
        if self._sniffed is not None:
            self._sniffed += data
            if len(self._sniffed) < SNIFF_BYTES:
                return
            data, self._sniffed = bytes(self._sniffed), None
            found = sniff(data)
            if found is not None:
                self.use_container(found)
            elif self._fallback is not None:
                self.raw = self._fallback
            else:
                self._decoder_failed("the audio is in no container the server knows (WAV, Ogg, WebM, FLAC, "
                                     "MP3); raw audio needs its encoding and sample rate")
                return
        if self.decoder is not None:
            if not self._decoder_error:
                await self.decoder.write(data)
        elif self.raw is not None:
            self.session.stream.narrowband = self.raw.narrowband
            await self.feed(self.raw.decode(data))

    def _decoded(self, pcm: np.ndarray, narrowband: bool) -> None:
        """Audio the container's decoder delivers, and whether it was sent at 8 kHz or less."""
        assert self.session is not None
        self.session.stream.narrowband = narrowband
        self.session.feed(pcm)

    async def feed(self, pcm: np.ndarray) -> None:
        """16 kHz audio to the session in slices, so the loop stays responsive and finals keep up."""
        assert self.session is not None
        for i in range(0, pcm.size, _FEED_SLICE):
            self.session.feed(pcm[i : i + _FEED_SLICE])
            await asyncio.sleep(0)
            if i + _FEED_SLICE < pcm.size:
                await self.session.stream.wait_capacity(MAX_PENDING_FINALS)

    def _decoder_failed(self, message: str) -> None:
        assert self.session is not None
        self._decoder_error = True
        self.bad_audio(message)
        self.session.end_soon("error")  # no decoder to drain: it has just stopped

    # Writing and closing -------------------------------------------------------------------------

    async def _write(self) -> None:
        while True:
            item = await self.outbox.get()
            if not self.ws.closed and not self._dropped:
                for text in self.encode(item):
                    try:
                        if not await write_or_drop(self.ws.send_str(text), self.request.transport):
                            self._not_reading()
                            break
                    except ConnectionError:
                        break
            if item["type"] == "session.ended":
                return

    def _not_reading(self) -> None:
        """The client has left events unread past the outbox or WRITE_TIMEOUT_S: its connection is cut
        (no close frame could reach it) and its session ends."""
        if self._dropped:
            return
        self._dropped = True
        log.info("websocket client %s does not read its events: connection cut", self.client.address or "-")
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        if self.session is not None:
            self.session.end_soon("not_reading")

    async def _close(self) -> None:
        assert self.session is not None
        code, reason = self.close_frame(self.session.reason or "")
        # session.ended is the last item queued: the writer sends what precedes it, then the close goes.
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), _CLOSE_FLUSH_S)
            except asyncio.TimeoutError:
                pass
        if not await write_or_drop(self.ws.close(code=code, message=reason.encode()[:120]), self.request.transport):
            self._dropped = True

    async def refuse(self, texts: list[str], code: int, reason: str) -> None:
        """No session: these messages, then the close."""
        for text in texts:
            if self.ws.closed or not await write_or_drop(self.ws.send_str(text), self.request.transport):
                return
        await write_or_drop(self.ws.close(code=code, message=reason.encode()[:120]), self.request.transport)


class NativeSession(SocketSession):
    """GET /v1/ws: our own protocol (protocol.py), the same events as on the data channel."""

    def __init__(self, ws: Socket, request: web.Request, query: dict[str, str]) -> None:
        super().__init__(ws, request)
        self.query = query

    async def run(self) -> None:
        try:
            self.registry.check_capacity(self.client)
        except ApiError as e:
            await self.ws.close(code=protocol.ERRORS[e.code].close, message=e.message.encode())
            return
        first = await self.first_message()
        if first is None:
            return
        try:
            start = protocol.ws_start(first.data)
            self._start(start or protocol.Start())
        except ClientError as e:
            metrics.error("event", e.code)
            await self.refuse([protocol.encode(protocol.error(e.code, e.message))], e.close, e.message)
            return
        await self.read(None if start is not None else first)

    def _start(self, start: protocol.Start) -> None:
        raw = {**self.query, **start.options}
        try:
            options = auth.session_options(self.request, raw)
            self.registry.check_capacity(self.client)
        except ApiError as e:
            raise ClientError(e.code, e.message) from None
        self.raw = RawAudio("pcm_s16le", start.sample_rate)
        self.start(options)
        if start.encoding == "webm":
            self.use_container("matroska")

    def opening(self, session: Session) -> list[Event]:
        return [session.started_event()]

    async def dispatch(self, message: WSMessage) -> bool:
        try:
            received = protocol.ws_message(message.data)
            if isinstance(received, protocol.Stop):
                await self.end("stop")
                return True
            if self.decoder is None and len(received.data) % 2:
                raise ClientError("odd_length", "16-bit PCM needs an even number of bytes; message dropped")
            await self.audio(received.data)
        except ClientError as e:
            return await self._client_error(e)
        return False

    async def _client_error(self, e: ClientError) -> bool:
        """Its error event; True when the session ends on it, as the code says (ClientError.close)."""
        self._error(e)
        if e.close is None:
            return False
        # The session itself ends: what was said before the refused message still gets its finals.
        await self.fail(e.close)
        return True

    async def too_large(self) -> None:
        await self._client_error(protocol.too_large())

    def bad_audio(self, message: str) -> None:
        e = ClientError("bad_audio", message)
        self._error(e)
        self._close_code = e.close

    def _error(self, e: ClientError) -> None:
        metrics.error("event", e.code)
        self.outbox.put(protocol.error(e.code, e.message))
