"""Two replicas behind HAProxy and behind nginx, each with its configuration from deploy/, as shipped."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest

from balancers import HAProxy, Nginx
from config import Config
from ops.storage.files import SESSION_ID
from sessions import new_session_id
from client import HOST, RTCClient, ServerProcess, SpeechTrack, SSEClient, WSClient
from speech import load_devset, pcm16, recording, word_errors

KEY = "deploy-test-key-0123456789"
SECRET = "one-secret-for-every-replica-0123"  # --token-secret, shared
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_the_replica_id_starts_every_session_id():
    assert all(new_session_id("b").startswith("b") for _ in range(100))
    assert SESSION_ID.fullmatch(new_session_id("0a1b2c3d")) and SESSION_ID.fullmatch(new_session_id())
    with pytest.raises(SystemExit):
        Config.from_args(["--replica-id", "replica-a"], {})


class Cluster:
    def __init__(self, balancer, replicas: dict[str, ServerProcess]) -> None:
        self.balancer, self.replicas = balancer, replicas
        self.url = balancer.url


@pytest.fixture(scope="module", params=[HAProxy, Nginx], ids=["haproxy", "nginx"])
def cluster(request, private_network, tmp_path_factory):
    """Replicas a and b (their --replica-id starts each session id), one key and token secret, a balancer."""
    replicas = {}
    try:
        for rid in ("a", "b"):
            replicas[rid] = ServerProcess(
                "--replica-id", rid, "--api-key", KEY, "--token-secret", SECRET, "--trusted-proxies", "1",
                "--max-sessions", "8", "--data-dir", str(tmp_path_factory.mktemp(f"replica-{rid}")))
        balancer = request.param(f"{HOST}:{replicas['a'].port}", f"{HOST}:{replicas['b'].port}",
                                 tmp_path_factory.mktemp(request.param.name))
    except BaseException:
        for r in replicas.values():
            r.stop()
        raise
    yield Cluster(balancer, replicas)
    balancer.stop()
    for r in replicas.values():
        r.stop()


def wer_ok(reference: str, events: list[dict]) -> bool:
    errors, words = word_errors(reference, " ".join(e["text"] for e in events))
    return errors / words < 0.3


async def ws_transcript(url: str, audio, **client_args) -> WSClient:
    client = WSClient(url, **client_args)
    try:
        await client.connect()
        await client.speak(pcm16(audio) + bytes(16000), realtime=False)
        await client.stop(timeout=40)
    finally:
        await client.close()
    return client


async def test_websocket_sessions_spread_over_both_replicas(cluster):
    speech = [r for r in load_devset() if r.seconds < 8][:4]
    clients = await asyncio.gather(*(ws_transcript(cluster.url, r.audio, headers=AUTH) for r in speech))
    owners = {c.of_type("session.started")[0]["session_id"][0] for c in clients}
    assert owners == {"a", "b"}, owners
    for r, c in zip(speech, clients):
        assert wer_ok(r.text, c.of_type("transcript.final")), (r.text, c.events)


async def test_a_token_minted_by_one_replica_opens_sessions_on_the_other(cluster):
    async with aiohttp.ClientSession() as http:
        async with http.post(cluster.replicas["a"].url + "/v1/tokens", json={}, headers=AUTH) as r:
            assert r.status in (200, 201), await r.text()
            token = (await r.json())["token"]
    speech = recording("ls-61-70968-0000")
    for rid, replica in cluster.replicas.items():
        client = await ws_transcript(replica.url, speech.audio, query={"token": token})
        assert client.of_type("session.started")[0]["session_id"].startswith(rid)
        assert wer_ok(speech.text, client.of_type("transcript.final"))


async def test_webrtc_delete_and_sse_reach_the_replica_that_owns_the_session(cluster):
    speech = recording("ls-1221-135766-0002")
    clients: list[RTCClient] = []
    watchers: list[SSEClient] = []
    try:
        # Round robin: consecutive offers land on both replicas within a few.
        while {c.session_id[0] for c in clients} != {"a", "b"}:
            assert len(clients) < 4, [c.session_id for c in clients]
            client = RTCClient(cluster.url, track=SpeechTrack(speech.audio))
            clients.append(client)
            await client.connect(headers=AUTH)
            watcher = SSEClient(cluster.url, client.session_id, headers=AUTH)  # 200, or it raises
            watchers.append(watcher)
            await watcher.connect()
        await asyncio.gather(*(c.heard_all(timeout=30) for c in clients))
        async with aiohttp.ClientSession(headers=AUTH) as http:
            for client, watcher in zip(clients, watchers):
                assert wer_ok(speech.text, client.of_type("transcript.final")), client.events
                await watcher.wait_type("transcript.final", timeout=10)
                # The URL that Location gave, through the balancer, to the replica that owns it.
                async with http.delete(cluster.url + client.location) as r:
                    assert r.status in (200, 204), await r.text()
                await watcher.ended(timeout=15)
                assert watcher.events[-1].event["type"] == "session.ended"
                # Its saved transcript is on the owner's disk: routed there too.
                async with http.get(f"{cluster.url}/v1/sessions/{client.session_id}/transcript") as r:
                    assert r.status == 200, await r.text()
    finally:
        for c in clients:
            await c.close()
        for w in watchers:
            await w.close()


async def until_draining(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/ready") as r:
                    if r.status == 503:
                        return
            except aiohttp.ClientError:
                return  # already gone
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not start draining")


async def open_and_stop(url: str) -> str:
    """A new WebSocket session and a new WebRTC session through the balancer; the replicas that took them."""
    ws = WSClient(url, headers=AUTH)
    try:
        await ws.connect()
        await ws.send(pcm16(recording("ls-61-70968-0000").audio[:16000]))
        started = await ws.wait_type("session.started", timeout=10)
        await ws.stop(timeout=20)
    finally:
        await ws.close()
    rtc = RTCClient(url, track=SpeechTrack(recording("ls-61-70968-0000").audio[:8000]))
    try:
        await rtc.connect(headers=AUTH)
        async with aiohttp.ClientSession(headers=AUTH) as http, http.delete(url + rtc.location) as r:
            assert r.status in (200, 204), await r.text()
    finally:
        await rtc.close()
    return started["session_id"][0] + rtc.session_id[0]


async def test_stopping_a_replica_drains_it_and_new_sessions_land_on_the_other(cluster):
    long = recording("ls-1221-135766-0001")  # 16.7 s of nearly unbroken speech
    talking: list[WSClient] = []
    speakers: list[asyncio.Task] = []
    try:
        while {c.of_type("session.started")[0]["session_id"][0] for c in talking} != {"a", "b"}:
            assert len(talking) < 4
            client = WSClient(cluster.url, headers=AUTH)
            talking.append(client)
            await client.connect()
            speakers.append(asyncio.create_task(client.speak(pcm16(long.audio) + bytes(32000))))
            await client.wait_type("session.started", timeout=10)
        on_a = [c for c in talking if c.of_type("session.started")[0]["session_id"][0] == "a"]
        for c in on_a:
            await c.wait_type("transcript.partial", timeout=20)
        cluster.replicas["a"].signal()  # SIGTERM: replica a drains
        # From the moment it handles the signal: a socket upgraded in the instant before that, and
        # started after, is ended with shutting_down like every session of a replica that stops.
        await until_draining(cluster.replicas["a"].url)

        # New sessions while a drains and after it has gone: every one succeeds, on b.
        landed, errors = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                landed.append(await open_and_stop(cluster.url))
            except Exception as e:  # noqa: BLE001 - every client error is counted, none is allowed
                errors.append(repr(e))
            if cluster.replicas["a"].proc.poll() is not None and len(landed) >= 3 + len(errors):
                break
        assert cluster.replicas["a"].proc.wait(30) == 0
        assert not errors, errors
        assert landed and set("".join(landed)) == {"b"}, landed

        for c in on_a:  # finals of speech in flight, then session.ended and close 1001
            assert c.of_type("transcript.final"), c.events
            assert (await c.wait_type("session.ended", timeout=5))["reason"] == "shutdown"
            assert await c.closed(timeout=10) == 1001
        for c, speaker in zip(talking, speakers):
            if c not in on_a:  # b's sessions went on: they say everything and end normally
                await asyncio.wait_for(speaker, 60)
                await c.stop(timeout=40)
                assert wer_ok(long.text, c.of_type("transcript.final")), c.events
    finally:
        for t in speakers:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        for c in talking:
            await c.close()
