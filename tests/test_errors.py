"""Every client error gets its specified answer while another session keeps transcribing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiortc import RTCSessionDescription

from client import RTCClient, ServerProcess, SpeechTrack, health, wait_sessions
from speech import Recording, recording, wer

# One event loop for the module: the streaming session outlives each test that runs beside it.
pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_OFFER_BYTES = 65536  # the server's default --max-offer-bytes


def silence() -> SpeechTrack:
    """A microphone in a quiet room: SpeechTrack sends silence once its audio is over."""
    return SpeechTrack(np.zeros(0, np.float32))


@dataclass
class Streaming:
    client: RTCClient
    track: SpeechTrack
    recording: Recording


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def streaming(server) -> AsyncIterator[Streaming]:
    """A session that streams JFK in real time while the errors below are provoked."""
    await wait_sessions(server.url, 0, timeout=10)
    jfk = recording("jfk-inaugural-ask-not")
    track = SpeechTrack(jfk.audio)
    client = RTCClient(server.url, track=track)
    await client.connect()
    await client.wait_type("session.started", timeout=10)
    yield Streaming(client, track, jfk)
    await client.close()


async def check_still_streaming(streaming: Streaming, base_url: str) -> None:
    """The other session was not disturbed, and the refused request left no session behind."""
    assert not streaming.client.of_type("session.ended")
    assert (await health(base_url))["sessions"] == 1


async def post(base_url: str, body: Any, content_type: str,
               query: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/v1/rtc", data=body, params=query,
                             headers={"Content-Type": content_type}) as r:
            return r.status, dict(r.headers), await r.json()  # refuses other content types


def assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


async def real_offer(base_url: str, audio: bool = True) -> str:
    """What a real aiortc client offers: Opus audio (or none) plus the events data channel."""
    client = RTCClient(base_url, track=silence() if audio else None)
    try:
        return await client.offer()
    finally:
        await client.close()


def keep_only_g711(sdp: str) -> str:
    """The offer of a client that can only send PCMU/PCMA: other payload types leave m=audio."""
    lines = sdp.split("\r\n")
    rtpmaps = {line[len("a=rtpmap:"):].split()[0]: line.split()[1].split("/")[0].upper()
               for line in lines if line.startswith("a=rtpmap:")}
    dropped = {pt for pt, codec in rtpmaps.items() if codec not in ("PCMU", "PCMA")}
    kept = []
    for line in lines:
        if line.startswith("m=audio "):
            words = line.split()
            line = " ".join(words[:3] + [pt for pt in words[3:] if pt not in dropped])
        elif line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")) and \
                line.split(":", 1)[1].split()[0] in dropped:
            continue
        kept.append(line)
    return "\r\n".join(kept)


async def test_garbage_sdp_is_400(server, streaming):
    status, _, body = await post(server.url, "this is not an offer\r\n", "application/sdp")
    assert status == 400
    assert_error(body, "bad_sdp")
    await check_still_streaming(streaming, server.url)


async def test_offer_without_audio_is_400(server, streaming):
    sdp = await real_offer(server.url, audio=False)
    assert "m=application" in sdp and "m=audio" not in sdp
    status, _, body = await post(server.url, sdp, "application/sdp")
    assert status == 400
    assert_error(body, "no_audio")
    await check_still_streaming(streaming, server.url)


async def test_offer_without_opus_is_400(server, streaming):
    original = await real_offer(server.url)
    sdp = keep_only_g711(original)
    assert "opus/48000" in original and "opus" not in sdp.lower()
    assert "PCMU/8000" in sdp and "PCMA/8000" in sdp
    status, _, body = await post(server.url, sdp, "application/sdp")
    assert status == 400
    assert_error(body, "no_opus")
    await check_still_streaming(streaming, server.url)


async def test_wrong_content_type_is_415(server, streaming):
    status, _, body = await post(server.url, await real_offer(server.url), "text/plain")
    assert status == 415
    assert_error(body, "unsupported_media_type")
    await check_still_streaming(streaming, server.url)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_offer_is_413(server, streaming, framing):
    offer = (await real_offer(server.url)).encode()
    padded = offer + b"a=x-padding:" + b"0" * (MAX_OFFER_BYTES - len(offer)) + b"\r\n"
    assert len(padded) > MAX_OFFER_BYTES

    async def chunks() -> AsyncIterator[bytes]:
        # Without a Content-Length the server can only tell by counting what it reads.
        for i in range(0, len(padded), 4096):
            yield padded[i:i + 4096]
            await asyncio.sleep(0)

    status, _, body = await post(server.url, padded if framing == "content-length" else chunks(),
                                 "application/sdp")
    assert status == 413
    assert_error(body, "too_large")
    await check_still_streaming(streaming, server.url)


async def test_offer_in_small_chunks_is_read_whole(server, streaming):
    """The counterpart of the chunked 413: a body that arrives piece by piece is read to its end."""
    client = RTCClient(server.url, track=silence())
    try:
        offer = (await client.offer()).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(offer), 256):
                yield offer[i:i + 256]
                await asyncio.sleep(0.01)

        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/rtc", data=chunks(),
                                 headers={"Content-Type": "application/sdp"}) as r:
                assert r.status == 201, await r.text()
                answer = await r.text()
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await client.wait_type("session.started", timeout=10)
        client.send({"type": "stop"})
        assert (await client.wait_type("session.ended", timeout=10))["reason"] == "stop"
    finally:
        await client.close()
    await wait_sessions(server.url, 1, timeout=5)
    await check_still_streaming(streaming, server.url)


async def test_malformed_json_is_400(server, streaming):
    status, _, body = await post(server.url, '{"type": "offer", "sdp": ', "application/json")
    assert status == 400
    assert_error(body, "bad_json")
    # Nested past the parser's recursion limit: a client error too, not a 500.
    status, _, body = await post(server.url, "[" * 60000, "application/json")
    assert status == 400
    assert_error(body, "bad_json")
    await check_still_streaming(streaming, server.url)


async def test_unknown_json_option_is_400(server, streaming):
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/rtc", json={
                "type": "offer", "sdp": await real_offer(server.url), "colour": "red"}) as r:
            status, body = r.status, await r.json()
    assert status == 400
    assert_error(body, "unknown_option")
    assert "colour" in body["error"]["message"]
    await check_still_streaming(streaming, server.url)


@pytest.mark.parametrize("query", [{"endpoint_ms": "abc"}, {"partials": "maybe"}, {"language": "xx"}])
async def test_bad_query_option_is_400(server, streaming, query):
    status, _, body = await post(server.url, await real_offer(server.url), "application/sdp", query)
    assert status == 400
    assert_error(body, "bad_option")
    await check_still_streaming(streaming, server.url)


async def test_delete_unknown_session_is_404(server, streaming):
    async with aiohttp.ClientSession() as http:
        async with http.delete(server.url + "/v1/rtc/" + "0" * 32) as r:
            assert r.status == 404
            assert r.content_type == "application/json"
            assert_error(await r.json(), "unknown_session")
    await check_still_streaming(streaming, server.url)


async def test_session_limit_is_503_with_retry_after(server, streaming):
    limited = await asyncio.to_thread(ServerProcess, "--max-sessions", "1")
    first, refused, later = (RTCClient(limited.url, track=silence()) for _ in range(3))
    try:
        await first.connect()
        await first.wait_type("session.started", timeout=10)
        status, headers, body = await post(limited.url, await refused.offer(), "application/sdp")
        assert status == 503
        assert int(headers["Retry-After"]) > 0
        assert_error(body, "session_limit")

        first.send({"type": "stop"})
        await first.wait_type("session.ended", timeout=10)
        await wait_sessions(limited.url, 0, timeout=5)
        await later.connect()  # 201 again once the first session is gone
        await later.wait_type("session.started", timeout=10)
        later.send({"type": "stop"})
        assert (await later.wait_type("session.ended", timeout=10))["reason"] == "stop"
    finally:
        for client in (first, refused, later):
            await client.close()
        code = await asyncio.to_thread(limited.stop)
    assert code == 0, limited.log()
    await check_still_streaming(streaming, server.url)


async def test_bad_data_channel_messages_get_error_events(server, streaming):
    golden = recording("ls-61-70968-0002")  # one short sentence: one utterance, one final
    # Speech starts after the bad messages: the transcript shows the session went on.
    client = RTCClient(server.url, track=SpeechTrack(golden.audio, lead_silence_s=1.5))
    try:
        await client.connect(form="json")
        await client.wait_type("session.started", timeout=10)
        client.send("not json{")
        bad_json = await client.wait_type("error", timeout=5)
        assert bad_json["code"] == "bad_message" and bad_json["message"]
        errors_seen = len(client.events)
        client.send("[" * 60000)  # nested past the parser's recursion limit: the peer stays up
        nested = await client.wait_type("error", timeout=5, after=errors_seen)
        assert nested["code"] == "bad_message"
        errors_seen = len(client.events)
        client.send({"type": "dance"})
        unknown = await client.wait_type("error", timeout=5, after=errors_seen)
        assert unknown["code"] == "unknown_message" and "dance" in unknown["message"]
        after_errors = len(client.events)

        final = await client.wait_type("transcript.final", timeout=20, after=after_errors)
        assert wer([(golden.text, final["text"])]) <= 0.25, final
        client.send({"type": "stop"})
        ended = await client.wait_type("session.ended", timeout=10)
        assert ended["reason"] == "stop"
    finally:
        await client.close()
    await wait_sessions(server.url, 1, timeout=5)
    await check_still_streaming(streaming, server.url)


async def test_streaming_session_was_not_disturbed(server, streaming):
    client = streaming.client
    await client.heard_all()
    finals = client.of_type("transcript.final")
    hypothesis = " ".join(f["text"] for f in finals)
    print(f"\nREF: {streaming.recording.text}\nHYP: {hypothesis}")
    assert not client.of_type("error")
    assert wer([(streaming.recording.text, hypothesis)]) <= 0.25
    client.send({"type": "stop"})
    assert (await client.wait_type("session.ended", timeout=10))["reason"] == "stop"
    await wait_sessions(server.url, 0, timeout=5)
