"""Watching the server: GET /metrics moves with real sessions, GET /ready follows the model and the
shutdown, and JSON log lines carry the session audit but never what was said."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import AsyncIterator

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import RTCClient, ServerProcess, SpeechTrack, WSClient, wait_sessions
from speech import normalize, pcm16, recording

pytestmark = pytest.mark.asyncio(loop_scope="module")

RATE = 16000

Scrape = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def server(private_network) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess("--log-format", "json", "--max-sessions", "1", "--idle-timeout-s", "10")
    yield proc
    assert proc.stop() == 0, proc.log()


async def scrape(base_url: str) -> Scrape:
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: Scrape, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def log_records(server: ServerProcess) -> list[dict]:
    lines = [line for line in server.log().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line: one JSON object


async def test_metrics_and_audit_log_follow_a_session(server):
    speech = recording("ls-61-70968-0000")
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), speech.audio, np.zeros(RATE, np.float32)])
    await wait_sessions(server.url, 0, timeout=10)
    before = await scrape(server.url)
    # Without --trusted-proxies, a client's own X-Forwarded-For is no address.
    client = WSClient(server.url, headers={"X-Forwarded-For": "198.51.100.7"})
    try:
        await client.connect()
        await client.send({"type": "start"})
        session_id = (await client.wait_type("session.started", timeout=10))["session_id"]
        during = await scrape(server.url)
        await client.send("not json{")
        await client.wait_type("error", timeout=5)
        spoken = time.monotonic()  # the session's timeline starts with this audio
        await client.speak(pcm16(audio))  # in real time, as a microphone
        await client.wait_last_final(timeout=15)
        await client.stop()
    finally:
        await client.close()
    after = await scrape(server.url)
    finals = client.of_type("transcript.final")
    partials = client.of_type("transcript.partial")
    assert finals and partials and len(client.of_type("speech.stopped")) == len(finals)

    assert value(during, "stt_sessions_active", transport="websocket") == 1
    assert value(after, "stt_sessions_active", transport="websocket") == 0
    assert grew(before, after, "stt_sessions_total", transport="websocket") == 1
    assert grew(before, after, "stt_sessions_total", transport="webrtc") == 0
    assert grew(before, after, "stt_sessions_ended_total", transport="websocket", reason="stop") == 1
    assert grew(before, after, "stt_session_duration_seconds_count") == 1
    assert grew(before, after, "stt_audio_received_seconds_total", transport="websocket") == pytest.approx(
        audio.size / RATE, abs=0.01)
    assert grew(before, after, "stt_utterances_total", transport="websocket") == len(finals)
    # One latency per final: from its last speech sample's arrival, so the endpoint silence is in it.
    # The client sees the same: it sent the sample at `end` about `end` seconds after it began, paced
    # like a microphone, and it got the final a moment after the server sent it.
    assert grew(before, after, "stt_final_latency_seconds_count") == len(finals)
    mean = grew(before, after, "stt_final_latency_seconds_sum") / len(finals)
    seen = [r.at - (spoken + r.event["end"]) for r in client.events if r.event["type"] == "transcript.final"]
    print(f"\nend of speech to final: {mean:.3f}s on the server, {np.mean(seen):.3f}s in the client")
    assert mean == pytest.approx(np.mean(seen), abs=0.08)
    assert 0.1 < mean < 5, mean
    assert grew(before, after, "stt_partial_latency_seconds_count") >= len(partials)
    assert grew(before, after, "stt_decodes_total") >= len(finals) + len(partials)
    # One stream: partials and finals seldom meet, and no burst of finals ever queues.
    decodes = grew(before, after, "stt_decodes_total")
    busy_window = grew(before, after, "stt_decodes_short_window_total")
    greedy = grew(before, after, "stt_decodes_greedy_total")
    print(f"decodes {decodes}, busy window {busy_window}, greedy {greedy}, finals {len(finals)}")
    assert busy_window < decodes
    # Exported, though one stream cannot pin its value: a final is greedy only while another of the stream's
    # finals waits for a worker (test_asr tests when a final is greedy).
    assert ("stt_decodes_greedy_total", frozenset()) in after
    assert grew(before, after, "stt_decodes_batched_total") == 0
    # Every 32 ms of audio is one VAD window; one stream alone has no company to be batched with.
    windows = grew(before, after, "stt_vad_windows_total")
    assert abs(windows - audio.size / 512) <= 2 and grew(before, after, "stt_vad_calls_total") == windows
    assert grew(before, after, "stt_decode_busy_seconds_total") > 0
    assert value(after, "stt_decode_queue_depth") == 0
    assert grew(before, after, "stt_errors_total", source="event", code="bad_message") == 1

    # The audit: a start and an end line, in JSON, with who, how long, how much and why.
    records = log_records(server)
    started = [r for r in records if r.get("session_id") == session_id and r.get("event") == "session.started"]
    ended = [r for r in records if r.get("session_id") == session_id and r.get("event") == "session.ended"]
    assert len(started) == 1 and len(ended) == 1, records
    assert started[0]["transport"] == "websocket" and started[0]["client"].startswith("127.")
    end = ended[0]
    assert end["level"] == "INFO" and end["time"] and session_id in end["message"]
    assert {k: end[k] for k in ("transport", "client", "reason", "utterances")} == {
        "transport": "websocket", "client": started[0]["client"], "reason": "stop",
        "utterances": len(finals)}
    assert end["duration_s"] >= audio.size / RATE - 0.5
    assert end["audio_s"] == pytest.approx(audio.size / RATE, abs=0.01)
    # Never what was said.
    log = server.log().lower()
    said = {w for f in finals + partials for w in normalize(f["text"]) if len(w) >= 5}
    assert said, finals
    assert not [w for w in said if w in log], [w for w in said if w in log]


async def test_http_errors_and_refused_sessions_are_counted(server):
    await wait_sessions(server.url, 0, timeout=10)
    before = await scrape(server.url)
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/rtc", data="hello", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
    first = WSClient(server.url)
    refused = WSClient(server.url)
    offerer = RTCClient(server.url, track=SpeechTrack(np.zeros(0, np.float32)))
    try:
        await first.connect()
        await first.send({"type": "start"})
        await first.wait_type("session.started", timeout=10)
        await refused.connect()  # --max-sessions 1
        assert await refused.closed(timeout=5) == 1013
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/rtc", data=await offerer.offer(),
                                 headers={"Content-Type": "application/sdp"}) as r:
                assert r.status == 503
        await first.stop()
    finally:
        for c in (first, refused):
            await c.close()
        await offerer.close()
    after = await scrape(server.url)
    assert grew(before, after, "stt_errors_total", source="http", code="unsupported_media_type") == 1
    assert grew(before, after, "stt_errors_total", source="http", code="session_limit") == 1
    assert grew(before, after, "stt_sessions_refused_total", code="session_limit") == 2
    assert grew(before, after, "stt_sessions_total", transport="websocket") == 1  # refusals open none
    assert grew(before, after, "stt_sessions_total", transport="webrtc") == 0


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, dict, dict]:
    async with http.request(method, url, **kwargs) as r:
        return r.status, dict(r.headers), await r.json()


async def test_ready_follows_the_model_and_the_shutdown(private_network):
    proc = await asyncio.to_thread(ServerProcess, "--trusted-proxies", "1", "--log-format", "json",
                                   wait=False)
    try:
        seen: list[tuple[int, str]] = []  # (/ready status, its status field) while /health is 200
        refused_while_loading: list[tuple[int, dict, dict]] = []
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                try:
                    health, _, _ = await status_of(http, "GET", proc.url + "/health")
                    ready, _, body = await status_of(http, "GET", proc.url + "/ready")
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)  # not listening yet
                    continue
                assert health == 200
                seen.append((ready, body["status"]))
                if ready == 200:
                    break
                if not refused_while_loading:  # the API says 503 too, with a JSON error
                    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
                               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
                    refused_while_loading = await asyncio.gather(
                        status_of(http, "GET", proc.url + "/v1/ws", headers=upgrade),
                        status_of(http, "POST", proc.url + "/v1/rtc", data="v=0",
                                  headers={"Content-Type": "application/sdp"}))
                await asyncio.sleep(0.01)
        assert seen and seen[0] == (503, "loading") and seen[-1] == (200, "ready"), seen
        print(f"\n/ready answered 503 {len(seen) - 1} time(s) while the model loaded")
        for status, headers, body in refused_while_loading:
            assert status == 503 and body["error"]["code"] == "not_ready", body
            assert int(headers["Retry-After"]) > 0

        # Shutdown: /ready says 503 while the speech in flight is finalized, before the listener closes.
        long = recording("ls-1221-135766-0001")
        # Behind one trusted proxy: the address it saw is the client's; what came before may be forged.
        client = WSClient(proc.url, headers={"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
        try:
            await client.connect()
            await client.send({"type": "start"})
            session_id = (await client.wait_type("session.started", timeout=10))["session_id"]
            microphone = asyncio.create_task(client.speak(pcm16(long.audio)))
            await client.wait_type("transcript.partial", timeout=15)
            proc.signal(signal.SIGTERM)
            async with aiohttp.ClientSession() as http:
                while True:
                    status, _, body = await status_of(http, "GET", proc.url + "/ready")
                    if status != 200:
                        break
                assert status == 503 and body["status"] == "shutting_down", body
                status, _, body = await status_of(http, "GET", proc.url + "/health")
                assert status == 200 and body["ready"] is False
            ended = await client.wait_type("session.ended", timeout=20)
            assert ended["reason"] == "shutdown"
            microphone.cancel()
        finally:
            await client.close()
        assert await asyncio.to_thread(proc.proc.wait, 20) == 0, proc.log()
        ended = [r for r in log_records(proc) if r.get("event") == "session.ended"]
        assert [(r["session_id"], r["client"], r["reason"]) for r in ended] == [
            (session_id, "203.0.113.9", "shutdown")]
    finally:
        await asyncio.to_thread(proc.stop)
