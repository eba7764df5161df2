"""End to end over WebRTC: a real aiortc peer streams real speech in real time."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from client import RTCClient, SpeechTrack, wait_sessions
from speech import load_devset, wer

GAP_S = 1.5  # a speaker's pause between sentences: longer than the 500 ms endpoint


def _programme(recordings, sessions: int):
    """Split the devset across sessions, balanced by duration; each a list of recordings."""
    groups: list[list] = [[] for _ in range(sessions)]
    for rec in sorted(recordings, key=lambda r: -r.seconds):
        min(groups, key=lambda g: sum(r.seconds for r in g)).append(rec)
    return groups


def _concat(recordings) -> np.ndarray:
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    return np.concatenate([part for r in recordings for part in (r.audio, gap)])


def check_protocol(events: list[dict]) -> dict[int, dict]:
    """Per-utterance order and shape; returns the finals by utterance number."""
    assert events[0]["type"] == "session.started"
    assert events[0]["sample_rate"] == 16000 and events[0]["model"] and events[0]["session_id"]
    seen: dict[int, list[str]] = {}
    finals: dict[int, dict] = {}
    for e in events[1:]:
        if e["type"] in ("speech.started", "transcript.partial", "speech.stopped", "transcript.final"):
            seen.setdefault(e["utterance"], []).append(e["type"])
        if e["type"] == "transcript.partial":
            assert e["text"].split()[: len(e["stable"].split())] == e["stable"].split()
        if e["type"] == "transcript.final":
            assert e["utterance"] not in finals, "two finals for one utterance"
            finals[e["utterance"]] = e
            assert e["start"] < e["end"]
            for w in e["words"]:
                assert 0 <= w["probability"] <= 1
                assert e["start"] - 1.0 <= w["start"] <= w["end"] <= e["end"] + 1.0
    assert sorted(seen) == list(range(1, len(seen) + 1)), "utterances are numbered 1, 2, 3..."
    for n, kinds in seen.items():
        assert kinds[0] == "speech.started" and kinds[-2:] == ["speech.stopped", "transcript.final"], (n, kinds)
        assert set(kinds[1:-2]) <= {"transcript.partial"}, (n, kinds)
    assert events[-1] == {"type": "session.ended", "reason": "stop"}
    return finals


async def stream_session(server, recordings, form: str) -> tuple[RTCClient, float]:
    track = SpeechTrack(_concat(recordings))
    client = RTCClient(server.url, track=track)
    await client.connect(form=form)
    await client.wait_type("session.started", timeout=10)
    while not track.done:
        await asyncio.sleep(0.1)
    # The microphone keeps sending silence: the last endpoint and final come on their own.
    await client.wait_for(lambda e: e["type"] == "transcript.final"
                          and e["utterance"] == len(client.of_type("speech.started")), timeout=15)
    client.send({"type": "stop"})
    await client.wait_type("session.ended", timeout=15)
    await asyncio.sleep(0.3)
    await client.close()
    return client, track.speech_offset


async def test_devset_over_webrtc(server):
    recordings = load_devset()
    groups = _programme(recordings, 3)
    results = await asyncio.gather(*(stream_session(server, g, form)
                                     for g, form in zip(groups, ["sdp", "json", "sdp"])))
    pairs = []
    for (client, _), group in zip(results, groups):
        events = [r.event for r in client.events]
        finals = check_protocol(events)
        hypothesis = " ".join(finals[n]["text"] for n in sorted(finals))
        reference = " ".join(r.text for r in group)
        pairs.append((reference, hypothesis))
        print(f"\nREF: {reference}\nHYP: {hypothesis}")
        # Long utterances show partials while they are spoken.
        for n, final in finals.items():
            if final["end"] - final["start"] > 3:
                partials = [e for e in events if e["type"] == "transcript.partial" and e["utterance"] == n]
                assert partials, f"no partial during the {final['end'] - final['start']:.1f}s utterance {n}"
    error_rate = wer(pairs)
    print(f"devset WER over WebRTC: {error_rate:.3f}")
    assert error_rate <= 0.12
    await wait_sessions(server.url, 0, timeout=5)
