"""How sessions end: DELETE, a vanished client, ICE that never connects, server shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import numpy as np

from client import ROOT, RTCClient, ServerProcess, SpeechTrack, health, wait_sessions
from speech import Recording, load_devset

IDLE_TIMEOUT_S = 3
ICE_TIMEOUT_S = 2


def recording(recording_id: str) -> Recording:
    return next(r for r in load_devset() if r.id == recording_id)


def silence() -> SpeechTrack:
    """A microphone in a quiet room: SpeechTrack sends silence once its audio is over."""
    return SpeechTrack(np.zeros(0, np.float32))


@asynccontextmanager
async def dedicated_server(*args: str) -> AsyncIterator[ServerProcess]:
    """A server of the test's own: for options the shared one lacks, or to stop it."""
    proc = await asyncio.to_thread(ServerProcess, *args)
    try:
        yield proc
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.log()


async def test_health_counts_live_sessions(server):
    await wait_sessions(server.url, 0, timeout=10)
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/health") as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            body = await r.json()
            assert {k: body[k] for k in ("status", "model", "sessions")} == {
                "status": "ok", "model": "tiny.en", "sessions": 0}
            assert body["languages"] == ["en"]  # what the page's language selector offers
    client = RTCClient(server.url, track=silence())
    try:
        await client.connect()
        await client.wait_type("session.started", timeout=10)
        assert (await health(server.url))["sessions"] == 1
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=10)
    finally:
        await client.close()
    await wait_sessions(server.url, 0, timeout=5)


async def test_delete_ends_a_live_session(server):
    await wait_sessions(server.url, 0, timeout=10)
    client = RTCClient(server.url, track=SpeechTrack(recording("ls-61-70968-0002").audio))
    try:
        await client.connect(form="sdp")
        await client.wait_type("session.started", timeout=10)
        assert client.location == f"/v1/rtc/{client.session_id}"
        async with aiohttp.ClientSession() as http:
            async with http.delete(server.url + client.location) as r:
                assert r.status == 200
                assert await r.json() == {"session_id": client.session_id, "reason": "deleted"}
            ended = await client.wait_type("session.ended", timeout=10)
            assert ended == {"type": "session.ended", "reason": "deleted"}
            assert client.events[-1].event == ended
            assert (await health(server.url))["sessions"] == 0
            async with http.delete(server.url + client.location) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "unknown_session"
    finally:
        await client.close()


VANISHING_CLIENT = textwrap.dedent("""
    import asyncio, sys
    from client import RTCClient, SpeechTrack
    from speech import load_devset

    async def main(url: str, recording_id: str) -> None:
        audio = next(r for r in load_devset() if r.id == recording_id).audio
        client = RTCClient(url, track=SpeechTrack(audio))
        await client.connect()
        await client.wait_type("session.started", timeout=10)
        print(client.session_id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:]))
""")


async def test_vanished_client_is_cleaned_up(private_network, tmp_path: Path):
    script = tmp_path / "vanishing_client.py"
    script.write_text(VANISHING_CLIENT)
    async with dedicated_server("--idle-timeout-s", str(IDLE_TIMEOUT_S)) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), server.url, "ls-1221-135766-0001",
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])})
        try:
            session_id = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
            assert session_id, "the client process did not connect"
            await asyncio.sleep(2)  # mid-sentence
            assert (await health(server.url))["sessions"] == 1
        finally:
            proc.kill()  # SIGKILL: no stop, no DTLS close, no RTCP BYE; only the audio stops
            await proc.wait()
        killed = time.monotonic()
        await wait_sessions(server.url, 0, timeout=IDLE_TIMEOUT_S + 5)
        print(f"\nsession gone {time.monotonic() - killed:.1f}s after the client was killed")
        print(await server.wait_log(f"session {session_id} ended", timeout=3))


async def test_ice_that_never_connects_times_out(private_network):
    async with dedicated_server("--ice-timeout-s", str(ICE_TIMEOUT_S)) as server:
        client = RTCClient(server.url, track=silence())
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(server.url + "/v1/rtc", data=await client.offer(),
                                     headers={"Content-Type": "application/sdp"}) as r:
                    assert r.status == 201, await r.text()
                    session_id = r.headers["Location"].rsplit("/", 1)[-1]
            # The answer is never applied: the server's connectivity checks go unanswered.
            assert (await health(server.url))["sessions"] == 1
            await wait_sessions(server.url, 0, timeout=ICE_TIMEOUT_S + 3)
        finally:
            await client.close()
        line = await server.wait_log(f"session {session_id} ended", timeout=3)
    assert "reason=ice_timeout" in line, line


async def test_shutdown_finalizes_speech_in_progress(private_network):
    long = recording("ls-1221-135766-0001")  # 16.7 s of nearly unbroken speech
    async with dedicated_server() as server:
        client = RTCClient(server.url, track=SpeechTrack(long.audio))
        try:
            await client.connect()
            await client.wait_type("session.started", timeout=10)
            partial = await client.wait_type("transcript.partial", timeout=15)
            utterance = partial["utterance"]
            assert not [e for e in client.of_type("speech.stopped") if e["utterance"] == utterance]
            server.signal(signal.SIGTERM)

            final = (await client.wait_for(lambda e: e["type"] == "transcript.final"
                                           and e["utterance"] == utterance, timeout=20)).event
            assert final["text"].strip(), final
            ended = await client.wait_type("session.ended", timeout=20)
            assert ended["reason"] == "shutdown"
            assert client.events[-1].event == ended
            assert await asyncio.to_thread(server.proc.wait, 20) == 0, server.log()
        finally:
            await client.close()
    print(f"\nfinal at shutdown: {final['text']!r}")
