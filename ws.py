"""WebSocket transport: the same sessions and events for clients that cannot do WebRTC."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from asr.audio import SAMPLE_RATE, Resampler, WebmDecoder
from ops import auth
from ops import metrics
import protocol
from errors import ApiError
from protocol import ClientError
from sessions import REGISTRY, Client, EventQueue, Session, SessionRegistry, write_or_drop

log = logging.getLogger(__name__)

_MAX_PENDING_FINALS = 2  # past this, a sender faster than real time waits: the socket is not read
_FEED_SLICE = SAMPLE_RATE // 2  # feed big messages in slices so the loop stays responsive
_CLOSE_FLUSH_S = 5.0  # longest wait for a slow reader to take the last events


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/ws", websocket_session)


async def websocket_session(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    query = dict(request.query)
    auth.session_options(request, query)  # a bad (or, for a token, another) option: no upgrade
    if not registry.accepting:
        # Draining: 503 before the upgrade, which a load balancer can still send to another replica.
        registry.check_capacity(auth.client(request))
    ws = _Socket(
        protocols=auth.ws_protocols(request),  # echoes "livestt" when a browser sent a token with it
        heartbeat=max(1.0, registry.config.idle_timeout_s / 3),  # pings; no pong closes the socket
        max_msg_size=4 * protocol.MAX_AUDIO_BYTES,  # aiohttp stops reading a message past this; below, we answer
        timeout=_CLOSE_FLUSH_S,  # for the client's answer to our close frame
    )
    await ws.prepare(request)
    client = auth.client(request)
    try:
        try:
            registry.check_capacity(client)
        except ApiError as e:
            await ws.close(code=protocol.ERRORS[e.code].close, message=e.message.encode())
            return ws
        await WebSocketSession(ws, registry, query, request, client).run()
    finally:
        ws.stop_heartbeat()
        # Whatever the client left unread by now it will never read; closing would wait for it for ever.
        if request.transport is not None and request.transport.get_write_buffer_size():
            request.transport.abort()
    return ws


class _Socket(web.WebSocketResponse):
    """aiohttp's socket, with two of its habits changed.

    - A message over max_msg_size: aiohttp would close with 1009 at once. The session ends first, as for
      any message too large: an error event, the finals of what came before, session.ended, then the close.
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


class WebSocketSession:
    """Reads one socket into a session; writes the session's events back in order."""

    def __init__(self, ws: web.WebSocketResponse, registry: SessionRegistry, query: dict[str, str],
                 request: web.Request, client: Client):
        self.ws = ws
        self.registry = registry
        self.query = query
        self.request = request  # its credential decides the options a token allows
        self.client = client
        self.session: Session | None = None
        self.outbox = EventQueue(on_overflow=self._not_reading)
        self.rate = SAMPLE_RATE
        self.resampler = Resampler()
        self.decoder: WebmDecoder | None = None
        self._close_code = 1000
        self._decoder_error = False
        self._dropped = False  # the client stopped reading and its connection was cut
        self._writer: asyncio.Task | None = None

    async def run(self) -> None:
        try:
            # Not receive(timeout=...): each pong the heartbeat brings would restart that timer.
            first = await asyncio.wait_for(self.ws.receive(), self.registry.config.idle_timeout_s)
        except asyncio.TimeoutError:
            # Nothing was ever sent, so no session watches this socket: it must not stay open forever.
            await self.ws.close(code=1000, message=b"idle_timeout")
            return
        if first.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return
        try:
            start = protocol.ws_start(first.data)
            self._start(start or protocol.Start())
        except ClientError as e:
            await self._refuse(e)
            return
        if start is not None:
            first = None
        self._writer = asyncio.create_task(self._write())
        try:
            await self._read(first)
        finally:
            await self._writer

    def _start(self, start: protocol.Start) -> None:
        raw = {**self.query, **start.options}
        try:
            options = auth.session_options(self.request, raw)
            self.registry.check_capacity(self.client)
        except ApiError as e:
            raise ClientError(e.code, e.message) from None
        self.rate = start.sample_rate
        self.session = session = self.registry.create("websocket", options, client=self.client)
        if start.encoding == "webm":
            self.decoder = WebmDecoder(session.feed, self._decoder_failed)
        self.outbox.put(session.started_event())
        session.add_sink(self.outbox.put)
        session.on_close(self._close)

    async def _read(self, first: WSMessage | None) -> None:
        """`first`: the message that started the session, when it was not a start message."""
        assert self.session is not None
        if first is not None and await self._dispatch(first):
            return
        while not self.session.ended:
            await self.session.stream.wait_capacity(_MAX_PENDING_FINALS)
            if await self._dispatch(await self.ws.receive()):
                return

    async def _dispatch(self, message: WSMessage) -> bool:
        """Acts on one message; True when the session is over and reading must stop."""
        if message.type == WSMsgType.ERROR and isinstance(message.data, WebSocketError) \
                and message.data.code == WSCloseCode.MESSAGE_TOO_BIG:
            return await self._client_error(protocol.too_large())
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            await self._end("not_reading" if self._dropped else "peer_closed")
            return True
        if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return False
        try:
            received = protocol.ws_message(message.data)
            if isinstance(received, protocol.Stop):
                await self._end("stop")
                return True
            await self._audio(received.data)
        except ClientError as e:
            return await self._client_error(e)
        return False

    async def _client_error(self, e: ClientError) -> bool:
        """Its error event; True when the session ends on it, as the code says (ClientError.close)."""
        self._error(e)
        if e.close is None:
            return False
        # The session itself ends: what was said before the refused message still gets its finals.
        self._close_code = e.close
        await self._end("error")
        return True

    async def _audio(self, data: bytes) -> None:
        assert self.session is not None
        if self.decoder is not None:
            await self.decoder.write(data)
            return
        if len(data) % 2:
            raise ClientError("odd_length", "16-bit PCM needs an even number of bytes; message dropped")
        pcm = self.resampler.pcm16(data, self.rate)
        for i in range(0, pcm.size, _FEED_SLICE):
            self.session.feed(pcm[i : i + _FEED_SLICE])
            await asyncio.sleep(0)

    def _decoder_failed(self, message: str) -> None:
        e = ClientError("bad_audio", message)
        self._error(e)
        self._close_code = e.close
        self._decoder_error = True
        self.session.end_soon("error")  # no decoder to drain: it has just stopped

    async def _end(self, reason: str) -> None:
        assert self.session is not None
        if self.decoder is not None and reason != "error":
            await self.decoder.close()  # every byte received is transcribed before the end
            # The decoder may have failed meanwhile; its end_soon("error") may not have run yet.
            reason = "error" if self._decoder_error else reason
        await self.session.end(reason)

    def _error(self, e: ClientError) -> None:
        metrics.error("event", e.code)
        self.outbox.put(protocol.error(e.code, e.message))

    async def _write(self) -> None:
        while True:
            event = await self.outbox.get()
            if not self.ws.closed and not self._dropped:
                try:
                    if not await write_or_drop(self.ws.send_str(protocol.encode(event)), self.request.transport):
                        self._not_reading()
                except ConnectionError:
                    pass
            if event["type"] == "session.ended":
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
        code = protocol.WS_CLOSE_ON_END.get(self.session.reason or "", self._close_code)
        # session.ended is the last event queued: the writer sends it, then the close frame goes.
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), _CLOSE_FLUSH_S)
        except asyncio.TimeoutError:
            pass
        if not await write_or_drop(self.ws.close(code=code, message=(self.session.reason or "").encode()),
                                   self.request.transport):
            self._dropped = True

    async def _refuse(self, e: ClientError) -> None:
        """A start the server does not take: the error event, then the close, and no session."""
        metrics.error("event", e.code)
        if not self.ws.closed and await write_or_drop(
                self.ws.send_str(protocol.encode(protocol.error(e.code, e.message))), self.request.transport):
            await write_or_drop(self.ws.close(code=e.close, message=e.message.encode()[:120]),
                                self.request.transport)
