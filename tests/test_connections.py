"""Hostile HTTP clients against a real server: slow heads and bodies, connections held open
without a request, and the descriptor limit. Sessions themselves are neither cut nor counted.

Settings go in the environment rather than as flags, so that a server without them still starts
and these tests show what it does. Each timing check waits many times the timeout at stake, and
checks what happened to the connection, not how fast."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from client import HOST, ServerProcess, SSEClient, WSClient

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "k-9c1e7f0b6a5d4e3f2a1b0c9d8e7f6a5b"
BEARER = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 3  # the short server's header, body and keep-alive timeouts
PATIENCE_S = 30  # how long a test waits for the server to close a connection: ten times TIMEOUT_S
CAP = 4  # the capped server's --max-pending-connections


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A server with access control and short timeouts (and the default connection cap)."""
    proc = ServerProcess("--api-key", KEY, env={
        "STT_HEADER_TIMEOUT_S": str(TIMEOUT_S), "STT_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "STT_KEEPALIVE_TIMEOUT_S": str(TIMEOUT_S)})
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def capped():
    """A server that keeps few connections without a request, and times none out during a test."""
    proc = ServerProcess(env={"STT_MAX_PENDING_CONNECTIONS": str(CAP), "STT_HEADER_TIMEOUT_S": "120",
                              "STT_KEEPALIVE_TIMEOUT_S": "120"})
    yield proc
    assert proc.stop() == 0, proc.log()


class Raw:
    """A TCP connection that sends bytes as told and keeps what comes back until the server closes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.received = bytearray()
        self._reader = reader
        self._reading = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, server: ServerProcess) -> Raw:
        return cls(*await asyncio.open_connection(HOST, server.port))

    async def _read(self) -> None:
        try:
            while chunk := await self._reader.read(65536):
                self.received += chunk
        except ConnectionError:  # closed with bytes of ours unread: what came before is kept
            pass

    @property
    def closed(self) -> bool:
        return self._reading.done()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, data: bytes, every_s: float = 0.25) -> None:
        """A byte every `every_s` until the server answers or closes, or PATIENCE_S passes."""
        deadline = time.monotonic() + PATIENCE_S
        for byte in data:
            if self.received or self.closed or time.monotonic() > deadline:
                return
            try:
                await self.send(bytes([byte]))
            except ConnectionError:
                return
            await asyncio.sleep(every_s)

    async def wait_closed(self, timeout: float = PATIENCE_S) -> bool:
        """Whether the server closed the connection within `timeout`."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reading), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def response(self) -> tuple[int, dict[str, str], Any]:
        """The first response received: status, headers (lowercase names), JSON body."""
        head, _, body = bytes(self.received).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        return int(lines[0].split()[1]), headers, json.loads(body[:length])

    def close(self) -> None:
        self.writer.close()
        self._reading.cancel()


@pytest_asyncio.fixture(loop_scope="module")
async def raw() -> AsyncIterator[list[Raw]]:
    """Connections a test opens; closed after it."""
    opened: list[Raw] = []
    yield opened
    for connection in opened:
        connection.close()


async def connect(server: ServerProcess, opened: list[Raw]) -> Raw:
    connection = await Raw.open(server)
    opened.append(connection)
    return connection


def assert_error(response: tuple[int, dict[str, str], Any], status: int, code: str) -> None:
    got, headers, body = response
    assert got == status, body
    assert headers["content-type"].startswith("application/json"), headers
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body


async def test_a_head_sent_a_byte_at_a_time_gets_408_and_is_closed(short, raw):
    connection = await connect(short, raw)
    await connection.trickle(b"POST /v1/rtc HTTP/1.1\r\nHost: stt\r\nContent-Type: application/sdp\r\n"
                             + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n")
    assert await connection.wait_closed(), f"still open after {PATIENCE_S}s"
    assert_error(connection.response(), 408, "header_timeout")


async def test_a_connection_that_sends_nothing_is_closed(short, raw):
    connection = await connect(short, raw)
    assert await connection.wait_closed(), f"still open after {PATIENCE_S}s"
    assert connection.received == b""  # nothing was asked, so nothing is answered


async def test_keep_alive_serves_prompt_requests_then_closes_when_idle(short, raw):
    connection = await connect(short, raw)
    request = b"GET /health HTTP/1.1\r\nHost: stt\r\n\r\n"
    for _ in range(2):  # a head in pieces, then a second request after a short pause: both served
        await connection.send(request[:10])
        await asyncio.sleep(0.1)
        await connection.send(request[10:])
        while not connection.received.endswith(b"}") and not connection.closed:
            await asyncio.sleep(0.05)
        assert connection.received.startswith(b"HTTP/1.1 200 "), connection.received
        connection.received.clear()
        await asyncio.sleep(0.5)
    assert await connection.wait_closed(), f"an idle keep-alive connection still open after {PATIENCE_S}s"
    assert connection.received == b""


@pytest.mark.parametrize("path, content_type, body", [
    ("/v1/rtc", "application/sdp", b"v=0\r\na=x-slow:" + b"s" * 500 + b"\r\n"),
    ("/v1/tokens", "application/json", b'{"ttl_s": 60' + b" " * 500 + b"}"),
], ids=["offer", "token"])
async def test_a_body_sent_a_byte_at_a_time_gets_408_and_is_closed(short, raw, path, content_type, body):
    connection = await connect(short, raw)
    await connection.send(f"POST {path} HTTP/1.1\r\nHost: stt\r\nAuthorization: Bearer {KEY}\r\n"
                          f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    await connection.trickle(body)
    assert await connection.wait_closed(), f"still open after {PATIENCE_S}s"
    assert_error(connection.response(), 408, "body_timeout")


async def test_sessions_outlive_every_timeout(short):
    """A WebSocket session and its SSE watcher are open much longer than the timeouts, then end
    as usual: the timeouts are for requests still arriving, not for streams."""
    ws = WSClient(short.url, headers=BEARER)
    watcher: SSEClient | None = None
    try:
        await ws.connect()
        await ws.send({"type": "start"})
        started = await ws.wait_type("session.started", timeout=10)
        watcher = SSEClient(short.url, started["session_id"], headers=BEARER)
        await watcher.connect()
        await asyncio.sleep(3 * TIMEOUT_S)
        assert ws.close_code is None and not ws.ws.closed
        await ws.send(b"\0\0" * 16000)  # a second of silence: the session still takes audio
        await ws.stop()
        await watcher.ended(timeout=10)
        assert watcher.of_type("session.ended") == [{"type": "session.ended", "reason": "stop"}]
    finally:
        await ws.close()
        if watcher is not None:
            await watcher.close()


async def test_connections_without_a_request_are_capped_oldest_first(capped, raw):
    idle = []
    for _ in range(CAP):
        idle.append(await connect(capped, raw))
        await asyncio.sleep(0.2)  # accepted in this order
    client = await connect(capped, raw)  # one more: the oldest idle one makes room
    await client.send(b"GET /health HTTP/1.1\r\nHost: stt\r\nConnection: close\r\n\r\n")
    assert await client.wait_closed(10)
    assert client.received.startswith(b"HTTP/1.1 200 "), client.received
    assert await idle[0].wait_closed(10), "the oldest connection without a request is still open"
    for connection in idle[1:]:  # the header timeout is two minutes: nothing else closes them
        assert not await connection.wait_closed(0.5)


async def test_sessions_do_not_count_against_the_cap(capped, raw):
    ws = WSClient(capped.url)
    watcher: SSEClient | None = None
    try:
        await ws.connect()
        await ws.send({"type": "start"})
        started = await ws.wait_type("session.started", timeout=10)
        watcher = SSEClient(capped.url, started["session_id"])
        await watcher.connect()
        idle = [await connect(capped, raw) for _ in range(2 * CAP)]  # the first CAP are closed for the rest
        assert all([await connection.wait_closed(10) for connection in idle[:CAP]])
        assert ws.close_code is None and not ws.ws.closed
        await ws.stop()
        await watcher.ended(timeout=10)
        assert watcher.of_type("session.ended") == [{"type": "session.ended", "reason": "stop"}]
    finally:
        await ws.close()
        if watcher is not None:
            await watcher.close()


def open_file_limit(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


async def test_the_open_file_limit_is_raised_and_checked():
    """Started with `ulimit -n` at 256 and a hard limit of 512: the server takes the 512, and
    warns that its defaults (512 connections without a request alone) need more."""
    proc = await asyncio.to_thread(ServerProcess, nofile=(256, 512))
    try:
        assert open_file_limit(proc.proc.pid) == (512, 512)
        line = await proc.wait_log("open-file limit is 512")
        assert "WARNING" in line and "--max-pending-connections 512" in line, line
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.log()


# Requests the parser refuses, each with a credential where aiohttp's own message would quote it.
MALFORMED = {
    "long URL": (b"GET /v1/ws?token=" + KEY.encode() + b"&pad=" + b"p" * 9000 + b" HTTP/1.1\r\nHost: stt\r\n\r\n",
                 414, "uri_too_long"),
    "long header": (b"GET /v1/sessions HTTP/1.1\r\nHost: stt\r\nAuthorization: Bearer " + KEY.encode()
                    + b"p" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    "many headers": (b"GET /v1/sessions HTTP/1.1\r\nHost: stt\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
                     + b"".join(b"X-Pad-%d: p\r\n" % i for i in range(200)) + b"\r\n", 431, "headers_too_large"),
    "bad header": (b"GET /v1/ws?token=" + KEY.encode() + b" HTTP/1.1\r\nHost: stt\r\nBad Header: "
                   + KEY.encode() + b"\r\n\r\n", 400, "bad_request"),
}


async def log_lines_with(server: ServerProcess, text: str, count: int, timeout: float = 10) -> None:
    """Until the server's log has `count` lines with `text`."""
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"fewer than {count} lines with {text!r}:\n{server.log()}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("request_bytes, status, code", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_gets_a_json_error_and_one_quiet_log_line(short, raw, request_bytes, status, code):
    logged = short.log().count("malformed request")
    connection = await connect(short, raw)
    await connection.send(request_bytes)
    assert await connection.wait_closed(10)
    assert_error(connection.response(), status, code)
    await log_lines_with(short, "malformed request", logged + 1)
    line = [line for line in short.log().splitlines() if "malformed request" in line][-1]
    assert f"{status} {code}" in line, line
    assert KEY not in short.log() and "Traceback" not in short.log()


async def test_a_client_leaving_mid_body_is_no_error(short, raw):
    connection = await connect(short, raw)
    await connection.send(f"POST /v1/tokens HTTP/1.1\r\nHost: stt\r\nAuthorization: Bearer {KEY}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
    await asyncio.sleep(0.5)
    connection.close()
    deadline = time.monotonic() + 3  # the server hears of it at once; a traceback would be there by then
    while time.monotonic() < deadline:
        assert "Traceback" not in short.log() and "unhandled error" not in short.log(), short.log()
        await asyncio.sleep(0.1)
