"""A whole file at offline accuracy: Silero VAD cuts it into pieces, and the pieces are decoded in batches,
each with the text said just before it.

Not the live path: no partials, no endpoint to hurry, no latency to keep. The file is split into
contiguous lanes, one per batch slot; a batch takes the next piece of every lane, so each piece is decoded
after the one it follows, with that one's text as Whisper's previous-text prompt, while the batch still
fills. A few batches of a file are in flight at once, and the decode worker runs them only on what live
streams leave (DecodePool.pieces).
"""

from __future__ import annotations

import asyncio
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .engine import Before, Transcript, Word
from .segmenter import Segmenter, SegmenterConfig, SpeechEnded
from .audio import SAMPLE_RATE
from .vad import SileroVAD
from .worker import DecodePool

# Languages written without spaces between words: their words are joined as they are.
_NO_SPACES = frozenset({"ja", "zh", "yue", "th", "lo", "my", "km", "bo"})
_SENTENCE_END = (".", "?", "!", "。", "？", "！")
_MIN_SEGMENT_S = 2.0  # a segment (a subtitle cue) ends on a sentence end only once it is this long


@dataclass(frozen=True)
class FileOptions:
    language: str | None  # None: detected on the file's first piece
    prompt: str = ""  # Whisper's initial prompt: what the first piece of each lane continues
    batch: int = 4  # pieces decoded together in one request to the worker
    parallel: int = 2  # batches of one file in flight at once
    context_chars: int = 200  # of a lane's text, continued by its next piece
    # Utterances are joined into one piece across pauses up to `join_gap_s`, up to `join_s` long: a short
    # utterance alone ("Ask not", 1.1 s) is often misheard.
    join_s: float = 0.0
    join_gap_s: float = 1.0
    narrowband: bool = False  # sent at NARROWBAND_RATE or lower: the VAD hears it so (asr/vad.py)


@dataclass(frozen=True)
class Segment:
    """One stretch of speech with its words, on the file's timeline (seconds)."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    language: str

    @property
    def avg_logprob(self) -> float:
        """Mean log probability of its words."""
        if not self.words:
            return 0.0
        return float(np.mean([math.log(max(w.probability, 1e-6)) for w in self.words]))

    @property
    def compression_ratio(self) -> float:
        data = self.text.encode()
        return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class FileTranscript:
    duration: float  # seconds of audio in the file
    language: str
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return join([s.text for s in self.segments], self.language)

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


@dataclass(frozen=True)
class _Piece:
    """One utterance the segmenter found: samples [start, end) of the file, its speech from `speech_start`
    to `speech_end` (seconds)."""

    start: int
    end: int
    speech_start: float
    speech_end: float


def separator(language: str | None) -> str:
    """What stands between two words or sentences of `language`."""
    return "" if language in _NO_SPACES else " "


def join(texts: list[str], language: str | None) -> str:
    return separator(language).join(t for t in texts if t)


def cut(audio: np.ndarray, vad: SileroVAD, config: SegmenterConfig, join_s: float = 0.0,
        join_gap_s: float = 1.0) -> list[_Piece]:
    """The file's speech as the live segmenter cuts it: utterances ended by a pause, or split for length.
    Pieces joined up to 12 or 28 s decoded slower on the long-form devset item, with the same words.
    Blocking (Silero over every window)."""
    segmenter = Segmenter(vad, config)
    pieces = []
    for e in segmenter.push(audio) + segmenter.flush():
        if isinstance(e, SpeechEnded):
            start = round(e.audio_start * SAMPLE_RATE)
            end = min(audio.size, start + e.audio.size)
            last = pieces[-1] if pieces else None
            if (last is not None and e.start - last.speech_end <= join_gap_s
                    and end - last.start <= join_s * SAMPLE_RATE):
                pieces[-1] = _Piece(last.start, max(end, last.end), last.speech_start, e.end)
            else:
                pieces.append(_Piece(start, end, e.start, e.end))
    return pieces


def _segments(piece: _Piece, result: Transcript | None, language: str) -> list[Segment]:
    """A piece's transcript as segments: one per sentence, a short sentence joined to the next (subtitle
    cues of a readable length)."""
    if result is None or not result.text.strip():
        return []
    offset = piece.start / SAMPLE_RATE
    words = [Word(w.word, round(offset + w.start, 3), round(offset + w.end, 3), w.probability) for w in result.words]
    if not words:
        return [Segment(piece.speech_start, piece.speech_end, result.text.strip(), (), language)]
    groups: list[list[Word]] = [[]]
    for word in words:
        group = groups[-1]
        if group and group[-1].word.endswith(_SENTENCE_END) and group[-1].end - group[0].start >= _MIN_SEGMENT_S:
            groups.append(group := [])
        group.append(word)
    texts = _texts(result.text, [len(g) for g in groups], words, language)
    return [Segment(g[0].start, g[-1].end, t, tuple(g), language) for g, t in zip(groups, texts)]


def _texts(text: str, sizes: list[int], words: list[Word], language: str) -> list[str]:
    """The transcript cut where its groups of words (of `sizes`) meet, keeping its own spacing ("cold-hearted",
    not "cold -hearted"); the words joined where they cannot all be found in it in order."""
    ends, at = [], 0
    for word in words:
        found = text.find(word.word, at)
        if found < 0:
            break
        at = found + len(word.word)
        ends.append(at)
    texts, first = [], 0
    for size in sizes:
        last = first + size
        if len(ends) < len(words):
            texts.append(join([w.word for w in words[first:last]], language))
        else:
            texts.append(text[ends[first - 1] if first else 0:ends[last - 1]].strip())
        first = last
    return texts


class FileTranscriber:
    """Transcribes whole files on a shared decode worker, after its live requests."""

    def __init__(self, worker: DecodePool, vad: Callable[[], SileroVAD], segmenter: SegmenterConfig) -> None:
        self._worker = worker
        self._vad = vad  # a new VAD for each file
        self._segmenter = segmenter

    async def transcribe(self, audio: np.ndarray, options: FileOptions,
                         on_segment: Callable[[Segment], None] | None = None) -> FileTranscript:
        """16 kHz mono float32 in; `on_segment` gets each segment in order as soon as all before it are
        decoded. Cancelling it drops the file's waiting batches."""
        vad = self._vad()
        vad.narrowband = options.narrowband
        pieces = await asyncio.to_thread(cut, audio, vad, self._segmenter, options.join_s, options.join_gap_s)
        run = _Run(self._worker, audio, pieces, options, on_segment)
        language = await run.decode()
        return FileTranscript(round(audio.size / SAMPLE_RATE, 3), language,
                              tuple(s for found in run.found for s in found or ()))


class _Run:
    """One file's decode: its lanes, their contexts, and the segments found so far."""

    def __init__(self, worker: DecodePool, audio: np.ndarray, pieces: list[_Piece], options: FileOptions,
                 on_segment: Callable[[Segment], None] | None) -> None:
        self.worker, self.audio, self.pieces, self.options = worker, audio, pieces, options
        self.on_segment = on_segment
        self.language = options.language
        self.found: list[list[Segment] | None] = [None] * len(pieces)
        self._told = 0  # pieces whose segments went to on_segment
        slots = max(1, options.batch) * max(1, options.parallel)
        lanes = min(slots, len(pieces))
        length = math.ceil(len(pieces) / lanes) if lanes else 0
        # Contiguous lanes: lane j holds pieces j*length ..., so each piece follows the one before it.
        self.lanes = [list(range(j * length, min(len(pieces), (j + 1) * length))) for j in range(lanes)]
        self.lanes = [lane for lane in self.lanes if lane]
        self.said = [options.prompt.strip() for _ in self.lanes]

    async def decode(self) -> str:
        groups = [list(range(g, len(self.lanes), max(1, self.options.parallel)))
                  for g in range(min(max(1, self.options.parallel), len(self.lanes)))]
        if not groups:
            return self.language or "en"
        if self.language is None:  # the first batch says the language; the others follow it
            await self._step(groups[0], 0)
            await asyncio.gather(*(self._chain(g, 1 if i == 0 else 0) for i, g in enumerate(groups)))
        else:
            await asyncio.gather(*(self._chain(g, 0) for g in groups))
        return self.language or "en"

    async def _chain(self, lanes: list[int], first: int) -> None:
        for step in range(first, max(len(self.lanes[j]) for j in lanes)):
            await self._step(lanes, step)

    async def _step(self, lanes: list[int], step: int) -> None:
        active = [j for j in lanes if step < len(self.lanes[j])]
        indices = [self.lanes[j][step] for j in active]
        audios = [self.audio[self.pieces[i].start:self.pieces[i].end] for i in indices]
        befores = [Before(self.said[j][-self.options.context_chars:] if self.options.context_chars else "")
                   for j in active]
        results = await self.worker.pieces(audios, self.language, befores)
        for j, i, result in zip(active, indices, results):
            if result is not None:
                if self.language is None:
                    self.language = result.language
                self.said[j] = join([self.said[j], result.text.strip()], result.language)
            self.found[i] = _segments(self.pieces[i], result, self.language or "en")
        self._tell()

    def _tell(self) -> None:
        while self._told < len(self.found) and self.found[self._told] is not None:
            if self.on_segment is not None:
                for segment in self.found[self._told]:
                    self.on_segment(segment)
            self._told += 1
