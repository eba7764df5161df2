"""OpenAI's Realtime API for transcription, driven by OpenAI's own SDK (openai 3.51.0) with only its base URL
changed: over the WebSocket (GA and beta, server VAD and manual commits) and over WebRTC (an aiortc peer
and client.realtime.calls.create), with client secrets; bad input gets OpenAI's error shape."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import defaultdict
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from openai import AsyncOpenAI

from client import ServerProcess, SpeechTrack, health, wait_sessions
from speech import g711, pcm16, recording, wer
from vendor import chunked, paced, spoken

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "sk-test-realtime-key"
PCM_24K_100MS = 4800


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(private_network, tmp_path_factory):
    proc = ServerProcess("--max-sessions", "6", "--idle-timeout-s", "8", "--ice-timeout-s", "5",
                         "--data-dir", str(tmp_path_factory.mktemp("realtime-data")))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed(private_network, tmp_path_factory):
    """Access control on; every minted secret lasts 3 s at most, so that one can be seen to expire."""
    proc = ServerProcess("--api-key", KEY, "--token-max-ttl-s", "3", "--data-dir", "")
    yield proc
    assert proc.stop() == 0, proc.log()


def sdk(server: ServerProcess, key: str = "x") -> AsyncOpenAI:
    # The beta client dials wss:// unless told the WebSocket's own base URL.
    return AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0,
                       websocket_base_url=server.url.replace("http", "ws", 1) + "/v1")


class Events:
    """Every event a Realtime connection received, parsed by the SDK, read on a task of its own."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.events: list[Any] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.connection:
            self.events.append(event)
            self.changed.set()

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]

    async def wait(self, predicate, timeout: float = 30) -> None:
        async def until() -> None:
            while not predicate(self):
                self.changed.clear()
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"the connection ended: {[e.type for e in self.events]}")
                await self.changed.wait()
        await asyncio.wait_for(until(), timeout)

    async def count(self, kind: str, n: int, timeout: float = 30) -> list[Any]:
        await self.wait(lambda s: len(s.of(kind)) >= n, timeout)
        return self.of(kind)


def transcription(vad: dict[str, Any] | None = None, model: str = "gpt-4o-transcribe", **extra) -> dict[str, Any]:
    """A GA session.update's session: 24 kHz PCM, English, server VAD unless `vad` is None."""
    return {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000},
        "transcription": {"model": model, "language": "en", **extra},
        "turn_detection": vad}}}


async def append_all(connection, pcm: bytes, speed: float = 4.0) -> None:
    """The SDK's appends, 100 ms each, `speed` times real time."""
    async def send(chunk: bytes) -> None:
        await connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
    await paced(chunked(pcm, PCM_24K_100MS), 0.1, send, speed)


def check_items(events: Events, live: bool) -> list[str]:
    """Each item's events in OpenAI's order; the transcripts, in order."""
    by_item: dict[str, list[Any]] = defaultdict(list)
    for e in events.events:
        if getattr(e, "item_id", None):
            by_item[e.item_id].append(e)
    committed = events.of("input_audio_buffer.committed")
    assert committed[0].previous_item_id is None
    assert [c.previous_item_id for c in committed[1:]] == [c.item_id for c in committed[:-1]]
    transcripts, consistent, early = [], 0, 0
    for c in committed:
        kinds = [e.type for e in by_item[c.item_id]]
        assert kinds[0] == "input_audio_buffer.speech_started", kinds
        stop = kinds.index("input_audio_buffer.speech_stopped")
        assert kinds[stop + 1] == "input_audio_buffer.committed", kinds
        assert kinds[-1] == "conversation.item.input_audio_transcription.completed", kinds
        assert set(kinds[1:stop]) <= ({"conversation.item.input_audio_transcription.delta"} if live else set()), kinds
        started, stopped = by_item[c.item_id][0], by_item[c.item_id][stop]
        assert 0 <= started.audio_start_ms < stopped.audio_end_ms
        completed = by_item[c.item_id][-1]
        assert completed.usage.type == "duration" and completed.usage.seconds > 0
        deltas = "".join(e.delta for e in by_item[c.item_id]
                         if e.type == "conversation.item.input_audio_transcription.delta")
        if not live:
            assert deltas == completed.transcript
        consistent += completed.transcript.startswith(deltas)
        early += stop > 1  # a delta while the utterance was spoken
        transcripts.append(completed.transcript)
    if live:
        # Deltas only add words; the final may revise what a partial had settled, and then stands alone.
        assert early and consistent * 2 >= len(committed), (early, consistent, len(committed))
    return transcripts


async def test_ga_server_vad_in_real_time_with_live_deltas(server):
    """The guide's flow: connect with intent=transcription, session.update, append 24 kHz PCM as a microphone
    gives it; each utterance is an item, with deltas while it is spoken (a live model) and its completed."""
    said = spoken("ls-61-70968-0000", "jfk-inaugural-ask-not")
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        events = Events(connection)
        await events.count("session.created", 1)
        assert events.events[0].type == "session.created" and events.events[0].session.type == "transcription"
        await connection.session.update(session=transcription(
            {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 50},
            model="gpt-realtime-whisper"))
        updated = (await events.count("session.updated", 1))[0]
        # What is applied is reported: a 50 ms endpoint would end every word, so it is clamped.
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 100
        await connection.session.update(session=transcription(
            {"type": "server_vad", "silence_duration_ms": 500}, model="gpt-realtime-whisper"))
        await events.count("session.updated", 2)
        await append_all(connection, pcm16(said.audio, 24000), speed=1.0)
        await events.wait(lambda s: len(s.of("conversation.item.input_audio_transcription.completed"))
                          == len(s.of("input_audio_buffer.speech_started")) >= 3)
        transcripts = check_items(events, live=True)
        assert events.of("conversation.item.input_audio_transcription.delta")
        assert events.of("conversation.item.added") and events.of("conversation.item.done")
    hypothesis = " ".join(transcripts)
    print(f"\nREF: {said.reference}\nHYP: {hypothesis}")
    assert wer([(said.reference, hypothesis)]) <= 0.15


async def test_ga_manual_commits_and_clear(server):
    """turn_detection null: the client's commit makes the item of everything appended since the last; a
    commit of less than 100 ms is OpenAI's commit_empty error; clear drops what was appended."""
    first, second = recording("ls-61-70968-0000"), recording("librivox-ss01-0870")
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        events = Events(connection)
        await connection.session.update(session=transcription(None, model="whisper-1"))
        updated = (await events.count("session.updated", 1))[0]
        assert updated.session.audio.input.turn_detection is None
        await append_all(connection, pcm16(first.audio, 24000), speed=20)
        await connection.input_audio_buffer.commit()
        completed = (await events.count("conversation.item.input_audio_transcription.completed", 1))[0]
        committed = events.of("input_audio_buffer.committed")
        assert len(committed) == 1 and committed[0].item_id == completed.item_id
        assert not events.of("input_audio_buffer.speech_started")  # the client decides the turns
        assert wer([(first.text, completed.transcript)]) <= 0.2
        assert abs(completed.usage.seconds - first.seconds) < 0.5
        await connection.input_audio_buffer.commit()  # nothing appended since
        error = (await events.count("error", 1))[0]
        assert error.error.code == "input_audio_buffer_commit_empty" and "100ms" in error.error.message
        await append_all(connection, pcm16(recording("jfk-inaugural-ask-not").audio, 24000), speed=20)
        await connection.input_audio_buffer.clear()
        await events.count("input_audio_buffer.cleared", 1)
        await connection.input_audio_buffer.commit()
        assert (await events.count("error", 2))[1].error.code == "input_audio_buffer_commit_empty"
        await append_all(connection, pcm16(second.audio, 24000), speed=20)
        await connection.input_audio_buffer.commit()
        second_item = (await events.count("conversation.item.input_audio_transcription.completed", 2))[1]
        assert events.of("input_audio_buffer.committed")[1].previous_item_id == committed[0].item_id
    print(f"\nREF: {second.text}\nHYP: {second_item.transcript}")
    assert wer([(second.text, second_item.transcript)]) <= 0.2
    assert "ask not" not in second_item.transcript.lower()  # the cleared audio is never transcribed


async def test_beta_session_with_g711(server):
    """client.beta.realtime (OpenAI-Beta: realtime=v1): transcription_session.update, μ-law audio, the beta
    events."""
    said = spoken("librivox-ss01-0890", "ls-61-70968-0002")
    samples = np.frombuffer(pcm16(said.audio, 8000), "<i2")
    async with sdk(server).beta.realtime.connect(model="gpt-4o-transcribe",
                                                  extra_query={"intent": "transcription"}) as connection:
        events = Events(connection)
        await connection.send({"type": "transcription_session.update", "session": {
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}})
        updated = (await events.count("transcription_session.updated", 1))[0]
        assert events.events[0].type == "transcription_session.created"
        assert updated.session.input_audio_format == "g711_ulaw"
        for chunk in chunked(g711(samples, "mulaw"), 1600):  # 200 ms
            await connection.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
            await asyncio.sleep(0.02)
        await events.wait(lambda s: len(s.of("conversation.item.input_audio_transcription.completed")) >= 2
                          and len(s.of("conversation.item.input_audio_transcription.completed"))
                          == len(s.of("input_audio_buffer.speech_started")))
        assert events.of("conversation.item.created") and not events.of("conversation.item.added")
        transcripts = [e.transcript for e in events.of("conversation.item.input_audio_transcription.completed")]
    print(f"\nREF: {said.reference}\nHYP: {' '.join(transcripts)}")
    assert wer([(said.reference, " ".join(transcripts))]) <= 0.2


async def test_prompt_and_language_are_honoured(server):
    """transcription.prompt is Whisper's initial prompt: the name it spells is the one heard; a language the
    model does not know is an error, and the session goes on with the one it had."""
    hester = recording("ls-1221-135766-0002")
    pcm = pcm16(np.concatenate([hester.audio, np.zeros(16000, np.float32)]), 24000)
    results = {}
    for prompt in ("", "Hester Prynne."):
        async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as connection:
            events = Events(connection)
            await connection.session.update(session=transcription(None, prompt=prompt))
            await events.count("session.updated", 1)
            await connection.session.update(session={"type": "transcription", "audio": {"input": {
                "transcription": {"language": "fr"}}}})
            error = (await events.count("error", 1))[0]
            assert error.error.code == "unsupported_language"
            assert error.error.param == "session.audio.input.transcription.language"
            await append_all(connection, pcm, speed=20)
            await connection.input_audio_buffer.commit()
            results[prompt] = (await events.count(
                "conversation.item.input_audio_transcription.completed", 1))[0].transcript
    print(results)
    assert "Hester Prynne" in results["Hester Prynne."] and "Hester Prynne" not in results[""]


async def test_bad_input_gets_openai_errors_and_the_sessions_go_on(server):
    """Unknown and conversational events, bad JSON, bad base64, bad settings: an `error` event each, in
    OpenAI's shape, and the session still transcribes; a message over 16 MiB ends only its own session."""
    other = recording("ls-61-70968-0002")
    async with sdk(server).realtime.connect(extra_query={"intent": "transcription"}) as bystander:
        watching = Events(bystander)
        await bystander.session.update(session=transcription(None))
        await watching.count("session.updated", 1)
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.url + "/v1/realtime?intent=transcription") as ws:
                assert json.loads((await ws.receive()).data)["type"] == "session.created"
                bad: list[tuple[Any, str, str | None]] = [
                    ("not json{", "invalid_json", None),
                    ({"type": "dance", "event_id": "evt_1"}, "invalid_value", "type"),
                    ({"type": "response.create"}, "unsupported", "type"),
                    ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio"),
                    ({"type": "input_audio_buffer.append", "audio": 5}, "invalid_value", "audio"),
                    ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/mp3"}}}}},
                     "invalid_value", "session.audio.input.format.type"),
                    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
                        "type": "server_vad", "threshold": 7}}}}}, "invalid_value",
                     "session.audio.input.turn_detection.threshold"),
                    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty", None),
                ]
                for sent, code, param in bad:
                    await (ws.send_str(sent) if isinstance(sent, str) else ws.send_json(sent))
                    event = json.loads((await ws.receive(timeout=5)).data)
                    assert event["type"] == "error" and event["event_id"].startswith("event_"), event
                    assert (event["error"]["code"], event["error"]["param"]) == (code, param), (sent, event)
                    assert event["error"]["type"] == "invalid_request_error" and event["error"]["message"]
                assert event["error"]["event_id"] is None
                await ws.send_json({"type": "dance", "event_id": "evt_7"})
                assert json.loads((await ws.receive(timeout=5)).data)["error"]["event_id"] == "evt_7"
                # Just past 16 MiB as base64: the server stops reading there, the rest still fits its buffers.
                huge = base64.b64encode(bytes((12 << 20) + 6144)).decode()
                # Read while sending: the server answers before the whole message is in, and then closes.
                sending = asyncio.create_task(ws.send_json({"type": "input_audio_buffer.append", "audio": huge}))
                messages = [m async for m in ws]
                await asyncio.wait([sending])
                assert json.loads(messages[0].data)["error"]["code"] == "message_too_large"
                # 1009; 1006 where the server's reset (its socket closed with the message's rest unread)
                # reached this busy client before it had read the close frame.
                assert ws.close_code in (1009, 1006), ws.close_code
        await append_all(bystander, pcm16(other.audio, 24000), speed=20)
        await bystander.input_audio_buffer.commit()
        completed = (await watching.count("conversation.item.input_audio_transcription.completed", 1))[0]
        assert wer([(other.text, completed.transcript)]) <= 0.2
        assert not watching.of("error")


async def test_webrtc_call_with_the_sdk_and_events_on_oai_events(server):
    """client.realtime.calls.create posts the offer (multipart, with the session); 201, the answer and its
    Location; the events come as OpenAI's on the client's oai-events channel, the audio on the track."""
    said = spoken("ls-61-70968-0000", "ls-61-70968-0002")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")
    received: list[dict[str, Any]] = []
    channel.on("message", lambda m: received.append(json.loads(m)))
    track = SpeechTrack(said.audio, lead_silence_s=0)
    pc.addTrack(track)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        answer = await sdk(server).realtime.calls.create(
            sdp=pc.localDescription.sdp, session=transcription({"type": "server_vad"}, model="gpt-4o-transcribe"))
        assert answer.response.status_code == 201
        assert answer.response.headers["Location"].startswith("/v1/realtime/calls/rtc_")
        await pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await asyncio.wait_for(opened.wait(), 10)
        channel.send(json.dumps({"type": "session.update", "session": transcription(
            {"type": "server_vad", "silence_duration_ms": 500}, model="gpt-4o-transcribe")}))
        deadline = asyncio.get_running_loop().time() + said.seconds + 20
        while asyncio.get_running_loop().time() < deadline:
            done = [e for e in received if e["type"] == "conversation.item.input_audio_transcription.completed"]
            if track.done and len(done) >= 2 and len(done) == len(
                    [e for e in received if e["type"] == "input_audio_buffer.speech_started"]):
                break
            await asyncio.sleep(0.2)
        channel.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}))
        await asyncio.sleep(0.5)
    finally:
        await pc.close()
    kinds = [e["type"] for e in received]
    assert kinds[0] == "session.created" and "session.updated" in kinds, kinds
    assert all(e["event_id"].startswith("event_") for e in received)
    errors = [e for e in received if e["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["unsupported"]  # audio comes on the track, not in appends
    hypothesis = " ".join(e["transcript"] for e in received
                          if e["type"] == "conversation.item.input_audio_transcription.completed")
    print(f"\nREF: {said.reference}\nHYP: {hypothesis}")
    assert wer([(said.reference, hypothesis)]) <= 0.2
    await wait_sessions(server.url, 0, timeout=15)


async def test_webrtc_a_file_that_ends_is_transcribed_to_its_end(server, tmp_path):
    """aiortc's MediaPlayer plays a WAV file and then sends nothing, not even a BYE: the server hears the
    quiet as silence, so the last sentence, said with no pause after it, still gets its completed."""
    from aiortc.contrib.media import MediaPlayer

    from speech import write_wav

    said = recording("ls-61-70968-0000")
    wav = tmp_path / "speech.wav"
    write_wav(wav, np.concatenate([np.zeros(8000, np.float32), said.audio]))
    player = MediaPlayer(str(wav))
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")
    received: list[dict[str, Any]] = []
    channel.on("message", lambda m: received.append(json.loads(m)))
    pc.addTrack(player.audio)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        answer = await sdk(server).realtime.calls.create(sdp=pc.localDescription.sdp,
                                                         session=transcription({"type": "server_vad"}))
        await pc.setRemoteDescription(RTCSessionDescription(answer.text, "answer"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + said.seconds + 0.5 + 6  # the file, then the endpoint and a decode
        while loop.time() < deadline and not [
                e for e in received if e["type"] == "conversation.item.input_audio_transcription.completed"]:
            await asyncio.sleep(0.1)
    finally:
        await pc.close()
    completed = [e for e in received if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert completed, [e["type"] for e in received]
    assert wer([(said.text, completed[0]["transcript"])]) <= 0.2


async def test_webrtc_raw_sdp_and_json_offers(server):
    """The browser form (raw SDP, as openai-agents-js posts it) and the older JSON form get the same answer;
    the call hangs up through its Location."""
    for form in ("sdp", "json"):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("oai-events")
        pc.addTrack(SpeechTrack(np.zeros(16000, np.float32)))
        try:
            await pc.setLocalDescription(await pc.createOffer())
            async with aiohttp.ClientSession() as http:
                if form == "sdp":
                    r = await http.post(server.url + "/v1/realtime/calls", data=pc.localDescription.sdp,
                                        headers={"Content-Type": "application/sdp"})
                else:
                    r = await http.post(server.url + "/v1/realtime/calls",
                                        json={"sdp": pc.localDescription.sdp, "session": transcription(None)})
                assert r.status == 201 and r.content_type == "application/sdp", await r.text()
                assert (await r.text()).startswith("v=0")
                location = r.headers["Location"]
                hung = await http.post(server.url + location + "/hangup")
                assert hung.status == 200
                again = await http.post(server.url + location + "/hangup")
                assert again.status == 404 and (await again.json())["error"]["type"] == "invalid_request_error"
                bad = await http.post(server.url + "/v1/realtime/calls", data="v=0 nonsense",
                                      headers={"Content-Type": "application/sdp"})
                body = await bad.json()
                assert bad.status == 400 and body["error"]["code"] == "bad_sdp"
                assert set(body["error"]) == {"message", "type", "param", "code"}
        finally:
            await pc.close()


async def test_client_secrets_open_realtime_sessions_only_until_they_expire(keyed):
    """An ek_ secret minted with the key opens Realtime sessions (WebSocket, its settings applied), not other
    routes, and not once it has expired; the beta transcription_sessions mints the same."""
    admin = sdk(keyed, KEY)
    secret = await admin.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 600},
        session=transcription({"type": "server_vad", "silence_duration_ms": 700}))
    assert secret.value.startswith("ek_") and secret.session.type == "transcription"
    async with sdk(keyed, secret.value).realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = await connection.recv()
        assert created.type == "session.created"
        assert created.session.audio.input.turn_detection.silence_duration_ms == 700  # as minted
    async with aiohttp.ClientSession() as http:
        # A browser's form: the secret in a subprotocol, "realtime" echoed.
        async with http.ws_connect(keyed.url + "/v1/realtime?intent=transcription",
                                   protocols=("realtime", f"openai-insecure-api-key.{secret.value}")) as ws:
            assert ws.protocol == "realtime"
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "session.created"
        for method, path in (("GET", "/v1/ws"), ("GET", "/v1/sessions"), ("POST", "/v1/tokens")):
            r = await http.request(method, keyed.url + path, headers={"Authorization": f"Bearer {secret.value}"})
            assert r.status == 403, (path, r.status)
            assert (await r.json())["error"]["code"] in ("token_not_allowed", "key_required")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await sdk(keyed, secret.value).realtime.client_secrets.create(session=transcription(None))
    assert refused.value.code == "key_required"
    beta = await admin.beta.realtime.transcription_sessions.create(input_audio_format="pcm16")
    assert beta.client_secret.value.startswith("ek_")
    assert secret.expires_at <= time.time() + 4  # --token-max-ttl-s caps what was asked
    await asyncio.sleep(secret.expires_at - time.time() + 1)
    with pytest.raises(websockets.exceptions.InvalidStatus) as expired:
        async with sdk(keyed, secret.value).realtime.connect(extra_query={"intent": "transcription"}):
            pass
    assert expired.value.response.status_code == 401
    with pytest.raises(openai.AuthenticationError) as wrong:
        await sdk(keyed, "sk-wrong").realtime.client_secrets.create(session=transcription(None))
    assert wrong.value.code == "invalid_token" and wrong.value.type == "authentication_error"
    with pytest.raises(openai.BadRequestError) as bad:
        await admin.realtime.client_secrets.create(session={"type": "transcription", "audio": {"input": {
            "transcription": {"language": "xx"}}}})
    assert bad.value.code == "bad_option" and "language" in bad.value.message
    assert (await health(keyed.url))["sessions"] == 0
