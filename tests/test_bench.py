"""The benchmark's scoring: latencies are measured from the audio's own speech edges."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import accuracy  # noqa: E402
import run as bench  # noqa: E402
import speech  # noqa: E402
from speech import load_devset  # noqa: E402


@pytest.fixture(scope="module")
def programme() -> bench.Programme:
    recordings = [r for r in load_devset() if r.id in ("jfk-inaugural-ask-not", "ls-61-70968-0002")]
    return bench.Programme.build(recordings)


def test_speech_edges_come_from_the_audio(programme):
    jfk = next(r for r in load_devset() if r.id == "jfk-inaugural-ask-not")
    start, end = bench._speech_span(jfk.audio)
    # The clip's last word ends near 10.3 s; crowd noise follows it to 11.0 s and is not speech.
    assert 0.1 < start < 0.6 and 10.0 < end < 10.6
    first, second = programme.sentences
    assert first.start < first.end < second.start < second.end < programme.seconds
    assert programme.pcm.size == round(programme.seconds * 16000)


def test_noise_after_the_last_word_does_not_move_the_end_of_speech():
    """The JFK clip slowed to 0.95 with white noise at 20 dB SNR: its crowd noise passes the VAD and the
    energy test, and was read as speech 0.68 s past the last word. The last word's alignment bounds it."""
    clean = next(r for r in load_devset() if r.id == "jfk-inaugural-ask-not")
    variant = next(recs for name, recs in speech.devset_variants().items() if "noise 20 dB" in name)
    noisy = next(r for r in variant if r.id == clean.id)
    true_end = bench.speech_span(clean.audio)[1] / 0.95
    assert bench._speech_span(noisy.audio)[1] - true_end > 0.5  # what the energy edge alone reads
    assert abs(bench.speech_span(noisy.audio)[1] - true_end) < 0.15
    # A "last word" before any loud window (a hallucination over silence) bounds nothing.
    assert bench._speech_span(clean.audio, last_word_end=0.0) == bench._speech_span(clean.audio)


def test_latency_is_final_arrival_minus_end_of_speech(programme):
    started = 1000.0
    first, second = programme.sentences
    events = [
        (started + first.start + 0.4, {"type": "transcript.partial", "start": first.start, "text": "and"}),
        (started + first.start + 1.0, {"type": "transcript.partial", "start": first.start, "text": "and so"}),
        (started + first.end + 0.6, {"type": "transcript.final", "end": first.end + 0.1, "text": "one"}),
        (started + second.end + 0.9, {"type": "transcript.final", "end": second.end, "text": "two"}),
    ]
    result = bench.analyse("websocket", programme, started, events)
    assert result.ok and np.allclose(result.latencies, [0.6, 0.9])
    assert np.allclose(result.first_partials, [0.4]) and np.allclose(result.partial_gaps, [0.6])
    assert result.hypothesis == "one two"


def test_speakers_start_anywhere_in_a_sentence_period(programme):
    period = programme.seconds / len(programme.sentences)  # about 10 s: two recordings, 11 and 3 s
    delays = bench.start_delays(200, programme, random.Random(0))
    assert all(0 <= d < period for d in delays)
    # Over the whole period, not its first 2 s: speakers of the same recording must not end sentences together.
    assert sum(d > 2 for d in delays) > 100
    # One long recording: speakers still start within 10 s, so that most of them talk at once.
    long = bench.Programme(np.zeros(60 * 16000, np.float32), programme.sentences[:1])
    assert 9 < max(bench.start_delays(200, long, random.Random(0))) < 10


def test_only_a_complete_run_on_the_devset_rewrites_the_performance_page():
    assert bench.complete(bench.arguments([]))
    for partial in (["--levels", "1", "16"], ["--transports", "webrtc"], ["--quick"], ["--unison", "0"],
                    ["--no-compare"], ["--devset", "/held/out"], ["--server-args", "--endpoint-ms", "300"]):
        assert not bench.complete(bench.arguments(partial)), partial


def test_the_accuracy_figures_in_the_docs_are_a_runs_own():
    """The README and docs/performance.md quote the run whose report their blocks link to, as it wrote them:
    a figure typed in, or a report replaced without its blocks, fails here."""
    root = Path(__file__).resolve().parents[1]
    for page, lines in ((root / "README.md", accuracy.summary), (root / "docs" / "performance.md", accuracy.table)):
        text = page.read_text()
        block = text[text.index("<!-- accuracy:start -->"):text.index("<!-- accuracy:end -->")]
        report = json.loads((root / re.search(r"(bench/results/[\w.-]+)\.md", block)[1]).with_suffix(".json")
                            .read_text())
        assert accuracy.quoted(report), page
        assert "\n".join(lines(report)) in block, page


def test_a_missing_final_fails_the_stream(programme):
    started = 0.0
    first = programme.sentences[0]
    events = [(first.end + 0.5, {"type": "transcript.final", "end": first.end, "text": "one"})]
    result = bench.analyse("webrtc", programme, started, events)
    assert not result.ok and "no final" in result.error and len(result.latencies) == 1


def test_held_out_speech_need_not_be_16_khz_mono_wav(tmp_path, monkeypatch):
    """`--devset` takes a folder as the devset is laid out; its audio may come in another form (here
    44.1 kHz stereo FLAC) and is read as the server would hear it."""
    jfk = next(r for r in load_devset() if r.id == "jfk-inaugural-ask-not")
    frame = speech.stereo_frame(jfk.audio, 44100)
    with av.open(str(tmp_path / "jfk.flac"), "w") as container:
        stream = container.add_stream("flac", rate=44100, layout="stereo")
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "jfk", "wav": "jfk.flac", "text": jfk.text}) + "\n")
    monkeypatch.setattr(speech, "DEVSET", tmp_path)
    [heard] = speech.load_devset()
    assert heard.text == jfk.text and abs(heard.seconds - jfk.seconds) < 0.05
    n = min(heard.audio.size, jfk.audio.size)
    assert np.corrcoef(heard.audio[:n], jfk.audio[:n])[0, 1] > 0.99


def test_a_final_across_two_recordings_gives_each_its_own_words():
    """In one session a pause between two recordings may hold ("one, two, three" [1.5 s] "It is really good
    news."): each recording is scored on the words timed within its span, not the whole final."""
    word = lambda text, start, end: {"word": text, "start": start, "end": end, "probability": 0.9}  # noqa: E731
    both = {"text": "One, two, three. It is really good news.", "start": 0.5, "end": 5.0, "cause": "endpoint",
            "language": "en", "words": [word("One,", 0.5, 0.8), word("two,", 0.9, 1.2), word("three.", 1.3, 1.6),
                                        word("It", 3.1, 3.3), word("is", 3.3, 3.5), word("really", 3.5, 3.9),
                                        word("good", 3.9, 4.2), word("news.", 4.2, 4.6)]}
    alone = {**both, "text": "Yes.", "start": 6.0, "end": 6.4, "words": [word("Yes.", 6.0, 6.4)]}
    empty = {**both, "text": "", "start": 2.0, "end": 2.6, "words": []}
    first, second = (0.0, 2.35), (2.35, float("inf"))
    assert accuracy._within(both, *first)["text"] == "One, two, three."
    assert accuracy._within(both, *second)["text"] == "It is really good news."
    assert accuracy._within(alone, *first) is None and accuracy._within(alone, *second) is alone
    assert accuracy._within(empty, *first) is empty and accuracy._within(empty, *second) is None
    said = {**both, "text": "你好。谢谢。", "language": "zh",
            "words": [word("你好。", 0.5, 1.0), word("谢谢。", 3.0, 3.6)]}
    assert accuracy._within(said, *first)["text"] == "你好。"
