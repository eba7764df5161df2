"""Files over the APIs people already use: OpenAI's audio REST and Deepgram's prerecorded POST /v1/listen,
driven by the vendors' own SDKs (openai 3.51.0, deepgram-sdk 7.16.0) with only the base URL changed, on real
speech; asserting words and timings, and that bad input gets the vendor's error and leaves the server as it was.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import select
import socket
import time
from typing import Any

import aiohttp
import av
import numpy as np
import openai
import pytest
from deepgram import DeepgramClient
from deepgram.environment import DeepgramClientEnvironment

from client import RTCClient, ServerProcess, SpeechTrack, WSClient, wait_sessions
from speech import (GAP_S, Recording, load_devset, pcm16, recording, telephone_band, wer, with_pauses,
                    word_errors)

# Word error rate bounds, with the plain normaliser ("1" is not "one"). The devset one after another with
# pauses measured 6% (10 of 163 words); offline faster-whisper 4 to 5%.
BAR = 0.10
CLIP_BAR = 0.15  # one or two recordings: a word is a larger share
MAX_UPLOAD_MB = 8


@pytest.fixture(scope="module")
def files_server(tmp_path_factory):
    """One file at a time, so that a second one during a long upload is refused (429)."""
    proc = ServerProcess("--max-upload-mb", str(MAX_UPLOAD_MB), "--max-file-s", "400", "--max-file-jobs", "1",
                         "--max-sessions", "8", "--idle-timeout-s", "10",
                         "--data-dir", str(tmp_path_factory.mktemp("files-data")))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def devset() -> list[Recording]:
    return load_devset()


@pytest.fixture(scope="module")
def programme(devset) -> tuple[bytes, str, list[tuple[float, float]]]:
    """The devset read one after another with pauses, as a WAV file; its reference; each recording's span."""
    spans, at = [], 0.0
    for r in devset:
        spans.append((at, at + r.seconds))
        at += r.seconds + GAP_S
    return wav_bytes(with_pauses(devset)), " ".join(r.text for r in devset), spans


def wav_bytes(audio: np.ndarray, rate: int = 16000, layout: str = "mono") -> bytes:
    return encode(audio, "wav", "pcm_s16le", rate, layout)


def encode(audio: np.ndarray, fmt: str, codec: str, rate: int, layout: str) -> bytes:
    """16 kHz speech as a file of another container, codec, rate and channel layout, as a user would have it."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm16(audio), "<i2").reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = 16000
        for f in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def openai_client(server: ServerProcess, key: str = "not-checked") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def deepgram_client(server: ServerProcess, key: str = "not-checked") -> DeepgramClient:
    ws = server.url.replace("http", "ws", 1)
    return DeepgramClient(api_key=key, environment=DeepgramClientEnvironment(
        base=server.url, production=ws, agent=ws, agent_rest=server.url))


def cue_text(body: str) -> tuple[str, list[tuple[float, float]]]:
    """The words and the (start, end) times of SubRip or WebVTT cues."""
    times, words = [], []
    for line in body.splitlines():
        if m := re.match(r"(\d+):(\d\d):(\d\d)[,.](\d{3}) --> (\d+):(\d\d):(\d\d)[,.](\d{3})$", line):
            h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
            times.append((h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000))
        elif line.strip() and line.strip() != "WEBVTT" and not line.strip().isdigit():
            words.append(line)
    return " ".join(words), times


def within_a_recording(start: float, end: float, spans: list[tuple[float, float]], slack: float = 0.6) -> bool:
    return start <= end and any(a - slack <= start and end <= b + slack for a, b in spans)


async def test_every_response_format_through_the_openai_sdk(files_server, programme):
    data, reference, spans = programme
    client = openai_client(files_server)
    duration = spans[-1][1] + GAP_S
    texts = {}
    for fmt in ("json", "text", "srt", "vtt"):
        result = await client.audio.transcriptions.create(file=("devset.wav", data), model="whisper-1",
                                                          response_format=fmt)
        if fmt == "json":
            assert result.usage.seconds == pytest.approx(duration, abs=0.05)
            texts[fmt] = result.text
        elif fmt == "text":
            assert isinstance(result, str) and result.endswith("\n")
            texts[fmt] = result
        else:
            assert result.startswith("WEBVTT\n\n") == (fmt == "vtt")
            texts[fmt], cues = cue_text(result)
            assert len(cues) >= len(spans) - 1
            assert all(within_a_recording(a, b, spans) for a, b in cues), cues
            assert all(b1 <= a2 for (_, b1), (a2, _) in zip(cues, cues[1:])), cues
    for fmt, text in texts.items():
        errors, words = word_errors(reference, text)
        assert errors / words <= BAR, (fmt, errors, text)

    verbose = await client.audio.transcriptions.create(
        file=("devset.wav", data), model="gpt-4o-transcribe", response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    assert verbose.language == "english" and verbose.duration == pytest.approx(duration, abs=0.05)
    assert wer([(reference, verbose.text)]) <= BAR
    assert wer([(reference, " ".join(w.word for w in verbose.words))]) <= BAR
    assert all(within_a_recording(w.start, w.end, spans) for w in verbose.words)
    assert all(a.start <= b.start for a, b in zip(verbose.words, verbose.words[1:]))
    assert [s.id for s in verbose.segments] == list(range(len(verbose.segments)))
    assert all(within_a_recording(s.start, s.end, spans) for s in verbose.segments)
    assert " ".join(s.text.strip() for s in verbose.segments) == verbose.text
    # Each recording's first word starts within half a second of where it was said.
    for (start, _), r in zip(spans, load_devset()):
        first = next(w for w in verbose.words if w.end > start - 0.6)
        assert abs(first.start - start) < 0.8, (r.id, first, start)

    words_only = await client.audio.transcriptions.create(
        file=("devset.wav", data), model="whisper-1", response_format="verbose_json",
        timestamp_granularities=["word"])
    assert words_only.words and not words_only.segments


async def test_stream_true_sends_deltas_then_the_whole_text(files_server, programme):
    data, reference, _ = programme
    stream = await openai_client(files_server).audio.transcriptions.create(
        file=("devset.wav", data), model="gpt-4o-mini-transcribe", stream=True)
    events = [event async for event in stream]
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and len(deltas) >= 5
    assert "".join(d.delta for d in deltas) == events[-1].text
    assert wer([(reference, events[-1].text)]) <= BAR


CONTAINERS = [  # (format, codec, rate, layout)
    ("mp3", "libmp3lame", 44100, "stereo"),
    ("ipod", "aac", 44100, "stereo"),  # M4A
    ("ogg", "libopus", 48000, "mono"),
    ("webm", "libopus", 48000, "stereo"),
    ("flac", "flac", 22050, "mono"),
    ("wav", "pcm_s16le", 8000, "mono"),
    ("wav", "pcm_s24le", 44100, "stereo"),
]


@pytest.mark.parametrize("fmt, codec, rate, layout", CONTAINERS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CONTAINERS])
async def test_containers_rates_and_channels(files_server, fmt, codec, rate, layout):
    clip = [recording("jfk-inaugural-ask-not"), recording("ls-61-70968-0000")]
    data = encode(with_pauses(clip), fmt, codec, rate, layout)
    # Bytes, as the SDK sends them: filename "upload", no type: the server sniffs the content.
    result = await openai_client(files_server).audio.transcriptions.create(file=data, model="whisper-1")
    assert wer([(" ".join(r.text for r in clip), result.text)]) <= CLIP_BAR, result.text


async def test_a_call_recorded_at_8_khz_keeps_every_word(files_server):
    """A call's recording (G.711 mu-law at 8 kHz in a WAV) of "One. Two. Three." over a telephone line, each word
    alone: heard at 8 kHz, as the file was sent, the VAD keeps every word (at 16 kHz it lost one)."""
    rec = recording("sr-english-one-two-three")
    data = encode(telephone_band(with_pauses([rec])), "wav", "pcm_mulaw", 8000, "mono")
    result = await openai_client(files_server).audio.transcriptions.create(file=data, model="whisper-1")
    assert word_errors(rec.text, result.text)[0] == 0, result.text


async def test_models_through_the_openai_sdk(files_server):
    client = openai_client(files_server)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny.en", "whisper-1"]
    assert all(m.object == "model" and m.owned_by == "livestt" and m.created > 0 for m in models.data)
    assert (await client.models.retrieve("whisper-1")).id == "whisper-1"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-9")
    assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"


async def test_deepgram_sdk_transcribe_file(files_server, programme):
    data, reference, spans = programme
    client = deepgram_client(files_server)
    response = await asyncio.to_thread(client.listen.v1.media.transcribe_file, request=data, model="nova-3",
                                       smart_format=True, utterances=True)
    assert response.metadata.duration == pytest.approx(spans[-1][1] + GAP_S, abs=0.05)
    assert response.metadata.channels == 1 and response.metadata.model_info
    alternative = response.results.channels[0].alternatives[0]
    assert wer([(reference, alternative.transcript)]) <= BAR
    assert 0 < alternative.confidence <= 1
    assert all(within_a_recording(w.start, w.end, spans) for w in alternative.words)
    assert all(w.word == w.word.lower() and w.punctuated_word for w in alternative.words)
    assert wer([(reference, " ".join(w.punctuated_word for w in alternative.words))]) <= BAR
    utterances = response.results.utterances
    assert len(utterances) >= len(spans) - 1 and all(u.start <= u.end for u in utterances)

    # Raw 16-bit PCM at 8 kHz, declared in the query (the SDK has no sample_rate argument for files); without
    # smart_format Deepgram's text is plain.
    clip = recording("jfk-inaugural-ask-not")
    raw = await asyncio.to_thread(client.listen.v1.media.transcribe_file, request=pcm16(clip.audio, 8000),
                                  model="nova-3", encoding="linear16",
                                  request_options={"additional_query_parameters": {"sample_rate": 8000}})
    transcript = raw.results.channels[0].alternatives[0].transcript
    assert transcript == transcript.lower() and "," not in transcript and "." not in transcript
    assert wer([(clip.text, transcript)]) <= CLIP_BAR, transcript


async def post_form(server: ServerProcess, fields: dict[str, Any], file: bytes | None,
                    path: str = "/v1/audio/transcriptions") -> tuple[int, Any]:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            form.add_field(name, v)
    if file is not None:
        form.add_field("file", file, filename="upload", content_type="application/octet-stream")
    async with aiohttp.ClientSession() as http, http.post(server.url + path, data=form) as r:
        return r.status, await r.json(content_type=None)


def mp3_clip() -> bytes:
    return encode(recording("jfk-inaugural-ask-not").audio, "mp3", "libmp3lame", 44100, "stereo")


BAD_FORMS = [  # (fields, file, param, code)
    ({"model": "whisper-1"}, b"%PDF-1.7\n" + b"\x00not audio" * 500, "file", "invalid_value"),
    ({"model": "whisper-1"}, b"", "file", "invalid_value"),
    ({"model": "whisper-1"}, "truncated", "file", "invalid_value"),
    ({"model": "whisper-1"}, None, "file", "invalid_value"),
    ({"model": "whisper-1", "response_format": "diarized_json"}, "audio", "response_format", "invalid_value"),
    ({"model": "whisper-1", "temperature": "warm"}, "audio", "temperature", "invalid_value"),
    ({"model": "whisper-1", "temperature": "1.5"}, "audio", "temperature", "invalid_value"),
    ({"model": "whisper-1", "stream": "maybe"}, "audio", "stream", "invalid_value"),
    ({"model": "whisper-1", "timestamp_granularities[]": ["word", "second"]}, "audio", "timestamp_granularities",
     "invalid_value"),
    ({"model": "whisper-1", "language": "fr"}, "audio", "language", "unsupported_language"),
]


@pytest.mark.parametrize("fields, file, param, code", BAD_FORMS,
                         ids=["not audio", "empty", "mp3 cut to its first bytes", "no file",
                              "unknown response_format", "temperature not a number", "temperature past 1",
                              "stream not a boolean", "unknown granularity", "language of another model"])
async def test_bad_requests_get_openai_errors(files_server, fields, file, param, code):
    if file == "truncated":
        file = mp3_clip()[:60]
    elif file == "audio":
        file = wav_bytes(recording("sr-english-one-two-three").audio)
    status, body = await post_form(files_server, fields, file)
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], body


async def test_bad_file_through_the_sdk_and_a_body_that_is_no_form(files_server):
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(files_server).audio.transcriptions.create(file=b"just some text" * 100, model="whisper-1")
    assert caught.value.param == "file" and "Supported formats" in caught.value.message
    async with aiohttp.ClientSession() as http:
        async with http.post(files_server.url + "/v1/audio/transcriptions", json={"file": "x"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_request"


async def test_an_mp3_cut_short_is_transcribed_up_to_the_cut(files_server):
    data = mp3_clip()
    result = await openai_client(files_server).audio.transcriptions.create(
        file=data[:len(data) // 2], model="whisper-1", response_format="verbose_json")
    assert 4 < result.duration < 7  # of 11 s
    assert "fellow americans" in result.text.lower(), result.text


async def test_deepgram_errors_in_deepgram_shape(files_server):
    async with aiohttp.ClientSession() as http:
        for body, query, content_type, needle in [
            (b"not audio at all" * 64, {}, "application/octet-stream", "audio format"),
            (json.dumps({"url": f"{files_server.url}/health"}).encode(), {}, "application/json", "fetch-url-hosts"),
            (json.dumps({"url": "http://169.254.169.254/latest"}).encode(), {}, "application/json", "fetch-url-hosts"),
            (b"\x00\x01" * 8000, {"encoding": "linear16"}, "application/octet-stream", "sample_rate"),
            (b"", {}, "application/octet-stream", "empty"),
        ]:
            async with http.post(files_server.url + "/v1/listen", data=body, params=query,
                                 headers={"Content-Type": content_type, "Authorization": "Token anything"}) as r:
                answer = await r.json()
                assert r.status == 400, answer
                assert set(answer) == {"err_code", "err_msg", "request_id"} and answer["err_code"] == "Bad Request"
                assert needle in answer["err_msg"], answer
    from deepgram.errors import BadRequestError

    with pytest.raises(BadRequestError):
        await asyncio.to_thread(deepgram_client(files_server).listen.v1.media.transcribe_file,
                                request=b"GIF89a" + b"\x00" * 999, model="nova-3")


def huge_upload(server: ServerProcess, path: str, chunked: bool) -> tuple[int, bytes]:
    """A 2 GB body, streamed until the server answers; returns (bytes sent, the answer's head and body)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {2 << 30}"
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: stt\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  f"{length}\r\n\r\n".encode())
        # A form whose file goes on and on (the raw route takes it all as audio).
        block = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
        block += b"\x00" * ((1 << 20) - len(block))
        piece = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
        sent = 0
        deadline = time.monotonic() + 60
        while sent < 2 << 30 and time.monotonic() < deadline:
            if select.select([s], [], [], 0.5 if not sent else 0)[0]:
                break  # the server has answered
            try:
                s.sendall(piece)
            except OSError:
                break
            sent += len(block)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return sent, answer


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/listen"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_two_gigabyte_body_gets_413_before_it_is_read(files_server, path, chunked):
    before = files_server.rss_mb()
    sent, answer = await asyncio.to_thread(huge_upload, files_server, path, chunked)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    error = json.loads(body[body.index(b"{"):])
    assert (error["error"]["code"] == "file_too_large") if path.endswith("transcriptions") else (
        error["err_code"] == "PAYLOAD_TOO_LARGE"), error
    # Refused from its declared length before the limit's worth was sent, or a few MiB past the limit if streamed.
    assert sent < (MAX_UPLOAD_MB << 20 if not chunked else (MAX_UPLOAD_MB + 16) << 20), sent
    assert files_server.rss_mb() < before + 3 * MAX_UPLOAD_MB + 50
    async with aiohttp.ClientSession() as http, http.get(files_server.url + "/health") as r:
        assert r.status == 200


async def test_expect_100_continue_gets_413_before_the_body_is_sent(files_server):
    host, port = files_server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: stt\r\nContent-Length: {2 << 30}\r\n"
                 "Content-Type: multipart/form-data; boundary=b\r\nExpect: 100-continue\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()


async def test_files_are_saved_counted_and_open_to_keys_and_tokens(tmp_path):
    key = "files-key-0123456789"
    server = ServerProcess("--api-key", key, "--data-dir", str(tmp_path))
    try:
        clip = recording("jfk-inaugural-ask-not")
        data = wav_bytes(clip.audio)
        with pytest.raises(openai.AuthenticationError) as caught:
            await openai_client(server, "wrong").audio.transcriptions.create(file=data, model="whisper-1")
        assert caught.value.type == "authentication_error"
        raw = await openai_client(server, key).audio.transcriptions.with_raw_response.create(
            file=data, model="whisper-1", response_format="json")
        assert wer([(clip.text, raw.parse().text)]) <= CLIP_BAR
        saved = raw.headers["x-transcript"]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
            async with http.get(server.url + saved, params={"format": "srt"}) as r:
                assert r.status == 200 and "Americans" in await r.text()
            async with http.get(server.url + "/v1/sessions") as r:
                assert (await r.json())["sessions"][0]["transport"] == "file"
            async with http.post(server.url + "/v1/tokens", json={}) as r:
                token = (await r.json())["token"]
        # Deepgram's SDK sends "Token <key>"; a page's session token works as it does for sessions.
        response = await asyncio.to_thread(deepgram_client(server, key).listen.v1.media.transcribe_file,
                                           request=data, model="nova-3")
        assert wer([(clip.text, response.results.channels[0].alternatives[0].transcript)]) <= CLIP_BAR
        result = await openai_client(server, token).audio.transcriptions.create(file=data, model="whisper-1")
        assert wer([(clip.text, result.text)]) <= CLIP_BAR
        async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as r:
            metrics = await r.text()
        counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("stt_file")}
        assert counted['stt_files_total{outcome="ok",route="openai"}'] == 2, counted
        assert counted['stt_files_total{outcome="ok",route="deepgram"}'] == 1, counted
        assert counted["stt_file_audio_seconds_total"] == 33, counted
    finally:
        assert server.stop() == 0, server.log()


async def live_websocket(base_url: str, recordings: list[Recording]) -> WSClient:
    client = WSClient(base_url, {"language": "en"})
    try:
        await client.connect()
        await client.speak(pcm16(with_pauses(recordings)), chunk_ms=20)
        await client.wait_last_final(timeout=20)
        await client.stop()
    finally:
        await client.close()
    return client


async def live_webrtc(base_url: str, recordings: list[Recording]) -> RTCClient:
    track = SpeechTrack(with_pauses(recordings))
    client = RTCClient(base_url, track=track)
    await client.connect()
    await client.wait_type("session.started", timeout=10)
    await client.heard_all(timeout=30)
    client.send({"type": "stop"})
    await client.wait_type("session.ended", timeout=20)
    await client.close()
    return client


async def test_a_long_upload_while_live_streams_run(private_network, files_server, devset):
    """Four minutes of speech as one FLAC while two WebRTC and two WebSocket streams speak in real time: every
    live stream still gets the final of every sentence, and the file its transcript. Latency under this load
    is the benchmark's to measure, not a test's."""
    long_audio = np.concatenate([with_pauses(devset)] * 3)
    data = encode(long_audio, "flac", "flac", 16000, "mono")
    reference = " ".join([" ".join(r.text for r in devset)] * 3)
    live = [devset[:5], devset[5:], devset[5:], devset[:5]]
    tasks = [asyncio.create_task(live_webrtc(files_server.url, live[0])),
             asyncio.create_task(live_webrtc(files_server.url, live[1])),
             asyncio.create_task(live_websocket(files_server.url, live[2])),
             asyncio.create_task(live_websocket(files_server.url, live[3]))]
    await asyncio.sleep(3)
    client = openai_client(files_server)
    upload = asyncio.create_task(client.audio.transcriptions.create(file=data, model="whisper-1"))
    await asyncio.sleep(1.5)
    # --max-file-jobs 1: a second file meanwhile is refused, with when to try again.
    with pytest.raises(openai.RateLimitError) as caught:
        await client.audio.transcriptions.create(file=wav_bytes(devset[0].audio), model="whisper-1")
    assert caught.value.code == "file_limit" and caught.value.response.headers["retry-after"]
    sessions = await asyncio.gather(*tasks)
    result = await upload
    assert wer([(reference, result.text)]) <= BAR
    for session, recordings in zip(sessions, live):
        finals = session.of_type("transcript.final")
        hypothesis = " ".join(f["text"] for f in finals)
        assert not session.of_type("error"), session.of_type("error")
        assert wer([(" ".join(r.text for r in recordings), hypothesis)]) <= 0.15, hypothesis
    await wait_sessions(files_server.url, 0, timeout=10)
