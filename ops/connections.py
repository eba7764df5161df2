"""HTTP connections under limits, so that slow or idle clients cannot hold the server's descriptors.

aiohttp reads each connection with a RequestHandler; GuardedHandler adds to it:

- a header timeout: a request's head must arrive within --header-timeout-s of the connection's
  opening, or of the first byte of a later request on a keep-alive connection (408, then closed);
- between requests, aiohttp's own keep-alive timer (--keepalive-timeout-s);
- a body timeout: a body not all there --body-timeout-s after its head fails its reader with
  errors.BodyTimeout, which the API answers with 408;
- a cap on connections with no request in progress (--max-pending-connections): past it, the
  oldest of them is closed. A connection in a request, WebSocket and SSE streams included, is
  neither counted nor timed here;
- requests that cannot be parsed get the API's JSON error (400, 414, 431) and one log line that
  holds neither their request line nor their headers, where credentials may be.
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from ops import metrics
from config import Config
from errors import BodyTimeout, error_body, error_response

log = logging.getLogger(__name__)

_WARN_EVERY_S = 60.0  # under a flood of connections, one warning a minute rather than one each


class Runner(web.AppRunner):
    """web.AppRunner whose connections are GuardedHandlers."""

    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=config.keepalive_timeout_s, **kwargs)
        self.config = config

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.config)


class GuardedServer(web.Server):
    """The aiohttp Server that AppRunner made, with its settings, handing out GuardedHandlers; it
    keeps the connections that have no request in progress, oldest first."""

    def __init__(self, plain: web.Server, config: Config) -> None:
        # plain._kwargs: the settings the runner and the app gave (access_log=None among them).
        super().__init__(plain.request_handler, request_factory=self._request,
                         handler_cancellation=plain.handler_cancellation, **plain._kwargs)
        self.config = config
        self._app_request = plain.request_factory
        self._pending: dict[RequestHandler, None] = {}  # insertion order: the oldest first
        self._warned = -_WARN_EVERY_S

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def _request(self, message: Any, payload: StreamReader, protocol: GuardedHandler, writer: Any,
                 task: asyncio.Task) -> web.BaseRequest:
        """A head is complete and its request begins."""
        self._pending.pop(protocol, None)
        protocol.request_started(payload)
        return self._app_request(message, payload, protocol, writer, task)

    def waiting(self, handler: GuardedHandler) -> None:
        """The connection has no request in progress; past the cap, the oldest such one is closed,
        so that connections held open without a request cannot lock newer clients out."""
        self._pending.pop(handler, None)
        while len(self._pending) >= self.config.max_pending_connections:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            oldest.force_close()
            metrics.connection_closed("pending_limit")
            if time.monotonic() - self._warned >= _WARN_EVERY_S:
                self._warned = time.monotonic()
                log.warning("%d connections are open without a request (--max-pending-connections): "
                            "closing the oldest ones", self.config.max_pending_connections)
        self._pending[handler] = None

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._pending.pop(handler, None)
        super().connection_lost(handler, exc)


class GuardedHandler(RequestHandler):
    """One HTTP connection: aiohttp's reading, under the header and body timeouts and the cap."""

    def __init__(self, server: GuardedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._config = server.config
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # of the head being read, while the header timeout runs
        self._line_bytes = 0  # of its request line so far: a long one is a long URL, not a long header
        self._line_open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.waiting(self)
        self._start_head()  # a new connection's first head is due from its opening

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head()
        self._stop_body()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._waiting_for_request():
            self._start_head()  # the first bytes of a later request on a keep-alive connection
        if self._head_timer is not None:
            self._note_head(data)
        super().data_received(data)
        if self._messages:  # a head is complete (or refused as malformed): its request begins
            self._stop_head()

    def allow_slow_body(self, payload: StreamReader, seconds: float) -> None:
        """A route that takes large bodies (a file upload) gives its body `seconds` from now instead."""
        self._stop_body()
        if not payload.is_eof():
            self._body_timer = self._loop.call_later(seconds, self._body_late, payload)

    def request_started(self, payload: StreamReader) -> None:
        """From here only the body's timeout applies, and only while the body is still coming."""
        self._stop_head()
        if not payload.is_eof():
            self._body_timer = self._loop.call_later(self._config.body_timeout_s, self._body_late, payload)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        self._stop_body()
        response, reset = result
        if not reset and response.keep_alive and self.transport is not None:
            self._server.waiting(self)
        return result

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, or to an exception that escaped the app:
        the API's JSON error. Neither the log nor the answer repeats the parser's message, which
        quotes the request line or a header, and so maybe a key or a token."""
        if isinstance(exc, HttpProcessingError):
            status, code, text = self._malformed(exc)
            log.info("malformed request from %s: %d %s (%s)", request.remote, status, code, type(exc).__name__)
        elif isinstance(exc, ConnectionError):  # the client left mid-request: nobody to answer
            log.debug("client %s went away: %s", request.remote, exc)
            code, text = "client_gone", "the connection was lost"
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            code, text = "internal", HTTPStatus(status).phrase.lower()
        if not isinstance(exc, ConnectionError):
            metrics.error("http", code)
        if request.writer.output_size > 0:  # a response had begun: the connection can only close
            raise ConnectionError("cannot send an error response after a response has begun")
        response = error_response(status, code, text)
        response.force_close()
        return response

    def _malformed(self, exc: HttpProcessingError) -> tuple[int, str, str]:
        """The status, code and message for a request the parser refused."""
        if isinstance(exc, LineTooLong):
            if self._line_bytes > self.max_line_size:
                return 414, "uri_too_long", f"the request line is longer than {self.max_line_size} bytes"
            return 431, "headers_too_large", f"a header is longer than {self.max_field_size} bytes"
        if "Too many headers" in exc.message:
            return 431, "headers_too_large", f"the request has more than {self.max_headers} headers"
        return 400, "bad_request", "the request is not valid HTTP/1.1"

    def _note_head(self, data: bytes) -> None:
        self._head_bytes += len(data)
        if self._line_open:
            end = data.find(b"\n")
            self._line_bytes += len(data) if end < 0 else end
            self._line_open = end < 0

    def _waiting_for_request(self) -> bool:
        """aiohttp waits for a head, as its own keep-alive timer checks."""
        return self._waiter is not None and not self._waiter.done()

    def _start_head(self) -> None:
        self.keep_alive(True)  # cancels aiohttp's idle timer: the header timeout takes over
        self._head_bytes = self._line_bytes = 0
        self._line_open = True
        self._head_timer = self._loop.call_later(self._config.header_timeout_s, self._head_late)

    def _stop_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._messages or self.transport is None:
            return
        if self._head_bytes:  # a client that is sending learns why; an idle one is just closed
            message = f"the request head did not arrive within {self._config.header_timeout_s:g} s"
            self.transport.write(_raw_error(408, "header_timeout", message))
            metrics.error("http", "header_timeout")
        metrics.connection_closed("header_timeout")
        self.force_close()  # the transport sends what it was given before it closes

    def _body_late(self, payload: StreamReader) -> None:
        self._body_timer = None
        if not payload.is_eof():
            payload.set_exception(BodyTimeout(
                f"the request body did not arrive within {self._config.body_timeout_s:g} s"))


def _raw_error(status: int, code: str, message: str) -> bytes:
    """A JSON error written straight to a connection that has no request to answer through aiohttp."""
    body = error_body(code, message).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body
