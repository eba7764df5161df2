"""Quiet, noisy and hesitant copies of every English recording, for judging a lever by more than a couple of
words.

devset-wide holds two quiet-derived and two noisy-derived recordings: a lever that moves one word there
moves the condition by a fifth. This writes a corpus folder (manifest.jsonl and WAVs, as devset-wide's) with
these copies of each English original of devset-wide and of the small devset:

  - quiet45-*: attenuated to an active speech level of -45 dBFS;
  - kitchen10-*: real kitchen noise at 10 dB SNR (the noise of devset-wide's noisy copies, recovered as
    each noisy copy minus its original, 16 s in all, taken from a different place for each recording);
  - babble10-*: four talkers of devset-wide's other languages summed, at 10 dB SNR, a cafe's murmur
    that Silero hears as speech;
  - paused-*: the hesitations of spontaneous speech, where devset-wide has one meeting clip: a pause of
    0.5 to 1.5 s (room tone at the recording's own floor) for about every six words, at the quietest 10 ms
    near a word boundary by Whisper's word timings (tiny.en, greedy), never after a sentence's end. Those
    timings are approximate, and the quietest moment may be a stop's closure inside a word ("s|peech");
    `--min-gap-ms 100` puts pauses (the lone copies' too) only where the speech already falls quiet that long;
  - lone-*: the commonest hesitation of all, after a sentence's first word ("Yet... these thoughts"): a
    pause of 1 s of room tone at the quietest 10 ms between the first two words of every sentence, quiet or
    not (readers run them together).

`--other` writes the same kinds at settings no lever was tuned on (bench/.derived-other/): -55 dBFS,
kitchen noise at 5 dB SNR, babble at 15 dB, pauses of 1 to 2.5 s, and lone first words followed by 0.4 to
2.4 s. A lever that wins on the first set and loses on this one fits the first set's numbers.

`--trimmed` writes only trimmed-* copies (bench/.derived-trimmed/): each original cut to 20 ms before its
first sound and 150 ms after its last, as corpora that cut their clips close to the speech are.

The active level is measured as devset-wide's SOURCES.md says: the RMS of the 20 ms frames within 25 dB of
the 95th-percentile frame. Deterministic: the same folders give the same files.

    .venv/bin/python bench/derive.py            # writes bench/.derived/
    .venv/bin/python bench/accuracy.py --paths sim --devset bench/.derived
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from faster_whisper import WhisperModel  # noqa: E402

from asr import models  # noqa: E402
from speech import active_level_db, frame_rms, read_audio, write_wav  # noqa: E402

SHARED = ROOT.parent / "shared" / "eval"
SOURCES = (SHARED / "devset-wide", SHARED / "devset")
OUT = ROOT / "bench" / ".derived"


@dataclass(frozen=True)
class Settings:
    quiet_dbfs: float  # active level of the quiet copies
    kitchen_snr_db: float
    babble_snr_db: float
    pause_s: tuple[float, float]  # the hesitant copies' pauses, drawn between these
    lone_pause_s: tuple[float, float]  # the pause after each lone first word, drawn between these
    # A pause goes only where the speech is already quiet this long: a stop's closure inside a word ("s|peech",
    # "com|pelled") is quiet too, but briefly. 0: the quietest moment near a word boundary, however brief.
    min_gap_s: float = 0.0


TUNED = Settings(quiet_dbfs=-45, kitchen_snr_db=10, babble_snr_db=10, pause_s=(0.5, 1.5), lone_pause_s=(1.0, 1.0))
OTHER = Settings(quiet_dbfs=-55, kitchen_snr_db=5, babble_snr_db=15, pause_s=(1.0, 2.5), lone_pause_s=(0.4, 2.4))


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]


def originals():
    """(folder, manifest entry) of every English original of devset-wide and of the small devset."""
    for folder in SOURCES:
        for entry in manifest(folder):
            derived = {"quiet-derived", "noisy-derived"} & set(entry.get("conditions", ()))
            if entry.get("language", "en") == "en" and not derived:
                yield folder, entry


def kitchen_noise(wide: Path) -> np.ndarray:
    """devset-wide's noisy copies are original + gained noise, so their difference is the noise itself."""
    pieces = []
    for entry in manifest(wide):
        if entry["id"].startswith("noisy10-"):
            original = entry["id"].removeprefix("noisy10-")
            pieces.append(read_audio(wide / entry["wav"]).astype(np.float64)
                          - read_audio(wide / f"{original}.wav").astype(np.float64))
    return np.concatenate(pieces)


def babble(wide: Path) -> np.ndarray:
    """devset-wide's other languages, each at one level, end to end; four copies of that, each started a
    quarter further on, summed: four talkers at once."""
    talkers = []
    for entry in manifest(wide):
        if entry.get("language", "en") != "en":
            audio = read_audio(wide / entry["wav"]).astype(np.float64)
            talkers.append(audio * 10 ** ((-30 - active_level_db(audio)) / 20))
    pool = np.concatenate(talkers)
    return sum(np.roll(pool, k * pool.size // 4) for k in range(4))


def noise_for(noise: np.ndarray, length: int, key: str) -> np.ndarray:
    """A stretch of `noise` as long as `length`, from a place set by `key`, looped where it must."""
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % noise.size
    return np.resize(np.roll(noise, -start), length)


_FADE = np.linspace(1.0, 0.0, 80)  # 5 ms either side of a cut


def _levels(speech: np.ndarray) -> tuple[np.ndarray, float]:
    """The RMS of each 10 ms of `speech`, and its room tone's: the 5th percentile, at least -75 dBFS."""
    rms = frame_rms(speech) + 1e-9
    return rms, max(np.percentile(rms, 5), 10 ** (-75 / 20))


def _quietest(rms: np.ndarray, word, following) -> int | None:
    """The quietest 10 ms frame from just before the end of `word` to just after the start of `following`; None
    where there is none."""
    near = np.arange(max(0, int((word.end - 0.05) * 100)), min(rms.size, int((following.start + 0.05) * 100)))
    return int(near[rms[near].argmin()]) if near.size else None


def _gap_s(rms: np.ndarray, frame: int, quiet: float) -> float:
    """How long the audio around `frame` stays at or under `quiet`."""
    if rms[frame] > quiet:
        return 0.0
    first, last = frame, frame
    while first > 0 and rms[first - 1] <= quiet:
        first -= 1
    while last + 1 < rms.size and rms[last + 1] <= quiet:
        last += 1
    return (last - first + 1) / 100


def _ends_sentence(word) -> bool:
    return word.word.rstrip().endswith((".", "?", "!"))


def _spliced(speech: np.ndarray, pauses: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """`speech` with each (sample, pause) put in at that sample, the speech faded out before it and in after."""
    pieces, start = [], 0
    for cut, pause in pauses:
        piece = speech[start:cut].copy()
        piece[-80:] *= _FADE
        pieces += [piece, pause]
        start = cut
    rest = speech[start:].copy()
    if start:
        rest[:80] *= _FADE[::-1]
    return np.concatenate(pieces + [rest])


def _quiet(speech: np.ndarray, floor: float) -> float:
    """The RMS at or under which `speech` counts as quiet: 40 dB under its active level, at least twice its room
    tone."""
    return max(2 * floor, 10 ** ((active_level_db(speech) - 40) / 20))


def paused(speech: np.ndarray, words: list, key: str, pause_s: tuple[float, float],
           min_gap_s: float = 0.0) -> np.ndarray:
    """`speech` with hesitations: a pause of `pause_s` (from, to) of room tone for about every six words, each at
    the quietest 10 ms between two words of a sentence. Word timings are approximate: a boundary with no
    quiet moment near it (words run together), or none that lasts `min_gap_s`, is passed over."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big"))
    rms, floor = _levels(speech)
    quiet = _quiet(speech, floor)
    cuts = []  # the quietest 10 ms between two words of a sentence, where it is quiet
    for word, following in zip(words, words[1:]):
        frame = _quietest(rms, word, following)
        if (not _ends_sentence(word) and frame is not None and rms[frame] <= quiet
                and _gap_s(rms, frame, quiet) >= min_gap_s):
            cuts.append(frame * 160 + 80)
    chance = min(1.0, len(words) / 6 / max(1, len(cuts)))
    pauses, start = [], 0
    for cut in cuts:
        if rng.random() >= chance or not start + 80 < cut < speech.size - 80:
            continue
        pauses.append((cut, rng.normal(0.0, floor, int(rng.uniform(*pause_s) * 16000))))
        start = cut
    return _spliced(speech, pauses)


def lone_first_words(speech: np.ndarray, words: list, pause_s: tuple[float, float],
                     min_gap_s: float = 0.0) -> np.ndarray | None:
    """`speech` with a pause of `pause_s` (from, to) of room tone after the first word of every sentence (with
    `min_gap_s`, only where a quiet gap that long lies between them); None if none has two."""
    rms, floor = _levels(speech)
    quiet = _quiet(speech, floor)
    cuts = []
    for i, (word, following) in enumerate(zip(words, words[1:])):
        frame = _quietest(rms, word, following)
        if ((i == 0 or _ends_sentence(words[i - 1])) and not _ends_sentence(word) and frame is not None
                and (not min_gap_s or _gap_s(rms, frame, quiet) >= min_gap_s)):
            cuts.append(frame * 160 + 80)
    if not cuts:
        return None
    tone, lengths = np.random.default_rng(1), np.random.default_rng(2).uniform(*pause_s, len(cuts))
    return _spliced(speech, [(cut, tone.normal(0.0, floor, int(s * 16000))) for cut, s in zip(cuts, lengths)])


def trimmed(speech: np.ndarray) -> np.ndarray:
    """`speech` from 20 ms before the first 30 ms of sound to 150 ms after the last. Sound: 12 dB over the
    quietest tenth of the clip and at most 40 dB under its loudest 10 ms; a lone click is not."""
    rms = frame_rms(speech)
    line = max(np.percentile(rms, 10) * 10 ** (12 / 20), rms.max() / 100)
    loud = np.flatnonzero(np.convolve(rms > line, np.ones(3), "valid") == 3)
    return speech[max(0, loud[0] * 160 - 320):(loud[-1] + 3) * 160 + 2400]


def _written(out: Path, entries: list[dict]) -> int:
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return len(entries)


def _db(value: float) -> str:
    return f"{abs(value):g}".replace(".", "")


def derive(out: Path, settings: Settings = TUNED) -> int:
    out.mkdir(parents=True, exist_ok=True)
    noises = {f"kitchen{_db(settings.kitchen_snr_db)}": (kitchen_noise(SOURCES[0]), settings.kitchen_snr_db),
              f"babble{_db(settings.babble_snr_db)}": (babble(SOURCES[0]), settings.babble_snr_db)}
    model = WhisperModel(models.resolve(models.EMBEDDED), compute_type="int8")
    entries = []
    for folder, entry in originals():
        tags = set(entry.get("conditions", ()))
        speech = read_audio(folder / entry["wav"]).astype(np.float64)
        level = active_level_db(speech)
        base = {k: entry[k] for k in ("text", "language") if k in entry}
        copies = {f"quiet{_db(settings.quiet_dbfs)}": (speech * 10 ** ((settings.quiet_dbfs - level) / 20),
                                                       "quiet-derived")}
        for name, (noise, snr) in noises.items():
            stretch = noise_for(noise, speech.size, f"{name}-{entry['id']}")
            gain = 10 ** ((level - snr - 10 * np.log10((stretch**2).mean())) / 20)
            copies[name] = (speech + gain * stretch, "noisy-derived")
        timed, _ = model.transcribe(speech.astype(np.float32), language="en", beam_size=1, temperature=0.0,
                                    word_timestamps=True, condition_on_previous_text=False)
        words = [w for s in timed for w in s.words]
        copies["paused"] = (paused(speech, words, entry["id"], settings.pause_s, settings.min_gap_s), "hesitant")
        lone = lone_first_words(speech, words, settings.lone_pause_s, settings.min_gap_s)
        if lone is not None:
            copies["lone"] = (lone, "hesitant")
        for name, (audio, condition) in copies.items():
            wav = f"{name}-{entry['id']}.wav"
            write_wav(out / wav, audio)
            entries.append({**base, "id": f"{name}-{entry['id']}", "wav": wav,
                            "conditions": sorted((tags - {"quiet-original"}) | {condition, name}),
                            "derived_from": f"{folder.name}/{entry['wav']}"})
    return _written(out, entries)


def derive_trimmed(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for folder, entry in originals():
        wav = f"trimmed-{entry['id']}.wav"
        write_wav(out / wav, trimmed(read_audio(folder / entry["wav"]).astype(np.float64)))
        entries.append({"text": entry["text"], "language": "en", "id": f"trimmed-{entry['id']}", "wav": wav,
                        "conditions": sorted({*entry.get("conditions", ()), "trimmed"}),
                        "derived_from": f"{folder.name}/{entry['wav']}"})
    return _written(out, entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        help=f"default {OUT.name}, or {OUT.name}-other with --other; -gapN after with --min-gap-ms N")
    parser.add_argument("--other", action="store_true", help="the settings no lever was tuned on")
    parser.add_argument("--min-gap-ms", type=int, default=0,
                        help="pauses only where the speech is already quiet this long (0: as the copies were tuned on)")
    parser.add_argument("--trimmed", action="store_true", help="only the originals cut close to their speech")
    args = parser.parse_args()
    if args.trimmed:
        out = args.out or OUT.with_name(OUT.name + "-trimmed")
        print(f"{derive_trimmed(out)} recordings in {out}")
        return
    out = args.out or OUT.with_name(OUT.name + ("-other" if args.other else "")
                                    + (f"-gap{args.min_gap_ms}" if args.min_gap_ms else ""))
    settings = replace(OTHER if args.other else TUNED, min_gap_s=args.min_gap_ms / 1000)
    print(f"{derive(out, settings)} recordings in {out}")


if __name__ == "__main__":
    main()
