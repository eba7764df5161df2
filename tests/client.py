"""A real server process and a real aiortc client, as a user's program would drive them."""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"
FRAME = 320  # 20 ms at 16 kHz, what a browser's Opus packetizer would carry


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """server.py in a subprocess, started the way the README says."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"stt-server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--host", HOST, "--port", str(self.port), *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not become healthy:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text()

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


@dataclass
class RTCClient:
    """An aiortc peer that offers audio (+ a data channel) and records every event it gets."""

    base_url: str
    track: MediaStreamTrack | None = None
    data_channel: bool = True
    events: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("events") if self.data_channel else None
        self._changed = asyncio.Event()
        if self.channel is not None:
            self.channel.on("message", self._on_message)
        if self.track is not None:
            self.pc.addTrack(self.track)
        self.session_id: str | None = None
        self.location: str | None = None

    def _on_message(self, message: str) -> None:
        self.events.append(Received(json.loads(message), time.monotonic()))
        self._changed.set()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, form: str = "sdp", query: dict[str, str] | None = None,
                      fields: dict[str, Any] | None = None) -> None:
        sdp = await self.offer()
        async with aiohttp.ClientSession() as http:
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

    def send(self, message: Any) -> None:
        assert self.channel is not None
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

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

    async def close(self) -> None:
        await self.pc.close()


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
