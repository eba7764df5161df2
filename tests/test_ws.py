"""End to end over the WebSocket transport (GET /v1/ws): real aiohttp clients send real speech."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from client import (AudioForm, RTCClient, ServerProcess, SpeechTrack, WSClient, audio_message, check_protocol,
                    check_transcript, health, wait_sessions)
from speech import GAP_S, Recording, load_devset, pcm16, recording, split_by_duration, webm_opus, wer, with_pauses

# One event loop for the module: the streaming session outlives each test that runs beside it.
pytestmark = pytest.mark.asyncio(loop_scope="module")

RATE = 16000
LEAD_S = 0.5  # silence before the first word, as a microphone that was just opened gives
MAX_MESSAGE = 1 << 20  # protocol.MAX_AUDIO_BYTES


def lead(audio: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), audio])


def by_recording(finals: list[dict[str, Any]], recordings: list[Recording]) -> list[str]:
    """For lead(with_pauses(recordings)): the joined finals that fall in each recording's stretch."""
    bounds, t = [], LEAD_S
    for r in recordings[:-1]:
        t += r.seconds
        bounds.append(t + GAP_S / 2)
        t += GAP_S
    texts: list[list[str]] = [[] for _ in recordings]
    for f in finals:
        texts[int(np.searchsorted(bounds, (f["start"] + f["end"]) / 2))].append(f["text"])
    return [" ".join(t) for t in texts]


@dataclass
class Streaming:
    client: WSClient
    recording: Recording
    spoken: asyncio.Event  # set once the recording has been sent; silence follows
    microphone: asyncio.Task


async def check_still_streaming(streaming: Streaming, base_url: str, sessions: int = 1) -> None:
    """The other session was not disturbed, and the refused client left no session behind."""
    assert not streaming.client.of_type("session.ended")
    assert not streaming.client.of_type("error")
    assert (await health(base_url))["sessions"] == sessions


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def streaming(server) -> AsyncIterator[Streaming]:
    """A WebSocket session that streams JFK in real time while the bad inputs below are sent."""
    await wait_sessions(server.url, 0, timeout=10)
    jfk = recording("jfk-inaugural-ask-not")
    client = WSClient(server.url)
    await client.connect()
    await client.send({"type": "start"})
    await client.wait_type("session.started", timeout=10)
    spoken = asyncio.Event()

    async def microphone() -> None:
        await client.speak(pcm16(lead(jfk.audio)))
        spoken.set()
        # Then silence, as an open microphone: the session must not end as idle while the tests run.
        await client.speak(pcm16(np.zeros(120 * RATE, np.float32)))

    task = asyncio.create_task(microphone())
    yield Streaming(client, jfk, spoken, task)
    task.cancel()
    await client.close()


async def test_bad_messages_get_error_events_and_the_session_goes_on(server, streaming):
    golden = recording("ls-61-70968-0000")
    audio = pcm16(golden.audio)
    half = len(audio) // 4 * 2  # mid-sentence, on a sample boundary
    client = WSClient(server.url)
    try:
        await client.connect()
        await client.send({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le"})
        await client.wait_type("session.started", timeout=10)
        await client.speak(audio[:half], realtime=False)
        bad: list[tuple[bytes | str | dict[str, Any], str]] = [
            ("not json{", "bad_message"),
            ("[" * 60000, "bad_message"),  # nested past the parser's recursion limit
            ({"type": "dance"}, "unknown_message"),
            ({"type": "audio", "data": "not base64!"}, "bad_base64"),
            ({"type": "audio", "payload": 1234}, "bad_base64"),
            (b"\x01\x02\x03", "odd_length"),  # if kept, every later sample would be misaligned
            ({"type": "start"}, "already_started"),
        ]
        for sent, code in bad:
            seen = len(client.events)
            await client.send(sent)
            error = await client.wait_type("error", timeout=5, after=seen)
            assert error["code"] == code and error["message"], (sent, error)
        assert "dance" in client.of_type("error")[2]["message"]
        await client.speak(audio[half:] + pcm16(np.zeros(RATE, np.float32)), realtime=False)
        await client.stop()
    finally:
        await client.close()
    hypothesis = " ".join(f["text"] for f in client.of_type("transcript.final"))
    print(f"\nREF: {golden.text}\nHYP: {hypothesis}")
    assert wer([(golden.text, hypothesis)]) <= 0.2
    await wait_sessions(server.url, 1, timeout=5)
    await check_still_streaming(streaming, server.url)


@pytest.mark.parametrize("start, code, close_code", [
    ({"sample_rate": 7999}, "unsupported_rate", 1003),
    ({"sample_rate": 48001}, "unsupported_rate", 1003),
    ({"sample_rate": "16000"}, "unsupported_rate", 1003),
    ({"encoding": "mp3"}, "unsupported_encoding", 1003),
    ({"colour": "red"}, "unknown_option", 1008),
    ({"endpoint_ms": 50}, "bad_option", 1008),
])
async def test_refused_start(server, streaming, start, code, close_code):
    client = WSClient(server.url)
    try:
        await client.connect()
        await client.send({"type": "start", **start})
        assert await client.closed(timeout=5) == close_code
    finally:
        await client.close()
    assert [r.event["type"] for r in client.events] == ["error"]
    assert client.events[0].event["code"] == code and client.events[0].event["message"]
    await check_still_streaming(streaming, server.url)


@pytest.mark.parametrize("when", ["first message", "after speech", "base64 after speech",
                                  "over 4 MiB after speech"])
async def test_too_large_message_ends_the_session_after_its_finals(server, streaming, when):
    """Past 4 MiB aiohttp stops reading the message: the session still ends as for any too large."""
    golden = recording("ls-61-70968-0002")
    too_large = bytes((4 * MAX_MESSAGE if when.startswith("over") else MAX_MESSAGE) + 2)
    client = WSClient(server.url)
    try:
        await client.connect()
        if when == "first message":
            await client.send(too_large)
        else:
            await client.send({"type": "start"})
            await client.speak(pcm16(golden.audio), realtime=False)
            await client.send(audio_message(too_large, "data" if when.startswith("base64") else "binary"))
        ended = await client.wait_type("session.ended", timeout=20)
        assert await client.closed(timeout=10) == 1008
    finally:
        await client.close()
    events = [r.event for r in client.events]
    assert events[0]["type"] == "session.started"
    errors = client.of_type("error")
    assert [e["code"] for e in errors] == ["too_large"] and errors[0]["message"]
    assert events[-1] == ended and ended["reason"] == "error"
    if when != "first message":
        # What was said before the refused message is still transcribed, and comes before the end.
        final = client.of_type("transcript.final")
        assert len(final) == 1 and wer([(golden.text, final[0]["text"])]) <= 0.2, final
    await wait_sessions(server.url, 1, timeout=5)
    await check_still_streaming(streaming, server.url)


@pytest.mark.parametrize("query, code", [
    ({"endpoint_ms": "abc"}, "bad_option"), ({"partials": "maybe"}, "bad_option"),
    ({"language": "xx"}, "bad_option"), ({"colour": "red"}, "unknown_option"),
])
async def test_bad_query_option_is_400_on_the_handshake(server, streaming, query, code):
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.url + "/v1/ws", params=query)
        assert refused.value.status == 400
        # The same handshake by hand, to read the JSON error a client library hides.
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}
        async with http.get(server.url + "/v1/ws", params=query, headers=upgrade) as r:
            assert r.status == 400
            body = await r.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    await check_still_streaming(streaming, server.url)


async def test_bad_webm_is_refused(server, streaming):
    client = WSClient(server.url)
    try:
        await client.connect()
        await client.send({"type": "start", "encoding": "webm"})
        await client.wait_type("session.started", timeout=10)
        await client.send(b"this is not a WebM stream" * 100)
        await client.send({"type": "stop"})
        ended = await client.wait_type("session.ended", timeout=10)
        assert await client.closed(timeout=10) == 1003
    finally:
        await client.close()
    assert [e["code"] for e in client.of_type("error")] == ["bad_audio"]
    assert client.events[-1].event == ended and ended["reason"] == "error"
    await wait_sessions(server.url, 1, timeout=5)
    await check_still_streaming(streaming, server.url)


async def test_streaming_session_was_not_disturbed(server, streaming):
    client = streaming.client
    await asyncio.wait_for(streaming.spoken.wait(), timeout=30)
    await asyncio.sleep(1.0)  # the silence after the last word reaches the endpoint
    await client.wait_last_final(timeout=15)
    streaming.microphone.cancel()
    await client.stop()
    finals = check_protocol([r.event for r in client.events])
    hypothesis = " ".join(finals[n]["text"] for n in sorted(finals))
    print(f"\nREF: {streaming.recording.text}\nHYP: {hypothesis}")
    assert not client.of_type("error")
    assert wer([(streaming.recording.text, hypothesis)]) <= 0.2
    await wait_sessions(server.url, 0, timeout=5)


async def stream_devset(base_url: str, recordings: list[Recording], chunk_ms: int,
                        start: dict[str, Any] | None = None, query: dict[str, str] | None = None,
                        stop_message: dict[str, str] | None = None) -> WSClient:
    """A speaker reads the recordings into a live microphone, pausing between them, then stops."""
    client = WSClient(base_url, query)
    try:
        await client.connect()
        if start is not None:
            await client.send(start)
        audio = lead(with_pauses(recordings))
        await client.speak(pcm16(audio), chunk_ms=chunk_ms)
        await client.wait_last_final(timeout=15)
        await client.stop(stop_message)
    finally:
        await client.close()
    return client


async def test_devset_in_real_time(server):
    recordings = load_devset()
    groups = split_by_duration(recordings, 3)
    with_start, with_query, with_control_stop = await asyncio.gather(
        stream_devset(server.url, groups[0], chunk_ms=20, start={
            "type": "start", "language": "en", "sample_rate": RATE, "encoding": "pcm_s16le"}),
        # No start message: the first binary message starts a session with the query's options.
        stream_devset(server.url, groups[1], chunk_ms=100,
                      query={"language": "en", "partials": "false", "endpoint_ms": "600"}),
        stream_devset(server.url, groups[2], chunk_ms=50, start={"type": "start"},
                      stop_message={"type": "control", "action": "stop"}),
    )
    pairs = []
    for client, group in zip((with_start, with_query, with_control_stop), groups):
        events = [r.event for r in client.events]
        assert events[0]["language"] == "en"
        assert not client.of_type("error")
        pairs.append(check_transcript(events, group, partials=client is not with_query))
    error_rate = wer(pairs)
    print(f"devset WER over WebSocket in real time: {error_rate:.3f}")
    assert error_rate <= 0.12
    await wait_sessions(server.url, 0, timeout=5)


async def send_all(client: WSClient, start: dict[str, Any], messages: list[bytes | dict[str, str]]) -> None:
    """Everything as fast as the socket takes it, then stop."""
    try:
        await client.connect()
        await client.send(start)
        for m in messages:
            await client.send(m)
        await client.stop()
    finally:
        await client.close()


def pcm_messages(audio: np.ndarray, rate: int = RATE,
                 form: AudioForm = "binary") -> list[bytes | dict[str, str]]:
    data = pcm16(lead(audio), rate)
    step = rate * 2 // 10  # 100 ms
    return [audio_message(data[i : i + step], form) for i in range(0, len(data), step)]


def webm_messages(audio: np.ndarray) -> list[bytes | dict[str, str]]:
    """MediaRecorder's timeslices cut the stream anywhere, not at cluster boundaries."""
    data = webm_opus(lead(audio))
    sizes = [4096, 16384, 7001]
    out, i = [], 0
    while i < len(data):
        out.append(data[i : i + sizes[len(out) % len(sizes)]])
        i += len(out[-1])
    return out


async def test_input_formats(server):
    """8 and 48 kHz PCM, base64 JSON in either field, and MediaRecorder's WebM/Opus, side by side."""
    cases: list[tuple[str, dict[str, Any], Recording]] = []
    sessions = []
    for name, start, rec_id, make in [
        ("8 kHz PCM", {"sample_rate": 8000}, "ls-61-70968-0000", lambda a: pcm_messages(a, 8000)),
        ("48 kHz PCM", {"sample_rate": 48000}, "librivox-ss01-0870", lambda a: pcm_messages(a, 48000)),
        ("base64 'data'", {}, "librivox-ss01-0890", lambda a: pcm_messages(a, form="data")),
        ("base64 'payload'", {}, "librivox-ss01-0920", lambda a: pcm_messages(a, form="payload")),
        ("WebM/Opus", {"encoding": "webm"}, "jfk-inaugural-ask-not", webm_messages),
    ]:
        rec = recording(rec_id)
        client = WSClient(server.url)
        cases.append((name, start, rec))
        sessions.append((client, send_all(client, {"type": "start", **start}, make(rec.audio))))
    await asyncio.gather(*(s for _, s in sessions))
    failures = []
    for (name, _, rec), (client, _) in zip(cases, sessions):
        finals = check_protocol([r.event for r in client.events])
        hypothesis = " ".join(finals[n]["text"] for n in sorted(finals))
        error_rate = wer([(rec.text, hypothesis)])
        print(f"\n{name}: WER {error_rate:.3f}\nREF: {rec.text}\nHYP: {hypothesis}")
        if error_rate > 0.2 or client.of_type("error"):
            failures.append((name, error_rate, client.of_type("error")))
    assert not failures
    await wait_sessions(server.url, 0, timeout=5)


async def test_faster_than_real_time_keeps_every_final_and_gives_its_memory_back(private_network):
    """A client that sends the devset five times as fast as it can: backpressure, not a growing buffer."""
    recordings = load_devset() * 5
    audio = lead(with_pauses(recordings))
    data = pcm16(audio)
    dedicated = await asyncio.to_thread(ServerProcess)

    async def overload() -> tuple[WSClient, float, float]:
        client = WSClient(dedicated.url)
        try:
            await client.connect()
            await client.send({"type": "start"})
            started = time.monotonic()
            await client.speak(data, chunk_ms=100, realtime=False)
            sent = time.monotonic() - started
            # The socket buffers hold minutes of audio that the server has not read yet: its speed is
            # for bench/ to measure; here it only has to come to the end.
            await client.stop(timeout=audio.size / RATE)
            return client, sent, time.monotonic() - started
        finally:
            await client.close()

    async def settled_rss() -> float:
        # The server trims its heap a second after its last session ends (MemoryRelease).
        await wait_sessions(dedicated.url, 0, timeout=5)
        await asyncio.sleep(2)
        return dedicated.rss_mb()

    try:
        # The first session pays for what the server keeps once warm (thread arenas, decode buffers).
        await overload()
        before = await settled_rss()
        client, sent, took = await overload()
        after = await settled_rss()
    finally:
        code = await asyncio.to_thread(dedicated.stop)
    assert code == 0, dedicated.log()
    print(f"\n{audio.size / RATE:.0f}s of audio sent in {sent:.1f}s, transcribed in {took:.1f}s; "
          f"server RSS {before:.0f} MB after the same session before it, {after:.0f} MB after it")
    finals = check_protocol([r.event for r in client.events])
    assert not client.of_type("error")
    texts = by_recording([finals[n] for n in sorted(finals)], recordings)
    assert all(texts), [r.id for r, t in zip(recordings, texts) if not t]
    error_rate = wer(list(zip((r.text for r in recordings), texts)))
    print(f"devset x5 WER, faster than real time: {error_rate:.3f}")
    assert error_rate <= 0.12
    # Backpressure: the server reads no further while finals wait, so it never holds more than a
    # few utterances that are not transcribed yet. One 100 ms message ends at most one utterance.
    waiting = most = 0
    for e in (r.event for r in client.events):
        waiting += (e["type"] == "speech.stopped") - (e["type"] == "transcript.final")
        most = max(most, waiting)
    assert most <= 3, f"{most} utterances were waiting for their finals at once"
    # Nothing of an ended session stays behind: had the server kept this session's audio (float32, as
    # the pipeline holds it), it would hold that much more than after the same session before.
    kept = audio.nbytes / 2**20
    assert after - before < kept, f"{after - before:.1f} MB more after the session; its audio is {kept:.1f} MB"


@pytest.fixture(scope="module")
def small_server(private_network):
    """One session at a time, and a short idle timeout."""
    proc = ServerProcess("--max-sessions", "1", "--idle-timeout-s", "2")
    yield proc
    assert proc.stop() == 0, proc.log()


async def test_session_limit_closes_1013(small_server):
    first = WSClient(small_server.url)
    refused = WSClient(small_server.url)
    later = WSClient(small_server.url)
    microphone: asyncio.Task | None = None
    try:
        await first.connect()
        await first.send({"type": "start"})
        await first.wait_type("session.started", timeout=10)
        microphone = asyncio.create_task(first.speak(pcm16(np.zeros(30 * RATE, np.float32))))
        await refused.connect()
        assert await refused.closed(timeout=5) == 1013
        assert not [e for e in refused.events if e.event["type"] != "error"]
        # The limit is the server's, whatever the transport.
        rtc = RTCClient(small_server.url, track=SpeechTrack(np.zeros(0, np.float32)))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(small_server.url + "/v1/rtc", data=await rtc.offer(),
                                     headers={"Content-Type": "application/sdp"}) as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == "session_limit"
        finally:
            await rtc.close()
        microphone.cancel()
        await first.stop()
        await wait_sessions(small_server.url, 0, timeout=5)
        await later.connect()
        await later.send({"type": "start"})
        await later.wait_type("session.started", timeout=10)
        await later.stop()
    finally:
        if microphone is not None:
            microphone.cancel()
        for client in (first, refused, later):
            await client.close()


async def test_idle_socket_is_pinged_then_closed(small_server):
    client = WSClient(small_server.url)
    try:
        await client.connect(autoping=False)  # to see the server's pings
        await client.send({"type": "start"})
        await client.wait_type("session.started", timeout=10)
        await client.send(pcm16(np.zeros(RATE // 10, np.float32)))
        last_audio = time.monotonic()
        ended = await client.wait_type("session.ended", timeout=10)
        idle = time.monotonic() - last_audio
        assert await client.closed(timeout=5) == 1000
    finally:
        await client.close()
    assert ended["reason"] == "idle_timeout"
    assert client.close_reason == "idle_timeout"
    assert 2 <= idle < 4, idle
    assert client.pings >= 1
    await wait_sessions(small_server.url, 0, timeout=5)


async def test_silent_socket_is_closed_after_the_idle_timeout(small_server):
    """A client that connects and never says anything must not hold the socket forever."""
    client = WSClient(small_server.url)
    try:
        await client.connect()
        connected = time.monotonic()
        assert await client.closed(timeout=8) == 1000
        assert 2 <= time.monotonic() - connected < 4
        assert client.close_reason == "idle_timeout"
    finally:
        await client.close()
    await wait_sessions(small_server.url, 0, timeout=5)
