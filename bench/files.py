"""File transcription (asr/batch.py, the path behind /v1/audio/transcriptions and POST /v1/listen) beside
faster-whisper's own BatchedInferencePipeline and its offline transcribe(), on the same files, model and
machine, taking turns: speed (times real time, wall clock and CPU) and word error rate.

Files: devset-wide's long-form recordings (udhr-en-preamble; udhr-fr-preamble with --base, on the multilingual
base model) and a programme of its other English recordings one after another with 1.5 s pauses. Every system
gets the file as 16 kHz float32 (decoding the container is not timed). Ours runs as the server runs it: the
decode worker with one thread per core, one CTranslate2 thread each, beam 5, word timings; faster-whisper's
with as many CTranslate2 threads as cores, beam 5, BatchedInferencePipeline with its defaults (batch 8, its
Silero VAD) and word timings, transcribe() with its defaults (no VAD, the previous text as prompt).

Scored with Whisper's English normaliser where whisper-normalizer is installed (bench/accuracy.py).
Writes bench/results/files.{json,md}. `--variants` tries other FileOptions, for tuning.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the server: its workers are the parallelism

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from accuracy import WIDE, Item, load_corpus, score  # noqa: E402
from run import machine  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GAP_S = 1.5
SYSTEMS = ("livestt", "batched", "offline")
NAMES = {"livestt": "livestt files (asr/batch.py)", "batched": "faster-whisper BatchedInferencePipeline",
         "offline": "faster-whisper transcribe()"}


def programme(items: list[Item]) -> Item:
    """devset-wide's English recordings other than the long-form one, one after another with pauses."""
    chosen = [i for i in items if i.language == "en" and "long-form" not in i.conditions
              and not i.id.startswith(("quiet", "noisy"))]
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    audio = np.concatenate([part for i in chosen for part in (i.audio, gap)])
    return Item("programme-en", " ".join(i.text for i in chosen), "en", ("long-form", "concatenated"), audio)


def files(args: argparse.Namespace) -> list[tuple[Item, str]]:
    """(file, model) pairs."""
    items = load_corpus(Path(args.devset))
    by_id = {i.id: i for i in items}
    chosen = [(by_id["udhr-en-preamble"], args.model), (programme(items), args.model)]
    if args.base:
        chosen.append((by_id["udhr-fr-preamble"], "base"))
    return [(i, m) for i, m in chosen if not args.only or i.id in args.only]


class Livestt:
    """The server's file path in this process: engine, decode worker, FileTranscriber, Config's defaults."""

    def __init__(self, model: str, threads: int) -> None:
        from asr.engine import WhisperEngine
        from asr.vad import SileroModel
        from config import Config
        from server import decode_options
        from sessions import SessionRegistry

        config = Config(model=model, decode_workers=threads)
        self.config = config
        self.engine = WhisperEngine(model, options=decode_options(config))
        self.engine.warm_up()
        registry = SessionRegistry(config, None, SileroModel())
        self.vad, self.segmenter = registry.vad, registry.segmenter_config
        self.threads = threads

    def transcribe(self, audio: np.ndarray, language: str | None, overrides: dict) -> str:
        from asr.batch import FileOptions, FileTranscriber
        from asr.worker import DecodePool

        async def run() -> str:
            worker = DecodePool(self.engine, 64, workers=self.threads)
            worker.live = lambda: False  # no live sessions here: a file may take every thread
            worker.start()
            try:
                transcriber = FileTranscriber(worker, self.vad, self.segmenter)
                options = replace(FileOptions(language, batch=self.config.file_batch,
                                              context_chars=self.config.context_chars), **overrides)
                return (await transcriber.transcribe(audio, options)).text
            finally:
                await worker.close()

        return asyncio.run(run())


class FasterWhisper:
    def __init__(self, model: str, threads: int) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from asr import models

        self.model = WhisperModel(models.resolve(model), device="cpu", compute_type="int8", cpu_threads=threads)
        self.batched = BatchedInferencePipeline(self.model)
        self.model.transcribe(np.zeros(16000, np.float32), language="en")  # the first decode's allocations

    def transcribe(self, audio: np.ndarray, language: str | None, batched: bool) -> str:
        if batched:
            segments, _ = self.batched.transcribe(audio, language=language, beam_size=5, word_timestamps=True)
        else:
            segments, _ = self.model.transcribe(audio, language=language, beam_size=5)
        return "".join(s.text for s in segments)


def timed(run) -> tuple[str, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    text = run()
    return text, time.perf_counter() - wall, time.process_time() - cpu


def measure(args: argparse.Namespace) -> dict:
    report = {"machine": machine(), "threads": args.threads, "repeat": args.repeat, "files": []}
    variants = json.loads(args.variants) if args.variants else [{}]
    loaded: dict[str, tuple[Livestt, FasterWhisper]] = {}
    for item, model in files(args):
        if model not in loaded:
            loaded[model] = (Livestt(model, args.threads), FasterWhisper(model, args.threads))
        ours, theirs = loaded[model]
        language = item.language
        runs = {
            **{f"livestt{'' if not v else ' ' + json.dumps(v)}": (lambda v=v: ours.transcribe(item.audio, language, v))
               for v in variants},
            "batched": lambda: theirs.transcribe(item.audio, language, batched=True),
            "offline": lambda: theirs.transcribe(item.audio, language, batched=False),
        }
        results: dict[str, dict] = {name: {"wall": [], "cpu": [], "scores": []} for name in runs}
        for turn in range(args.repeat):
            # Taking turns, in a rotating order: a busy minute of the machine falls on every system alike.
            names = list(runs)
            names = names[turn % len(names):] + names[:turn % len(names)]
            for name in names:
                text, wall, cpu = timed(runs[name])
                s = score(item, text)
                results[name]["wall"].append(wall)
                results[name]["cpu"].append(cpu)
                results[name]["scores"].append(s)
                results[name]["text"] = text
                print(f"{item.id} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {s['errors']}/{s['words']} errors",
                      flush=True)
        entry = {"id": item.id, "model": model, "seconds": round(item.seconds, 2), "language": language,
                 "systems": {}}
        for name, r in results.items():
            wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
            errors = statistics.median(s["errors"] for s in r["scores"])
            words = r["scores"][0]["words"]
            entry["systems"][name] = {
                "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "x_realtime": round(item.seconds / wall, 1),
                "x_realtime_cpu": round(item.seconds / cpu, 1), "errors": errors, "words": words,
                "wer": round(errors / words, 4), "walls": [round(w, 3) for w in r["wall"]],
                "errors_each": [s["errors"] for s in r["scores"]], "text": r["text"]}
        report["files"].append(entry)
    return report


def normaliser() -> str:
    try:
        import whisper_normalizer  # noqa: F401
    except ImportError:
        return "the project's plain normaliser (whisper-normalizer is not installed)"
    return "Whisper's English normaliser (whisper-normalizer)"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# File transcription: livestt against faster-whisper, side by side",
        "",
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}; {report['threads']} threads for every system; "
        f"median of {report['repeat']} runs taking turns. Speed is audio seconds per second of wall clock "
        "(and per CPU second: the machine is shared, so CPU time is the steadier figure). Word errors are "
        f"counted with {normaliser()}.",
        "",
        "| file | model | audio | system | wall | × real time | CPU | × real time (CPU) | word errors | WER |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in report["files"]:
        for name, s in f["systems"].items():
            label = NAMES.get(name, name)
            lines.append(f"| {f['id']} | {f['model']} | {f['seconds']:.1f} s | {label} | {s['wall_s']:.2f} s | "
                         f"{s['x_realtime']:.1f} | {s['cpu_s']:.2f} s | {s['x_realtime_cpu']:.1f} | "
                         f"{s['errors']:g}/{s['words']} | {100 * s['wer']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devset", default=str(WIDE), help="a corpus folder as devset-wide (manifest.jsonl)")
    parser.add_argument("--model", default="tiny.en", help="the model for the English files")
    parser.add_argument("--base", action="store_true", help="also udhr-fr-preamble on the multilingual base")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="only these file ids")
    parser.add_argument("--variants", help='JSON list of FileOptions overrides, e.g. \'[{}, {"batch": 8}]\'')
    parser.add_argument("--out", default="files", help="report name under bench/results/")
    args = parser.parse_args()
    report = measure(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
