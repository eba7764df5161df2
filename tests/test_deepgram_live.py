"""Deepgram's live API, GET /v1/listen, driven by Deepgram's own SDK (deepgram-sdk 7.16.0) with only its
environment changed: raw PCM with interim results, a WAV file streamed as Deepgram's example streams it,
Finalize, KeepAlive and CloseStream, its auth forms; bad input gets Deepgram's answers."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import wave
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from deepgram import AsyncDeepgramClient, DeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment

from asr.audio import G711
from client import ServerProcess, health
from speech import pcm16, phone_line, recording, wer, word_errors
from vendor import chunked, paced, spoken

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "dg-test-key"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(private_network, tmp_path_factory):
    proc = ServerProcess("--max-sessions", "6", "--idle-timeout-s", "4",
                         "--data-dir", str(tmp_path_factory.mktemp("deepgram-data")))
    yield proc
    assert proc.stop() == 0, proc.log()


def environment(server: ServerProcess) -> DeepgramClientEnvironment:
    ws = server.url.replace("http", "ws", 1)
    return DeepgramClientEnvironment(base=server.url, production=ws, agent=ws, agent_rest=server.url)


class Messages:
    """What an async connection received, parsed by the SDK, read until the server closes."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.messages: list[Any] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.connection:
            self.messages.append(message)
            self.changed.set()

    def of(self, kind: str) -> list[Any]:
        return [m for m in self.messages if getattr(m, "type", None) == kind]

    def finals(self) -> list[Any]:
        return [m for m in self.of("Results") if m.is_final]

    async def wait(self, predicate, timeout: float = 30) -> None:
        async def until() -> None:
            while not predicate(self):
                self.changed.clear()
                if self.task.done():
                    raise AssertionError(f"the stream ended: {[getattr(m, 'type', m) for m in self.messages]}")
                await self.changed.wait()
        await asyncio.wait_for(until(), timeout)


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], str]:
    """Every message until the server's close, and the reason its close frame gave."""
    messages = []
    while True:
        message = await ws.receive(timeout=20)
        if message.type != aiohttp.WSMsgType.TEXT:
            return messages, message.extra or ""
        messages.append(json.loads(message.data))


async def test_raw_pcm_with_interim_results_utterance_end_and_vad_events(server):
    """linear16 at 16 kHz in 100 ms messages, in real time: interim Results while each sentence is said,
    a final with speech_final at its end, words with Whisper's own confidences, SpeechStarted and
    UtteranceEnd; CloseStream gets the last Results, Metadata, then close 1000."""
    said = spoken("ls-61-70968-0000", "librivox-ss01-0870")
    client = AsyncDeepgramClient(api_key="x", environment=environment(server))
    async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000",
                                        interim_results="true", utterance_end_ms="1000", vad_events="true",
                                        punctuate="true", smart_format="true", language="en-US",
                                        # Parameters this server does not act on are ignored.
                                        request_options={"additional_query_parameters": {
                                            "no_delay": "true", "filler_words": "false", "tier": "x"}}
                                        ) as connection:
        messages = Messages(connection)
        await paced(chunked(pcm16(said.audio), 3200), 0.1, connection.send_media)
        await messages.wait(lambda m: len(m.of("UtteranceEnd")) >= 2)
        await connection.send_close_stream()
        await asyncio.wait_for(messages.task, 20)
    kinds = [m.type for m in messages.messages]
    assert kinds[-1] == "Metadata" and kinds.count("Metadata") == 1, kinds
    assert "SpeechStarted" in kinds and messages.of("Results")[0].is_final is False  # interim first
    finals = messages.finals()
    assert all(f.speech_final for f in finals if f.channel.alternatives[0].transcript)
    words = [w for f in finals for w in f.channel.alternatives[0].words]
    assert words and all(0 < w.confidence <= 1 for w in words) and len({w.confidence for w in words}) > 3
    assert all(w.word == w.word.lower() and w.punctuated_word for w in words)
    assert all(f.channel.alternatives[0].confidence > 0 for f in finals if f.channel.alternatives[0].words)
    request_ids = {m.metadata.request_id for m in messages.of("Results")} | {messages.of("Metadata")[0].request_id}
    assert len(request_ids) == 1
    metadata = messages.of("Metadata")[0]
    assert abs(metadata.duration - said.seconds) < 0.1 and len(metadata.sha256) == 64
    ends = messages.of("UtteranceEnd")
    assert all(e.last_word_end > 0 for e in ends)
    assert kinds.index("UtteranceEnd") > kinds.index("Results")
    hypothesis = " ".join(f.channel.alternatives[0].transcript for f in finals)
    print(f"\nREF: {said.reference}\nHYP: {hypothesis}")
    assert wer([(said.reference, hypothesis)]) <= 0.15


async def test_finalize_keepalive_and_close_stream(server):
    """Finalize ends the utterance in progress now (from_finalize, not speech_final), and with nothing in
    progress still answers an empty from_finalize Results; KeepAlive keeps a silent stream past the idle
    timeout; lowercase words without punctuation when neither punctuate nor smart_format is asked."""
    rec = recording("librivox-ss01-0870")
    pcm = pcm16(rec.audio)
    cut = len(pcm) // 2 // 2 * 2
    client = AsyncDeepgramClient(api_key="x", environment=environment(server))
    async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000") as connection:
        messages = Messages(connection)
        for chunk in chunked(pcm[:cut], 3333):  # cut mid-sample: the odd byte waits for the next message
            await connection.send_media(chunk)
        await connection.send_finalize()
        await messages.wait(lambda m: m.finals())
        first = messages.finals()[0]
        assert first.from_finalize and not first.speech_final and first.channel.alternatives[0].transcript
        await connection.send_finalize()
        await messages.wait(lambda m: len(m.finals()) >= 2)
        empty = messages.finals()[1]
        assert empty.from_finalize and empty.channel.alternatives[0].transcript == ""
        for _ in range(6):  # 6 s without audio, the idle timeout 4 s
            await asyncio.sleep(1)
            await connection.send_keep_alive()
        assert not messages.task.done()
        for chunk in chunked(pcm[cut:] + pcm16(np.zeros(16000, np.float32)), 3333):
            await connection.send_media(chunk)
        await connection.send_close_stream()
        await asyncio.wait_for(messages.task, 20)
    assert all(r.is_final for r in messages.of("Results"))  # no interim_results asked: none sent
    transcripts = [f.channel.alternatives[0].transcript for f in messages.finals()]
    assert all(t == t.lower() and "," not in t and "." not in t for t in transcripts), transcripts
    print(transcripts)
    assert wer([(rec.text, " ".join(transcripts))]) <= 0.2
    assert messages.messages[-1].type == "Metadata"


async def test_a_wav_file_streamed_with_its_header_by_the_sync_client(server):
    """Deepgram's example: the sync client, no encoding and no sample_rate, a 44.1 kHz stereo WAV file sent
    as it is read, header and all; messages come to the SDK's event handlers on its listening thread."""
    said = spoken("jfk-inaugural-ask-not")
    samples = np.frombuffer(pcm16(said.audio, 44100), "<i2")
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(np.repeat(samples, 2).tobytes())
    received: list[Any] = []

    def example() -> bool:  # as a program without asyncio runs it
        client = DeepgramClient(api_key="x", environment=environment(server))
        with client.listen.v1.connect(model="nova-3") as connection:
            connection.on(EventType.MESSAGE, received.append)
            listener = threading.Thread(target=connection.start_listening, daemon=True)
            listener.start()
            for chunk in chunked(wav.getvalue(), 8192):
                connection.send_media(chunk)
            connection.send_close_stream()
            listener.join(30)
        return not listener.is_alive()

    assert await asyncio.to_thread(example)
    finals = [m for m in received if getattr(m, "type", None) == "Results" and m.is_final]
    hypothesis = " ".join(f.channel.alternatives[0].transcript for f in finals)
    print(f"\nREF: {said.reference}\nHYP: {hypothesis}")
    assert wer([(said.reference, hypothesis)]) <= 0.15
    assert received[-1].type == "Metadata"


async def test_a_caller_on_a_telephone_line_keeps_every_word(server):
    """"One. Two. Three." over a telephone line, each word alone, comes back whole from a telephone client's
    stream (mulaw at 8 kHz, as a call's media stream comes) and from a WAV file at 8 kHz streamed as it is
    read: both are heard at 8 kHz (asr/vad.py)."""
    said = spoken("sr-english-one-two-three")
    line = phone_line(said.audio)
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(G711["mulaw"][np.frombuffer(line, np.uint8)].tobytes())
    client = AsyncDeepgramClient(api_key="x", environment=environment(server))
    for query, chunks, speed in (({"encoding": "mulaw", "sample_rate": "8000"}, chunked(line, 800), 1.0),
                                 ({}, chunked(wav.getvalue(), 8192), 100.0)):  # the file as fast as it is read
        async with client.listen.v1.connect(model="nova-3", **query) as connection:
            messages = Messages(connection)
            await paced(chunks, 0.1, connection.send_media, speed)
            await connection.send_close_stream()
            await asyncio.wait_for(messages.task, 20)
        hypothesis = " ".join(f.channel.alternatives[0].transcript for f in messages.finals())
        assert word_errors(said.reference, hypothesis)[0] == 0, (query, hypothesis)


async def test_token_scheme_access_tokens_and_the_browser_subprotocol(private_network):
    """With keys: `Authorization: Token <key>` (the SDK's api_key), `bearer <token>` (its access_token, from
    its auth.v1.tokens.grant or ours), and a browser's subprotocol pair token, <token>, echoed; a wrong key is
    refused before the upgrade."""
    keyed = ServerProcess("--api-key", KEY, "--data-dir", "")
    try:
        env = environment(keyed)
        async with AsyncDeepgramClient(api_key=KEY, environment=env).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate="16000") as connection:
            await connection.send_close_stream()
            assert [m.type async for m in connection] == ["Metadata"]
        with pytest.raises(ApiError) as refused:
            async with AsyncDeepgramClient(api_key="wrong", environment=env).listen.v1.connect(model="nova-3"):
                pass
        assert refused.value.status_code == 401
        granted = await AsyncDeepgramClient(api_key=KEY, environment=env).auth.v1.tokens.grant(ttl_seconds=60)
        assert granted.expires_in == 60
        async with AsyncDeepgramClient(access_token=granted.access_token, environment=env).listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate="16000") as connection:
            await connection.send_close_stream()
            assert [m.type async for m in connection] == ["Metadata"]
        async with aiohttp.ClientSession() as http:
            r = await http.get(keyed.url + "/v1/ws", headers={"Authorization": f"bearer {granted.access_token}"})
            assert r.status == 403  # a granted token opens Deepgram streams only
            r = await http.post(keyed.url + "/v1/tokens", headers={"Authorization": f"Token {KEY}"})
            token = (await r.json())["token"]
            async with AsyncDeepgramClient(access_token=token, environment=env).listen.v1.connect(
                    model="nova-3", encoding="mulaw", sample_rate="8000") as connection:
                await connection.send_media(b"\xff" * 8000)
                await connection.send_close_stream()
                assert [m.type async for m in connection] == ["Metadata"]
            url = keyed.url + "/v1/listen?encoding=linear16&sample_rate=16000"
            async with http.ws_connect(url, protocols=("token", token)) as ws:
                assert ws.protocol == "token"
                await ws.send_json({"type": "CloseStream"})
                assert json.loads((await ws.receive(timeout=10)).data)["type"] == "Metadata"
            r = await http.get(keyed.url + "/v1/listen", headers={"Authorization": "Token wrong"})
            body = await r.json()
            assert r.status == 401 and set(body) == {"err_code", "err_msg", "request_id"}, body
    finally:
        assert keyed.stop() == 0, keyed.log()


async def test_bad_input_gets_deepgram_answers_and_leaves_the_others(server):
    """Bad parameters: 400 before the upgrade, in Deepgram's shape. Unknown messages: an Error, the stream
    goes on. Audio that cannot be decoded: an Error, then close 1008 DATA-0000. A stream beside them all
    is transcribed as if alone."""
    rec = recording("ls-61-70968-0002")
    client = AsyncDeepgramClient(api_key="x", environment=environment(server))
    async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000") as bystander:
        watching = Messages(bystander)
        async with aiohttp.ClientSession() as http:
            for query in ("encoding=flac", "encoding=linear16", "sample_rate=99", "interim_results=maybe",
                          "language=xx"):
                r = await http.get(server.url + "/v1/listen?" + query)
                body = await r.json()
                assert r.status == 400 and body["err_code"] == "Bad Request" and body["err_msg"], (query, body)
            async with http.ws_connect(server.url + "/v1/listen?encoding=linear16&sample_rate=16000") as ws:
                await ws.send_str("{not json")
                await ws.send_json({"type": "Dance"})
                for _ in range(2):
                    error = json.loads((await ws.receive(timeout=5)).data)
                    assert error["type"] == "Error" and error["variant"] == "SchemaError", error
                await ws.send_json({"type": "Configure", "keyterms": ["livestt"]})
                assert json.loads((await ws.receive(timeout=5)).data)["type"] == "ConfigureFailure"
                await ws.send_bytes(pcm16(rec.audio))
                await ws.send_bytes(b"")  # the older end of stream
                kinds = [json.loads(m.data)["type"] async for m in ws]
                assert kinds[-1] == "Metadata" and "Results" in kinds and ws.close_code == 1000
            async with http.ws_connect(server.url + "/v1/listen") as ws:  # a container is expected
                await ws.send_bytes(b"RIFF\x24\0\0\0WAVEfmt \x10\0\0\0" + b"\xff" * 16 + b"data" + bytes(4000))
                messages, reason = await until_closed(ws)
                assert messages[0]["type"] == "Error" and messages[-1]["type"] == "Metadata", messages
                assert (ws.close_code, reason) == (1008, "DATA-0000")
        await bystander.send_media(pcm16(np.concatenate([rec.audio, np.zeros(16000, np.float32)])))
        await bystander.send_close_stream()
        await asyncio.wait_for(watching.task, 20)
    assert not watching.of("Error")
    hypothesis = " ".join(f.channel.alternatives[0].transcript for f in watching.finals())
    assert wer([(rec.text, hypothesis)]) <= 0.2
    assert (await health(server.url))["sessions"] == 0
