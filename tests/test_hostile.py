"""Hostile and unlucky clients: each is answered clearly and costs the server nothing it keeps."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import pathlib
import re
import signal
import socket
import time
import tracemalloc

import aiohttp
import aiohttp.web
import numpy as np
import pytest
from aiortc import RTCSessionDescription

from client import HOST, RTCClient, ServerProcess, SpeechTrack, free_port, health, wait_sessions
from speech import data_recording, word_errors


@pytest.fixture(scope="module")
def one_slot(private_network):
    """One session at a time: a slot not freed in time is a refusal."""
    proc = ServerProcess("--max-sessions", "1", "--idle-timeout-s", "5", "--ice-timeout-s", "5")
    yield proc
    assert proc.stop() == 0, proc.log()


def silence() -> SpeechTrack:
    return SpeechTrack(np.zeros(0, np.float32), lead_silence_s=0)


async def post_offer(url: str, sdp: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/rtc", data=sdp, headers={"Content-Type": "application/sdp"}) as r:
            return r.status, await r.text()


async def test_extra_audio_tracks_are_refused_in_the_answer_and_cost_no_memory(one_slot):
    """Ten audio tracks offered, all sending: the first is transcribed, the answer refuses the other
    nine, and the server's memory does not grow with what they send."""
    speech = data_recording("arctic-aew-a0003")
    client = RTCClient(one_slot.url, track=SpeechTrack(speech.audio))
    for _ in range(9):
        client.pc.addTrack(silence())
    try:
        sdp = await client.offer()
        assert sdp.count("m=audio") == 10
        status, answer = await post_offer(one_slot.url, sdp)
        assert status == 201, answer
        audio = [s for s in answer.split("m=")[1:] if s.startswith("audio")]
        assert len(audio) == 10
        assert "a=recvonly" in audio[0]
        assert all("a=inactive" in s for s in audio[1:]), answer
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await client.heard_all()
        await asyncio.sleep(1)
        before = one_slot.rss_mb()  # the decode's own buffers are in by now: only silence follows
        await asyncio.sleep(8)
        grown = one_slot.rss_mb() - before
        print(f"server RSS grew {grown:.1f} MB in 8 s of ten tracks sending")
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=15)
    finally:
        await client.close()
    heard = " ".join(e["text"] for e in client.of_type("transcript.final"))
    assert word_errors(speech.text, heard)[0] <= 2, heard
    # An unread track's packets must not be queued: ten of them would add megabytes a second.
    assert grown < 15, f"RSS grew {grown:.1f} MB while nine extra tracks sent silence"
    await wait_sessions(one_slot.url, 0, timeout=10)


async def test_a_client_that_reconnects_on_session_ended_gets_the_slot(one_slot):
    """With one slot, a client offers again the moment session.ended arrives: the slot is already free."""
    refused = 0
    current = RTCClient(one_slot.url, track=silence())
    await current.connect()
    try:
        for _ in range(6):
            await current.wait_type("session.started", timeout=10)
            following = RTCClient(one_slot.url, track=silence())
            offer = await following.offer()  # ready before the stop, so nothing delays the next POST
            current.send({"type": "stop"})
            await current.wait_type("session.ended", timeout=15)
            status, answer = await post_offer(one_slot.url, offer)
            await current.close()
            if status != 201:
                refused += 1
                await following.close()
                await wait_sessions(one_slot.url, 0, timeout=10)
                following = RTCClient(one_slot.url, track=silence())
                await following.connect()
            else:
                await following.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            current = following
    finally:
        await current.close()
    assert refused == 0, f"{refused} of 6 reconnections on session.ended were refused"
    await wait_sessions(one_slot.url, 0, timeout=10)


def _without(sdp: str, pattern: str) -> str:
    return "\r\n".join(line for line in sdp.split("\r\n") if not re.match(pattern, line))


@pytest.mark.parametrize("case", ["no_fingerprint", "md5_fingerprint", "huge_port", "huge_candidate_port",
                                  "no_ice_credentials", "too_many_tracks"])
async def test_lenient_offers_are_refused_before_a_session_is_made(one_slot, case):
    client = RTCClient(one_slot.url, track=silence())
    if case == "too_many_tracks":
        for _ in range(16):
            client.pc.addTrack(silence())
    try:
        sdp = await client.offer()
    finally:
        await client.close()
    if case == "no_fingerprint":
        sdp = _without(sdp, r"a=fingerprint:")
    elif case == "md5_fingerprint":
        sdp = _without(sdp, r"a=fingerprint:sha-(384|512)")
        sdp = re.sub(r"a=fingerprint:sha-256 ([0-9A-F:]+)", lambda m: "a=fingerprint:md5 " + m.group(1)[:47], sdp)
    elif case == "huge_port":
        sdp = re.sub(r"m=audio \d+", "m=audio 12345678901234567890", sdp)
    elif case == "huge_candidate_port":
        sdp = re.sub(r"(a=candidate:\S+ \d \S+ \d+ \S+) \d+", r"\1 99999999999999999999", sdp)
    elif case == "no_ice_credentials":
        sdp = _without(sdp, r"a=ice-(ufrag|pwd):")
    status, body = await post_offer(one_slot.url, sdp)
    assert status == 400, body
    code = "too_many_tracks" if case == "too_many_tracks" else "bad_sdp"
    assert json.loads(body)["error"]["code"] == code, body
    assert (await health(one_slot.url))["sessions"] == 0
    assert "Task exception was never retrieved" not in one_slot.log()


class RawWebSocket:
    """A WebSocket client on a bare socket with a small receive buffer, which can stop reading."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    @staticmethod
    def frame(text: str) -> bytes:
        payload, mask = text.encode(), os.urandom(4)
        size = len(payload)
        header = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, *texts: str) -> None:
        try:
            self.sock.sendall(b"".join(self.frame(t) for t in texts))
        except ConnectionError:  # the server has cut this client off
            pass

    def close(self) -> None:
        self.sock.close()


async def wait_count(url: str, count: int, timeout: float) -> float:
    """Seconds until /health counts `count` sessions; fails past `timeout`."""
    started = time.monotonic()
    await wait_sessions(url, count, timeout)
    return time.monotonic() - started


async def wait_descriptors(proc: ServerProcess, most: int, timeout: float) -> float:
    started = time.monotonic()
    while (n := proc.descriptors()) > most:
        assert time.monotonic() - started < timeout, f"{n} descriptors open, {most} before the clients came"
        await asyncio.sleep(0.5)
    return time.monotonic() - started


@pytest.mark.parametrize("messages", [200, 20000])
async def test_a_websocket_client_that_never_reads_still_ends_and_shutdown_is_prompt(private_network, messages):
    """Clients with a small receive buffer send start, many messages that each bring an error event,
    then stop, and never read: their sessions end and their connections close (the bounded outbox or
    the write timeout cuts them). Then two such clients stay mid-session, and SIGTERM still stops the
    server within its grace."""
    # Pings come a third of the idle timeout apart, and a client that never reads never answers them:
    # with a long timeout, only the server's own write limits can end these sessions.
    proc = ServerProcess("--max-sessions", "2", "--idle-timeout-s", "600")
    clients = []
    try:
        baseline = proc.descriptors()
        for _ in range(2):
            client = RawWebSocket(proc.url)
            clients.append(client)
            client.send(json.dumps({"type": "start"}), *[json.dumps({"type": "x" * 1000})] * messages,
                        json.dumps({"type": "stop"}))
        ended = await wait_count(proc.url, 0, timeout=45)
        closed = await wait_descriptors(proc, baseline, timeout=45)
        for _ in range(2):
            client = RawWebSocket(proc.url)
            clients.append(client)
            client.send(json.dumps({"type": "start"}), *[json.dumps({"type": "x" * 60})] * 200)
        await wait_count(proc.url, 2, timeout=10)
        stopping = time.monotonic()
        proc.signal(signal.SIGTERM)
        await asyncio.to_thread(proc.proc.wait, 40)
        stopped = time.monotonic() - stopping
        print(f"{messages} messages: sessions ended in {ended:.1f}s, connections closed {closed:.1f}s later; "
              f"SIGTERM mid-session took {stopped:.1f}s")
        assert proc.proc.returncode == 0
        assert stopped < 20
    finally:
        for client in clients:
            client.close()
        proc.stop()


async def test_websocket_sessions_leave_nothing_behind(tmp_path):
    """What a WebSocket session allocates is freed when it ends: measured in the server's own process
    over 300 sessions after 50 of warm-up (aiohttp's heartbeat timer kept each whole connection alive)."""
    import server
    from config import Config

    port = free_port()
    config = Config.from_args(["--host", HOST, "--port", str(port), "--data-dir", str(tmp_path)])
    app = server.build_app(config)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, HOST, port).start()
        await server.load_model(app, config)
        url = f"http://{HOST}:{port}"

        async def session(http: aiohttp.ClientSession) -> None:
            async with http.ws_connect(url + "/v1/ws") as ws:
                await ws.send_str(json.dumps({"type": "start"}))
                await ws.send_str(json.dumps({"type": "stop"}))
                async for _ in ws:
                    pass

        logging.disable(logging.INFO)  # pytest keeps every record it captures: not the server's memory
        async with aiohttp.ClientSession() as http:
            for _ in range(50):
                await session(http)
            await asyncio.sleep(1)
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for _ in range(300):
                await session(http)
            await asyncio.sleep(1)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
        # pathlib interns each folder name: the interpreter's table of them grows once to its size.
        interned = [tracemalloc.Filter(False, pathlib.__file__)]
        stats = after.filter_traces(interned).compare_to(before.filter_traces(interned), "filename")
        grown = sum(s.size_diff for s in stats)
        print(f"{grown / 300:.0f} bytes kept per WebSocket session")
        assert grown / 300 < 1500, f"{grown / 300:.0f} bytes kept per WebSocket session"
    finally:
        logging.disable(logging.NOTSET)
        await runner.cleanup()


async def test_a_webrtc_peer_that_acknowledges_no_event_is_ended(one_slot):
    """A peer whose SCTP takes the server's events but never acknowledges them, while it sends messages
    that each bring an error event: the events it leaves unacknowledged are bounded, and its session ends."""
    from aiortc.rtcsctptransport import DataChunk

    client = RTCClient(one_slot.url, track=silence())
    try:
        await client.connect()
        await client.wait_type("session.started", timeout=10)
        sctp = client.pc.sctp
        hear = sctp._receive_chunk

        async def deaf(chunk) -> None:  # the server's data is dropped unacknowledged; the rest goes on
            if not isinstance(chunk, DataChunk):
                await hear(chunk)

        sctp._receive_chunk = deaf
        for _ in range(20000):
            client.send("not json")
        line = await one_slot.wait_log("reason=not_reading", timeout=60)
        assert "transport=webrtc" in line
        await wait_sessions(one_slot.url, 0, timeout=10)
    finally:
        await client.close()
