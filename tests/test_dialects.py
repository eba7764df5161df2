"""The legacy WebSocket dialects (adapters/dialects.py), each driven by a client written from its message
shapes alone, as the pages of the servers they replace drive them."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from client import ServerProcess, health
from speech import pcm16, recording, webm_opus, wer
from vendor import chunked, paced, spoken

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(private_network, tmp_path_factory):
    proc = ServerProcess("--max-sessions", "6", "--idle-timeout-s", "6",
                         "--data-dir", str(tmp_path_factory.mktemp("dialects-data")))
    yield proc
    assert proc.stop() == 0, proc.log()


async def received(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Every message until the server closes."""
    return [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]


async def test_ws_transcribe(server):
    """Binary PCM, then base64 PCM at another rate; partials and finals as `transcription` messages with an
    ISO 8601 timestamp; bad messages get `error` and the session goes on."""
    said = spoken("ls-61-70968-0000", "ls-61-70968-0002")
    more = recording("ls-1221-135766-0002")
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/ws/transcribe") as ws:
        hello = json.loads((await ws.receive(timeout=10)).data)
        assert hello["type"] == "connection" and hello["status"] == "connected" and hello["model"] and hello["message"]
        # Twice as fast as said; 3201 bytes: a sample is cut between two messages.
        await paced(chunked(pcm16(said.audio), 3201), 0.1, ws.send_bytes, speed=2)
        await ws.send_json({"type": "audio", "data": "%%%"})
        await ws.send_str("[")
        audio = pcm16(np.concatenate([more.audio, np.zeros(16000, np.float32)]), 8000)
        for chunk in chunked(audio, 1600):
            await ws.send_json({"type": "audio", "data": base64.b64encode(chunk).decode(), "sampleRate": 8000})
            await asyncio.sleep(0.01)
        await ws.send_json({"type": "stop"})
        messages = await received(ws)
        assert ws.close_code == 1000
    errors = [m for m in messages if m["type"] == "error"]
    assert len(errors) == 2 and all(set(e) == {"type", "message"} for e in errors)
    texts = [m for m in messages if m["type"] == "transcription"]
    assert all(set(m) == {"type", "text", "timestamp", "isFinal"} for m in texts)
    assert all(datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00")).tzinfo for m in texts)
    assert any(not m["isFinal"] for m in texts)
    hypothesis = " ".join(m["text"] for m in texts if m["isFinal"])
    reference = f"{said.reference} {more.text}"
    print(f"\nREF: {reference}\nHYP: {hypothesis}")
    assert wer([(reference, hypothesis)]) <= 0.15


@pytest.mark.parametrize("audio", ["webm", "pcm"])
async def test_v1_transcriptions(server, audio):
    """The start action, answered with the session's id; MediaRecorder's WebM/Opus chunks or raw PCM (the
    first bytes tell); `partial` and `final` messages; the stop action."""
    said = spoken("librivox-ss01-0870", "ls-61-70968-0002")
    data = webm_opus(said.audio) if audio == "webm" else pcm16(said.audio)
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url + "/v1/transcriptions") as ws:
        await ws.send_json({"action": "start", "language": "en"})
        started = json.loads((await ws.receive(timeout=10)).data)
        assert set(started) == {"session_id"} and len(started["session_id"]) == 32
        chunks = chunked(data, 4000)
        await paced(chunks, said.seconds / len(chunks), ws.send_bytes, speed=2)
        await ws.send_json({"action": "stop"})
        messages = await received(ws)
    assert all(len(m) == 1 and set(m) <= {"partial", "final"} for m in messages), messages
    assert any("partial" in m for m in messages)
    hypothesis = " ".join(m["final"] for m in messages if "final" in m)
    print(f"\nREF: {said.reference}\nHYP: {hypothesis}")
    assert wer([(said.reference, hypothesis)]) <= 0.15


async def test_v1_transcriptions_refusals(server):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(server.url + "/v1/transcriptions") as ws:
            await ws.send_json({"action": "start", "language": "xx"})
            messages = await received(ws)
            assert list(messages[0]) == ["error"] and "xx" in messages[0]["error"] and ws.close_code == 1008
        async with http.ws_connect(server.url + "/v1/transcriptions") as ws:
            await ws.send_json({"action": "start"})
            await ws.receive(timeout=10)
            await ws.send_bytes(b"\x1a\x45\xdf\xa3" + bytes(4000))  # WebM's magic, nothing after it
            await ws.send_json({"action": "stop"})
            messages = await received(ws)
            assert messages and list(messages[0]) == ["error"] and ws.close_code == 1003, messages


async def test_ws_with_saved_transcript(server):
    """Base64 PCM in `payload`, the control stop, `transcript` messages, then `saved` with the route of the
    saved transcript, which serves what was said."""
    said = spoken("jfk-inaugural-ask-not")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(server.url + "/ws") as ws:
            for chunk in chunked(pcm16(said.audio), 6400):  # 200 ms, twice as fast as it is said
                await ws.send_json({"type": "audio", "payload": base64.b64encode(chunk).decode()})
                await asyncio.sleep(0.1)
            await ws.send_json({"type": "audio", "payload": "not base64"})
            await ws.send_json({"type": "control", "action": "stop"})
            messages = await received(ws)
        errors = [m for m in messages if m["type"] == "error"]
        assert len(errors) == 1 and errors[0]["message"]
        texts = [m for m in messages if m["type"] == "transcript"]
        assert all(set(m) == {"type", "text", "is_final"} for m in texts) and any(not m["is_final"] for m in texts)
        assert messages[-1]["type"] == "saved", messages[-1]
        hypothesis = " ".join(m["text"] for m in texts if m["is_final"])
        async with http.get(server.url + messages[-1]["key"], params={"format": "txt"}) as r:
            assert r.status == 200
            saved = await r.text()
    print(f"\nREF: {said.reference}\nHYP: {hypothesis}\nSAVED: {saved}")
    assert wer([(said.reference, hypothesis)]) <= 0.15
    assert wer([(said.reference, saved)]) <= 0.15


async def test_legacy_routes_are_guarded_like_v1(private_network):
    """Access control covers the dialects' paths outside /v1/ too."""
    keyed = ServerProcess("--api-key", "k-dialects", "--data-dir", "")
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/ws", "/ws/transcribe", "/v1/transcriptions"):
                r = await http.get(keyed.url + path)
                assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized", path
            async with http.ws_connect(keyed.url + "/ws/transcribe",
                                       headers={"Authorization": "Bearer k-dialects"}) as ws:
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "connection"
                await ws.send_json({"type": "stop"})
                assert await received(ws) == []
        assert (await health(keyed.url))["sessions"] == 0
    finally:
        assert keyed.stop() == 0, keyed.log()
