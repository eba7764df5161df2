"""A real server process and a real aiortc client, as a user's program would drive them."""

from __future__ import annotations

import asyncio
import base64
import fractions
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"
FRAME = 320  # 20 ms at 16 kHz, what a browser's Opus packetizer would carry


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """server.py in a subprocess, started the way the README says."""

    running: ClassVar[list[ServerProcess]] = []  # a failed test's report shows their logs (conftest)

    def __init__(self, *args: str, env: dict[str, str] | None = None, host: str = HOST,
                 wait: bool = True, prefix: tuple[str, ...] = (), nofile: tuple[int, int] | None = None) -> None:
        """`prefix`: a command that runs the server, such as nsenter into another mount namespace."""
        self.port = free_port(host)
        scheme = "https" if {"--self-signed", "--certfile"} & set(args) else "http"
        self.url = f"{scheme}://{host}:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"stt-server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(ROOT / "server.py"), "--host", host, "--port", str(self.port), *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            # The open-file limit (soft, hard) the server starts with, as a shell's `ulimit -n` sets it.
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None,
        )
        ServerProcess.running.append(self)
        if wait:
            self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        """Until GET /ready is 200: the model is loaded (GET /health answers before that)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                # Readiness only: the certificate itself is for the tests to check.
                unverified = ssl._create_unverified_context()
                with urllib.request.urlopen(self.url + "/ready", timeout=1, context=unverified) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not become ready:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text()

    def rss_mb(self) -> float:
        """The server's resident memory now (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def descriptors(self) -> int:
        """The server's open file descriptors now (Linux)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def audio_received_s(self) -> float:
        """Seconds of audio the server has received so far, every session and transport (GET /metrics)."""
        import urllib.request

        unverified = ssl._create_unverified_context()
        with urllib.request.urlopen(self.url + "/metrics", timeout=5, context=unverified) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("stt_audio_received_seconds_total{"))

    def hear_out(self, since: float, seconds: float, timeout: float) -> None:
        """Until the server has received `seconds` of audio more than `since`, or `timeout` passed.

        Chromium's fake microphone reads its file on a timer that skips the ticks it was too busy for,
        so on a starved machine the file plays slower than real time: waiting for its audio rather
        than for the clock keeps the end of the speech from being cut off.
        """
        deadline = time.monotonic() + timeout
        # The counter adds up fractions of a second: its sum may fall short of the exact total.
        while self.audio_received_s() - since < seconds - 0.001 and time.monotonic() < deadline:
            time.sleep(0.2)

    async def wait_log(self, text: str, timeout: float = 10) -> str:
        """The log line containing `text` (logging may trail the state change a little)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {text!r}:\n{self.log()}")
            await asyncio.sleep(0.1)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self in ServerProcess.running:
            ServerProcess.running.remove(self)
        return self.proc.returncode


class SpeechTrack(MediaStreamTrack):
    """A microphone that says `audio` in real time, then keeps sending silence like a real one."""

    kind = "audio"

    def __init__(self, audio: np.ndarray, lead_silence_s: float = 0.5) -> None:
        super().__init__()
        lead = np.zeros(int(lead_silence_s * 16000), np.float32)
        self._pcm = (np.clip(np.concatenate([lead, audio]), -1, 1) * 32767).astype(np.int16)
        self._sent = 0
        self._start: float | None = None
        self.speech_end_wall: float | None = None  # when the last sample of `audio` left
        self.speech_offset = lead.size / 16000

    @property
    def done(self) -> bool:
        return self._sent >= self._pcm.size

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._sent / 16000
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = self._pcm[self._sent : self._sent + FRAME]
        if chunk.size < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - chunk.size, np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, 16000)
        self._sent += FRAME
        if self.speech_end_wall is None and self.done:
            self.speech_end_wall = time.monotonic()
        return frame


@dataclass
class Received:
    event: dict[str, Any]
    at: float  # time.monotonic() on arrival


class EventLog:
    """Every event a client received, in order, and ways to wait for one."""

    events: list[Received]
    _changed: asyncio.Event

    def record(self, event: dict[str, Any]) -> None:
        self.events.append(Received(event, time.monotonic()))
        self._changed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r.event for r in self.events if r.event["type"] == kind]

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                       after: int = 0) -> Received:
        """The first event (from index `after`) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            for r in self.events[after:]:
                if predicate(r.event):
                    return r
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event in {timeout}s; got {[r.event for r in self.events]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_type(self, kind: str, timeout: float = 10, after: int = 0) -> dict[str, Any]:
        return (await self.wait_for(lambda e: e["type"] == kind, timeout, after)).event

    async def wait_last_final(self, timeout: float) -> None:
        """Until the utterance that started last has its final."""
        await self.wait_for(lambda e: e["type"] == "transcript.final"
                            and e["utterance"] == len(self.of_type("speech.started")), timeout)


@dataclass
class RTCClient(EventLog):
    """An aiortc peer that offers audio (+ a data channel) and records every event it gets."""

    base_url: str
    track: MediaStreamTrack | None = None
    data_channel: bool = True
    events: list[Received] = field(default_factory=list)
    configuration: RTCConfiguration | None = None  # ICE servers and policy; none by default

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection(self.configuration or RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("events") if self.data_channel else None
        self._changed = asyncio.Event()
        if self.channel is not None:
            self.channel.on("message", self._on_message)
        if self.track is not None:
            self.pc.addTrack(self.track)
        self.session_id: str | None = None
        self.location: str | None = None

    def _on_message(self, message: str) -> None:
        self.record(json.loads(message))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, form: str = "sdp", query: dict[str, str] | None = None,
                      fields: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> None:
        sdp = await self.offer()
        async with aiohttp.ClientSession(headers=headers) as http:
            if form == "sdp":
                r = await http.post(self.base_url + "/v1/rtc", data=sdp, params=query,
                                    headers={"Content-Type": "application/sdp"})
                assert r.status == 201, await r.text()
                assert r.content_type == "application/sdp"
                answer = await r.text()
            else:
                r = await http.post(self.base_url + "/v1/rtc", params=query,
                                    json={"type": "offer", "sdp": sdp, **(fields or {})})
                assert r.status == 201, await r.text()
                body = await r.json()
                assert body["type"] == "answer"
                answer = body["sdp"]
                self.session_id = body["session_id"]
            self.location = r.headers["Location"]
        self.session_id = self.session_id or self.location.rsplit("/", 1)[-1]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def heard_all(self, timeout: float = 15) -> None:
        """Until the track has said everything and its last utterance has its final: the
        microphone goes on with silence, so the last endpoint comes by itself."""
        while self.track is not None and not self.track.done:
            await asyncio.sleep(0.1)
        await self.wait_last_final(timeout)

    def send(self, message: Any) -> None:
        assert self.channel is not None
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def close(self) -> None:
        await self.pc.close()


AudioForm = Literal["binary", "data", "payload"]  # a binary message, or base64 in this JSON field


def audio_message(pcm: bytes, form: AudioForm) -> bytes | dict[str, str]:
    if form == "binary":
        return pcm
    return {"type": "audio", form: base64.b64encode(pcm).decode()}


class WSClient(EventLog):
    """A client of GET /v1/ws that records every event, and the code and reason the server closed with."""

    def __init__(self, base_url: str, query: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None, protocols: tuple[str, ...] = ()) -> None:
        self.base_url = base_url
        self.query = query
        self.headers = headers  # e.g. Authorization, Origin
        self.protocols = protocols  # Sec-WebSocket-Protocol values offered
        self.events = []
        self._changed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.pings = 0  # seen only with autoping off: aiohttp answers them itself otherwise
        self._http = aiohttp.ClientSession()
        self._reader: asyncio.Task | None = None

    async def connect(self, autoping: bool = True) -> None:
        self.ws = await self._http.ws_connect(self.base_url + "/v1/ws", params=self.query,
                                              autoping=autoping, headers=self.headers,
                                              protocols=self.protocols)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT:
                self.record(json.loads(message.data))
            elif message.type == aiohttp.WSMsgType.PING:
                self.pings += 1
                await self.ws.pong(message.data)
            elif message.type == aiohttp.WSMsgType.CLOSE:
                self.close_code, self.close_reason = message.data, message.extra
            elif message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):
                self.close_code = self.close_code or self.ws.close_code
                return

    async def send(self, message: bytes | str | dict[str, Any]) -> None:
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def speak(self, pcm: bytes, rate: int = 16000, chunk_ms: int = 20, realtime: bool = True,
                    form: AudioForm = "binary") -> None:
        """Sends PCM in chunks: paced like a live microphone, or as fast as the socket takes them."""
        step = rate * 2 * chunk_ms // 1000
        started = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), step)):
            if realtime:
                await asyncio.sleep(max(0.0, started + i * chunk_ms / 1000 - time.monotonic()))
            await self.send(audio_message(pcm[offset : offset + step], form))

    async def stop(self, message: dict[str, str] | None = None, timeout: float = 20) -> None:
        """Says stop: the last finals, session.ended (stop) as the last event, and a normal close."""
        await self.send(message or {"type": "stop"})
        assert (await self.wait_type("session.ended", timeout=timeout))["reason"] == "stop"
        assert await self.closed(timeout=10) == 1000
        assert self.events[-1].event["type"] == "session.ended"

    async def closed(self, timeout: float) -> int | None:
        """Waits until the server has closed the socket; its close code."""
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code

    async def close(self) -> None:
        if self._reader is not None:
            await self.ws.close()
            await self._reader
        await self._http.close()


async def say_over_ws(base_url: str, pcm: bytes, timeout: float = 30) -> WSClient:
    """One WebSocket session that says `pcm` as fast as the socket takes it, then half a second of silence,
    then stop; the client, closed, with every event it got."""
    client = WSClient(base_url)
    try:
        await client.connect()
        await client.speak(pcm + bytes(16000), realtime=False)
        await client.stop(timeout=timeout)
    finally:
        await client.close()
    return client


async def killed_mid_speech(server: ServerProcess, pcm: bytes, after_final: int) -> tuple[str, WSClient]:
    """A WebSocket session says `pcm` as a live microphone would, and the server is SIGKILLed the instant
    final number `after_final` arrives; the session's id and the client, closed, with what it got."""
    client = WSClient(server.url)
    speaking: asyncio.Task | None = None
    try:
        await client.connect()
        await client.send({"type": "start"})
        session_id = (await client.wait_type("session.started"))["session_id"]
        speaking = asyncio.create_task(client.speak(pcm))
        await client.wait_for(lambda e: e["type"] == "transcript.final" and e["utterance"] == after_final,
                              timeout=30)
        server.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(server.proc.wait, 10)
    finally:
        if speaking is not None:
            speaking.cancel()
        await client.close()
        server.stop()
    return session_id, client


class SSEClient(EventLog):
    """A subscriber of GET /v1/sessions/{id}/events that records every event until the stream ends."""

    def __init__(self, base_url: str, session_id: str, headers: dict[str, str] | None = None) -> None:
        self.url = f"{base_url}/v1/sessions/{session_id}/events"
        self.headers = headers  # e.g. Authorization
        self.events = []
        self._changed = asyncio.Event()
        self._http = aiohttp.ClientSession()
        self._reader: asyncio.Task | None = None

    async def connect(self) -> None:
        response = await self._http.get(self.url, headers=self.headers)
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        self._reader = asyncio.create_task(self._read(response))

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        name = data = None
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif not line and data is not None:
                assert data["type"] == name, (name, data)
                self.record(data)
                name = data = None

    async def ended(self, timeout: float) -> None:
        """Waits until the server has ended the stream."""
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._http.close()


async def rtc_session_watched(base_url: str, track: MediaStreamTrack) -> tuple[RTCClient, SSEClient]:
    """A WebRTC session that says all of `track` and stops, with an SSE subscriber from its start to its end."""
    client = RTCClient(base_url, track=track)
    subscriber: SSEClient | None = None
    try:
        await client.connect()
        subscriber = SSEClient(base_url, client.session_id)
        await subscriber.connect()
        await client.heard_all()
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=15)
        await subscriber.ended(timeout=10)
    finally:
        await client.close()
        if subscriber is not None:
            await subscriber.close()
    return client, subscriber


def check_protocol(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per-utterance order and shape of a session's events; returns the finals by utterance number."""
    assert events[0]["type"] == "session.started"
    assert events[0]["sample_rate"] == 16000 and events[0]["model"] and events[0]["session_id"]
    seen: dict[int, list[str]] = {}
    finals: dict[int, dict[str, Any]] = {}
    for e in events[1:]:
        if e["type"] in ("speech.started", "transcript.partial", "speech.stopped", "transcript.final"):
            seen.setdefault(e["utterance"], []).append(e["type"])
        if e["type"] == "transcript.partial":
            assert e["text"].split()[: len(e["stable"].split())] == e["stable"].split()
        if e["type"] == "transcript.final":
            assert e["utterance"] not in finals, "two finals for one utterance"
            finals[e["utterance"]] = e
            assert e["start"] < e["end"]
            for w in e["words"]:
                assert 0 <= w["probability"] <= 1
                assert e["start"] - 1.0 <= w["start"] <= w["end"] <= e["end"] + 1.0
    assert sorted(seen) == list(range(1, len(seen) + 1)), "utterances are numbered 1, 2, 3..."
    for n, kinds in seen.items():
        assert kinds[0] == "speech.started" and kinds[-2:] == ["speech.stopped", "transcript.final"], (n, kinds)
        assert set(kinds[1:-2]) <= {"transcript.partial"}, (n, kinds)
    assert events[-1] == {"type": "session.ended", "reason": "stop"}
    return finals


def check_transcript(events: list[dict[str, Any]], recordings, partials: bool = True) -> tuple[str, str]:
    """A devset session: its protocol, partials while long utterances are spoken (or none when
    they are off), and (reference, hypothesis) for the word error rate."""
    finals = check_protocol(events)
    for n, final in finals.items():
        shown = [e for e in events if e["type"] == "transcript.partial" and e["utterance"] == n]
        if not partials:
            assert not shown, "partials were turned off"
        elif final["end"] - final["start"] > 3:
            assert shown, f"no partial during the {final['end'] - final['start']:.1f}s utterance {n}"
    hypothesis = " ".join(finals[n]["text"] for n in sorted(finals))
    reference = " ".join(r.text for r in recordings)
    print(f"\nREF: {reference}\nHYP: {hypothesis}")
    return reference, hypothesis


async def health(base_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/health") as r:
            return await r.json()


async def wait_sessions(base_url: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (n := (await health(base_url))["sessions"]) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} sessions, expected {count} within {timeout}s")
        await asyncio.sleep(0.2)


CHROMIUM = Path("/usr/bin/chromium")


def launch_chromium(playwright, executable: Path, wav: Path, origin: str):
    """Debian's Chromium whose fake microphone plays `wav`, treating `origin` as secure.

    The background-networking flags keep it from calling out; the machine has no network.
    """
    return playwright.chromium.launch(executable_path=str(executable), args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        f"--unsafely-treat-insecure-origin-as-secure={origin}",
    ])
