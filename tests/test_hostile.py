"""Hostile and unlucky clients: each is answered clearly and costs the server nothing it keeps."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import numpy as np
import pytest
from aiortc import RTCSessionDescription

from client import RTCClient, ServerProcess, SpeechTrack, health, wait_sessions
from speech import data_recording, word_errors


@pytest.fixture(scope="module")
def one_slot(private_network):
    """One session at a time: a slot not freed in time is a refusal."""
    proc = ServerProcess("--max-sessions", "1", "--idle-timeout-s", "5", "--ice-timeout-s", "5")
    yield proc
    assert proc.stop() == 0, proc.log()


def rss_mb(proc: ServerProcess) -> float:
    with open(f"/proc/{proc.proc.pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


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
        before = rss_mb(one_slot)  # the decode's own buffers are in by now: only silence follows
        await asyncio.sleep(8)
        grown = rss_mb(one_slot) - before
        print(f"server RSS grew {grown:.1f} MB in 8 s of ten tracks sending")
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=15)
    finally:
        await client.close()
    heard = " ".join(e["text"] for e in client.of_type("transcript.final"))
    assert word_errors(speech.text, heard)[0] <= 2, heard
    # Unread tracks queued about 10 MB a second here before the fix.
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
