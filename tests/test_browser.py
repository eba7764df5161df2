"""The page in a real browser: Debian's Chromium, whose fake microphone says devset speech."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from client import ROOT, ServerProcess, launch_chromium
from speech import DEVSET, load_devset, normalize, wer, write_wav

# Chromium ignores loopback candidates: the page and the server meet on the veth that tests/netns.sh makes.
BROWSER_HOST = "10.77.0.1"
ARTIFACTS = ROOT / "test-artifacts"
SPEECH_IDS = ["jfk-inaugural-ask-not", "ls-61-70968-0000", "ls-61-70968-0002"]
LEAD_S, GAP_S, TAIL_S = 2.0, 3.0, 3.0  # capture starts at getUserMedia, before the session connects
# The page's paragraph rule (web/app.js): a pause over PARAGRAPH_PAUSE_S, or a sentence's end once the
# paragraph is PARAGRAPH_LONG_S long. GAP_S is well over the pause, and the pauses inside each recording
# well under it: every recording is a paragraph of its own.
PARAGRAPH_PAUSE_S, PARAGRAPH_LONG_S = 2.0, 30.0
SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f\u2026][\"'\u201d\u2019\u00bb)\]]*$")
# Small enough that a refused upload costs nothing, large enough for the test speech (about 1 MB).
MAX_UPLOAD_MB = 2

# Every change of the state indicator, in order, however quickly they follow one another.
RECORD_STATES = """
window.__states = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("state");
  window.__states.push(el.dataset.state);
  new MutationObserver((records) => records.forEach((r, i) =>
    window.__states.push(i + 1 < records.length ? records[i + 1].oldValue : el.dataset.state)
  )).observe(el, { attributes: true, attributeFilter: ["data-state"], attributeOldValue: true });
});
"""

# The status badge as laid out in every state it shows: its height, the height of one line of it, and
# whether it sits on the title's row.
RECORD_BADGE = """
window.__badge = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("state");
  const title = document.querySelector("h1");
  const measure = () => {
    const css = getComputedStyle(el);
    const px = (name) => parseFloat(css.getPropertyValue(name));
    const box = el.getBoundingClientRect(), beside = title.getBoundingClientRect();
    window.__badge.push({
      state: el.dataset.state, text: el.innerText, height: box.height,
      one_line: px("line-height") + px("padding-top") + px("padding-bottom")
        + px("border-top-width") + px("border-bottom-width"),
      beside_title: box.top < beside.bottom && box.left >= beside.right,
    });
  };
  measure();
  new MutationObserver(measure).observe(el, { attributes: true, childList: true, subtree: true, characterData: true });
});
"""

# Where the partial is, each time it changes: at the end of the last paragraph, lighter than the finals.
RECORD_PARTIALS = """
window.__partials = [];
document.addEventListener("DOMContentLoaded", () => {
  const transcript = document.getElementById("transcript");
  const partial = document.getElementById("partial");
  new MutationObserver(() => {
    if (!partial.isConnected || !partial.textContent) return;
    window.__partials.push({
      at_end: partial.parentElement.matches("#transcript > .paragraph:last-child") && !partial.nextElementSibling,
      lighter: getComputedStyle(partial).color !== getComputedStyle(transcript).color,
    });
  }).observe(transcript, { childList: true, subtree: true, characterData: true });
});
"""


# The file's progress as the page shows it, each time it changes: the state, the bar's position (-1 while it
# is indeterminate), the line above it, and whether Start is held off meanwhile.
RECORD_FILE_PROGRESS = """
window.__file = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("file-progress");
  const record = () => window.__file.push({
    state: document.getElementById("state").dataset.state, position: bar.position,
    status: document.getElementById("file-status").textContent,
    start_disabled: document.getElementById("start").disabled,
  });
  new MutationObserver(record).observe(document.getElementById("file-work"),
    { attributes: true, childList: true, subtree: true, characterData: true });
});
"""

# A file dragged onto the page and dropped on the transcript, as a file manager's drag delivers it.
DROP_FILE = """([name, text]) => {
  const data = new DataTransfer();
  data.items.add(new File([text], name, { type: "text/plain" }));
  const on = (type, target) => target.dispatchEvent(
    new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
  const target = document.getElementById("transcript");
  on("dragenter", target);
  on("dragover", target);
  const highlighted = document.getElementById("drop").classList.contains("dragging");
  const taken = !on("drop", target);  // the page took it: the browser does not navigate to the file
  return { highlighted, taken, after: document.getElementById("drop").classList.contains("dragging") };
}"""


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[Path, float, str]:
    """The fake microphone's WAV, how long it plays, and what it says."""
    recordings = {r.id: r for r in load_devset()}
    chosen = [recordings[i] for i in SPEECH_IDS]
    silence = lambda s: np.zeros(int(s * 16000), np.float32)  # noqa: E731
    parts = [silence(LEAD_S)]
    for r in chosen:
        parts += [r.audio, silence(GAP_S)]
    audio = np.concatenate(parts + [silence(TAIL_S)])
    path = tmp_path_factory.mktemp("microphone") / "speech.wav"
    write_wav(path, audio)
    return path, audio.size / 16000, " ".join(r.text for r in chosen)


@pytest.fixture(scope="module")
def page_server(private_network):
    proc = ServerProcess("--ice-timeout-s", "5", "--max-upload-mb", str(MAX_UPLOAD_MB), host=BROWSER_HOST)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def browser(chromium, page_server, speech):
    wav = speech[0]
    with sync_playwright() as p:
        browser = launch_chromium(p, chromium, wav, page_server.url)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.add_init_script(RECORD_STATES)
    page.add_init_script(RECORD_PARTIALS)
    yield page
    context.close()


def state(page: Page):
    return page.locator("#state")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def in_order(expected: list[str], seen: list[str]) -> bool:
    remaining = iter(seen)
    return all(state in remaining for state in expected)


def transcribe(page: Page, server: ServerProcess, url: str, duration_s: float) -> str:
    """Start, let the fake microphone say everything, stop; the finals as the page shows them."""
    page.goto(url)
    expect(state(page)).to_have_attribute("data-state", "idle")
    before = server.audio_received_s()
    started = time.monotonic()
    page.click("#start")
    expect(state(page)).to_have_attribute("data-state", "listening", timeout=20_000)
    # The last utterance ends in the trailing silence: its final comes by itself, before Stop.
    page.wait_for_timeout(max(0.0, started + duration_s + 1.0 - time.monotonic()) * 1000)
    # The lead may go by before the session connects; the speech and the tail may not.
    server.hear_out(before, duration_s - LEAD_S + 1.0, timeout=5 * duration_s)
    page.click("#stop")
    expect(state(page)).to_have_attribute("data-state", "stopped", timeout=20_000)
    return " ".join(t.strip() for t in page.locator("#transcript .final .text").all_inner_texts())


def download(page: Page, format: str) -> str:
    with page.expect_download() as info:
        page.click(f"[data-format={format}]")
    return Path(info.value.path()).read_text(encoding="utf-8")


def clock(seconds: float) -> str:
    """A time in the session as the page shows it: 0:07, 12:34 or 1:02:03."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def paragraphs_by_the_rule(finals: list[dict]) -> list[list[str]]:
    """The finals' texts grouped as docs/browser.md says the page groups them."""
    paragraphs: list[list[str]] = []
    first = last = None
    for f in finals:
        if last is None or f["start"] - last["end"] > PARAGRAPH_PAUSE_S or (
                f["start"] - first["start"] > PARAGRAPH_LONG_S and SENTENCE_END.search(last["text"])):
            paragraphs.append([])
            first = f
        paragraphs[-1].append(f["text"])
        last = f
    return paragraphs


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_cues(text: str, separator: str) -> list[tuple[float, float, str]]:
    """Cues of SRT (numbered, ',' before milliseconds) or of WebVTT (after its header, '.')."""
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(separator)}(\d\d\d)"
    cues = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        if separator == ",":
            assert lines.pop(0) == str(len(cues) + 1), block
        match = re.fullmatch(f"{stamp} --> {stamp}", lines[0])
        assert match, block
        start, end = _seconds(*match.groups()[:4]), _seconds(*match.groups()[4:])
        assert start < end and lines[1:], block
        cues.append((start, end, " ".join(lines[1:])))
    assert [c[0] for c in cues] == sorted(c[0] for c in cues)
    return cues


@pytest.mark.parametrize("transport", ["rtc", "ws"])
def test_page_transcribes(page, page_server, speech, transport):
    _, duration, reference = speech
    text = transcribe(page, page_server, f"{page_server.url}/?transport={transport}", duration)
    screenshot(page, f"desktop-{transport}.png")
    assert page.locator("#transport").text_content() == {"rtc": "WebRTC", "ws": "WebSocket"}[transport]
    error_rate = wer([(reference, text)])
    print(f"\n{transport}: WER {error_rate:.3f}: {text}")
    assert error_rate <= 0.12, text
    assert in_order(["idle", "connecting", "listening", "stopping", "stopped"], page.evaluate("window.__states"))

    finals = page.locator("#transcript .final .text").all_inner_texts()
    finals = [f.strip() for f in finals]
    saved = json.loads(download(page, "json"))
    assert [f["text"] for f in saved["finals"]] == finals and saved["model"] == "tiny.en"

    # Each final shows when it started in the session, in order.
    stamps = page.locator("#transcript .final .stamp").all_inner_texts()
    assert stamps == [clock(f["start"]) for f in saved["finals"]], stamps
    assert all(re.fullmatch(r"\d+:\d\d", s) for s in stamps), stamps
    starts = [f["start"] for f in saved["finals"]]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] < duration

    # Finals join into paragraphs by the rule: here, one paragraph a recording.
    paragraphs = [p.locator(".final .text").all_inner_texts()
                  for p in page.locator("#transcript .paragraph").all()]
    paragraphs = [[t.strip() for t in p] for p in paragraphs]
    print(f"paragraphs: {paragraphs}")
    assert paragraphs == paragraphs_by_the_rule(saved["finals"])
    assert len(paragraphs) == len(SPEECH_IDS) and max(len(p) for p in paragraphs) > 1, paragraphs
    assert [f["paragraph"] for f in saved["finals"]] == [i for i, p in enumerate(paragraphs) for _ in p]
    assert download(page, "txt") == "\n\n".join(" ".join(p) for p in paragraphs) + "\n"

    # The partial was shown at the end of the paragraph in progress, lighter than the finals.
    partials = page.evaluate("window.__partials")
    print(f"{len(partials)} partials seen")
    assert all(p["at_end"] and p["lighter"] for p in partials), partials

    # The latency figures are behind a disclosure, closed until the user opens it: one delay a final.
    latency = page.locator("#latency")
    assert latency.evaluate("details => details.open") is False
    expect(page.locator("#delays")).to_be_hidden()
    page.click("#latency summary")
    expect(page.locator("#delays")).to_be_visible()
    delays = [float(d.removesuffix(" s")) for d in page.locator("#delays .delay").all_inner_texts()]
    assert len(delays) == len(finals) and all(0 <= d < 5 for d in delays), delays
    expect(page.locator("#delay")).to_contain_text(f"of {len(finals)}")

    srt = parse_cues(download(page, "srt"), ",")
    assert [c[2] for c in srt] == finals
    vtt_text = download(page, "vtt")
    assert vtt_text.startswith("WEBVTT\n\n")
    vtt = parse_cues(vtt_text.removeprefix("WEBVTT\n\n"), ".")
    assert [c[2] for c in vtt] == finals and [c[:2] for c in vtt] == [c[:2] for c in srt]
    assert srt[-1][1] < duration


# Every second, the bytes of Opus the page's peer connection has sent (outbound-rtp, headers not counted).
RECORD_SENT = """
window.__sent = [];
const NativePeerConnection = window.RTCPeerConnection;
window.RTCPeerConnection = function (...args) {
  const pc = new NativePeerConnection(...args);
  const timer = setInterval(async () => {
    if (pc.connectionState === "closed") return clearInterval(timer);
    for (const s of (await pc.getStats()).values())
      if (s.type === "outbound-rtp" && s.kind === "audio") window.__sent.push([s.timestamp, s.bytesSent]);
  }, 1000);
  return pc;
};
window.RTCPeerConnection.prototype = NativePeerConnection.prototype;
"""


def test_the_browser_sends_opus_at_the_rate_the_answer_asks(page, page_server):
    """Unasked, Chromium codes the microphone at 32 kbit/s; the answer asks for `--opus-bitrate` (96000)."""
    page.add_init_script(RECORD_SENT)
    page.goto(f"{page_server.url}/?transport=rtc")
    page.click("#start")
    expect(state(page)).to_have_attribute("data-state", "listening", timeout=20_000)
    page.wait_for_timeout((LEAD_S + 8) * 1000)  # into the first recording's speech
    page.click("#stop")
    expect(state(page)).to_have_attribute("data-state", "stopped", timeout=20_000)
    sent = page.evaluate("window.__sent")
    rates = [8 * (b2 - b1) / (t2 - t1) for (t1, b1), (t2, b2) in zip(sent, sent[1:])]  # kbit/s: t in ms
    print(f"Opus sent, kbit/s a second: {[round(r) for r in rates]}")
    assert max(rates) > 64, rates


def test_without_webrtc_the_page_falls_back_to_the_websocket(page, page_server, speech):
    page.add_init_script("delete window.RTCPeerConnection; delete window.webkitRTCPeerConnection;")
    _, duration, reference = speech
    text = transcribe(page, page_server, f"{page_server.url}/", duration)
    assert page.locator("#transport").text_content() == "WebSocket"
    assert wer([(reference, text)]) <= 0.12, text


def test_phone_layout(browser, page_server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
    page = context.new_page()
    page.add_init_script(RECORD_BADGE)
    page.goto(f"{page_server.url}/")
    page.click("#start")
    expect(state(page)).to_have_attribute("data-state", "listening", timeout=20_000)
    # JFK's first phrase ends 2.5 s into the speech: a final on the page while it is laid out.
    # (A starved fake microphone plays slower than real time: see ServerProcess.hear_out.)
    expect(page.locator("#transcript .final").first).to_be_visible(timeout=60_000)
    screenshot(page, "phone.png")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for button in page.locator("button:visible, summary").all():
        box = button.bounding_box()
        assert box["height"] >= 44 and box["width"] >= 44, button.inner_text()
    page.click("#latency summary")
    expect(page.locator("#delays")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # The phone is locked: the page is hidden, and the session ends cleanly.
    page.evaluate("""() => {
        Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
        document.dispatchEvent(new Event("visibilitychange"));
    }""")
    expect(state(page)).to_have_attribute("data-state", "stopped", timeout=20_000)
    expect(page.locator("#alert")).to_contain_text("the page was hidden")
    wait_sessions(page, page_server, 0)
    # A file on the phone: its progress and transcript fit the width as well.
    throttle_upload(page, 100_000)
    page.set_input_files("#file", DEVSET / "ls-61-70968-0002.wav")
    expect(page.locator("#file-progress")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#cancel").bounding_box()
    assert box["height"] >= 44 and box["width"] >= 44, box
    screenshot(page, "phone-file.png")
    expect(state(page)).to_have_attribute("data-state", "done", timeout=60_000)
    expect(page.locator("#transcript .final").first).to_be_visible()
    # In every state it went through, the status badge kept to one line, beside the title.
    badge = page.evaluate("window.__badge")
    assert {"idle", "connecting", "listening", "stopping", "stopped", "uploading", "transcribing",
            "done"} <= {b["state"] for b in badge}, badge
    assert all(b["height"] <= b["one_line"] + 0.5 and b["beside_title"] for b in badge), badge
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    context.close()


def throttle_upload(page: Page, bytes_per_s: int) -> None:
    """Chromium's own network emulation: the upload takes long enough for its progress to be seen."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": bytes_per_s})


def test_page_transcribes_a_file(page, page_server, speech):
    wav, duration, reference = speech
    recordings = {r.id: r for r in load_devset()}
    starts, at = [], LEAD_S  # where each recording starts in the file
    for i in SPEECH_IDS:
        starts.append(at)
        at += recordings[i].seconds + GAP_S
    page.add_init_script(RECORD_FILE_PROGRESS)
    page.goto(f"{page_server.url}/")
    expect(page.locator("#model")).to_have_text("tiny.en")
    throttle_upload(page, 400_000)  # the file is about 1 MB: a few seconds of progress
    page.set_input_files("#file", wav)
    expect(state(page)).to_have_attribute("data-state", "done", timeout=60_000)
    screenshot(page, "desktop-file.png")
    expect(page.locator("#file-work")).to_be_hidden()
    assert in_order(["idle", "uploading", "transcribing", "done"], page.evaluate("window.__states"))

    # The upload's progress climbed to the whole body, then the bar turned indeterminate while the server
    # transcribed; Start was held off all along.
    progress = page.evaluate("window.__file")
    uploading = [p for p in progress if p["state"] == "uploading"]
    print(f"\nupload progress: {[round(p['position'], 2) for p in uploading]}")
    assert any(0 < p["position"] < 1 for p in uploading) and uploading[-1]["position"] == 1, uploading
    assert [p["position"] for p in uploading] == sorted(p["position"] for p in uploading)
    assert all(re.fullmatch(r"speech\.wav: uploading, \d+\s% of 1\.\d\sMB", p["status"]) for p in uploading), uploading
    transcribing = [p for p in progress if p["state"] == "transcribing"]
    assert transcribing and all(p["position"] == -1 for p in transcribing), progress
    assert all(p["start_disabled"] for p in uploading + transcribing), progress
    expect(page.locator("#start")).to_be_enabled()

    finals = [t.strip() for t in page.locator("#transcript .final .text").all_inner_texts()]
    text = " ".join(finals)
    error_rate = wer([(reference, text)])
    print(f"file: WER {error_rate:.3f}: {text}")
    assert error_rate <= 0.12, text
    expect(page.locator("#notice")).to_contain_text(f"speech.wav: {clock(duration)} transcribed")

    # Saved as the microphone's transcript is, named after the file.
    with page.expect_download() as info:
        page.click("[data-format=json]")
    assert info.value.suggested_filename == "speech.json"
    saved = json.loads(Path(info.value.path()).read_text(encoding="utf-8"))
    assert [f["text"] for f in saved["finals"]] == finals and saved["model"] == "tiny.en"
    assert saved["file"] == "speech.wav" and abs(saved["duration"] - duration) < 0.1, saved
    assert all(f["delay_ms"] is None for f in saved["finals"])
    for f in saved["finals"]:  # each line has the words spoken in it, within its times
        assert f["words"] and all(f["start"] - 0.01 <= w["start"] <= w["end"] <= f["end"] + 0.01
                                  for w in f["words"]), f
        assert normalize(" ".join(w["word"] for w in f["words"])) == normalize(f["text"]), f

    # Each line shows where in the file it starts, in order; each recording is a paragraph, which starts
    # where the recording does.
    stamps = page.locator("#transcript .final .stamp").all_inner_texts()
    assert stamps == [clock(f["start"]) for f in saved["finals"]], stamps
    assert all(re.fullmatch(r"\d+:\d\d", s) for s in stamps), stamps
    begins = [f["start"] for f in saved["finals"]]
    assert begins == sorted(begins) and saved["finals"][-1]["end"] <= duration
    paragraphs = [[t.strip() for t in p.locator(".final .text").all_inner_texts()]
                  for p in page.locator("#transcript .paragraph").all()]
    print(f"paragraphs: {paragraphs}")
    assert paragraphs == paragraphs_by_the_rule(saved["finals"]) and len(paragraphs) == len(SPEECH_IDS)
    firsts = [next(f["start"] for f in saved["finals"] if f["paragraph"] == i) for i in range(len(paragraphs))]
    assert all(s - 0.5 <= first <= s + 1.5 for s, first in zip(starts, firsts)), (firsts, starts)
    assert download(page, "txt") == "\n\n".join(" ".join(p) for p in paragraphs) + "\n"
    srt = parse_cues(download(page, "srt"), ",")
    assert [c[2] for c in srt] == finals and srt[-1][1] <= duration
    assert all(abs(c[0] - f["start"]) < 0.0015 for c, f in zip(srt, saved["finals"]))
    vtt = parse_cues(download(page, "vtt").removeprefix("WEBVTT\n\n"), ".")
    assert [c[:2] for c in vtt] == [c[:2] for c in srt]

    # A file the server refuses leaves the transcript as it was.
    result = page.evaluate(DROP_FILE, ["notes.txt", "a shopping list, not a recording\n" * 20])
    assert result == {"highlighted": True, "taken": True, "after": False}, result
    expect(state(page)).to_have_attribute("data-state", "error", timeout=20_000)
    expect(page.locator("#alert")).to_contain_text("notes.txt could not be transcribed")
    assert [t.strip() for t in page.locator("#transcript .final .text").all_inner_texts()] == finals


@pytest.mark.parametrize("case", ["not audio", "too large"])
def test_a_refused_file_is_told_with_the_servers_message(page, page_server, case):
    """The server's own message, as its OpenAI-shaped error body gives it, in the page's alert."""
    page.goto(f"{page_server.url}/")
    if case == "not audio":
        # Dropped: a drop anywhere on the page is taken as a file to transcribe.
        result = page.evaluate(DROP_FILE, ["notes.txt", "a shopping list, not a recording\n" * 20])
        assert result["taken"], result
        says = "notes.txt could not be transcribed. The file is not in an audio format this server decodes."
    else:
        page.set_input_files("#file", files=[{"name": "long.wav", "mimeType": "audio/wav",
                                              "buffer": b"RIFF" + bytes(MAX_UPLOAD_MB * 1024 * 1024 + 100_000)}])
        says = f"long.wav could not be transcribed. The file is larger than {MAX_UPLOAD_MB} MiB, this server's limit"
    expect(state(page)).to_have_attribute("data-state", "error", timeout=20_000)
    expect(page.locator("#alert")).to_contain_text(says)
    expect(page.locator("#retry")).to_be_hidden()  # the same file would be refused again
    expect(page.locator("#file-work")).to_be_hidden()
    expect(page.locator("#start")).to_be_enabled()
    expect(page.locator("#choose")).to_be_enabled()
    expect(page.locator("#placeholder")).to_be_visible()
    expect(page.locator("[data-format=json]")).to_be_disabled()


def test_a_file_upload_can_be_cancelled(page, page_server, speech):
    page.add_init_script(RECORD_FILE_PROGRESS)
    page.goto(f"{page_server.url}/")
    throttle_upload(page, 50_000)  # slow enough to cancel halfway
    # The button opens the browser's file picker; from there on, focus follows the controls.
    with page.expect_file_chooser() as chooser:
        page.click("#choose")
    chooser.value.set_files(speech[0])
    expect(page.locator("#file-status")).to_contain_text("speech.wav: uploading")
    expect(page.locator("#cancel")).to_be_focused()
    page.keyboard.press("Enter")
    expect(state(page)).to_have_attribute("data-state", "idle")
    expect(page.locator("#notice")).to_contain_text("Cancelled: speech.wav was not transcribed")
    expect(page.locator("#choose")).to_be_focused()
    expect(page.locator("#file-work")).to_be_hidden()
    expect(page.locator("#start")).to_be_enabled()
    assert all(p["position"] < 1 for p in page.evaluate("window.__file")), "the upload finished before Cancel"


def wait_sessions(page: Page, server: ServerProcess, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (n := page.request.get(server.url + "/health").json()["sessions"]) != count:
        assert time.monotonic() < deadline, f"{n} sessions on the server, expected {count}"
        time.sleep(0.2)


def test_when_webrtc_does_not_connect_the_page_falls_back(page, page_server):
    def without_candidates(sdp: str) -> str:
        return "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith("a=candidate"))

    def strip(route):
        # Neither peer learns an address of the other: ICE cannot connect.
        response = route.fetch(post_data=without_candidates(route.request.post_data))
        route.fulfill(response=response, body=without_candidates(response.text()))

    page.route(f"{page_server.url}/v1/rtc", strip)
    page.goto(f"{page_server.url}/")
    page.click("#start")
    expect(state(page)).to_have_attribute("data-state", "listening", timeout=20_000)
    assert page.locator("#transport").text_content() == "WebSocket"
    expect(page.locator("#notice")).to_contain_text("WebRTC did not connect")
    wait_sessions(page, page_server, 1)  # the WebRTC attempt's session was deleted, not left to time out
    page.click("#stop")
    expect(state(page)).to_have_attribute("data-state", "stopped", timeout=20_000)


def _refuse_microphone(name: str) -> str:
    return ("navigator.mediaDevices.getUserMedia = () => "
            f"Promise.reject(new DOMException('refused in the test', '{name}'));")


@pytest.mark.parametrize("case, says, retry", [
    ("microphone denied", "denied", False),
    ("no microphone", "No microphone", False),
    ("session limit", "every session is in use", True),
    ("server unreachable", "cannot be reached", True),
])
def test_bad_states_are_told_plainly(page, page_server, case, says, retry):
    if case == "microphone denied":
        page.add_init_script(_refuse_microphone("NotAllowedError"))
    elif case == "no microphone":
        page.add_init_script(_refuse_microphone("NotFoundError"))
    elif case == "session limit":
        page.route("**/v1/rtc*", lambda route: route.fulfill(
            status=503, headers={"Retry-After": "5"}, content_type="application/json",
            body=json.dumps({"error": {"code": "session_limit", "message": "all sessions are in use"}})))
    else:
        page.route("**/v1/rtc*", lambda route: route.abort("connectionrefused"))
    page.goto(f"{page_server.url}/?transport=rtc")
    page.click("#start")
    expect(state(page)).to_have_attribute("data-state", "error")
    expect(page.locator("#alert")).to_contain_text(says)
    expect(page.locator("#retry")).to_be_visible() if retry else expect(page.locator("#retry")).to_be_hidden()
    expect(page.locator("#start")).to_be_enabled()


def test_lost_connection_offers_a_retry(page, page_server):
    sockets = []

    def relay(ws):
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r".*/v1/ws"), relay)
    page.goto(f"{page_server.url}/?transport=ws")
    # Keyboard only: Start is the first stop of the tab order, and focus follows the controls.
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(state(page)).to_have_attribute("data-state", "listening", timeout=20_000)
    expect(page.locator("#stop")).to_be_focused()
    sockets[0].close(code=1011, reason="gone")
    expect(state(page)).to_have_attribute("data-state", "error")
    expect(page.locator("#alert")).to_contain_text("connection to the server was lost")
    page.locator("#retry").focus()
    page.keyboard.press("Enter")
    expect(state(page)).to_have_attribute("data-state", "listening", timeout=20_000)
    expect(page.locator("#stop")).to_be_focused()
    page.keyboard.press("Enter")
    expect(state(page)).to_have_attribute("data-state", "stopped", timeout=20_000)
    expect(page.locator("#start")).to_be_focused()


def test_language_selector_only_for_a_multilingual_model(page, page_server):
    page.goto(f"{page_server.url}/")
    expect(page.locator("#model")).to_have_text("tiny.en")
    expect(page.locator("#language-field")).to_be_hidden()
    page.route("**/health", lambda route: route.fulfill(json={
        "status": "ok", "model": "base", "languages": ["de", "en", "fr"], "sessions": 0}))
    page.reload()
    expect(page.locator("#language-field")).to_be_visible()
    page.select_option("#language", "fr")
    with page.expect_request(re.compile(r".*/v1/rtc\?.*")) as request:
        page.click("#start")
    assert "language=fr" in request.value.url
    # The real server's model is English only: its refusal reaches the page as it said it.
    expect(state(page)).to_have_attribute("data-state", "error")
    expect(page.locator("#alert")).to_contain_text("not supported by this model")
    screenshot(page, "desktop-error.png")
