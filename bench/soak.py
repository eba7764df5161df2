"""Soak: many short sessions with speech, churned, against one server; then what it kept.

1,000 WebSocket and 200 WebRTC sessions (by default), a few at a time, each saying a short recording and
ending in one of the ways real clients end: stop, DELETE, or the client simply going away. After a
warm-up share of each, the server's RSS and open descriptors are taken; after the rest, once every
session has ended, they are taken again with the session count and the gauges of /metrics.

    tests/netns.sh .venv/bin/python bench/soak.py [--ws 1000] [--rtc 200] [--concurrency 8]

Writes bench/results/soak.json and soak.md, and the soak block of docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from client import RTCClient, ServerProcess, SpeechTrack, health  # noqa: E402
from run import replace_doc_block  # noqa: E402
from speech import data_recording, pcm16  # noqa: E402

SPEECH = ["arctic-aew-a0003", "fleurs-en-005", "quiet40-arctic-aew-a0003"]
ENDINGS = ("stop", "delete", "vanish")  # how each session ends, in turn
# Share of each transport's sessions run before the baseline: by then the allocator's high-water mark is reached.
WARM_UP = 0.2


async def gauges(url: str) -> dict[str, float]:
    """Every gauge sample of /metrics that counts live things, summed over its labels."""
    names = ("stt_sessions_active", "stt_decode_queue_depth")
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


async def ws_session(url: str, audio: bytes, ending: str) -> bool:
    """One WebSocket session: start, the speech as fast as the socket takes it, then its ending. Events
    are read all along, as a real client does (and as the server's pings need). True when a final came
    back (always expected, unless the client vanished first)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url + "/v1/ws") as ws:
            finals: list[str] = []
            started: asyncio.Future = asyncio.get_running_loop().create_future()
            heard = asyncio.Event()  # a final has come

            async def read() -> None:
                async for message in ws:
                    event = json.loads(message.data)
                    if event["type"] == "session.started":
                        started.set_result(event["session_id"])
                    elif event["type"] == "transcript.final" and event["text"]:
                        finals.append(event["text"])
                        heard.set()
                    elif event["type"] == "session.ended":
                        return

            reader = asyncio.create_task(read())
            try:
                await ws.send_str(json.dumps({"type": "start"}))
                for i in range(0, len(audio), 32000):
                    await ws.send_bytes(audio[i : i + 32000])
                await ws.send_bytes(bytes(32000))  # a second of silence: the endpoint
                if ending == "vanish":
                    return True
                if ending == "stop":
                    await ws.send_str(json.dumps({"type": "stop"}))
                else:  # DELETE once all is sent and a final has come: the session ends with speech heard
                    await asyncio.wait_for(heard.wait(), 60)
                    async with http.delete(f"{url}/v1/rtc/{started.result()}") as r:
                        assert r.status in (200, 404), await r.text()
                await asyncio.wait_for(asyncio.shield(reader), 60)
            finally:
                reader.cancel()
            return bool(finals)


async def rtc_session(url: str, audio: np.ndarray, ending: str) -> bool:
    client = RTCClient(url, track=SpeechTrack(audio, lead_silence_s=0.2))
    try:
        await client.connect()
        await client.heard_all(timeout=20)
        if ending == "stop":
            client.send({"type": "stop"})
            await client.wait_type("session.ended", timeout=15)
        elif ending == "delete":
            async with aiohttp.ClientSession() as http:
                async with http.delete(url + client.location) as r:
                    assert r.status == 200, await r.text()
            await client.wait_type("session.ended", timeout=15)
        return bool(client.of_type("transcript.final"))
    finally:
        await client.close()  # "vanish": the peer connection just goes


async def run_many(count: int, concurrency: int, one) -> tuple[int, int]:
    """Runs sessions 0..count-1, `concurrency` at a time; (sessions with a final, failures)."""
    queue = iter(range(count))
    heard = failed = 0

    async def worker() -> None:
        nonlocal heard, failed
        for i in queue:
            try:
                result = await one(i)  # first: `heard += await ...` would read heard before the wait
                heard += bool(result)
            except Exception as e:  # counted and reported: a soak goes on
                failed += 1
                print(f"session {i} failed: {e!r}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return heard, failed


async def settle(url: str, timeout: float = 60) -> float:
    """Seconds until the server counts no session (then a moment for their connections to close)."""
    started = time.monotonic()
    while (await health(url))["sessions"] and time.monotonic() - started < timeout:
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)
    return time.monotonic() - started


async def soak(args: argparse.Namespace) -> dict:
    recordings = [data_recording(i) for i in SPEECH]
    pcm = [pcm16(r.audio) for r in recordings]
    proc = ServerProcess("--max-sessions", str(max(16, 2 * args.concurrency)), "--idle-timeout-s", "10",
                         "--data-dir", tempfile.mkdtemp(prefix="stt-soak-"))
    try:
        url = proc.url

        def ws(i: int):
            return ws_session(url, pcm[i % len(pcm)], ENDINGS[i % len(ENDINGS)])

        def rtc(i: int):
            return rtc_session(url, recordings[i % len(recordings)].audio, ENDINGS[i % len(ENDINGS)])

        await run_many(round(args.ws * WARM_UP), args.concurrency, ws)
        await run_many(round(args.rtc * WARM_UP), args.concurrency, rtc)
        await settle(url)
        before = {"rss_mb": proc.rss_mb(), "descriptors": proc.descriptors()}
        started = time.monotonic()
        samples: list[tuple[str, int, float]] = []  # (transport, sessions so far, RSS MB): a leak is a slope
        ws_heard = ws_failed = rtc_heard = rtc_failed = 0
        for transport, total, one in (("ws", args.ws, ws), ("rtc", args.rtc, rtc)):
            left, done = total - round(total * WARM_UP), 0
            while left > 0:
                step = min(left, max(args.concurrency, total // 10))
                heard, failed = await run_many(step, args.concurrency, lambda i, base=done, one=one: one(base + i))
                left, done = left - step, done + step
                samples.append((transport, done, round(proc.rss_mb(), 1)))
                if transport == "ws":
                    ws_heard, ws_failed = ws_heard + heard, ws_failed + failed
                else:
                    rtc_heard, rtc_failed = rtc_heard + heard, rtc_failed + failed
        elapsed = time.monotonic() - started
        settled = await settle(url)
        after = {"rss_mb": proc.rss_mb(), "descriptors": proc.descriptors(),
                 "sessions": (await health(url))["sessions"], "gauges": await gauges(url)}
    finally:
        code = proc.stop()
    measured_ws = args.ws - round(args.ws * WARM_UP)
    measured_rtc = args.rtc - round(args.rtc * WARM_UP)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpu": platform.processor() or platform.machine(),
                                                             "cores": os.cpu_count()},
        "ws_sessions": args.ws, "rtc_sessions": args.rtc, "concurrency": args.concurrency,
        "warm_up_share": WARM_UP, "endings": list(ENDINGS), "seconds": round(elapsed, 1),
        "ws": {"measured": measured_ws, "with_final": ws_heard, "failed": ws_failed},
        "rtc": {"measured": measured_rtc, "with_final": rtc_heard, "failed": rtc_failed},
        "settle_s": round(settled, 1), "before": before, "after": after, "rss_samples": samples,
        "rss_growth_mb": round(after["rss_mb"] - before["rss_mb"], 1),
        "descriptor_growth": after["descriptors"] - before["descriptors"], "exit_code": code,
    }


def verdict(report: dict) -> list[str]:
    """What the soak requires; empty when all holds."""
    failures = []
    if report["after"]["sessions"]:
        failures.append(f"{report['after']['sessions']} session(s) still counted")
    live = {k: v for k, v in report["after"]["gauges"].items() if v}
    if live:
        failures.append(f"gauges not back to 0: {live}")
    if report["rss_growth_mb"] >= 10:
        failures.append(f"RSS grew {report['rss_growth_mb']} MB after warm-up")
    if report["descriptor_growth"] > 0:
        failures.append(f"{report['descriptor_growth']} descriptor(s) more than after warm-up")
    for transport in ("ws", "rtc"):
        if report[transport]["failed"]:
            failures.append(f"{report[transport]['failed']} {transport} session(s) failed")
    if report["exit_code"] != 0:
        failures.append(f"server exited with {report['exit_code']}")
    return failures


def markdown(report: dict, failures: list[str]) -> list[str]:
    b, a = report["before"], report["after"]
    return [
        f"Latest `make bench-soak`: {report['date']}, {report['machine']['cores']} cores; "
        f"{report['ws_sessions']} WebSocket and {report['rtc_sessions']} WebRTC sessions with speech, "
        f"{report['concurrency']} at a time, ending in turn by {', '.join(report['endings'])}; "
        f"figures after a warm-up of the first {report['warm_up_share']:.0%} of each.", "",
        "| measure | after warm-up | at the end |", "|---|---:|---:|",
        f"| RSS with no session left (MB) | {b['rss_mb']:.1f} | {a['rss_mb']:.1f} |",
        f"| open descriptors | {b['descriptors']} | {a['descriptors']} |",
        f"| sessions counted | 0 | {a['sessions']} |",
        *(f"| `{k}` | 0 | {v:g} |" for k, v in a["gauges"].items()), "",
        f"Measured sessions with a final: WebSocket {report['ws']['with_final']} of {report['ws']['measured']}, "
        f"WebRTC {report['rtc']['with_final']} of {report['rtc']['measured']} (a client that vanishes may "
        f"leave before its final); failed: {report['ws']['failed'] + report['rtc']['failed']}. "
        f"{report['seconds']} s of churn. Verdict: " + ("pass." if not failures else "; ".join(failures) + "."),
        "", "RSS (MB) during the run, with sessions open, after each tenth of a transport's sessions: "
        + ", ".join(f"{t} {n}: {mb:g}" for t, n, mb in report["rss_samples"]) + ".",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ws", type=int, default=1000, help="WebSocket sessions")
    parser.add_argument("--rtc", type=int, default=200, help="WebRTC sessions")
    parser.add_argument("--concurrency", type=int, default=8, help="sessions at a time")
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    failures = verdict(report)
    report["verdict"] = failures or "pass"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = markdown(report, failures)
    (RESULTS / "soak.md").write_text("# Soak\n\n" + "\n".join(lines) + "\n")
    if args.ws >= 1000 and args.rtc >= 200:
        replace_doc_block("soak", lines)
    print("\n".join(lines))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
