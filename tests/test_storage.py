"""Saved sessions (ops/storage): real server processes write them, real clients read them back over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import html
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator, Iterator

import aiohttp
import av
import numpy as np
import pytest
import pytest_asyncio
from yarl import URL

from client import (ServerProcess, SpeechTrack, WSClient, check_protocol, killed_mid_speech,
                    rtc_session_watched)
from speech import data_recording, pcm16, recording, with_pauses

pytestmark = pytest.mark.asyncio(loop_scope="module")

RATE = 16000
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


# Helpers -----------------------------------------------------------------------------------------

async def fetch(base_url: str, path: str, raw: bool = False, key: str | None = None,
                **params: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; `raw`: the path goes exactly as written, unnormalized;
    `key`: an API key to send."""
    url = URL(base_url + path, encoded=True) if raw else base_url + path
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(url, params=params or None, headers=headers) as r:
            return r.status, r.content_type, await r.read()


async def fetch_json(base_url: str, path: str, key: str | None = None, **params: str) -> Any:
    status, content_type, body = await fetch(base_url, path, key=key, **params)
    assert status == 200 and content_type == "application/json", (status, body)
    return json.loads(body)


def folder_of(data_dir: Path, session_id: str) -> Path:
    [folder] = [p for p in data_dir.iterdir() if p.name.endswith("_" + session_id)]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ_" + session_id, folder.name), folder.name
    return folder


def jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a finals.jsonl, each of which must be whole JSON."""
    data = path.read_text()
    assert data == "" or data.endswith("\n"), "a line was cut short"
    return [json.loads(line) for line in data.splitlines()]


def without_at(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for final in stored:
        assert ISO.fullmatch(final["at"]), final
    return [{k: v for k, v in final.items() if k != "at"} for final in stored]


def cues(text: str, separator: str) -> list[tuple[int, int, str]]:
    """(start ms, end ms, text) of each SRT (separator ",") or WebVTT (".") cue."""
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(separator)}(\d\d\d)"
    out = []
    for block in text.strip("\n").split("\n\n") if text.strip() else []:
        lines = block.split("\n")
        if separator == ",":
            assert lines.pop(0) == str(len(out) + 1), block
        m = re.fullmatch(f"{stamp} --> {stamp}", lines[0])
        assert m and len(lines) == 2, block
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        out.append(((h1 * 60 + m1) * 60000 + s1 * 1000 + ms1, (h2 * 60 + m2) * 60000 + s2 * 1000 + ms2,
                    lines[1]))
    return out


def expected_cues(finals: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    return [(round(f["start"] * 1000), round(f["end"] * 1000), " ".join(f["text"].split()))
            for f in finals if f["text"].strip()]


def decode(path: Path) -> np.ndarray:
    """The whole file with av, as 16 kHz mono float32."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) / 32768


def envelope(audio: np.ndarray) -> np.ndarray:
    blocks = audio[: audio.size // 1600 * 1600].reshape(-1, 1600)  # 100 ms
    return np.sqrt((blocks ** 2).mean(axis=1))


def session_folder(data_dir: Path, started: datetime, session_id: str, ended: datetime | None,
                   finals: list[str] = (), mtime: datetime | None = None) -> Path:
    """A stored session as a server would have left it (ended None: a crash)."""
    folder = data_dir / f"{started.strftime('%Y-%m-%dT%H-%M-%SZ')}_{session_id}"
    folder.mkdir(parents=True)
    meta = {"session_id": session_id, "transport": "websocket",
            "started": started.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "ended": ended.strftime("%Y-%m-%dT%H:%M:%S.000Z") if ended else None,
            "reason": "stop" if ended else None, "model": "tiny.en", "language": "en",
            "utterances": len(finals), "audio": None}
    (folder / "session.json").write_text(json.dumps(meta))
    (folder / "finals.jsonl").write_text("".join(
        json.dumps({"type": "transcript.final", "utterance": i + 1, "text": text, "start": 2.0 * i,
                    "end": 2.0 * i + 1.5, "language": "en", "words": [], "at": meta["started"]}) + "\n"
        for i, text in enumerate(finals)))
    if mtime is not None:
        age(folder, mtime)
    return folder


def age(path: Path, when: datetime) -> None:
    """Sets the modification time of a folder and all it holds."""
    t = when.timestamp()
    for p in [*path.rglob("*"), path]:
        os.utime(p, (t, t), follow_symlinks=False)


def hex_id(n: int) -> str:
    return f"{n:032x}"


async def started_server(*args: str, **kwargs: Any) -> ServerProcess:
    """A server of the test's own, once it takes sessions (its model loads after it listens)."""
    server = await asyncio.to_thread(lambda: ServerProcess(*args, **kwargs))
    deadline = time.monotonic() + 60
    while (status := (await fetch(server.url, "/ready"))[0]) == 503:
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.1)
    assert status in (200, 404), status  # 404: a server without GET /ready is ready once it listens
    return server


async def stopped(server: ServerProcess) -> None:
    assert await asyncio.to_thread(server.stop) == 0, server.log()


# A server that saves sessions and their audio ----------------------------------------------------

class Stored:
    def __init__(self, server: ServerProcess, data_dir: Path) -> None:
        self.server, self.url, self.data_dir = server, server.url, data_dir


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stored(private_network, tmp_path_factory) -> AsyncIterator[Stored]:
    data_dir = tmp_path_factory.mktemp("stored") / "data"  # made by the server
    server = await started_server("--data-dir", str(data_dir), "--record-audio")
    yield Stored(server, data_dir)
    await stopped(server)


async def test_transcript_in_every_format_is_what_the_client_got(stored):
    """A WebSocket session: live transcript while it runs, then four formats, the files, the audio."""
    jfk = recording("jfk-inaugural-ask-not")
    sent = np.concatenate([np.zeros(RATE // 2, np.float32), jfk.audio, np.zeros(RATE, np.float32)])
    client = WSClient(stored.url)
    try:
        await client.connect()
        await client.send({"type": "start"})
        session_id = (await client.wait_type("session.started"))["session_id"]
        before = await asyncio.to_thread(stored.server.audio_received_s)
        await client.speak(pcm16(sent), realtime=False)
        # Sent faster than real time, much of it may still wait unread in the socket: the last final
        # so far is the last one only once the server has read the trailing silence too.
        await asyncio.to_thread(stored.server.hear_out, before, sent.size / RATE, timeout=60)
        await client.wait_last_final(timeout=20)

        # Live: listed with its status, its transcript read from finals.jsonl so far.
        so_far = client.of_type("transcript.final")
        assert len(so_far) >= 2, so_far
        listed = (await fetch_json(stored.url, "/v1/sessions"))["sessions"][0]
        assert listed["session_id"] == session_id and listed["status"] == "live", listed
        assert listed["ended"] is None and listed["utterances"] == len(so_far)
        live = await fetch_json(stored.url, f"/v1/sessions/{session_id}/transcript")
        assert live["status"] == "live" and without_at(live["finals"]) == so_far
        status, _, text = await fetch(stored.url, f"/v1/sessions/{session_id}/transcript", format="txt")
        assert status == 200 and text.decode().splitlines() == [f["text"] for f in so_far if f["text"]]
        await client.stop()
    finally:
        await client.close()

    events = [r.event for r in client.events]
    check_protocol(events)
    finals = client.of_type("transcript.final")
    assert events[-2] == {"type": "session.saved", "session_id": session_id,
                          "transcript": f"/v1/sessions/{session_id}/transcript"}
    assert len(client.of_type("session.saved")) == 1

    base = f"/v1/sessions/{session_id}/transcript"
    body = await fetch_json(stored.url, base)  # json is the default
    assert body == await fetch_json(stored.url, base, format="json")
    assert without_at(body["finals"]) == finals
    assert {k: body[k] for k in ("session_id", "status", "transport", "reason", "model", "language",
                                 "utterances")} == {
        "session_id": session_id, "status": "ended", "transport": "websocket", "reason": "stop",
        "model": "tiny.en", "language": "en", "utterances": len(finals)}
    assert ISO.fullmatch(body["started"]) and ISO.fullmatch(body["ended"]) and body["started"] < body["ended"]

    served = {}
    for fmt, content_type in [("txt", "text/plain"), ("srt", "application/x-subrip"), ("vtt", "text/vtt")]:
        status, got_type, data = await fetch(stored.url, base, format=fmt)
        assert (status, got_type) == (200, content_type), (fmt, status, got_type, data)
        served[fmt] = data.decode()
    spoken = [f["text"] for f in finals if f["text"].strip()]
    assert len(spoken) >= 3, finals
    assert served["txt"].splitlines() == spoken
    assert cues(served["srt"], ",") == expected_cues(finals)
    assert served["vtt"].startswith("WEBVTT\n\n")
    vtt = [(a, b, html.unescape(t)) for a, b, t in cues(served["vtt"].removeprefix("WEBVTT\n\n"), ".")]
    assert vtt == expected_cues(finals)

    # On disk: the same files, whole, and no temporary file left.
    folder = folder_of(stored.data_dir, session_id)
    assert without_at(jsonl(folder / "finals.jsonl")) == finals
    for fmt in ("txt", "srt", "vtt"):
        assert (folder / f"transcript.{fmt}").read_text() == served[fmt]
    meta = json.loads((folder / "session.json").read_text())
    assert meta == {k: body[k] for k in meta if k != "audio"} | {"audio": "audio.opus"}
    assert sorted(p.name for p in folder.iterdir()) == [
        "audio.opus", "finals.jsonl", "session.json", "transcript.srt", "transcript.txt", "transcript.vtt"]

    # The audio received: all of it, and it sounds like what was sent.
    status, content_type, data = await fetch(stored.url, f"/v1/sessions/{session_id}/audio")
    assert (status, content_type) == (200, "audio/ogg")
    assert data == (folder / "audio.opus").read_bytes()
    audio = decode(folder / "audio.opus")
    print(f"\n{sent.size / RATE:.2f}s sent, {audio.size / RATE:.2f}s recorded in "
          f"{len(data) / 1024:.0f} KiB")
    assert abs(audio.size - sent.size) < 0.05 * RATE
    n = min(audio.size, sent.size)
    correlation = np.corrcoef(envelope(audio[:n]), envelope(sent[:n]))[0, 1]
    assert correlation > 0.95, correlation


async def test_session_saved_reaches_the_data_channel_and_sse_before_session_ended(stored):
    client, subscriber = await rtc_session_watched(stored.url, SpeechTrack(recording("ls-61-70968-0002").audio))
    saved = {"type": "session.saved", "session_id": client.session_id,
             "transcript": f"/v1/sessions/{client.session_id}/transcript"}
    for events in ([r.event for r in client.events], [r.event for r in subscriber.events]):
        assert events[-2:] == [saved, {"type": "session.ended", "reason": "stop"}], events[-3:]
    finals = client.of_type("transcript.final")
    assert finals and finals[0]["text"]
    body = await fetch_json(stored.url, saved["transcript"])
    assert body["transport"] == "webrtc" and without_at(body["finals"]) == finals


async def test_unknown_ids_and_traversal_are_404(stored):
    outside = stored.data_dir.parent / "secret.txt"
    outside.write_text("SECRET")
    client = WSClient(stored.url)
    try:
        await client.connect()
        await client.send({"type": "start"})
        session_id = (await client.wait_type("session.started"))["session_id"]
        await client.stop()
    finally:
        await client.close()
    folder = folder_of(stored.data_dir, session_id).name
    assert (await fetch(stored.url, f"/v1/sessions/{session_id}/transcript", format="txt"))[0] == 200
    assert (await fetch(stored.url, f"/v1/sessions/{session_id}"))[0] == 200

    raw = [
        f"/v1/sessions/{'0' * 32}/transcript",
        f"/v1/sessions/{'0' * 32}",
        f"/v1/sessions/{'0' * 32}/audio",
        f"/v1/sessions/{session_id.upper()}/transcript",
        f"/v1/sessions/{session_id[:-1]}/transcript",
        f"/v1/sessions/{session_id}0/transcript",
        f"/v1/sessions/{folder}/transcript",
        f"/v1/sessions/{'g' * 32}/transcript",
        "/v1/sessions/..%2Fsecret.txt/transcript",
        "/v1/sessions/..%2F..%2Fsecret.txt/transcript",
        "/v1/sessions/..%2f..%2fsecret.txt",
        "/v1/sessions/%2E%2E%2Fsecret.txt/transcript",
        "/v1/sessions/..%5Csecret.txt/transcript",
        f"/v1/sessions/{session_id}%2F..%2F..%2Fsecret.txt/transcript",
        f"/v1/sessions/..%2F{folder}/transcript",
        f"/v1/sessions/%2E%2E/{session_id}/transcript",
        "/v1/sessions/../secret.txt",
        "/v1/sessions/%00/transcript",
    ]
    for path in raw:
        status, content_type, body = await fetch(stored.url, path, raw=True)
        assert status == 404 and content_type == "application/json", (path, status, body)
        error = json.loads(body)["error"]
        assert error["code"] in ("unknown_session", "not_found") and error["message"], (path, error)
        assert b"SECRET" not in body
    status, _, body = await fetch(stored.url, f"/v1/sessions/{session_id}/transcript", format="../../secret.txt")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_option"
    status, _, body = await fetch(stored.url, f"/v1/sessions/{session_id}/transcript", download="1")
    assert status == 400 and json.loads(body)["error"]["code"] == "unknown_option"


async def test_kill_9_loses_no_final_the_client_got(private_network, tmp_path):
    """A real server process is killed mid-session: what its client got is on disk, whole and readable."""
    data_dir = tmp_path / "data"
    recordings = [recording(r) for r in ("ls-61-70968-0002", "librivox-ss01-0890", "ls-61-70968-0000")]
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), with_pauses(recordings)])
    server = await started_server("--data-dir", str(data_dir), "--record-audio")
    started = time.monotonic()
    session_id, client = await killed_mid_speech(server, pcm16(audio), after_final=2)
    spoken_s = time.monotonic() - started
    assert server.proc.returncode == -signal.SIGKILL
    got = client.of_type("transcript.final")
    assert len(got) >= 2

    folder = folder_of(data_dir, session_id)
    stored = without_at(jsonl(folder / "finals.jsonl"))  # every line parses
    print(f"\nkilled after {spoken_s:.1f}s: the client had {len(got)} finals, finals.jsonl {len(stored)}")
    assert stored[: len(got)] == got and len(stored) <= len(got) + 1
    meta = json.loads((folder / "session.json").read_text())
    assert meta["session_id"] == session_id and meta["ended"] is None
    assert not list(folder.glob(".*")), "a temporary file was left"

    recorded = decode(folder / "audio.opus")  # a file cut short by the kill decodes with av
    print(f"audio: {spoken_s:.2f}s sent, {recorded.size / RATE:.2f}s on disk")
    assert spoken_s - 2.0 < recorded.size / RATE <= spoken_s + 0.2
    n = recorded.size
    assert np.corrcoef(envelope(recorded), envelope(audio[:n]))[0, 1] > 0.9

    # The next server completes what the crash left open, and serves it.
    restarted = await started_server("--data-dir", str(data_dir))
    try:
        deadline = time.monotonic() + 10
        while (entry := await fetch_json(restarted.url, f"/v1/sessions/{session_id}"))["status"] != "ended":
            assert time.monotonic() < deadline, entry
            await asyncio.sleep(0.2)
        assert entry["reason"] == "interrupted" and entry["utterances"] == len(stored), entry
        assert entry["audio"] == f"/v1/sessions/{session_id}/audio"
        status, _, text = await fetch(restarted.url, f"/v1/sessions/{session_id}/transcript", format="txt")
        assert status == 200 and text.decode().splitlines() == [f["text"] for f in stored if f["text"]]
        assert (folder / "transcript.txt").read_bytes() == text
    finally:
        await stopped(restarted)


class _SilentStream:
    """A session's speech pipeline that says nothing: the test emits the session's events itself."""

    utterances = 0

    def feed(self, pcm: np.ndarray) -> None:
        pass

    async def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


async def test_a_final_is_on_disk_before_a_transport_attached_first_has_it(tmp_path):
    """Storage's record runs before every transport sink, not by the order they attached in: a sink
    added before storage still finds each final in finals.jsonl when it gets it."""
    from sessions import Session, SessionOptions
    from ops.storage import Storage

    registry = SimpleNamespace(config=SimpleNamespace(idle_timeout_s=60, max_session_s=60, replica_id=""),
                               worker=SimpleNamespace(engine=SimpleNamespace(name="tiny.en")),
                               remove=lambda session: None)
    session = Session(registry, "websocket", SessionOptions("en", True, 500), lambda emit: _SilentStream(),
                      hold_events=False)
    store = Storage(tmp_path / "data")
    on_disk: list[list[dict[str, Any]]] = []

    def transport(event: dict[str, Any]) -> None:
        if event["type"] == "transcript.final":
            on_disk.append(without_at(jsonl(folder_of(store.root, session.id) / "finals.jsonl")))

    session.add_sink(transport)
    store.attach(session)
    finals = [{"type": "transcript.final", "utterance": n, "text": text, "start": 2.0 * n, "end": 2.0 * n + 1,
               "language": "en", "words": []} for n, text in enumerate(["Hello.", "Again."], 1)]
    try:
        for final in finals:
            session.emit(final)
        await session.end("stop")
    finally:
        await store.close()
    assert on_disk == [finals[:1], finals]


async def test_retention_deletes_only_old_sessions(private_network, tmp_path):
    data_dir = tmp_path / "data"
    now = datetime.now(timezone.utc)
    days = lambda n: now - timedelta(days=n)  # noqa: E731
    old_ended = session_folder(data_dir, days(10), hex_id(1), ended=days(9), finals=["old"])
    old_crashed = session_folder(data_dir, days(10), hex_id(2), ended=None, finals=["lost"], mtime=days(9))
    # Kept: ended an hour ago, whatever its folder's times say.
    recent = session_folder(data_dir, days(0.1), hex_id(3), ended=days(0.05), finals=["new"], mtime=days(9))
    long_one = session_folder(data_dir, days(3), hex_id(4), ended=days(0.5), finals=["long"], mtime=days(9))
    # Not storage's: other names, a file, a link to elsewhere. Never touched, however old.
    elsewhere = tmp_path / "elsewhere"
    session_folder(elsewhere, days(10), hex_id(5), ended=days(9), mtime=days(9))
    strangers = [data_dir / "notes", data_dir / f"{days(10).strftime('%Y-%m-%dT%H-%M-%SZ')}_not-an-id",
                 data_dir / f"2020-01-01T00-00-00Z_{hex_id(6)}.bak", data_dir / "cache"]
    for p in strangers:
        p.mkdir()
        (p / "session.json").write_text(json.dumps({"ended": "2020-01-01T00:00:00.000Z"}))
    (data_dir / f"2020-01-02T00-00-00Z_{hex_id(7)}").write_text("a file, not a folder")
    (data_dir / f"2020-01-03T00-00-00Z_{hex_id(5)}").symlink_to(next(elsewhere.iterdir()))
    age(data_dir, days(9))
    before = sorted(p.name for p in data_dir.iterdir())

    server = await started_server("--data-dir", str(data_dir), "--retention-days", "1")
    try:
        print("\n" + await server.wait_log("retention: deleted"))
        assert "deleted 2 session(s)" in await server.wait_log("retention: deleted")
        listed = await fetch_json(server.url, "/v1/sessions")
    finally:
        await stopped(server)
    assert not old_ended.exists() and not old_crashed.exists()
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        set(before) - {old_ended.name, old_crashed.name})
    assert [s["session_id"] for s in listed["sessions"]] == [hex_id(3), hex_id(4)]
    assert recent.is_dir() and long_one.is_dir() and (elsewhere / next(elsewhere.iterdir()).name).is_dir()
    assert all((p / "session.json").is_file() for p in strangers)


async def test_session_list_pages_newest_first(private_network, tmp_path):
    data_dir = tmp_path / "data"
    now = datetime.now(timezone.utc)
    ids = []
    for n in range(7):  # session 1 is the oldest
        start = now - timedelta(days=2, hours=7 - n)
        session_folder(data_dir, start, hex_id(100 + n), ended=start + timedelta(minutes=5), finals=[f"s{n}"])
        ids.append(hex_id(100 + n))
    newest_first = ids[::-1]
    server = await started_server("--data-dir", str(data_dir))
    live = WSClient(server.url)
    try:
        await live.connect()
        await live.send({"type": "start"})
        live_id = (await live.wait_type("session.started"))["session_id"]

        everything = await fetch_json(server.url, "/v1/sessions")
        assert everything["total"] == 8 and everything["next"] is None
        assert [s["session_id"] for s in everything["sessions"]] == [live_id, *newest_first]
        first = everything["sessions"][0]
        assert first["status"] == "live" and first["ended"] is None and first["transport"] == "websocket"
        for s in everything["sessions"][1:]:
            assert s["status"] == "ended" and s["reason"] == "stop" and s["utterances"] == 1
            assert s["transcript"] == f"/v1/sessions/{s['session_id']}/transcript" and s["audio"] is None

        # By cursor: follow `next` until it is null.
        seen, pages, path = [], 0, "/v1/sessions?limit=3"
        while path:
            body = await fetch_json(server.url, path)
            assert len(body["sessions"]) <= 3
            seen += [s["session_id"] for s in body["sessions"]]
            pages, path = pages + 1, body["next"]
        assert seen == [live_id, *newest_first] and pages == 3
        # By page number: the same pages.
        by_page = [[s["session_id"] for s in (await fetch_json(server.url, "/v1/sessions", limit="3",
                                                                page=str(p)))["sessions"]] for p in (1, 2, 3, 4)]
        assert by_page == [seen[0:3], seen[3:6], seen[6:8], []]
        after = await fetch_json(server.url, "/v1/sessions", limit="2", before=newest_first[1])
        assert [s["session_id"] for s in after["sessions"]] == newest_first[2:4]
        assert after["next"] == f"/v1/sessions?limit=2&before={newest_first[3]}"
        one = await fetch_json(server.url, f"/v1/sessions/{ids[0]}")
        assert one == everything["sessions"][-1]

        for params, status, code in [
            ({"limit": "0"}, 400, "bad_option"), ({"limit": "101"}, 400, "bad_option"),
            ({"limit": "x"}, 400, "bad_option"), ({"page": "0"}, 400, "bad_option"),
            ({"page": "-1"}, 400, "bad_option"), ({"before": "../x"}, 400, "bad_option"),
            ({"before": ids[0], "page": "2"}, 400, "bad_option"), ({"sort": "asc"}, 400, "unknown_option"),
            ({"before": hex_id(999)}, 404, "unknown_session"),
        ]:
            got, content_type, body = await fetch(server.url, "/v1/sessions", **params)
            assert (got, content_type) == (status, "application/json"), (params, got, body)
            assert json.loads(body)["error"]["code"] == code, (params, body)
        await live.stop()
        entry = await fetch_json(server.url, f"/v1/sessions/{live_id}")
        assert entry["status"] == "ended" and entry["reason"] == "stop" and entry["utterances"] == 0
    finally:
        await live.close()
        await stopped(server)


async def test_empty_data_dir_stores_nothing(private_network, tmp_path):
    server = await started_server("--data-dir", "")
    client = WSClient(server.url)
    try:
        await client.connect()
        await client.send({"type": "start"})
        await client.wait_type("session.started")
        await client.stop()
        status, _, body = await fetch(server.url, "/v1/sessions")
    finally:
        await client.close()
        await stopped(server)
    assert not client.of_type("session.saved")
    assert status == 404 and json.loads(body)["error"]["code"] == "storage_off"


# Saved sessions and API keys -----------------------------------------------------------------------

KEY_1 = "one-3f9c0a7e5b1d2c84"
KEY_2 = "two-8e2d4b6a0c9f1735"


def key_id(key: str) -> str:
    """As auth.key_id names a key in logs and saved sessions."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


async def listed_ids(base_url: str, key: str | None = None, **params: str) -> list[str]:
    return [s["session_id"] for s in (await fetch_json(base_url, "/v1/sessions", key=key, **params))["sessions"]]


async def test_each_key_sees_only_its_own_saved_sessions(private_network, tmp_path):
    """Live and saved, listed or asked for by id: another key's session is a 404, as an unknown one."""
    data_dir = tmp_path / "data"
    legacy = hex_id(77)  # saved before owners were recorded: no key_id
    session_folder(data_dir, datetime.now(timezone.utc) - timedelta(days=1), legacy,
                   ended=datetime.now(timezone.utc) - timedelta(hours=23), finals=["from before"])
    server = await started_server("--data-dir", str(data_dir), "--record-audio",
                                  "--api-key", f"{KEY_1},{KEY_2}")
    speech = data_recording("arctic-aew-a0003").audio
    one = WSClient(server.url, headers={"Authorization": f"Bearer {KEY_1}"})
    try:
        await one.connect()
        await one.send({"type": "start"})
        live_id = (await one.wait_type("session.started"))["session_id"]
        await one.speak(pcm16(np.concatenate([speech, np.zeros(RATE, np.float32)])), realtime=False)
        await one.wait_type("transcript.final", timeout=30)

        # Live: K1 sees it, K2 gets what an unknown id gets.
        assert await listed_ids(server.url, KEY_1) == [live_id]
        assert await listed_ids(server.url, KEY_2) == []
        unknown = await fetch(server.url, f"/v1/sessions/{hex_id(1234)}", key=KEY_2)
        assert unknown[0] == 404 and json.loads(unknown[2])["error"]["code"] == "unknown_session"
        for path in (f"/v1/sessions/{live_id}", f"/v1/sessions/{live_id}/transcript",
                     f"/v1/sessions/{live_id}/audio"):
            assert (await fetch(server.url, path, key=KEY_1))[0] == 200, path
            assert await fetch(server.url, path, key=KEY_2) == unknown, path
        await one.stop()
    finally:
        await one.close()

    try:
        # A token minted with K1 opens a session that is K1's.
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/tokens", json={},
                                 headers={"Authorization": f"Bearer {KEY_1}"}) as r:
                assert r.status == 200, await r.text()
                token = (await r.json())["token"]
        by_token = WSClient(server.url, query={"token": token})
        try:
            await by_token.connect()
            await by_token.send({"type": "start"})
            token_id = (await by_token.wait_type("session.started"))["session_id"]
            await by_token.stop()
        finally:
            await by_token.close()
        two = WSClient(server.url, headers={"Authorization": f"Bearer {KEY_2}"})
        try:
            await two.connect()
            await two.send({"type": "start"})
            two_id = (await two.wait_type("session.started"))["session_id"]
            await two.stop()
        finally:
            await two.close()

        assert sorted(await listed_ids(server.url, KEY_1)) == sorted([live_id, token_id])
        assert await listed_ids(server.url, KEY_2) == [two_id]
        assert (await fetch_json(server.url, "/v1/sessions", key=KEY_1))["total"] == 2
        for path, params in [(f"/v1/sessions/{live_id}", {}), (f"/v1/sessions/{live_id}/transcript", {}),
                             (f"/v1/sessions/{live_id}/transcript", {"format": "txt"}),
                             (f"/v1/sessions/{live_id}/audio", {}), (f"/v1/sessions/{legacy}", {}),
                             (f"/v1/sessions/{legacy}/transcript", {"format": "txt"})]:
            assert await fetch(server.url, path, key=KEY_2, **params) == unknown, (path, params)
        assert (await fetch(server.url, f"/v1/sessions/{live_id}/transcript", key=KEY_1, format="txt"))[0] == 200
        assert (await fetch(server.url, f"/v1/sessions/{two_id}", key=KEY_1)) == unknown
        assert (await fetch(server.url, f"/v1/sessions/{legacy}", key=KEY_1)) == unknown
        # A cursor naming another key's session is unknown too.
        assert (await fetch(server.url, "/v1/sessions", key=KEY_2, before=live_id))[0] == 404
        entry = await fetch_json(server.url, f"/v1/sessions/{token_id}", key=KEY_1)
        assert entry["key_id"] == key_id(KEY_1) and entry["status"] == "ended"
    finally:
        await stopped(server)

    # On disk: the owner's id, never the key itself.
    for session_id, owner in [(live_id, KEY_1), (token_id, KEY_1), (two_id, KEY_2)]:
        folder = folder_of(data_dir, session_id)
        assert json.loads((folder / "session.json").read_text())["key_id"] == key_id(owner)
        for path in folder.iterdir():
            assert KEY_1.encode() not in path.read_bytes() and KEY_2.encode() not in path.read_bytes()

    # Access open again: every session is visible, as before keys.
    server = await started_server("--data-dir", str(data_dir))
    try:
        assert sorted(await listed_ids(server.url)) == sorted([live_id, token_id, two_id, legacy])
        assert (await fetch(server.url, f"/v1/sessions/{live_id}/audio"))[0] == 200
    finally:
        await stopped(server)


# What a data folder may hold besides sessions ------------------------------------------------------

def tree(folder: Path) -> dict[str, Any]:
    """What a folder holds, links and FIFOs as such, never followed or opened."""
    out: dict[str, Any] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            out[p.name] = ("link", os.readlink(p))
        elif p.is_dir():
            out[p.name] = tree(p)
        elif p.is_file():
            out[p.name] = p.read_bytes()
        else:
            out[p.name] = "special"
    return out


async def test_broken_entries_stop_neither_listing_nor_recovery_nor_retention(private_network, tmp_path):
    """Odd folders beside real sessions: each is skipped and logged once, and the others are listed,
    completed after a crash and deleted when old, as if they were not there."""
    data_dir = tmp_path / "data"
    now = datetime.now(timezone.utc)
    days = lambda n: now - timedelta(days=n)  # noqa: E731
    # Real sessions: one a crash left open, one kept, two too old.
    crashed = session_folder(data_dir, days(0.5), hex_id(31), ended=None, finals=["still here"])
    recent = session_folder(data_dir, days(0.2), hex_id(32), ended=days(0.19), finals=["recent"])
    old_ended = session_folder(data_dir, days(12), hex_id(33), ended=days(11), finals=["old"])
    old_looped = session_folder(data_dir, days(10), hex_id(34), ended=None, finals=["looped"])
    (old_looped / "loop").symlink_to(old_looped / "loop")  # a symlink loop in an old crashed session
    age(old_looped, days(9))

    # Broken ones, each named as a session would be.
    def broken(started: datetime, n: int) -> Path:
        return session_folder(data_dir, started, hex_id(n), ended=None, finals=["broken"])

    bad_dates = [data_dir / f"2000-13-45T99-99-99Z_{hex_id(40)}", data_dir / f"2100-02-30T00-00-00Z_{hex_id(41)}"]
    for folder in bad_dates:
        folder.mkdir(parents=True)
        (folder / "session.json").write_text(json.dumps({"session_id": folder.name[-32:], "ended": None}))
        (folder / "finals.jsonl").write_text("")
    garbage = broken(days(0.3), 42)
    (garbage / "session.json").write_text('{"session_id": "0000')
    not_object = broken(days(0.31), 43)
    (not_object / "session.json").write_text("[1, 2, 3]")
    meta_folder = broken(days(0.32), 44)
    (meta_folder / "session.json").unlink()
    (meta_folder / "session.json").mkdir()  # a folder where a file is expected
    meta_loop = broken(days(0.33), 45)
    (meta_loop / "session.json").unlink()
    (meta_loop / "session.json").symlink_to(meta_loop / "session.json")
    meta_fifo = broken(days(0.34), 46)
    (meta_fifo / "session.json").unlink()
    os.mkfifo(meta_fifo / "session.json")  # opening it for reading would wait for a writer forever
    finals_folder = broken(days(0.35), 47)
    (finals_folder / "finals.jsonl").unlink()
    (finals_folder / "finals.jsonl").mkdir()
    (data_dir / f"{days(0.36).strftime('%Y-%m-%dT%H-%M-%SZ')}_{hex_id(48)}").write_text("a file, not a folder")
    oddities = [*bad_dates, garbage, not_object, meta_folder, meta_loop, meta_fifo, finals_folder]
    before = {p.name: tree(p) for p in oddities}

    server = await started_server("--data-dir", str(data_dir), "--retention-days", "1")
    try:
        assert "deleted 2 session(s)" in await server.wait_log("retention: deleted")
        for _ in range(2):  # asked twice: still one log line per broken entry
            listed = await fetch_json(server.url, "/v1/sessions")
            assert [s["session_id"] for s in listed["sessions"]] == [hex_id(32), hex_id(31)], listed
            assert listed["total"] == 2
            for folder in oddities:
                status, _, body = await fetch(server.url, f"/v1/sessions/{folder.name[-32:]}/transcript")
                assert status == 404 and json.loads(body)["error"]["code"] == "unknown_session", folder.name
        entry = listed["sessions"][1]
        assert entry["status"] == "ended" and entry["reason"] == "interrupted" and entry["utterances"] == 1
        status, _, text = await fetch(server.url, f"/v1/sessions/{hex_id(31)}/transcript", format="txt")
        assert (status, text) == (200, b"still here\n")
        log = server.log()
    finally:
        await stopped(server)
    print("\n" + "\n".join(line for line in log.splitlines() if "skipped" in line))

    assert (crashed / "transcript.txt").read_text() == "still here\n"
    assert json.loads((crashed / "session.json").read_text())["reason"] == "interrupted"
    assert recent.is_dir() and not old_ended.exists() and not os.path.lexists(old_looped)
    assert {p.name: tree(p) for p in oddities} == before, "a broken entry was changed"
    for folder in oddities:
        assert len([line for line in log.splitlines() if folder.name in line]) == 1, (folder.name, log)
    assert "Traceback" not in log, log


# When the disk refuses ------------------------------------------------------------------------------

@dataclass
class Disk:
    """A small tmpfs in a mount namespace of its own, held open by a sleeping process. The server runs
    inside that namespace (`prefix`); the test reaches the same files through /proc/<pid>/root."""

    holder: subprocess.Popen
    inside: Path  # the mount point, as the server sees it

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("nsenter", "-t", str(self.holder.pid), "-m", "--")

    def outside(self, path: Path) -> Path:
        """The test's view of a path the server sees."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def fill(self) -> Path:
        """Writes until the disk is full: the server's next new page gets ENOSPC."""
        filler = self.outside(self.inside / "filler")
        with open(filler, "wb", buffering=0) as f:
            with pytest.raises(OSError) as full:
                while True:
                    f.write(b"\0" * 65536)
        assert full.value.errno == errno.ENOSPC
        return filler

    def remount(self, mode: str) -> None:
        subprocess.run([*self.prefix, "mount", "-o", f"remount,{mode}", str(self.inside)], check=True)


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "4m") -> Iterator[Disk]:
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o "size=$1" tmpfs "$0" && echo mounted && exec sleep 3600', str(mountpoint), size],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if holder.stdout.readline() != b"mounted\n":
            message = f"cannot mount a tmpfs in a mount namespace (root needed): {holder.stderr.read()!r}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        yield Disk(holder, mountpoint)
    finally:
        holder.kill()
        holder.wait()


async def readiness(base_url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(base_url + "/ready") as r:
            return r.status, await r.json()


async def until_ready(base_url: str, status: str, timeout: float = 15) -> dict[str, Any]:
    """Until GET /ready says `status` (200 for ready, 503 otherwise); its body."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            code, body = await readiness(base_url)
        except aiohttp.ClientConnectionError:  # not listening yet
            code, body = 0, {"status": None}
        if body["status"] == status:
            assert code == (200 if status == "ready" else 503), (code, body)
            return body
        assert time.monotonic() < deadline, (code, body)
        await asyncio.sleep(0.2)


async def storage_errors(base_url: str) -> dict[str, float]:
    """stt_storage_errors_total by op, and the storage_failed error events sent."""
    status, _, body = await fetch(base_url, "/metrics")
    assert status == 200
    found = {}
    for line in body.decode().splitlines():
        m = re.fullmatch(r'stt_storage_errors_total\{op="(\w+)"\} (\S+)', line)
        if m:
            found[m.group(1)] = float(m.group(2))
        if line.startswith("stt_errors_total{") and 'code="storage_failed"' in line:
            found["events"] = float(line.rsplit(" ", 1)[1])
    return found


def failure_lines(log: str, session_id: str) -> list[str]:
    return [line for line in log.splitlines() if session_id in line and "cannot" in line]


FULL = "No space left on device"


async def test_a_full_disk_is_told_counted_and_outlived(private_network, tmp_path):
    """The disk fills mid-session: transcription goes on, the client is told once, /ready, /health and
    /metrics say so, the log has a line per kind, and once there is room again the session's files are
    written with the reason. Then a read-only disk refuses a new session's folder: the same, at its start."""
    with small_disk(tmp_path) as disk:
        data_dir = disk.inside / "data"
        server = await started_server("--data-dir", str(data_dir), "--record-audio", prefix=disk.prefix)
        first, second = data_recording("arctic-aew-a0003").audio, data_recording("fleurs-en-005").audio
        pause = np.zeros(RATE, np.float32)
        client = WSClient(server.url)
        try:
            before = await storage_errors(server.url)
            await client.connect()
            await client.send({"type": "start"})
            session_id = (await client.wait_type("session.started"))["session_id"]
            await client.speak(pcm16(np.concatenate([pause, first, pause])), realtime=False)
            await client.wait_for(lambda e: e["type"] == "transcript.final" and e["utterance"] == 1, timeout=30)
            assert (await readiness(server.url))[0] == 200
            filler = disk.fill()

            await client.speak(pcm16(np.concatenate([second, pause])), realtime=False)
            error = await client.wait_type("error", timeout=30)
            assert error["code"] == "storage_failed" and FULL in error["message"], error
            assert "not being saved" in error["message"]
            ready = await until_ready(server.url, "storage_failing", timeout=5)
            assert ready["storage"] == "failing" and ready["storage_error"] == FULL, ready
            health = await fetch_json(server.url, "/health")
            assert health["status"] == "ok" and health["ready"] is False and health["storage"] == "failing"
            counted = await storage_errors(server.url)
            assert sum(counted[op] - before[op] for op in counted if op != "events") >= 1, counted
            assert counted["events"] == before.get("events", 0) + 1, counted

            # Transcription goes on, and the client is not told twice.
            await client.wait_for(lambda e: e["type"] == "transcript.final" and e["utterance"] == 2, timeout=30)
            await client.speak(pcm16(np.concatenate([first, pause])), realtime=False)
            await client.wait_for(lambda e: e["type"] == "transcript.final" and e["utterance"] == 3, timeout=30)
            await client.stop()
            events = [r.event for r in client.events]
            check_protocol(events)
            assert [e for e in events if e["type"] == "error"] == [error]
            assert not client.of_type("session.saved")

            # Listed as it ended, with why it was not saved.
            entry = await fetch_json(server.url, f"/v1/sessions/{session_id}")
            assert (entry["status"], entry["reason"], entry["error"]) == ("ended", "stop", f"storage_failed: {FULL}")
            log = server.log()
            kinds = [re.search(r"cannot (.+?) \(", line).group(1) for line in failure_lines(log, session_id)]
            assert kinds and len(kinds) == len(set(kinds)), log  # one line per kind
            assert len([line for line in log.splitlines() if "failed (No space" in line]) == 1, log
            assert "Traceback" not in log, log

            # Room again: /ready recovers, and the session's files are written, saying why.
            filler.unlink()
            await until_ready(server.url, "ready", timeout=10)
            folder = disk.outside(data_dir) / next(
                p.name for p in disk.outside(data_dir).iterdir() if p.name.endswith(session_id))
            deadline = time.monotonic() + 10
            while not json.loads((folder / "session.json").read_text())["ended"]:
                assert time.monotonic() < deadline, server.log()
                await asyncio.sleep(0.2)
            meta = json.loads((folder / "session.json").read_text())
            assert (meta["reason"], meta["error"]) == ("stop", f"storage_failed: {FULL}"), meta
            assert meta["utterances"] >= 1 and (folder / "transcript.txt").is_file()
            assert await fetch_json(server.url, f"/v1/sessions/{session_id}") == entry | {
                "ended": meta["ended"], "utterances": meta["utterances"], "audio": entry["audio"]}

            # A read-only disk: the next session cannot make its folder; it is told after session.started.
            disk.remount("ro")
            other = WSClient(server.url)
            try:
                await other.connect()
                await other.send({"type": "start"})
                await other.wait_type("session.started")
                refused = await other.wait_type("error", timeout=10)
                assert refused["code"] == "storage_failed" and "Read-only" in refused["message"], refused
                assert (await until_ready(server.url, "storage_failing", timeout=5))["storage_error"] == \
                    "Read-only file system"
                disk.remount("rw")
                await until_ready(server.url, "ready", timeout=10)
                await other.stop()
                assert [r.event["type"] for r in other.events] == [
                    "session.started", "error", "session.ended"]
            finally:
                await other.close()
            log = server.log()
            assert "Traceback" not in log, log
        finally:
            await client.close()
            await stopped(server)


async def test_b_sessions_left_open_on_a_full_disk_are_completed_once_it_has_room(private_network, tmp_path):
    """A server is killed while its disk is full; the next one starts on the full disk: it lists the
    session as interrupted (with that reason), and completes it as soon as writes work again."""
    with small_disk(tmp_path) as disk:
        data_dir = disk.inside / "data"
        server = await started_server("--data-dir", str(data_dir), prefix=disk.prefix)
        client = WSClient(server.url)
        try:
            await client.connect()
            await client.send({"type": "start"})
            session_id = (await client.wait_type("session.started"))["session_id"]
            speech = data_recording("arctic-aew-a0003").audio
            pause = np.zeros(RATE, np.float32)
            await client.speak(pcm16(np.concatenate([pause, speech, pause])), realtime=False)
            await client.wait_for(lambda e: e["type"] == "transcript.final" and e["utterance"] == 1, timeout=30)
            filler = disk.fill()
            server.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(server.proc.wait, 10)
        finally:
            await client.close()
            server.stop()

        restarted = await asyncio.to_thread(
            lambda: ServerProcess("--data-dir", str(data_dir), prefix=disk.prefix, wait=False))
        try:
            ready = await until_ready(restarted.url, "storage_failing", timeout=60)
            assert ready["storage_error"] == FULL
            entry = await fetch_json(restarted.url, f"/v1/sessions/{session_id}")
            assert (entry["status"], entry["reason"]) == ("interrupted", "interrupted"), entry
            assert entry["utterances"] == 1

            filler.unlink()
            await until_ready(restarted.url, "ready", timeout=10)
            deadline = time.monotonic() + 10
            while (entry := await fetch_json(restarted.url, f"/v1/sessions/{session_id}"))["status"] != "ended":
                assert time.monotonic() < deadline, entry
                await asyncio.sleep(0.2)
            assert entry["reason"] == "interrupted" and entry["utterances"] == 1, entry
            status, _, text = await fetch(restarted.url, f"/v1/sessions/{session_id}/transcript", format="txt")
            assert status == 200 and text.strip()
            log = restarted.log()
            assert len([line for line in log.splitlines() if "cannot complete" in line]) == 1, log
            assert "Traceback" not in log, log
        finally:
            await stopped(restarted)
