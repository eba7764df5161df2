"""Access control against a real server process: API keys, session tokens (header, query,
Sec-WebSocket-Protocol), expiry, options bound in a token, origins (CORS and WebSocket), the
per-key session limit, and that a refused request creates nothing."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp
import jwt
import numpy as np
import pytest
import pytest_asyncio

from client import RTCClient, ServerProcess, SpeechTrack, WSClient, health, wait_sessions
from speech import pcm16, recording

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY_A = "alpha-7c1e0f4b9a2d6e83"  # --api-key, with B: a comma-separated value
KEY_B = "bravo-35d8a1c6f0e27b94"
KEY_C = "charlie-e4b7290d1f6a3c58"  # --api-key given a second time
KEY_F = "foxtrot-9a0c6d3e2b7f1e45"  # from --api-key-file
SECRET = "test-token-secret-0123456789"
APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"
FAKE_SDP = "v=0\r\n"  # never parsed: the credential is checked first


async def audio_offer(base_url: str) -> str:
    """A complete SDP offer with audio, from a client that then goes away."""
    client = RTCClient(base_url, track=SpeechTrack(np.zeros(0, np.float32)))
    try:
        return await client.offer()
    finally:
        await client.close()


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def start_and_stop_ws(url: str, **client: Any) -> None:
    """A WebSocket session these credentials may open: started, then stopped cleanly."""
    ws = WSClient(url, **client)
    try:
        await ws.connect()
        await ws.send({"type": "start"})
        await ws.wait_type("session.started", timeout=10)
        await ws.stop()
    finally:
        await ws.close()


def upgrade() -> dict[str, str]:
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


@pytest.fixture(scope="module")
def server(private_network, tmp_path_factory) -> AsyncIterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("auth")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# the fourth key\n\n  {KEY_F}  \n")
    proc = ServerProcess("--api-key", f"{KEY_A},{KEY_B}", "--api-key", KEY_C,
                         "--api-key-file", str(key_file), "--token-secret", SECRET,
                         "--allowed-origins", APP_ORIGIN, "--max-sessions-per-key", "1",
                         "--idle-timeout-s", "20", "--ice-timeout-s", "5", "--max-session-s", "600",
                         "--data-dir", str(folder / "data"))
    yield proc
    assert proc.stop() == 0, proc.log()


@dataclass
class Watched:
    client: WSClient
    session_id: str
    microphone: asyncio.Task


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(server) -> AsyncIterator[Watched]:
    """A session opened with KEY_B that stays open (an open microphone in a quiet room)."""
    client = WSClient(server.url, headers=bearer(KEY_B))
    await client.connect()
    await client.send({"type": "start"})
    started = await client.wait_type("session.started", timeout=10)
    task = asyncio.create_task(client.speak(pcm16(np.zeros(300 * 16000, np.float32)), chunk_ms=100))
    yield Watched(client, started["session_id"], task)
    task.cancel()
    await client.close()


async def still_alone(server, live: Watched) -> None:
    """The refused request created nothing and disturbed nothing."""
    assert (await health(server.url))["sessions"] == 1
    assert not live.client.of_type("session.ended")


async def mint(base_url: str, key: str, **body: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/v1/tokens", json=body, headers=bearer(key)) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Cache-Control"] == "no-store"
            return await r.json()


async def answer(method: str, url: str, *, headers: dict[str, str] | None = None,
                 params: dict[str, str] | None = None, websocket: bool = False,
                 **kwargs: Any) -> tuple[int, Any, dict[str, Any] | None]:
    """Status, headers and JSON body of one request (a WebSocket handshake with `websocket`)."""
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, params=params, **kwargs,
                                headers={**(upgrade() if websocket else {}), **(headers or {})}) as r:
            body = await r.json() if r.content_type == "application/json" else None
            return r.status, r.headers, body


def routes(session_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every route that opens, ends or watches a session, or reads a saved one; and /v1/tokens."""
    return [
        ("POST", "/v1/rtc", {"data": FAKE_SDP, "headers": {"Content-Type": "application/sdp"}}),
        ("DELETE", f"/v1/rtc/{session_id}", {}),
        ("GET", "/v1/ws", {"websocket": True}),
        ("GET", f"/v1/sessions/{session_id}/events", {}),
        ("GET", "/v1/sessions", {}),
        ("GET", f"/v1/sessions/{session_id}/transcript", {}),
        ("POST", "/v1/tokens", {"json": {}}),
    ]


ROUTE_NAMES = ["POST rtc", "DELETE rtc", "GET ws", "GET events", "GET sessions", "GET transcript",
               "POST tokens"]


def forged_token(sub: str = "key-0000000000") -> str:
    now = int(time.time())
    return jwt.encode({"aud": "livestt", "sub": sub, "iat": now, "exp": now + 300},
                      "another-secret-of-some-length!!!", algorithm="HS256")


CREDENTIALS = [  # what is sent, the error code, and its id
    ({}, "unauthorized", "none"),
    ({"headers": bearer("not-a-key")}, "invalid_token", "wrong key"),
    ({"headers": {"Authorization": f"Basic {base64.b64encode(KEY_A.encode()).decode()}"}}, "invalid_token", "basic"),
    ({"headers": bearer(forged_token())}, "invalid_token", "forged token"),
    ({"params": {"token": KEY_A}}, "invalid_token", "key in query"),  # a key is never taken from a URL
]


@pytest.mark.parametrize("route, credential, code", [
    pytest.param(route, credential, code, id=f"{name}, {label}")
    for route, name in enumerate(ROUTE_NAMES)
    for credential, code, label in CREDENTIALS
    if "params" not in credential or name.startswith("GET")  # query tokens are for GET routes
])


async def test_missing_or_wrong_credentials_are_401(server, live, route, credential, code):
    method, path, kwargs = routes(live.session_id)[route]
    headers = {**kwargs.pop("headers", {}), **credential.get("headers", {})}
    status, response_headers, body = await answer(method, server.url + path, headers=headers,
                                                  params=credential.get("params"), **kwargs)
    assert status == 401, (status, body)
    assert body["error"]["code"] == code and body["error"]["message"], body
    challenge = response_headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) == (code != "unauthorized"), challenge
    await still_alone(server, live)


async def test_open_routes(server, live):
    async with aiohttp.ClientSession() as http:
        for path in ("/health", "/ready", "/metrics", "/"):
            async with http.get(server.url + path) as r:
                assert r.status == 200, path


async def test_api_key_on_every_route(server, live):
    # Opening a session: WebRTC with the key of the command line's second --api-key.
    rtc = RTCClient(server.url, track=SpeechTrack(np.zeros(0, np.float32)))
    try:
        await rtc.connect(headers=bearer(KEY_C))
        await rtc.wait_type("session.started", timeout=10)
        # Ending it: only its own key sees it.
        status, _, body = await answer("DELETE", server.url + rtc.location, headers=bearer(KEY_A))
        assert status == 404 and body["error"]["code"] == "unknown_session"
        status, _, body = await answer("DELETE", server.url + rtc.location, headers=bearer(KEY_C))
        assert status == 200 and body == {"session_id": rtc.session_id, "reason": "deleted"}
        assert (await rtc.wait_type("session.ended", timeout=10))["reason"] == "deleted"
    finally:
        await rtc.close()
    await wait_sessions(server.url, 1, timeout=5)
    # The key from the file, over the WebSocket.
    await start_and_stop_ws(server.url, headers=bearer(KEY_F))
    # Watching, reading saved sessions, minting tokens.
    async with aiohttp.ClientSession() as http:
        events = f"{server.url}/v1/sessions/{live.session_id}/events"
        async with http.get(events, headers=bearer(KEY_A)) as r:
            assert r.status == 404  # another key's session
        async with http.get(events, headers=bearer(KEY_B)) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
        async with http.get(server.url + "/v1/sessions", headers=bearer(KEY_A)) as r:
            assert r.status == 200, await r.text()
    assert (await mint(server.url, KEY_A))["token"]
    await wait_sessions(server.url, 1, timeout=5)


async def test_session_tokens(server, live):
    minted = await mint(server.url, KEY_A, ttl_s=120)
    token = minted["token"]
    assert KEY_A not in token
    assert time.time() + 115 < minted["expires_at"] <= time.time() + 122
    # As ?token= and as Sec-WebSocket-Protocol, with and without the "livestt" protocol beside it.
    for client, protocol in [
        (WSClient(server.url, query={"token": token}), None),
        (WSClient(server.url, protocols=("livestt", f"bearer.{token}")), "livestt"),
        (WSClient(server.url, protocols=(f"bearer.{token}",)), f"bearer.{token}"),
        (WSClient(server.url, headers=bearer(token)), None),
    ]:
        try:
            await client.connect()
            assert client.ws.protocol == protocol  # RFC 6455: one of those offered, echoed
            await client.send({"type": "start"})
            await client.wait_type("session.started", timeout=10)
            await client.stop()
        finally:
            await client.close()
        await wait_sessions(server.url, 1, timeout=5)
    # As Bearer on POST /v1/rtc, and on DELETE of the session it opened.
    rtc = RTCClient(server.url, track=SpeechTrack(np.zeros(0, np.float32)))
    try:
        await rtc.connect(headers=bearer(token))
        await rtc.wait_type("session.started", timeout=10)
        status, _, _ = await answer("DELETE", server.url + rtc.location, headers=bearer(token))
        assert status == 200
    finally:
        await rtc.close()
    await wait_sessions(server.url, 1, timeout=5)
    # Events of a session of its key, by query (EventSource cannot set headers).
    token_b = (await mint(server.url, KEY_B))["token"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v1/sessions/{live.session_id}/events",
                            params={"token": token_b}) as r:
            assert r.status == 200
    # A token opens and watches sessions; it mints nothing and reads no saved transcript.
    for method, path in [("POST", "/v1/tokens"), ("GET", "/v1/sessions"),
                         ("GET", f"/v1/sessions/{live.session_id}/transcript")]:
        status, headers, body = await answer(method, server.url + path, headers=bearer(token))
        assert status == 403 and body["error"]["code"] == "key_required", (path, status, body)
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    await still_alone(server, live)


async def test_expired_token_is_401(server, live):
    minted = await mint(server.url, KEY_A, ttl_s=1)
    await asyncio.sleep(max(0.0, minted["expires_at"] - time.time()) + 0.3)
    token = minted["token"]
    for method, path, kwargs in [
        ("GET", "/v1/ws", {"websocket": True, "params": {"token": token}}),
        ("GET", "/v1/ws", {"websocket": True, "headers": {"Sec-WebSocket-Protocol": f"livestt, bearer.{token}"}}),
        ("POST", "/v1/rtc", {"headers": {**bearer(token), "Content-Type": "application/sdp"}, "data": FAKE_SDP}),
    ]:
        status, headers, body = await answer(method, server.url + path, **kwargs)
        assert status == 401 and body["error"]["code"] == "token_expired", (status, body)
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.url + "/v1/ws", params={"token": token})
        assert refused.value.status == 401
    await still_alone(server, live)


async def test_token_fixes_its_options(server, live):
    token = (await mint(server.url, KEY_A, options={"partials": False, "endpoint_ms": 800}))["token"]
    # Another value in the query: refused before the upgrade; on POST /v1/rtc too.
    status, _, body = await answer("GET", server.url + "/v1/ws", websocket=True,
                                   params={"token": token, "partials": "true"})
    assert status == 403 and body["error"]["code"] == "option_not_allowed", body
    status, _, body = await answer("POST", server.url + "/v1/rtc", params={"endpoint_ms": "500"},
                                   headers={**bearer(token), "Content-Type": "application/sdp"},
                                   data=await audio_offer(server.url))
    assert status == 403 and body["error"]["code"] == "option_not_allowed", body
    # In the start message: an error event, then close 1008.
    client = WSClient(server.url, query={"token": token})
    try:
        await client.connect()
        await client.send({"type": "start", "partials": True})
        assert await client.closed(timeout=5) == 1008
    finally:
        await client.close()
    assert [e["code"] for e in client.of_type("error")] == ["option_not_allowed"]
    await still_alone(server, live)
    # The same value, or none: the token's options hold (no partials while speaking).
    speech = recording("ls-61-70968-0000")
    client = WSClient(server.url, query={"token": token, "endpoint_ms": "800"})
    try:
        await client.connect()
        await client.send({"type": "start"})
        await client.speak(pcm16(np.concatenate([speech.audio, np.zeros(16000, np.float32)])))
        await client.wait_last_final(timeout=15)
        await client.stop()
    finally:
        await client.close()
    assert client.of_type("transcript.final") and not client.of_type("transcript.partial")
    # A token cannot promise what the server refuses.
    async with aiohttp.ClientSession() as http:
        for body, code in [({"options": {"language": "xx"}}, "bad_option"),
                           ({"options": {"colour": "red"}}, "unknown_option"),
                           ({"ttl_s": 86400}, "bad_option"), ({"max_session_s": 601}, "bad_option"),
                           ({"scope": "all"}, "unknown_option")]:
            async with http.post(server.url + "/v1/tokens", json=body, headers=bearer(KEY_A)) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == code, body
    await wait_sessions(server.url, 1, timeout=5)


async def test_token_limits_the_session_length(server, live):
    token = (await mint(server.url, KEY_A, max_session_s=2))["token"]
    client = WSClient(server.url, query={"token": token})
    try:
        await client.connect()
        await client.send({"type": "start"})
        await client.wait_type("session.started", timeout=10)
        started = time.monotonic()
        microphone = asyncio.create_task(client.speak(pcm16(np.zeros(30 * 16000, np.float32))))
        ended = await client.wait_type("session.ended", timeout=10)
        took = time.monotonic() - started
        microphone.cancel()
    finally:
        await client.close()
    assert ended["reason"] == "max_duration"
    assert 1.5 <= took < 4, took
    await wait_sessions(server.url, 1, timeout=5)


async def test_origins(server, live):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as http:
        async with http.options(server.url + "/v1/rtc", headers={"Origin": APP_ORIGIN, **preflight}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
            allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
            assert {"authorization", "content-type"} <= allowed
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        async with http.options(server.url + "/v1/rtc", headers={"Origin": EVIL_ORIGIN, **preflight}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden_origin"
            assert "Access-Control-Allow-Origin" not in r.headers
        # Simple requests: the allowed origin may read the answer (and its Location); the other not.
        async with http.get(server.url + "/health", headers={"Origin": APP_ORIGIN}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
            assert "Location" in r.headers["Access-Control-Expose-Headers"]
        async with http.get(server.url + "/health", headers={"Origin": EVIL_ORIGIN}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
    # A valid credential from a page of another origin creates nothing.
    offer = await audio_offer(server.url)
    status, headers, body = await answer(
        "POST", server.url + "/v1/rtc", data=offer,
        headers={**bearer(KEY_A), "Content-Type": "application/sdp", "Origin": EVIL_ORIGIN})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    assert "Access-Control-Allow-Origin" not in headers
    token = (await mint(server.url, KEY_A))["token"]
    status, _, body = await answer("GET", server.url + "/v1/ws", websocket=True,
                                   params={"token": token}, headers={"Origin": EVIL_ORIGIN})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    await still_alone(server, live)
    # The allowed origin and the server's own are let in.
    for origin in (APP_ORIGIN, server.url):
        await start_and_stop_ws(server.url, query={"token": token}, headers={"Origin": origin})
        await wait_sessions(server.url, 1, timeout=5)


async def test_sessions_per_key(server, live):
    first = WSClient(server.url, headers=bearer(KEY_A))
    microphone = None
    try:
        await first.connect()
        await first.send({"type": "start"})
        await first.wait_type("session.started", timeout=10)
        microphone = asyncio.create_task(first.speak(pcm16(np.zeros(60 * 16000, np.float32))))
        assert (await health(server.url))["sessions"] == 2
        # The same key, by WebSocket (as --max-sessions: close 1013) and WebRTC (429, Retry-After).
        token = (await mint(server.url, KEY_A))["token"]
        for again in (WSClient(server.url, headers=bearer(KEY_A)), WSClient(server.url, query={"token": token})):
            try:
                await again.connect()
                assert await again.closed(timeout=5) == 1013
                assert "limit" in again.close_reason
            finally:
                await again.close()
            assert [e.event["type"] for e in again.events] in ([], ["error"])
        status, headers, body = await answer(
            "POST", server.url + "/v1/rtc", data=await audio_offer(server.url),
            headers={**bearer(token), "Content-Type": "application/sdp"})
        assert status == 429 and body["error"]["code"] == "key_session_limit", body
        assert int(headers["Retry-After"]) > 0
        assert (await health(server.url))["sessions"] == 2
        # Another key has its own allowance.
        await start_and_stop_ws(server.url, headers=bearer(KEY_C))
        microphone.cancel()
        await first.stop()
    finally:
        if microphone is not None:
            microphone.cancel()
        await first.close()
    await wait_sessions(server.url, 1, timeout=5)
    await start_and_stop_ws(server.url, headers=bearer(KEY_A))


async def test_replicas_with_one_secret_take_each_others_tokens(server, live):
    """A token minted by one replica opens a session on another with the same --token-secret and key;
    a key the other replica does not have (removed) takes its tokens with it."""
    replica = await asyncio.to_thread(ServerProcess, "--api-key", KEY_C, "--token-secret", SECRET)
    try:
        token_c = (await mint(server.url, KEY_C))["token"]
        token_a = (await mint(server.url, KEY_A))["token"]
        await start_and_stop_ws(replica.url, query={"token": token_c})
        status, _, body = await answer("GET", replica.url + "/v1/ws", websocket=True, params={"token": token_a})
        assert status == 401 and body["error"]["code"] == "invalid_token", body
    finally:
        assert await asyncio.to_thread(replica.stop) == 0, replica.log()
    await still_alone(server, live)


async def test_the_watched_session_lived_through_it_all(server, live):
    live.microphone.cancel()
    await live.client.stop()
    assert not live.client.of_type("error")
    await wait_sessions(server.url, 0, timeout=5)


async def test_default_server_is_open_to_its_own_origin_only(server_default):
    """No key configured: open as before; a page of another origin is still refused."""
    status, _, body = await answer("GET", server_default.url + "/v1/ws", websocket=True,
                                   headers={"Origin": EVIL_ORIGIN})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    await start_and_stop_ws(server_default.url, headers={"Origin": server_default.url})


@pytest.fixture(scope="module")
def server_default(private_network) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess()
    yield proc
    assert proc.stop() == 0, proc.log()
