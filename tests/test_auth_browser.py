"""web/stt.js with a session token, in Debian's Chromium, against a server that has API keys: the
token goes as Bearer to /v1/rtc and as ?token= to /v1/ws; without it the server refuses."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import sync_playwright

from client import ServerProcess, launch_chromium
from speech import recording, wer, write_wav

BROWSER_HOST = "10.77.0.1"  # Chromium ignores loopback candidates (see test_browser.py)
KEY = "page-backend-key-5c2e8f1a9b07"
SPEECH_ID = "ls-61-70968-0000"
LEAD_S, TAIL_S = 1.5, 2.5

# In the page: the embedding app's code, given a token by its back end.
START = """async ({ token, transport }) => {
  const { startTranscription } = await import("/web/stt.js");
  window.finals = [];
  try {
    window.session = await startTranscription({ token, transport, onFinal: (e) => finals.push(e.text) });
    return { transport: window.session.transport };
  } catch (error) {
    return { error: error.code };
  }
}"""
STOP = "async () => { await window.session.stop(); return window.finals; }"


@pytest.fixture(scope="module")
def microphone(tmp_path_factory) -> tuple[Path, float]:
    audio = np.concatenate([np.zeros(int(LEAD_S * 16000), np.float32), recording(SPEECH_ID).audio,
                            np.zeros(int(TAIL_S * 16000), np.float32)])
    path = tmp_path_factory.mktemp("microphone") / "speech.wav"
    write_wav(path, audio)
    return path, audio.size / 16000


@pytest.fixture(scope="module")
def server(private_network):
    proc = ServerProcess("--api-key", KEY, "--ice-timeout-s", "5", host=BROWSER_HOST)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def page(chromium, server, microphone):
    with sync_playwright() as p:
        browser = launch_chromium(p, chromium, microphone[0], server.url)
        page = browser.new_page()
        page.goto(server.url + "/")  # the page itself needs no credential
        yield page
        browser.close()


def mint(server: ServerProcess) -> str:
    """What the embedding app's back end does with its key."""
    request = urllib.request.Request(server.url + "/v1/tokens", method="POST",
                                     data=json.dumps({"ttl_s": 60}).encode(),
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())["token"]


@pytest.mark.parametrize("transport", ["rtc", "ws"])
def test_stt_js_sends_the_token(page, server, microphone, transport):
    before = server.audio_received_s()
    started = time.monotonic()
    result = page.evaluate(START, {"token": mint(server), "transport": transport})
    assert result.get("transport") == transport, result
    time.sleep(max(0.0, started + microphone[1] - time.monotonic()))
    # The lead may go by before the session connects; the speech and the tail may not.
    server.hear_out(before, microphone[1] - LEAD_S, timeout=5 * microphone[1])
    text = " ".join(page.evaluate(STOP))
    print(f"\n{transport} with a token: {text}")
    assert wer([(recording(SPEECH_ID).text, text)]) <= 0.2, text


@pytest.mark.parametrize("transport, code", [("rtc", "unauthorized"), ("ws", "connect_failed")])
def test_without_a_token_the_server_refuses(page, server, transport, code):
    result = page.evaluate(START, {"token": "", "transport": transport})
    assert result == {"error": code}
