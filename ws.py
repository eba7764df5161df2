"""WebSocket transport: the same sessions and events for clients that cannot do WebRTC."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from asr.audio import MAX_RATE, MIN_RATE, SAMPLE_RATE, Resampler, WebmDecoder
import auth
import metrics
from errors import ApiError, client_json, quoted
from sessions import REGISTRY, Client, EventQueue, Session, SessionRegistry, write_or_drop

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20  # 1 MiB: 32 s of 16 kHz PCM in one message is already more than any client needs
_MAX_PENDING_FINALS = 2  # past this, a sender faster than real time waits: the socket is not read
_FEED_SLICE = SAMPLE_RATE // 2  # feed big messages in slices so the loop stays responsive
_CLOSE_FLUSH_S = 5.0  # longest wait for a slow reader to take the last events
_ENCODINGS = ("pcm_s16le", "webm")
_START_FIELDS = {"type", "language", "sample_rate", "encoding", "partials", "endpoint_ms"}

# Close codes (RFC 6455): 1000 normal, 1001 server going away, 1003 unsupported data,
# 1008 policy violation, 1013 try again later.
_CLOSE_FOR_REASON = {"shutdown": 1001}
_TRY_LATER = {"session_limit", "key_session_limit"}  # closed with 1013
_TOO_LARGE = f"audio messages must be at most {MAX_MESSAGE} bytes"


class Refused(Exception):
    """The stream cannot go on: an error event, then a close with this code."""

    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(message)
        self.code, self.message, self.close_code = code, message, close_code


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/ws", websocket_session)


async def websocket_session(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    query = dict(request.query)
    auth.session_options(request, query)  # a bad (or, for a token, another) option: no upgrade
    ws = _Socket(
        protocols=auth.ws_protocols(request),  # echoes "livestt" when a browser sent a token with it
        heartbeat=max(1.0, registry.config.idle_timeout_s / 3),  # pings; no pong closes the socket
        max_msg_size=4 * MAX_MESSAGE,  # aiohttp stops reading a message past this; below, we answer
        timeout=_CLOSE_FLUSH_S,  # for the client's answer to our close frame
    )
    await ws.prepare(request)
    client = auth.client(request)
    try:
        try:
            registry.check_capacity(client)
        except ApiError as e:
            await ws.close(code=1013 if e.code in _TRY_LATER else 1001, message=e.message.encode())
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
        try:
            if first.type == WSMsgType.TEXT and _is_start(first.data):
                self._start(client_json(first.data))
                first = None
            elif first.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                self._start({})
            else:
                return
        except Refused as e:
            await self._refuse(e)
            return
        self._writer = asyncio.create_task(self._write())
        try:
            await self._read(first)
        finally:
            await self._writer

    def _start(self, start: dict[str, Any]) -> None:
        unknown = set(start) - _START_FIELDS
        if unknown:
            raise Refused("unknown_option", f"unknown start field(s): {', '.join(sorted(unknown))}", 1008)
        encoding = start.get("encoding", "pcm_s16le")
        if encoding not in _ENCODINGS:
            raise Refused("unsupported_encoding",
                          f"encoding must be one of {', '.join(_ENCODINGS)}", 1003)
        rate = start.get("sample_rate", SAMPLE_RATE)
        if encoding == "pcm_s16le" and (
                not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE):
            raise Refused("unsupported_rate",
                          f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE}", 1003)
        raw = {**self.query, **{k: v for k, v in start.items() if k not in ("type", "sample_rate", "encoding")}}
        try:
            options = auth.session_options(self.request, raw)
            self.registry.check_capacity(self.client)
        except ApiError as e:
            raise Refused(e.code, e.message, 1013 if e.code in _TRY_LATER else 1008) from None
        self.rate = rate
        self.session = session = self.registry.create("websocket", options, client=self.client)
        if encoding == "webm":
            self.decoder = WebmDecoder(session.feed, self._decoder_failed)
        self.outbox.put({"type": "session.started", **session.info()})
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
            message = WSMessage(WSMsgType.BINARY, bytes(MAX_MESSAGE + 1), None)  # refused below, as any too large
        elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            await self._end("not_reading" if self._dropped else "peer_closed")
            return True
        try:
            return await self._handle(message)
        except Refused as e:
            # The session itself ends: what was said before the refused message still gets its finals.
            self._error(e.code, e.message)
            self._close_code = e.close_code
            await self._end("error")
            return True

    async def _handle(self, message: WSMessage) -> bool:
        """Acts on one client message; True when the client asked to stop."""
        if message.type == WSMsgType.BINARY:
            await self._audio(message.data)
            return False
        if message.type != WSMsgType.TEXT:
            return False
        try:
            data = client_json(message.data)
        except ValueError:
            self._error("bad_message", "message is not valid JSON")
            return False
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "stop" or (kind == "control" and data.get("action") == "stop"):
            await self._end("stop")
            return True
        if kind == "audio":
            payload = data.get("data", data.get("payload"))
            try:
                if not isinstance(payload, str):
                    raise ValueError
                audio = base64.b64decode(payload, validate=True)
            except (ValueError, binascii.Error):
                self._error("bad_base64", "audio data must be a base64 string in 'data' or 'payload'")
                return False
            await self._audio(audio)
        elif kind == "start":
            self._error("already_started", "the session has already started")
        else:
            self._error("unknown_message",
                        f"unknown message type {quoted(kind)}; the client may send: audio, stop")
        return False

    async def _audio(self, data: bytes) -> None:
        assert self.session is not None
        if len(data) > MAX_MESSAGE:
            raise Refused("too_large", _TOO_LARGE, 1008)
        if self.decoder is not None:
            await self.decoder.write(data)
            return
        if len(data) % 2:
            self._error("odd_length", "16-bit PCM needs an even number of bytes; message dropped")
            return
        pcm = self.resampler.pcm16(data, self.rate)
        for i in range(0, pcm.size, _FEED_SLICE):
            self.session.feed(pcm[i : i + _FEED_SLICE])
            await asyncio.sleep(0)

    def _decoder_failed(self, message: str) -> None:
        self._error("bad_audio", message)
        self._close_code = 1003
        self._decoder_error = True
        self.session.end_soon("error")  # no decoder to drain: it has just stopped

    async def _end(self, reason: str) -> None:
        assert self.session is not None
        if self.decoder is not None and reason != "error":
            await self.decoder.close()  # every byte received is transcribed before the end
            # The decoder may have failed meanwhile; its end_soon("error") may not have run yet.
            reason = "error" if self._decoder_error else reason
        await self.session.end(reason)

    def _error(self, code: str, message: str) -> None:
        metrics.error("event", code)
        self.outbox.put({"type": "error", "code": code, "message": message})

    async def _write(self) -> None:
        while True:
            event = await self.outbox.get()
            if not self.ws.closed and not self._dropped:
                try:
                    if not await write_or_drop(self.ws.send_str(json.dumps(event, separators=(",", ":"))),
                                               self.request.transport):
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
        code = _CLOSE_FOR_REASON.get(self.session.reason or "", self._close_code)
        # session.ended is the last event queued: the writer sends it, then the close frame goes.
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), _CLOSE_FLUSH_S)
        except asyncio.TimeoutError:
            pass
        if not await write_or_drop(self.ws.close(code=code, message=(self.session.reason or "").encode()),
                                   self.request.transport):
            self._dropped = True

    async def _refuse(self, e: Refused) -> None:
        metrics.error("event", e.code)
        if not self.ws.closed and await write_or_drop(
                self.ws.send_str(json.dumps({"type": "error", "code": e.code, "message": e.message})),
                self.request.transport):
            await write_or_drop(self.ws.close(code=e.close_code, message=e.message.encode()[:120]),
                                self.request.transport)


def _is_start(text: str) -> bool:
    try:
        data = client_json(text)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("type") == "start"
