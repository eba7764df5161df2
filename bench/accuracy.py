"""Streamed word error rate against offline Whisper, per corpus and per condition.

For every recording of a corpus folder (`manifest.jsonl` as in ../shared/eval/devset-wide: `text`,
`language`, `conditions`), one session streams it in real time and the finals are scored against the
reference, beside offline faster-whisper on the whole file (same model, beam 5). Paths:
  - webrtc: Opus over RTP through an aiortc peer, to a server process;
  - websocket: 16-bit PCM in 20 ms messages, to the same server;
  - sim: the server's own segmenter, decode pool and engine in this process, every decode finished before the
    next 20 ms of audio (a machine with time to spare): minutes instead of real time, for tuning;
  - opus: the same, fed what a WebRTC session hears (the audio through aiortc's Opus encoder and the server's
    decoder): the codec's share of the WebRTC path, without its timing;
  - phone: the same, fed what a caller's telephone line carries (300-3400 Hz, G.711 mu-law at 8 kHz), heard as
    the server hears a client that sends audio at 8 kHz.
Where a path hears Opus, offline Whisper also hears each whole file through that codec (`offline, Opus`):
what the client's encoder leaves of the speech for any server to hear; likewise over the line
(`offline, phone`).
A sentence is lost when less than half of its reference words appear in the streamed text. With a
multilingual model (`--model base`), finals are also checked for their detected language, and languages
written without spaces are scored by characters.

Writes bench/results/accuracy.{md,json}; a run of every path on devset-wide with the default model and
settings also rewrites docs/performance.md's accuracy block and the README's summary of it.
`make bench-accuracy`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from run import machine, replace_doc_block  # noqa: E402
from speech import alignment, lost_sentences, over_opus, over_phone, read_audio, split_by_duration  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WIDE = ROOT.parent / "shared" / "eval" / "devset-wide"
PATHS = ("webrtc", "websocket", "sim", "opus", "phone")
IN_PROCESS = ("sim", "opus", "phone")
TAIL_S = 2.0  # silence the microphone sends after the speech, so the last endpoint comes by itself
GAP_S = 1.5  # between recordings in one session (--one-session), unless --gap-s says otherwise
LEAD_S = 0.5  # silence before the speech (the WebRTC client's, and the others' alike)
# What each path's audio goes through before the server hears it; offline Whisper also hears the files so.
CODED = {"webrtc": "opus", "opus": "opus", "phone": "phone"}
CODECS = {"opus": over_opus, "phone": over_phone}
CODEC_NAMES = {"opus": "Opus", "phone": "phone"}
_NO_SPACES = {"ja", "zh", "th", "lo", "my", "km"}
README = ROOT / "README.md"  # quotes a summary of the run docs/performance.md quotes whole
SUMMARY_CONDITIONS = ("clean", "quiet", "noisy", "long-form", "spontaneous")


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    language: str
    conditions: tuple[str, ...]
    audio: np.ndarray

    @property
    def seconds(self) -> float:
        return self.audio.size / 16000

    @property
    def corpus(self) -> str:
        """The corpus a recording (or the original of a derived copy) comes from: its id's first word."""
        return re.sub(r"^(quiet|noisy|kitchen|babble)\d+-", "", self.id).split("-")[0]

    @property
    def groups(self) -> list[str]:
        """Conditions scored apart: the manifest's tags, and `clean` for plain English speech."""
        tags = set(self.conditions)
        if self.language != "en":
            tags.add("multilingual")
        elif not tags & {"quiet-original", "quiet-derived", "noisy-derived", "spontaneous", "hesitant"}:
            tags.add("clean")
        if tags & {"quiet-original", "quiet-derived"}:
            tags.add("quiet")
        if "noisy-derived" in tags:
            tags.add("noisy")
        return sorted(tags)


def load_corpus(folder: Path) -> list[Item]:
    items = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            items.append(Item(e["id"], e["text"], e.get("language", "en"), tuple(e.get("conditions", ())),
                              read_audio(folder / e["wav"])))
    return items


# --- Scoring -------------------------------------------------------------------------------------

@functools.cache
def _normalizer(language: str):
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def tokens(text: str, language: str) -> list[str]:
    """Words as Whisper's own evaluation normalises them ("I'm" is "i am", "six" is "6"); characters for
    languages written without spaces."""
    text = _normalizer(language)(text)
    if language in _NO_SPACES:
        return [c for c in text if not c.isspace()]
    return text.split()


def score(item: Item, hypothesis: str) -> dict:
    words = functools.partial(tokens, language=item.language)
    errors, _ = alignment(words(item.text), words(hypothesis))
    return {"errors": errors, "words": len(words(item.text)), "lost": lost_sentences(item.text, hypothesis, words)}


# --- Paths ---------------------------------------------------------------------------------------

def offline_text(model, item: Item, language: str | None) -> str:
    segments, _ = model.transcribe(item.audio, language=language, beam_size=5)
    return "".join(s.text for s in segments)


def heard_over(item: Item, codec: str) -> Item:
    """`item` as a session over `codec` hears it, lead silence and all: the encoder's state at the speech is
    the client's."""
    lead = int(LEAD_S * 16000)
    audio = CODECS[codec](np.concatenate([np.zeros(lead, np.float32), item.audio]))
    return replace(item, audio=audio[lead:lead + item.audio.size])


async def sim_finals(registry, audio: np.ndarray, language: str | None, coded=None,
                     narrowband: bool = False) -> list[dict]:
    """The session's stream in this process, each decode done before the next 20 ms of audio; `coded`: what
    the transport makes of the audio; `narrowband`: the client sends it at 8 kHz, as ws.py tells the stream."""
    import ctranslate2

    from sessions import SessionOptions

    finals: list[dict] = []
    fed = 0.0

    def heard(event: dict) -> None:
        # The wait for the endpoint, in audio time: how long after its speech ended a final came out.
        if event["type"] == "transcript.final":
            finals.append({**event, "wait": round(fed - event["end"], 3)})

    if coded is not None:
        audio = coded(audio)
    options = SessionOptions(language=language, partials=False, endpoint_ms=registry.config.endpoint_ms)
    stream = registry.stream_factory(options)(heard)
    stream.narrowband = narrowband
    ctranslate2.set_random_seed(0)  # the temperature fallback samples: the same run, the same words
    for i in range(0, audio.size, 320):
        fed = (i + 320) / 16000
        stream.feed(audio[i:i + 320])
        await asyncio.sleep(0)
        while not registry.worker.idle:
            await asyncio.sleep(0.002)
        await asyncio.sleep(0)
    await stream.finish()
    stream.close()
    return finals


async def webrtc_finals(base_url: str, audio: np.ndarray, query: dict) -> list[dict]:
    from client import RTCClient, SpeechTrack

    track = SpeechTrack(audio[int(LEAD_S * 16000):], lead_silence_s=LEAD_S)
    client = RTCClient(base_url, track)
    await client.connect(query=query)
    try:
        while not track.done:
            await asyncio.sleep(0.1)
        client.send({"type": "stop"})
        await client.wait_type("session.ended", timeout=30)
    finally:
        await client.close()
    return client.of_type("transcript.final")


async def websocket_finals(base_url: str, audio: np.ndarray, query: dict) -> list[dict]:
    from client import WSClient
    from speech import pcm16

    client = WSClient(base_url, query=query)
    await client.connect()
    try:
        await client.speak(pcm16(audio))
        await client.stop(timeout=30)
    finally:
        await client.close()
    return client.of_type("transcript.final")


# --- The run -------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict:
    from faster_whisper import WhisperModel

    from asr import models
    from client import ServerProcess

    items = load_corpus(Path(args.devset))
    if args.only:
        items = [i for i in items if any(re.search(p, i.id) for p in args.only)]
    started = time.time()
    offline = WhisperModel(models.resolve(args.model), device="cpu", compute_type="int8", cpu_threads=2)
    multilingual = offline.model.is_multilingual
    if not multilingual:
        items = [i for i in items if i.language == "en"]
    results: dict[str, dict[str, dict]] = defaultdict(dict)  # path -> item id -> outcome
    baselines = ["offline"] + [f"offline-{c}" for c in sorted({CODED[p] for p in args.paths if p in CODED})]
    for item in items:
        for baseline in baselines:
            heard = heard_over(item, baseline.split("-", 1)[1]) if "-" in baseline else item
            results[baseline][item.id] = {"text": offline_text(offline, heard, None if multilingual else "en")}
            print(f"{baseline} {item.id}: {results[baseline][item.id]['text'][:80]}", flush=True)
    del offline
    if args.repeat > 1:  # one long session: the recordings said again and again, each pass scored on its own
        passes = [[replace(i, id=f"{i.id} #{k}", conditions=(*i.conditions, f"pass {k}")) for i in items]
                  for k in range(1, args.repeat + 1)]
        for baseline in baselines:
            results[baseline].update({copy.id: results[baseline][i.id] for copies in passes
                                      for copy, i in zip(copies, items)})
        items = [copy for copies in passes for copy in copies]
    if args.streams > 1:  # that many sessions at once, each a programme of about equal length
        groups = [g for g in split_by_duration(items, args.streams) if g]
    else:
        groups = [items] if args.one_session or args.repeat > 1 else [[item] for item in items]
    query = {"partials": "true", **({"language": "auto"} if multilingual else {})}
    for path in args.paths:
        if path in IN_PROCESS:
            registry = _registry(args)
            finals = functools.partial(sim_finals, registry, language=None if multilingual else "en",
                                       coded=CODECS.get(CODED.get(path, "")), narrowband=path == "phone")
        else:
            server = ServerProcess("--model", args.model, "--data-dir", "", *args.server_args)
            finals = functools.partial(webrtc_finals if path == "webrtc" else websocket_finals, server.url, query=query)
        try:
            async def hear(group: list[Item]) -> None:
                audio, spans = programme(group, args.gap_s)
                heard = await finals(audio)
                for item, (start, end) in zip(group, spans):
                    results[path][item.id] = _outcome([p for f in heard if (p := _within(f, start, end))])
                    print(f"{path} {item.id}: {results[path][item.id]['text'][:100]}", flush=True)

            if args.streams > 1 and path not in IN_PROCESS:
                await asyncio.gather(*(hear(group) for group in groups))
            else:
                for group in groups:
                    await hear(group)
        finally:
            if path in IN_PROCESS:
                await registry.worker.close()
            else:
                server.stop()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()["cpu"],
              "model": args.model, "devset": str(args.devset), "server_args": args.server_args,
              "one_session": args.one_session or args.repeat > 1, "repeat": args.repeat, "streams": args.streams,
              "gap_s": args.gap_s, "only": args.only,
              "paths": list(args.paths), "elapsed_s": round(time.time() - started),
              "items": [{"id": i.id, "corpus": i.corpus, "language": i.language, "groups": i.groups,
                         "reference": i.text,
                         **{p: {**results[p][i.id], **score(i, results[p][i.id]["text"])}
                            for p in (*baselines, *args.paths)}} for i in items]}
    return report


def programme(items: list[Item], gap_s: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The recordings as one stream: silence before, `gap_s` between and after; each one's span on its timeline
    (a final's words belong to the recording their middle falls in: `_within`)."""
    parts, spans, at = [np.zeros(int(LEAD_S * 16000), np.float32)], [], LEAD_S
    for item in items:
        gap = gap_s if item is not items[-1] else TAIL_S
        parts += [item.audio, np.zeros(int(gap * 16000), np.float32)]
        spans.append((at - gap_s / 2 if spans else 0.0, at + item.audio.size / 16000 + gap / 2))
        at += item.audio.size / 16000 + gap
    spans[-1] = (spans[-1][0], float("inf"))
    return np.concatenate(parts), spans


def _registry(args: argparse.Namespace):
    """The server's sessions, engine and decode pool, built from its one Config as server.py builds them."""
    from asr.vad import SileroModel
    from asr.worker import DecodePool
    from config import Config
    from server import load_engine
    from sessions import SessionRegistry

    config = Config.from_args(["--model", args.model, *args.server_args], environ={})
    pool = DecodePool(load_engine(config), max_finals=64, workers=config.decode_workers)
    pool.start()
    return SessionRegistry(config, pool, SileroModel())


def _within(final: dict, start: float, end: float) -> dict | None:
    """The part of a final that one recording of a session said: its words timed within the recording's
    span. A pause that held between two recordings ("one, two, three" [1.5 s] "It is really good news.")
    makes one final of both, each of whose words is the right recording's."""
    words = final["words"]
    inside = [w for w in words if start <= (w["start"] + w["end"]) / 2 < end]
    if len(inside) == len(words):
        return final if inside or start <= (final["start"] + final["end"]) / 2 < end else None
    joint = "" if final.get("language") in _NO_SPACES else " "
    return {**final, "text": joint.join(w["word"].strip() for w in inside), "words": inside} if inside else None


def _outcome(finals: list[dict]) -> dict:
    waits = [f["wait"] for f in finals if "wait" in f and f["cause"] == "endpoint"]  # in process only
    return {"text": " ".join(f["text"] for f in finals if f["text"]),
            "finals": len(finals), "empty_finals": sum(not f["text"] for f in finals),
            "languages": [f.get("language") for f in finals if f["text"]], **({"waits": waits} if waits else {})}


# --- The report ----------------------------------------------------------------------------------

def _rate(items: list[dict], path: str) -> float:
    words = sum(i[path]["words"] for i in items)
    return sum(i[path]["errors"] for i in items) / words if words else 0.0


def _baselines(items: list[dict]) -> list[str]:
    """Offline Whisper on the files, and through each codec the report has it over (older reports have none)."""
    return ["offline"] + [f"offline-{c}" for c in CODECS if items and f"offline-{c}" in items[0]]


def _row(name: str, items: list[dict], paths: list[str]) -> str:
    """Items and words, offline's word error rate (and through Opus), then each path's with its ratio to
    offline and its lost sentences."""
    off = _rate(items, "offline")
    cells = [str(len(items)), str(sum(i["offline"]["words"] for i in items)),
             *(f"{_rate(items, b):.1%}" for b in _baselines(items))]
    for p in paths:
        r = _rate(items, p)
        lost = sum(len(i[p]["lost"]) for i in items)
        ratio = f"{r / off:.2f}×" if off else ("1.00×" if r == 0 else "∞")
        cells.append(f"{r:.1%} ({ratio}, lost {lost})")
    return f"| {name} | " + " | ".join(cells) + " |"


def _coded_note(items: list[dict]) -> str:
    notes = {"offline-opus": " `offline, Opus`: offline Whisper on the files as the WebRTC client's Opus encoder "
                             "leaves them.",
             "offline-phone": " `offline, phone`: offline Whisper on the files as a telephone line leaves them."}
    return "".join(notes[b] for b in _baselines(items) if b in notes)


def _header(first: str, units: str, paths: list[str], items: list[dict]) -> list[str]:
    columns = [f"offline, {CODEC_NAMES[b.split('-', 1)[1]]}" if "-" in b else b for b in _baselines(items)] + paths
    return [f"| {first} | items | {units} | " + " | ".join(columns) + " |", "|---|---:|---:|" + "---:|" * len(columns)]


def table(report: dict) -> list[str]:
    paths = report["paths"]
    english = [i for i in report["items"] if i["language"] == "en"]
    groups = sorted({g for i in english for g in i["groups"]})
    corpora = sorted({i["corpus"] for i in english})
    row = functools.partial(_row, paths=paths)
    shared = report.get("streams", 1) > 1 or report.get("one_session")  # sessions that say several recordings
    lines = [f"{report['date']}, {report['machine']}, model {report['model']}"
             + (f", server {' '.join(report['server_args'])}" if report["server_args"] else "")
             + f", {Path(report['devset']).name}"
             + (f", {report['streams']} sessions at once, the recordings shared among them"
                if report.get("streams", 1) > 1
                else f", one session saying every recording {report['repeat']} times" if report.get("repeat", 1) > 1
                else ", every recording in one session" if report.get("one_session")
                else ", a session per recording")
             + (f", {report['gap_s']:g} s between recordings" if shared and report.get("gap_s", GAP_S) != GAP_S else "")
             + ". Word error rate of the streamed finals "
             "(ratio to offline faster-whisper on the whole files, same model, beam 5; lost sentences)."
             + _coded_note(english), "",
             *_header("English", "words", paths, english), row("**all**", english)]
    lines += [row(g, [i for i in english if g in i["groups"]]) for g in groups]
    lines += [row(f"corpus {c}", [i for i in english if i["corpus"] == c]) for c in corpora]
    others = [i for i in report["items"] if i["language"] != "en"]
    if others:
        header, rule = _header("language", "units", paths, others)
        lines += ["", header + " language right, per final |", rule + "---|"]
        for lang in sorted({i["language"] for i in others}):
            chosen = [i for i in others if i["language"] == lang]
            detected = []
            for p in paths:
                langs = [lg for i in chosen for lg in i[p]["languages"]]
                detected.append(f"{p} {sum(lg == lang for lg in langs)}/{len(langs)}")
            unit = "CER" if lang in _NO_SPACES else "WER"
            lines.append(row(f"{lang} ({unit})", chosen) + " " + ", ".join(detected) + " |")
    lost = [(p, i["id"], s) for i in report["items"] for p in paths for s in i[p]["lost"]]
    if lost:
        lines += ["", "Lost sentences:", ""] + [f"- {p}, {iid}: “{s}”" for p, iid, s in lost]
    empty = {p: sum(i[p]["empty_finals"] for i in report["items"]) for p in paths}
    lines += ["", "Empty finals: " + ", ".join(f"{p} {n}" for p, n in empty.items()) + "."]
    for path in [p for p in paths if p in IN_PROCESS]:
        waits = [w for i in report["items"] for w in i[path].get("waits", [])]
        if waits:
            p50, p95 = np.percentile(waits, [50, 95])
            lines += ["", f"Endpoint wait in audio time ({path}; decodes take none): p50 {p50:.2f} s, "
                          f"p95 {p95:.2f} s, {len(waits)} finals."]
    return lines


def summary(report: dict) -> list[str]:
    """The README's few lines from the quoted run: all English words, and the conditions users ask after."""
    paths = report["paths"]
    english = [i for i in report["items"] if i["language"] == "en"]
    lines = [f"`make bench-accuracy`, {report['date']}, {report['machine']}, {report['model']}: word error rate "
             f"of the streamed finals on {Path(report['devset']).name} (ratio to offline faster-whisper on the "
             "whole files; lost sentences)." + _coded_note(english), "", *_header("English", "words", paths, english)]
    for name in ("all", *SUMMARY_CONDITIONS):
        items = [i for i in english if name == "all" or name in i["groups"]]
        if items:
            lines.append(_row(name, items, paths))
    return lines


def markdown(report: dict) -> str:
    return "\n".join(["# Accuracy of streamed finals", "", *table(report), "",
                      f"Run time {report['elapsed_s']} s. Produced by `make bench-accuracy`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devset", default=str(WIDE), help="a corpus folder with manifest.jsonl (default devset-wide)")
    parser.add_argument("--model", default="tiny.en", help="the server's --model")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["webrtc", "websocket"])
    parser.add_argument("--only", nargs="+", help="regular expressions: only the items whose id matches one")
    parser.add_argument("--streams", type=int, default=1,
                        help="sessions streaming at once (server paths), the recordings shared among them")
    parser.add_argument("--one-session", action="store_true",
                        help="every recording in one session, with pauses between them, instead of one session each")
    parser.add_argument("--gap-s", type=float, default=GAP_S,
                        help="silence between two recordings in one session (--one-session, --streams, --repeat)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="one session that says the recordings N times over, each pass scored as `pass K` "
                             "(a long session: does it hear its last pass as its first?)")
    parser.add_argument("--out", default="accuracy", help="report name under bench/results/")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more server flags (last)")
    args = parser.parse_args()
    if args.repeat > 1 and args.streams > 1:
        parser.error("--repeat is one session: it takes no --streams")
    report = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))
    if quoted(report):
        replace_doc_block("accuracy", table(report) + [
            "", f"Full report: [bench/results/{args.out}.md](../bench/results/{args.out}.md)."])
        replace_doc_block("accuracy", summary(report) + [
            "", f"Per corpus and condition: [bench/results/{args.out}.md](bench/results/{args.out}.md)."], README)


def quoted(report: dict) -> bool:
    """The run the docs quote: both transports, one stream, all of devset-wide, default model and settings."""
    return (Path(report["devset"]).name == WIDE.name and report["model"] == "tiny.en"
            and not (report["server_args"] or report.get("only") or report["one_session"])
            and report["repeat"] == 1 and report["streams"] == 1 and {"webrtc", "websocket"} <= set(report["paths"]))


if __name__ == "__main__":
    main()
