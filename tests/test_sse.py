"""Server-Sent Events (GET /v1/sessions/{id}/events): a session's events, whatever its transport."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np

from client import RTCClient, SSEClient, SpeechTrack, WSClient, rtc_session_watched, wait_sessions
from speech import Recording, pcm16, recording, wer


async def subscribe(base_url: str, session_id: str) -> SSEClient:
    subscriber = SSEClient(base_url, session_id)
    await subscriber.connect()
    return subscriber


def transcript(events: list[dict[str, Any]]) -> str:
    return " ".join(e["text"] for e in events if e["type"] == "transcript.final")


async def rtc_with_channel(base_url: str, rec: Recording) -> tuple[list[dict[str, Any]], SSEClient]:
    client, subscriber = await rtc_session_watched(base_url, SpeechTrack(rec.audio))
    return [r.event for r in client.events], subscriber


async def websocket(base_url: str, rec: Recording) -> tuple[list[dict[str, Any]], SSEClient]:
    client = WSClient(base_url)
    subscriber: SSEClient | None = None
    try:
        await client.connect()
        await client.send({"type": "start"})
        started = await client.wait_type("session.started", timeout=10)
        subscriber = await subscribe(base_url, started["session_id"])
        silence = np.zeros(8000, np.float32)  # before and after the words, as a microphone hears
        await client.speak(pcm16(np.concatenate([silence, rec.audio, silence])))
        await client.wait_last_final(timeout=15)
        await client.stop()
        await subscriber.ended(timeout=10)
    finally:
        await client.close()
        if subscriber is not None:
            await subscriber.close()
    return [r.event for r in client.events], subscriber


async def test_subscriber_gets_what_the_sessions_own_channel_gets(server):
    """WebRTC and WebSocket side by side: the stream repeats the channel, from subscription to the end."""
    over_rtc = recording("ls-61-70968-0002")
    over_ws = recording("librivox-ss01-0890")
    results = await asyncio.gather(rtc_with_channel(server.url, over_rtc), websocket(server.url, over_ws))
    for (channel, subscriber), rec in zip(results, (over_rtc, over_ws)):
        streamed = [r.event for r in subscriber.events]
        print(f"\nREF: {rec.text}\nSSE: {transcript(streamed)}")
        # Subscribed after session.started, before any speech: everything after it, in order.
        assert streamed and streamed == channel[len(channel) - len(streamed):]
        assert channel[0]["type"] == "session.started" and len(streamed) == len(channel) - 1
        assert streamed[-1] == {"type": "session.ended", "reason": "stop"}
        assert wer([(rec.text, transcript(streamed))]) <= 0.2
    await wait_sessions(server.url, 0, timeout=5)


async def test_session_without_data_channel_is_heard_over_sse_and_deleted(server):
    """A WHIP publisher (OBS, ffmpeg) opens no data channel: its transcript comes over SSE."""
    rec = recording("librivox-ss01-0920")
    track = SpeechTrack(rec.audio)
    client = RTCClient(server.url, track=track, data_channel=False)
    try:
        await client.connect()
        assert "m=application" not in client.pc.localDescription.sdp
        subscriber = await subscribe(server.url, client.session_id)
        try:
            while not track.done:
                await asyncio.sleep(0.1)
            await subscriber.wait_last_final(timeout=15)
            async with aiohttp.ClientSession() as http:
                async with http.delete(server.url + client.location) as r:
                    assert r.status == 200
                    assert await r.json() == {"session_id": client.session_id, "reason": "deleted"}
            await subscriber.ended(timeout=10)
        finally:
            await subscriber.close()
    finally:
        await client.close()
    events = [r.event for r in subscriber.events]
    print(f"\nREF: {rec.text}\nSSE: {transcript(events)}")
    assert events[-1] == {"type": "session.ended", "reason": "deleted"}
    assert [e["type"] for e in events if e["type"] != "transcript.partial"][:3] == [
        "speech.started", "speech.stopped", "transcript.final"]
    assert wer([(rec.text, transcript(events))]) <= 0.2
    await wait_sessions(server.url, 0, timeout=5)


async def test_unknown_or_ended_session_is_404(server):
    client = WSClient(server.url)
    try:
        await client.connect()
        await client.send({"type": "start"})
        ended_id = (await client.wait_type("session.started", timeout=10))["session_id"]
        await client.stop()
    finally:
        await client.close()
    async with aiohttp.ClientSession() as http:
        for session_id in ("0" * 32, ended_id):
            async with http.get(f"{server.url}/v1/sessions/{session_id}/events") as r:
                assert r.status == 404
                assert r.content_type == "application/json"
                body = await r.json()
            assert body["error"]["code"] == "unknown_session" and body["error"]["message"], body
