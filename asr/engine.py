"""The shared faster-whisper model and how one utterance is decoded."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES

from . import models

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000

# What Whisper tends to say over near-silence; dropped only when the model itself is unsure.
_HALLUCINATIONS = {
    "you", "thank you", "thanks for watching", "thank you for watching", "bye", "so",
    "please subscribe", "subtitles by the amara org community", "okay", "oh", "uh", "um",
}


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 5  # finals; partials are always greedy
    cpu_threads: int = 0


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


class WhisperEngine:
    """One faster-whisper model. Its methods block: only the decode worker calls them."""

    def __init__(self, model: str, device: str = "cpu", compute_type: str = "int8",
                 options: DecodeOptions = DecodeOptions()) -> None:
        self.name = model
        self.options = options
        started = time.monotonic()
        self._model = WhisperModel(
            models.resolve(model), device=device, compute_type=compute_type,
            cpu_threads=options.cpu_threads,
        )
        self.multilingual: bool = self._model.model.is_multilingual
        log.info("loaded model %s (%s, %s) in %.1fs", model, device, compute_type,
                 time.monotonic() - started)

    @property
    def languages(self) -> frozenset[str]:
        return frozenset(_LANGUAGE_CODES) if self.multilingual else frozenset({"en"})

    @property
    def default_language(self) -> str | None:
        """None means: detect per utterance."""
        return None if self.multilingual else "en"

    def warm_up(self) -> None:
        # The first decode pays for allocations and kernel selection; pay it before any session.
        t = np.arange(SAMPLE_RATE * 2, dtype=np.float32) / SAMPLE_RATE
        self.transcribe(0.1 * np.sin(2 * np.pi * 220 * t), self.default_language, final=True)

    def transcribe(self, audio: np.ndarray, language: str | None, final: bool) -> Transcript | None:
        """Text of one utterance, or None when there is no credible speech in it."""
        segments, info = self._model.transcribe(
            audio,
            language=language,
            beam_size=self.options.beam_size if final else 1,
            # Partials are disposable: one greedy pass, no fallback, no alignment.
            temperature=[0.0, 0.2, 0.4] if final else 0.0,
            condition_on_previous_text=False,
            without_timestamps=not final,
            word_timestamps=final,
            vad_filter=False,  # our own VAD already cut the utterance
        )
        kept = [s for s in segments if not self._rejected(s)]
        text = "".join(s.text for s in kept).strip()
        if not text:
            return None
        words = [
            Word(w.word.strip(), round(w.start, 3), round(w.end, 3), round(w.probability, 3))
            for s in kept for w in (s.words or ())
        ]
        return Transcript(text=text, language=info.language, words=words)

    @staticmethod
    def _rejected(segment) -> bool:
        if segment.compression_ratio > 2.4:  # a repetition loop, even after temperature fallback
            return True
        if _normalize(segment.text) in _HALLUCINATIONS:
            return segment.no_speech_prob > 0.3 or segment.avg_logprob < -0.7
        return not segment.text.strip()
