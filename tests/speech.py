"""Real speech for tests: the owners' devset, and word error rate as TESTING.md defines it."""

from __future__ import annotations

import io
import json
import os
import re
import wave
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import pytest

from asr.audio import G711, Resampler, RawAudio, active_level_db
from asr.segmenter import SegmentEvent, Segmenter, SegmenterConfig
from asr.vad import SileroModel, SileroVAD

GAP_S = 1.5  # a speaker's pause between sentences: longer than the 600 ms endpoint

DATA = Path(__file__).resolve().parent / "data"  # speech that travels with the tests (SOURCES.md there)
# The owners' small devset, copied into the repository; STT_DEVSET names another folder of that layout.
DEVSET = Path(os.environ.get("STT_DEVSET", DATA / "devset"))


@dataclass(frozen=True)
class Recording:
    id: str
    text: str
    audio: np.ndarray  # 16 kHz mono float32

    @property
    def seconds(self) -> float:
        return self.audio.size / 16000


def require_devset() -> Path:
    if (DEVSET / "manifest.jsonl").is_file():
        return DEVSET
    message = f"devset not found at {DEVSET}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


def write_wav(path: Path, audio: np.ndarray) -> None:
    """16 kHz float audio as a 16-bit mono WAV, e.g. for Chromium's fake microphone."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def read_audio(path: Path) -> np.ndarray:
    """16 kHz mono float32. A 16 kHz mono 16-bit WAV, as the devset's are, is read sample for sample;
    any other file PyAV can decode (FLAC, another rate, stereo, 24-bit) is downmixed and resampled as
    the server would, so that held-out speech need not be converted first."""
    try:
        with wave.open(str(path)) as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2):
                return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    except (wave.Error, EOFError):
        pass
    resampler = Resampler()
    with av.open(str(path)) as container:
        pieces = [resampler.frame(frame) for frame in container.decode(audio=0)]
    return np.concatenate(pieces + [resampler.frame(None)])


def stereo_frame(audio: np.ndarray, rate: int) -> av.AudioFrame:
    """16 kHz float speech as one 16-bit stereo frame at `rate`, both channels alike, as a stereo source sends it."""
    left_right = np.repeat(np.frombuffer(pcm16(audio, rate), "<i2"), 2).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(left_right, format="s16", layout="stereo")
    frame.sample_rate = rate
    return frame


def segment(vad_model: SileroModel, audio: np.ndarray, chunk: int = 320, **overrides) -> list[SegmentEvent]:
    """The server's segmenter over `audio`, fed in 20 ms packets as a live stream feeds it."""
    segmenter = Segmenter(SileroVAD(vad_model), SegmenterConfig(**overrides))
    events = []
    for i in range(0, audio.size, chunk):
        events += segmenter.push(audio[i : i + chunk])
    return events + segmenter.flush()


def frame_rms(audio: np.ndarray) -> np.ndarray:
    """The RMS of each whole 10 ms (160 samples) of `audio`."""
    return np.sqrt((audio[: audio.size // 160 * 160].reshape(-1, 160) ** 2).mean(axis=1))


def at_level(audio: np.ndarray, dbfs: float) -> np.ndarray:
    """`audio` scaled to an active speech level of `dbfs`."""
    return (audio * 10 ** ((dbfs - active_level_db(audio)) / 20)).astype(np.float32)


def _speed(audio: np.ndarray, factor: float) -> np.ndarray:
    n = int(audio.size / factor)
    return np.interp(np.linspace(0, audio.size - 1, n), np.arange(audio.size), audio).astype(np.float32)


def _noise(audio: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    power = float(np.mean(audio**2))
    noise = np.random.default_rng(seed).normal(0, np.sqrt(power / 10 ** (snr_db / 10)), audio.size)
    return (audio + noise).astype(np.float32)


# Six hearings of the devset (978 words), as (audio, seed) -> audio. The seeds are fixed, so every
# run hears the same audio. bench/accuracy.py counts word errors on all six.
VARIANTS = {
    "clean": lambda a, i: a,
    "speed 0.9": lambda a, i: _speed(a, 0.9),
    "speed 1.1": lambda a, i: _speed(a, 1.1),
    "noise 15 dB": lambda a, i: _noise(a, 15, i),
    "quiet (-12 dB)": lambda a, i: a * 0.25,
    "speed 0.95, noise 20 dB": lambda a, i: _noise(_speed(a, 0.95), 20, 100 + i),
}


def devset_variants() -> dict[str, list[Recording]]:
    recordings = load_devset()
    return {name: [replace(r, audio=alter(r.audio, 10 * v + i)) for i, r in enumerate(recordings)]
            for v, (name, alter) in enumerate(VARIANTS.items())}


def load_devset() -> list[Recording]:
    root = require_devset()
    items = []
    for line in (root / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            items.append(Recording(entry["id"], entry["text"], read_audio(root / entry["wav"])))
    return items


def recording(recording_id: str) -> Recording:
    return next(r for r in load_devset() if r.id == recording_id)


def data_recording(recording_id: str) -> Recording:
    """One of the recordings in tests/data."""
    for line in (DATA / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["id"] == recording_id:
            return Recording(entry["id"], entry["text"], read_audio(DATA / entry["wav"]))
    raise KeyError(recording_id)


def pcm16(audio: np.ndarray, rate: int = 16000) -> bytes:
    """16 kHz float speech as 16-bit little-endian mono PCM at `rate`, as a sound card at that rate gives it."""
    samples = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    if rate == 16000:
        return samples.tobytes()
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 16000
    frames = resampler.resample(frame) + resampler.resample(None)
    return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in frames)


def webm_opus(audio: np.ndarray) -> bytes:
    """What a browser's MediaRecorder makes of `audio`: Opus at 48 kHz in a live (unseekable) WebM."""
    out = io.BytesIO()
    with av.open(out, "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        samples = np.frombuffer(pcm16(audio, 48000), "<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 48000
        container.mux(stream.encode(frame))  # the encoder cuts it into 20 ms Opus frames
        container.mux(stream.encode(None))
    return out.getvalue()


def over_opus(audio: np.ndarray) -> np.ndarray:
    """`audio` as a WebRTC session hears it: coded by aiortc's Opus encoder (a peer's), decoded by the server's."""
    from aiortc.codecs.opus import OpusEncoder
    from aiortc.jitterbuffer import JitterFrame

    from rtc.opus import opus_decoder

    encoder, decoder = OpusEncoder(), opus_decoder()
    samples = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    samples = np.concatenate([samples, np.zeros(-samples.size % 320, np.int16)])
    heard = []
    for at in range(0, samples.size, 320):  # 20 ms frames, as a browser sends them
        frame = av.AudioFrame.from_ndarray(samples[at:at + 320].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, at
        payloads, timestamp = encoder.encode(frame)
        heard += [f.to_ndarray().reshape(-1) for p in payloads for f in decoder.decode(JitterFrame(p, timestamp))]
    return np.concatenate(heard).astype(np.float32) / 32768


def g711(samples: np.ndarray, encoding: str) -> bytes:
    """16-bit samples as G.711 codes: each the code whose value is nearest (the decoder's table inverted)."""
    table = G711[encoding].astype(np.int32)
    order = np.argsort(table)
    values = table[order]
    at = np.clip(np.searchsorted(values, samples.astype(np.int32)), 1, len(values) - 1)
    nearer = np.where(np.abs(values[at - 1] - samples) <= np.abs(values[at] - samples), at - 1, at)
    return order[nearer].astype(np.uint8).tobytes()


def telephone_band(audio: np.ndarray) -> np.ndarray:
    """16 kHz `audio` with its band cut to 300-3400 Hz, with fourth-order slopes, as a telephone line's filters
    fall off."""
    spectrum = np.fft.rfft(audio.astype(np.float64))
    hz = np.fft.rfftfreq(audio.size, 1 / 16000) + 1e-9
    return np.fft.irfft(spectrum / np.sqrt((1 + (300 / hz) ** 8) * (1 + (hz / 3400) ** 8)), audio.size)


def phone_line(audio: np.ndarray) -> bytes:
    """16 kHz `audio` as a caller's telephone line carries it: its telephone band at 8 kHz in G.711 mu-law."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    frame = av.AudioFrame.from_ndarray((np.clip(telephone_band(audio), -1, 1) * 32767).astype(np.int16).reshape(1, -1),
                                       format="s16", layout="mono")
    frame.sample_rate = 16000
    line = np.concatenate([f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)])
    return g711(line, "mulaw")


def over_phone(audio: np.ndarray) -> np.ndarray:
    """`audio` as the server hears a caller: over the telephone line, decoded as a G.711 client's stream is."""
    return RawAudio("mulaw", 8000).decode(phone_line(audio))


def split_by_duration(recordings: list[Recording], parts: int) -> list[list[Recording]]:
    """The recordings in `parts` groups of about equal duration, e.g. one per concurrent session."""
    groups: list[list[Recording]] = [[] for _ in range(parts)]
    for rec in sorted(recordings, key=lambda r: -r.seconds):
        min(groups, key=lambda g: sum(r.seconds for r in g)).append(rec)
    return groups


def with_pauses(recordings: list[Recording]) -> np.ndarray:
    """The recordings one after another, each followed by a pause of GAP_S seconds."""
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    return np.concatenate([part for r in recordings for part in (r.audio, gap)])


def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        prev, row[0] = row[:], i
        for j in range(1, len(hyp) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)], len(ref)


def alignment(ref: list[str], hyp: list[str]) -> tuple[int, list[bool]]:
    """Edit distance, and for each reference word whether the alignment matched it exactly."""
    n, m = len(ref), len(hyp)
    cost = np.zeros((n + 1, m + 1), np.int32)
    cost[:, 0], cost[0, :] = np.arange(n + 1), np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1, cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    matched = [False] * n
    i, j = n, m
    while i and j:
        if cost[i, j] == cost[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            matched[i - 1] = ref[i - 1] == hyp[j - 1]
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return int(cost[n, m]), matched


def sentences(text: str) -> list[str]:
    """A reference's sentences: ended by . ? ! ; or by a comma before a capitalised clause ("..., Whereas")."""
    return [s for s in re.split(r"(?<=[.?!;。？！])\s*|,\s+(?=[A-Z])", text) if s.strip()]


def lost_sentences(reference: str, hypothesis: str, words=normalize) -> list[str]:
    """The reference's sentences of which less than half the words appear in the hypothesis, in order.
    `words` splits a text into what is compared (the same for both sides)."""
    _, matched = alignment(words(reference), words(hypothesis))
    lost, at = [], 0
    for sentence in sentences(reference):
        n = len(words(sentence))
        if n and sum(matched[at:at + n]) * 2 < n:
            lost.append(sentence)
        at += n
    return lost


def wer(pairs: list[tuple[str, str]]) -> float:
    errors = words = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        errors, words = errors + e, words + n
    return errors / words
