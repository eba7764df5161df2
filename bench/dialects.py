"""Final latency and word error rate of every API the server speaks, beside its own protocol's, on the same
speech at the same concurrency: OpenAI Realtime (WebSocket and WebRTC), Deepgram live, the three legacy
WebSocket dialects, and our /v1/ws and /v1/rtc. Writes bench/results/dialects.{md,json}.

Each stream says a programme of devset recordings in real time, as bench/run.py's do, in 20 ms messages
(WebRTC: 20 ms Opus packets). One rule scores every API, whatever its messages carry: a sentence's final is
the first non-empty final to arrive after its last word was said, and its latency is that arrival less
the end of the sentence in the audio.

One stream of each API runs alone, one API after another. Under load the comparison must not hang on what
else the machine did meanwhile, so the 16 streams of a level are paired: half speak the API, half our own
protocol on the same transport, each pair the same programme from the same moment, and the API is held to
the streams of ours that ran beside it. Run it with `make bench-dialects` (in tests/netns.sh's namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH)]

from run import (RESULTS, ROOT, PacketTrack, Programme, ProcessProbe, add_devset_option,  # noqa: E402
                 build_programmes, commit, machine, percentile, start_delays, wer)
from client import RTCClient, ServerProcess  # noqa: E402
from speech import pcm16  # noqa: E402

LEVELS = (1, 16)
FRAME_S = 0.02
# API -> the API whose numbers it is held to: the same transport, our own protocol.
NATIVE = {"livestt-ws": "livestt-ws", "openai-ws": "livestt-ws", "deepgram": "livestt-ws",
          "ws-transcribe": "livestt-ws", "v1-transcriptions": "livestt-ws", "ws": "livestt-ws",
          "livestt-rtc": "livestt-rtc", "openai-rtc": "livestt-rtc"}
APIS = tuple(NATIVE)
# Our protocol beside itself: how far two halves of one run differ when nothing differs but chance (the
# moments decodes meet, and so greedy or beam search), the yardstick for the APIs' differences.
AGAIN = {"livestt-ws again": "livestt-ws", "livestt-rtc again": "livestt-rtc"}
NATIVE.update(AGAIN)
TARGET = 0.10  # each API within 10 % of its native's latency and WER


@dataclass
class Heard:
    """What one stream's client got: each final's text and when it arrived."""

    started: float = 0.0  # wall time of the programme's sample 0
    finals: list[tuple[float, str]] = field(default_factory=list)
    error: str = ""


Send = Callable[[bytes], Awaitable[None]]


async def say(programme: Programme, rate: int, send: Send, encode: Callable[[bytes], bytes] = lambda b: b) -> float:
    """The programme as PCM at `rate` in 20 ms messages, each once its audio has been captured; returns when
    sample 0 was."""
    pcm = pcm16(programme.pcm, rate)
    step = int(rate * FRAME_S) * 2
    started = time.monotonic()
    for n, i in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, started + (n + 1) * FRAME_S - time.monotonic()))
        await send(encode(pcm[i : i + step]))
    return started


async def websocket(url: str, programme: Programme, heard: Heard, *, rate: int = 16000,
                    first: list[dict] = (), frame: Callable[[bytes], object] = lambda b: b,
                    final: Callable[[dict], str | None], last: dict | None = None, wait_s: float = 3.0) -> None:
    """A WebSocket API: `first` messages, the audio as `frame` makes each 20 ms message of it, `last`; the
    text of each message `final` says is one, until the server closes (or `wait_s` after the audio)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        async def read() -> None:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    text = final(json.loads(message.data))
                    if text:
                        heard.finals.append((time.monotonic(), text))

        reader = asyncio.create_task(read())
        for message in first:
            await ws.send_json(message)

        async def send(chunk: bytes) -> None:
            message = frame(chunk)
            await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_json(message))

        heard.started = await say(programme, rate, send)
        if last is not None:
            await ws.send_json(last)
        try:
            await asyncio.wait_for(asyncio.shield(reader), wait_s if last is None else 30)
        except asyncio.TimeoutError:
            await ws.close()
            reader.cancel()


def b64(chunk: bytes) -> str:
    return base64.b64encode(chunk).decode()


async def stream(api: str, base: str, programme: Programme, packets: list[bytes]) -> Heard:
    heard = Heard()
    api = AGAIN.get(api, api)
    ws = base.replace("http", "ws", 1)
    try:
        if api == "livestt-ws":
            await websocket(ws + "/v1/ws", programme, heard, first=[{"type": "start"}], last={"type": "stop"},
                            final=lambda e: e["text"] if e["type"] == "transcript.final" else None)
        elif api == "openai-ws":
            session = {"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "gpt-4o-transcribe"},
                "turn_detection": {"type": "server_vad"}}}}
            await websocket(ws + "/v1/realtime?intent=transcription", programme, heard, rate=24000,
                            first=[{"type": "session.update", "session": session}],
                            frame=lambda c: {"type": "input_audio_buffer.append", "audio": b64(c)},
                            final=lambda e: e.get("transcript") if e["type"].endswith("transcription.completed")
                            else None)
        elif api == "deepgram":
            await websocket(ws + "/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&punctuate=true",
                            programme, heard, last={"type": "CloseStream"},
                            final=lambda e: e["channel"]["alternatives"][0]["transcript"]
                            if e["type"] == "Results" and e["is_final"] else None)
        elif api == "ws-transcribe":
            await websocket(ws + "/ws/transcribe", programme, heard, last={"type": "stop"},
                            final=lambda e: e["text"] if e["type"] == "transcription" and e["isFinal"] else None)
        elif api == "v1-transcriptions":
            await websocket(ws + "/v1/transcriptions", programme, heard, first=[{"action": "start", "language": "en"}],
                            last={"action": "stop"}, final=lambda e: e.get("final"))
        elif api == "ws":
            await websocket(ws + "/ws", programme, heard, frame=lambda c: {"type": "audio", "payload": b64(c)},
                            last={"type": "control", "action": "stop"},
                            final=lambda e: e["text"] if e["type"] == "transcript" and e["is_final"] else None)
        elif api == "livestt-rtc":
            await rtc_native(base, programme, packets, heard)
        elif api == "openai-rtc":
            await rtc_openai(base, programme, packets, heard)
    except Exception as e:  # a failed stream is a result, not a crash
        heard.error = repr(e)
    return heard


async def rtc_native(base: str, programme: Programme, packets: list[bytes], heard: Heard) -> None:
    track = PacketTrack(packets)
    client = RTCClient(base, track=track)
    try:
        await client.connect()
        await asyncio.sleep(programme.seconds + 0.5)
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=30)
    finally:
        await client.close()
    heard.started = track.started - FRAME_S  # a microphone has packet k 20 ms after its first sample
    heard.finals = [(r.at, r.event["text"]) for r in client.events
                    if r.event["type"] == "transcript.final" and r.event["text"]]


async def rtc_openai(base: str, programme: Programme, packets: list[bytes], heard: Heard) -> None:
    track = PacketTrack(packets)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("oai-events")

    def on_message(message: str) -> None:
        event = json.loads(message)
        if event["type"].endswith("transcription.completed") and event["transcript"]:
            heard.finals.append((time.monotonic(), event["transcript"]))

    channel.on("message", on_message)
    pc.addTrack(track)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            r = await http.post(base + "/v1/realtime/calls", data=pc.localDescription.sdp,
                                headers={"Content-Type": "application/sdp"})
            if r.status != 201:
                raise ConnectionError(f"{r.status}: {await r.text()}")
            answer, location = await r.text(), r.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.sleep(programme.seconds + 0.5)
        async with aiohttp.ClientSession() as http:
            await http.post(base + location + "/hangup")
    finally:
        await pc.close()
    heard.started = (track.started or 0) - FRAME_S


def score(programme: Programme, heard: Heard) -> tuple[list[float], str]:
    """Each sentence's latency by the one rule, and the hypothesis."""
    latencies = []
    for s in programme.sentences:
        end = heard.started + s.end
        closing = [at for at, _ in heard.finals if at >= end]
        if closing:
            latencies.append(closing[0] - end)
    return latencies, " ".join(text for _, text in heard.finals)


async def level(server: ServerProcess, apis: list[str], n: int, programmes: list[Programme],
                packets) -> list[dict]:
    """`n` streams, shared out in turn among `apis`: with two, streams 2k and 2k+1 say the same programme
    from the same moment, one in each API; each API goes first in as many pairs of each programme as the
    other (of two finals that come together, the first may be decoded with the beam, the other greedily).
    One result per API."""
    probe = ProcessProbe(server.proc.pid)
    delays = start_delays(n, programmes[0], random.Random(n))

    async def one(i: int) -> tuple[str, Programme, Heard]:
        k = i // len(apis)
        api = apis[(i + k // len(programmes)) % len(apis)]
        await asyncio.sleep(delays[k])
        programme = programmes[k % len(programmes)]
        return api, programme, await stream(api, server.url, programme, packets[k % len(programmes)])

    results = await asyncio.gather(*(one(i) for i in range(n)))
    cpu = probe.stop()
    audio_s = sum(p.seconds for _, p, _ in results)
    out = []
    for api in apis:
        mine = [(p, h) for a, p, h in results if a == api]
        result = summary(api, mine, n)
        result["cpu_s_per_audio_s_per_stream"] = cpu / audio_s if len(apis) == 1 else None
        if len(apis) > 1:
            result["beside"] = [a for a in apis if a != api]
        out.append(result)
    return out


def summary(api: str, results: list[tuple[Programme, Heard]], n: int) -> dict:
    latencies, pairs, failed, errors = [], [], 0, set()
    for programme, heard in results:
        if heard.error or not heard.finals:
            failed += 1
            errors.add(heard.error or "no final")
            continue
        mine, hypothesis = score(programme, heard)
        latencies += mine
        pairs.append((" ".join(s.text for s in programme.sentences), hypothesis))
    return {"api": api, "streams": n, "own_streams": len(results), "failed": failed, "errors": sorted(errors)[:3],
            "final_p50_s": percentile(latencies, 50), "final_p95_s": percentile(latencies, 95),
            "wer": wer(pairs) if pairs else None}


def compare(report: dict) -> None:
    """Each API's figures against its native's: the streams of ours beside it, or, alone, ours alone at the
    same level. Sets the ratios and `native`, the figures compared with."""
    alone = {(lv["api"], lv["streams"]): lv for lv in report["levels"] if not lv.get("beside")}
    beside = {(lv["beside"][0], lv["api"], lv["streams"]): lv for lv in report["levels"] if lv.get("beside")}
    for lv in report["levels"]:
        if lv["api"] == NATIVE[lv["api"]]:
            continue
        native = (beside.get((lv["api"], NATIVE[lv["api"]], lv["streams"])) if lv.get("beside")
                  else alone.get((NATIVE[lv["api"]], lv["streams"])))
        if native is None:
            continue
        lv["native"] = {k: native[k] for k in ("final_p50_s", "final_p95_s", "wer")}
        for name in ("final_p50_s", "final_p95_s", "wer"):
            if lv[name] is not None and native[name]:
                lv[f"{name}_vs_native"] = lv[name] / native[name] - 1


def markdown(report: dict) -> str:
    m = report["machine"]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    pct = lambda v: "" if v is None else f" ({v:+.0%})"  # noqa: E731
    what = "four short devset sentences" if report["quick"] else "the devset"
    lines = [
        "# Every API beside the native protocol", "",
        f"{report['date']}, {m['cpu']}, {m['cores']} cores; tiny.en int8, default settings; commit "
        f"{report['commit'] or '-'}. Each stream says {what} ({report['programme_s']} s with pauses) in real "
        "time, in 20 ms messages, from another recording and a "
        "random moment of the first seconds. A sentence's final is the first non-empty final to arrive after its "
        "last word was said; latency is that arrival less the end of the sentence in the audio. One stream runs "
        "alone; at more, half the streams speak the API and half our own protocol on the same transport at the "
        "same time, pair by pair the same programme from the same moment (`8 of 16`). In brackets: against our "
        f"own protocol's streams beside it, or alone at one stream (target: within {TARGET:.0%}).",
        "", "| API | transport | streams | failed | final p50 (s) | final p95 (s) | WER | our protocol meanwhile: "
        "p50 / p95 / WER | CPU s / audio s / stream |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    order = list(APIS) + list(AGAIN)
    for lv in sorted(report["levels"], key=lambda lv: (lv["streams"], bool(lv.get("beside")),
                                                       lv["api"] not in AGAIN, order.index(lv["api"]))):
        if lv.get("beside") and lv["api"] == NATIVE[lv["api"]]:
            continue  # shown beside the API it ran with
        transport = "WebRTC" if NATIVE[lv["api"]].endswith("rtc") else "WebSocket"
        streams = f"{lv['own_streams']} of {lv['streams']}" if lv.get("beside") else str(lv["streams"])
        native = lv.get("native") if lv.get("beside") else None
        meanwhile = "–" if native is None else (f"{fmt(native['final_p50_s'])} / {fmt(native['final_p95_s'])} / "
                                                f"{fmt(native['wer'], 3)}")
        lines.append(f"| {lv['api']} | {transport} | {streams} | {lv['failed']} | "
                     f"{fmt(lv['final_p50_s'])}{pct(lv.get('final_p50_s_vs_native'))} | "
                     f"{fmt(lv['final_p95_s'])}{pct(lv.get('final_p95_s_vs_native'))} | "
                     f"{fmt(lv['wer'], 3)}{pct(lv.get('wer_vs_native'))} | {meanwhile} | "
                     f"{fmt(lv.get('cpu_s_per_audio_s_per_stream'), 3)} |")
    failures = [f"{lv['api']} at {lv['streams']}: {'; '.join(lv['errors'])}" for lv in report["levels"] if lv["failed"]]
    if failures:
        lines += ["", "Failed streams: " + " / ".join(failures) + "."]
    lines += ["", "livestt-ws is GET /v1/ws and livestt-rtc POST /v1/rtc; openai-ws is GET /v1/realtime, openai-rtc "
              "POST /v1/realtime/calls, deepgram GET /v1/listen; ws-transcribe, v1-transcriptions and ws are the "
              "legacy dialects ([Compatibility](../../docs/compatibility.md)). A WER of a few sentences moves by a "
              "word: at one stream a ratio says little. The machine's cores are shared with other work, whose load "
              "varies from one run to the next: hence the pairing. `again` is our protocol beside itself: the "
              "difference chance alone makes between two halves of one run.", "",
              f"Run time {report['elapsed_s']} s. Produced by `make bench-dialects"
              f"{' BENCH_ARGS=--quick' if report['quick'] else ''}`.", ""]
    return "\n".join(lines)


COMPATIBILITY = ROOT / "docs" / "compatibility.md"  # quotes the latest run of every API at both levels


def update_docs(report: dict) -> None:
    """docs/compatibility.md's summary of the run, between <!-- dialects:start --> and <!-- dialects:end -->."""
    apis = {lv["api"] for lv in report["levels"]}
    streams = {lv["streams"] for lv in report["levels"]}
    if not set(APIS) <= apis or streams != set(LEVELS):
        return
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"Latest run: {report['date']}, {report['machine']['cores']} cores, "
             f"{'four short sentences per stream' if report['quick'] else 'the devset per stream'}; final latency "
             "p50 / p95 in seconds, and WER; at 16 streams, 8 of the API's beside 8 of ours, and in brackets the "
             "API against ours beside it:", "",
             "| API | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in LEVELS) + " |",
             "|---|" + "---|" * len(LEVELS)]
    # An API's own rows: alone at one stream, beside ours past it; ours: alone.
    by = {(lv["api"], lv["streams"]): lv for lv in report["levels"]
          if bool(lv.get("beside")) == (lv["streams"] > 1 and NATIVE[lv["api"]] != lv["api"])}
    if not any(api in AGAIN for api, _ in by):
        return
    for api in [*APIS, *AGAIN]:
        cells = [by.get((api, n)) for n in LEVELS]
        lines.append(f"| {api} | " + " | ".join(
            "–" if lv is None else f"{fmt(lv['final_p50_s'])} / {fmt(lv['final_p95_s'])}, {fmt(lv['wer'], 3)}"
            + (f" ({lv['final_p50_s_vs_native']:+.0%} / {lv['final_p95_s_vs_native']:+.0%}, "
               f"{lv['wer_vs_native']:+.0%})" if lv.get("beside") and "wer_vs_native" in lv else "")
            + (f" ({lv['failed']} failed)" if lv["failed"] else "") for lv in cells) + " |")
    first, last = "<!-- dialects:start -->", "<!-- dialects:end -->"
    text = COMPATIBILITY.read_text()
    start, end = text.index(first), text.index(last) + len(last)
    COMPATIBILITY.write_text(text[:start] + "\n".join([first, *lines, last]) + text[end:])


def write(report: dict) -> None:
    compare(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dialects.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "dialects.md").write_text(markdown(report))
    update_docs(report)
    print(markdown(report))


async def main(args: argparse.Namespace) -> None:
    if args.rewrite:  # the reports again, from the last run's figures
        write(json.loads((RESULTS / "dialects.json").read_text()))
        return
    _, programmes = build_programmes(args.devset, args.quick)
    packets = [p.opus_packets() for p in programmes]
    started = time.time()
    report = {"machine": machine(), "quick": args.quick, "commit": commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "programme_s": round(programmes[0].seconds, 1), "levels": []}
    data_dir = tempfile.mkdtemp(prefix="stt-bench-")  # transcripts are saved, as by default
    server = ServerProcess("--max-sessions", str(max(args.levels) + 4), "--data-dir", data_dir)
    try:
        for n in args.levels:
            runs = [[api] for api in args.apis]
            if n > 1:  # ours alone, ours beside itself, then each API beside ours
                natives = [api for api in args.apis if NATIVE[api] == api]
                runs = [[api] for api in natives] + [[again, NATIVE[again]] for again in AGAIN
                                                     if AGAIN[again] in natives] + [
                    [api, NATIVE[api]] for api in args.apis if NATIVE[api] != api]
            for apis in runs:
                for result in await level(server, apis, n, programmes, packets):
                    report["levels"].append(result)
                    print(json.dumps(result), flush=True)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    report["elapsed_s"] = round(time.time() - started)
    write(report)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--apis", nargs="+", default=list(APIS), choices=APIS)
    parser.add_argument("--quick", action="store_true", help="four short sentences per stream")
    parser.add_argument("--rewrite", action="store_true", help="no run: the reports again from dialects.json")
    add_devset_option(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    assert ROOT.is_dir()
    asyncio.run(main(arguments()))
