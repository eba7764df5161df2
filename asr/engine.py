"""The shared faster-whisper model and how one utterance is decoded."""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.transcribe import (
    get_compression_ratio,
    get_ctranslate2_storage,
    get_suppressed_tokens,
    merge_punctuations,
)

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
class Before:
    """What a stream said before an utterance."""

    text: str = ""  # continued as Whisper's previous-text prompt; "" for none
    language: str | None = None  # kept where detection on this utterance alone is unsure


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 5  # finals; partials are always greedy
    cpu_threads: int = 1  # per decode: parallel single-threaded decodes beat one wide decode on CPU
    workers: int = 1  # decodes that may run at once
    # Whisper's encoder is built for 30 s; on one core, tiny's takes ~425 ms at 30 s and ~58 ms at
    # 10 s. It runs over the utterance plus 1 to 3 s only, and its output is padded with the
    # encoding of silence, computed once, to the window the decoder attends over. Word errors on
    # bench/accuracy.py's 978 words: 49 padded to Whisper's 30 s (faster-whisper's full encoder on
    # the same utterances: 65), 66 padded to 10 s. But attending over 1500 frames costs every
    # decode ~40 ms of one core more than over 500, so partials while other decodes run or wait,
    # and finals in a burst, take the short window (asr/worker.py).
    window_s: float = 30.0
    busy_window_s: float = 10.0
    # Niceness added to CTranslate2's compute threads (Linux), so that under load the event loop, which
    # takes in every stream's audio, gets the CPU before decodes do. 0: the same priority (see
    # --decode-nice in docs/architecture.md for why that is the default).
    nice: int = 0
    # Tokens of the session's previous finals the decoder is prompted with (Whisper's previous-text
    # prompt, as offline transcription conditions each window on the last): a piece cut at a pause is
    # then read as the continuation it is. 0: each utterance alone.
    context_tokens: int = 64


# The encoder hears at least _ENCODE_PAD_S of silence after the utterance, rounded up to whole
# _ENCODE_STEP_S: a dozen buffer sizes rather than one per utterance length, so that freed buffers
# fit the next decode's and the heap stops growing. Word errors moved within the noise that any
# change of a second in the encoder's length makes: 72 against 75 on bench/accuracy.py's 978 words;
# 79 against 69 on the same words cut as tests/test_asr.py cuts them, where a 1.5 s pad gave 75.
_ENCODE_STEP_S = 2.0
_ENCODE_PAD_S = 1.0
_NO_SPEECH = 0.6  # faster-whisper's thresholds: no speech when both hold
_LOW_LOGPROB = -1.0
_REPETITIVE = 2.4  # compression ratio of a repetition loop
_FALLBACK_TEMPERATURES = (0.2, 0.4)
# A stream's language changes only where Whisper is sure of the new one: on a short piece it often
# hears a neighbouring language, unsure ("zum Stillstand" as Portuguese).
_SURE_OF_LANGUAGE = 0.5
_PREPEND, _APPEND = "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、"
_LONE_DIGIT = re.compile(r"(\d)([.!?]?)")
_DIGIT_NAMES = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")


def _computed_s(seconds: float) -> float:
    """How much of an utterance of `seconds` the encoder runs over: at least _ENCODE_PAD_S more."""
    return min(30.0, math.ceil((seconds + _ENCODE_PAD_S) / _ENCODE_STEP_S) * _ENCODE_STEP_S)


def _silent(avg_logprob: float, no_speech_prob: float) -> bool:
    """Whisper's own verdict of no speech: the no-speech token likely and the text improbable."""
    return no_speech_prob > _NO_SPEECH and avg_logprob < _LOW_LOGPROB


def cut_loop(tokens: list[int], min_period: int = 5) -> list[int]:
    """Whisper's loop: the output ends with the same block of tokens two or more times. Keep one.

    A speaker rarely repeats five or more tokens verbatim back to back; the decoder, given a
    little trailing silence, does it readily. A last copy cut short by the length cap counts too,
    and so does a copy whose first token differs (a sentence said again with a capital, "yet
    these thoughts ... Yet these thoughts ...").
    """
    n, keep = len(tokens), len(tokens)
    for period in range(min_period, n // 2 + 1):
        i = n - 1
        while i >= period and tokens[i] == tokens[i - period]:
            i -= 1
        # tokens[i + 1 - period : n] repeats with this period; its first copy ends at i + 1.
        repeated = n - (i + 1 - period)
        if repeated >= 2 * period:
            keep = min(keep, i + 1)
        elif repeated == 2 * period - 1:  # tokens[i] starts the second copy, in another spelling
            keep = min(keep, i)
    return tokens[:keep]


def spell_lone_digit(text: str) -> str:
    """A digit said on its own, as its word: "3" becomes "Three", "1." "One.".

    With no sentence around it, Whisper writes a lone number as a digit about as often as a word:
    "one", "two", "three" said with pauses came out "1.", "Two.", "3", where offline, over the
    whole recording, it wrote "One, two, three." Streaming cuts speech at pauses, so it meets lone
    numbers that offline never does; spelling them restores the offline text and the style
    (AP's) that writes single digits as words.
    """
    lone = _LONE_DIGIT.fullmatch(text)
    return _DIGIT_NAMES[int(lone[1])] + lone[2] if lone else text


def _load_niced(nice: int, load: Callable[[], WhisperModel]) -> WhisperModel:
    """`load()` on a thread of its own with `nice` added to its niceness: CTranslate2 starts its
    compute threads there, and a Linux thread inherits its creator's niceness.

    The decodes of 16 streams and the event loop that takes in their audio need about the same CPU
    on 2 cores. At the same priority, a backlog of finals took the loop's share: on a slower
    machine, the server had taken in 52 s of a stream's audio after 66 s, the peers' ICE consent
    checks timed out, and every session of the run closed. Niced, decodes get what the loop leaves.
    """
    if not nice or not sys.platform.startswith("linux"):  # elsewhere the niceness is the process's
        return load()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
            box["model"] = load()
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = e

    # A daemon, as server.py's loading thread: a stop during a long download does not wait for it.
    thread = threading.Thread(target=run, name="model-load-niced", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["model"]


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


def _repeats(tokenizer: Tokenizer, tokens: list[int], context: list[int]) -> bool:
    """The decoded text is nothing but words of the context, in its order: Whisper said the prompt again."""
    said = _normalize(tokenizer.decode(tokens))
    return bool(said) and f" {said} " in f" {_normalize(tokenizer.decode(context))} "


class WhisperEngine:
    """One faster-whisper model. Its methods block: only the decode worker calls them."""

    def __init__(self, model: str, device: str = "cpu", compute_type: str = "int8",
                 options: DecodeOptions = DecodeOptions()) -> None:
        self.name = model
        self.options = options
        started = time.monotonic()
        self._model = _load_niced(options.nice, lambda: WhisperModel(
            models.resolve(model), device=device, compute_type=compute_type,
            cpu_threads=options.cpu_threads, num_workers=options.workers,
        ))
        self._ct2 = self._model.model
        self.multilingual: bool = self._ct2.is_multilingual
        self._tokenizers: dict[str, Tokenizer] = {}
        self._silence = self._encode_window(np.zeros(0, np.float32), 30.0)
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

    def transcribe(self, audio: np.ndarray, language: str | None, final: bool,
                   greedy: bool = False, short_window: bool = False,
                   before: Before = Before()) -> Transcript | None:
        """Text of one utterance, or None when there is no credible speech in it.

        `greedy` (for a final: partials always are) and `short_window` (`busy_window_s` instead of
        `window_s`) trade accuracy for time when other decodes run or wait. `before`: what the stream said
        just before: its text is continued, its language kept where this utterance's is unsure.
        """
        encoded = self._encode(audio, self.options.busy_window_s if short_window else self.options.window_s)
        if language is None:
            token, probability = self._ct2.detect_language(get_ctranslate2_storage(encoded))[0][0]
            language = token[2:-2]
            if before.language and probability < _SURE_OF_LANGUAGE:
                language = before.language
        tokenizer = self._tokenizer(language)
        previous = self._previous(tokenizer, before.text)
        decoded = self._generate(encoded, tokenizer, audio.size / SAMPLE_RATE, final, greedy, previous)
        return self._transcript(decoded, tokenizer, encoded, audio, final, quick_words=greedy)

    def transcribe_burst(self, audios: list[np.ndarray], language: str,
                         befores: list[Before] | None = None) -> Iterator[tuple[int, Transcript | None]]:
        """Finals of a burst, as `transcribe(final=True, greedy=True, short_window=True)` gives them,
        in one batched decode: on one core, 8 of the devset's utterances took 566 ms against 948 ms
        one by one, 4 took 403 against 615.

        Yields (index, transcript) as each is ready, so that one need not wait for the word timings
        of all the others (about 16 ms each): first those the batch settled, then, one at a time, the
        doubtful ones that go on alone to the temperature fallback.
        """
        encoded = [self._encode(audio, self.options.busy_window_s) for audio in audios]
        frames = max(e.shape[1] for e in encoded)
        batch = get_ctranslate2_storage(np.concatenate([self._pad(e, frames) for e in encoded]))
        tokenizer = self._tokenizer(language)
        # One batch puts its start-of-transcript token at one position: every context as long as the shortest.
        previous = [self._previous(tokenizer, b.text) for b in befores or [Before()] * len(audios)]
        shortest = min(len(p) for p in previous)
        previous = [p[len(p) - shortest:] for p in previous]
        caps = [self._max_length(tokenizer, audio.size / SAMPLE_RATE, p) for audio, p in zip(audios, previous)]
        results = self._decode(batch, tokenizer, [self._prompt(tokenizer, p) for p in previous], max(caps), beam_size=1)
        tried = [self._outcome(result, tokenizer, cap) for result, cap in zip(results, caps)]
        for i in sorted(range(len(audios)), key=lambda i: not self._settled(tried[i], tokenizer)):
            seconds = audios[i].size / SAMPLE_RATE
            decoded = self._generate(encoded[i], tokenizer, seconds, final=True, greedy=True,
                                     previous=previous[i], tried=tried[i])
            yield i, self._transcript(decoded, tokenizer, encoded[i], audios[i], True, quick_words=True)

    def transcribe_pieces(self, audios: list[np.ndarray], language: str | None,
                          befores: list[Before] | None = None) -> list[Transcript | None]:
        """Pieces of one file, decoded together at offline accuracy: beam search over the full window in
        one batch, each piece with its own previous text, word timings over the full window, and the
        temperature fallback piece by piece for the doubtful. `language` None: detected on the first piece.
        """
        encoded = [self._encode(audio, self.options.window_s) for audio in audios]
        if language is None:
            token, _ = self._ct2.detect_language(get_ctranslate2_storage(encoded[0]))[0][0]
            language = token[2:-2]
        tokenizer = self._tokenizer(language)
        # One batch puts its start-of-transcript token at one position: every context as long as the shortest.
        previous = [self._previous(tokenizer, b.text) for b in befores or [Before()] * len(audios)]
        shortest = min(len(p) for p in previous)
        previous = [p[len(p) - shortest:] for p in previous]
        caps = [self._max_length(tokenizer, audio.size / SAMPLE_RATE, p) for audio, p in zip(audios, previous)]
        results = self._decode(get_ctranslate2_storage(np.concatenate(encoded)), tokenizer,
                               [self._prompt(tokenizer, p) for p in previous], max(caps),
                               beam_size=self.options.beam_size)
        transcripts = []
        for i, (result, cap) in enumerate(zip(results, caps)):
            seconds = audios[i].size / SAMPLE_RATE
            decoded = self._generate(encoded[i], tokenizer, seconds, final=True, greedy=False, previous=previous[i],
                                     tried=self._outcome(result, tokenizer, cap))
            transcripts.append(self._transcript(decoded, tokenizer, encoded[i], audios[i], True))
        return transcripts

    def _transcript(self, decoded: tuple[list[int], float, float], tokenizer: Tokenizer, encoded: np.ndarray,
                    audio: np.ndarray, final: bool, quick_words: bool = False) -> Transcript | None:
        tokens, avg_logprob, no_speech_prob = decoded
        text = tokenizer.decode(tokens).strip()
        if tokenizer.language_code == "en":
            text = spell_lone_digit(text)
        if self._rejected(text, avg_logprob, no_speech_prob):
            return None
        words = self._words(tokenizer, tokens, encoded, audio.size / SAMPLE_RATE, quick_words) if final else []
        if len(words) == 1:
            words = [replace(words[0], word=text)]
        return Transcript(text=text, language=tokenizer.language_code, words=words)

    def _encode(self, audio: np.ndarray, window_s: float) -> np.ndarray:
        """Encoder output over max(window_s, audio + 1 to 3 s), of which only audio + 1 to 3 s is computed."""
        return self._pad(self._encode_window(audio, _computed_s(audio.size / SAMPLE_RATE)), int(window_s * 50))

    def _short_window(self, encoded: np.ndarray, seconds: float) -> np.ndarray:
        """`encoded`, of an utterance of `seconds`, cut to the short window: what follows is silence."""
        return encoded[:, :int(max(self.options.busy_window_s, _computed_s(seconds)) * 50)]

    def _pad(self, encoded: np.ndarray, frames: int) -> np.ndarray:
        """`encoded` extended with the encoding of silence to `frames` (at most Whisper's 1500)."""
        frames = min(self._silence.shape[1], frames)
        if encoded.shape[1] >= frames:
            return encoded
        return np.concatenate([encoded, self._silence[:, encoded.shape[1]:frames]], axis=1)

    def _encode_window(self, audio: np.ndarray, window: float) -> np.ndarray:
        padded = np.zeros(int(window * SAMPLE_RATE), np.float32)
        padded[: audio.size] = audio[: padded.size]
        frames = int(window * 100) // 2 * 2  # the encoder's convolution halves the frame count
        features = self._model.feature_extractor(padded)[:, :frames]
        return np.array(self._ct2.encode(get_ctranslate2_storage(features[None]), to_cpu=True))

    def _tokenizer(self, language: str) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(
                self._model.hf_tokenizer, self.multilingual, task="transcribe", language=language)
        return self._tokenizers[language]

    def _generate(self, encoded: np.ndarray, tokenizer: Tokenizer, seconds: float, final: bool, greedy: bool,
                  previous: list[int] = (), tried: tuple[list[int], float, float] | None = None
                  ) -> tuple[list[int], float, float]:
        """Greedy for partials; beam search with temperature fallback for finals, as offline.

        `previous`: context tokens the decoder continues. A decode with context that is doubtful or only
        says the context again is tried once more without it, and the fallback never has it, so that a
        misheard context cannot carry over into the text.
        `tried`: the outcome of the first attempt, already decoded (in a batch). The fallback's five
        sampled hypotheses attend over the short window, which bounds their memory.
        """
        beam_size = self.options.beam_size if final and not greedy else 1
        storage = get_ctranslate2_storage(encoded)
        attempts = [(storage, list(previous), {"beam_size": beam_size})]
        if previous:
            attempts.append((storage, [], {"beam_size": beam_size}))
        if final:
            short = get_ctranslate2_storage(self._short_window(encoded, seconds))
            attempts += [(short, [], {"beam_size": 1, "sampling_temperature": t, "sampling_topk": 0,
                                      "num_hypotheses": 5}) for t in _FALLBACK_TEMPERATURES]
        best = None
        for number, (storage, context, attempt) in enumerate(attempts):
            if number == 0 and tried is not None:
                candidate = tried
            else:
                max_length = self._max_length(tokenizer, seconds, context)
                result = self._decode(storage, tokenizer, [self._prompt(tokenizer, context)], max_length, **attempt)[0]
                candidate = self._outcome(result, tokenizer, max_length)
            if context and _repeats(tokenizer, candidate[0], context):
                continue  # the context said again, not the audio
            if best is None or candidate[1] > best[1]:
                best = candidate
            if self._settled(candidate, tokenizer):
                return candidate
        assert best is not None  # the last attempt has no context
        return best

    def _previous(self, tokenizer: Tokenizer, context: str) -> list[int]:
        """The last `context_tokens` tokens of `context`, as faster-whisper keeps the previous text."""
        if not (self.options.context_tokens and context.strip()):
            return []
        return tokenizer.encode(" " + context.strip())[-self.options.context_tokens:]

    def _decode(self, encoded, tokenizer: Tokenizer, prompts: list[list[int]], max_length: int, **attempt) -> list:
        """Whisper's decoder over a batch of encodings, each with its prompt."""
        return self._ct2.generate(
            encoded, prompts, max_length=max_length, return_scores=True, return_no_speech_prob=True,
            suppress_blank=True, suppress_tokens=get_suppressed_tokens(tokenizer, [-1]), **attempt,
        )

    @staticmethod
    def _prompt(tokenizer: Tokenizer, previous: list[int] = ()) -> list[int]:
        head = [tokenizer.sot_prev, *previous] if previous else []
        return head + list(tokenizer.sot_sequence) + [tokenizer.no_timestamps]

    @classmethod
    def _max_length(cls, tokenizer: Tokenizer, seconds: float, previous: list[int] = ()) -> int:
        # Speech runs under ~5 tokens a second: a longer output is a loop, cut short. The prompt counts.
        return min(448, len(cls._prompt(tokenizer, previous)) + min(224, 16 + int(12 * seconds)))

    @staticmethod
    def _outcome(result, tokenizer: Tokenizer, max_length: int) -> tuple[list[int], float, float]:
        """(tokens, average log probability, no-speech probability) of one generated sequence."""
        tokens = cut_loop([t for t in result.sequences_ids[0][:max_length] if t < tokenizer.eot])
        return tokens, result.scores[0] * len(tokens) / (len(tokens) + 1), result.no_speech_prob

    @staticmethod
    def _settled(decoded: tuple[list[int], float, float], tokenizer: Tokenizer) -> bool:
        """No fallback needed: confidently silent, or neither a loop nor improbable."""
        tokens, avg_logprob, no_speech_prob = decoded
        if _silent(avg_logprob, no_speech_prob):
            return True
        return get_compression_ratio(tokenizer.decode(tokens)) <= _REPETITIVE and avg_logprob >= _LOW_LOGPROB

    def _words(self, tokenizer: Tokenizer, tokens: list[int], encoded: np.ndarray, seconds: float,
               quick: bool) -> list[Word]:
        """Word timings from the decoder's cross-attention over `encoded`, or, `quick`, over its computed
        part alone (the utterance plus 1 to 3 s).

        Over 30 s a final's alignment took 55 ms of one core on the devset's first three hearings (45
        utterances); over the computed part 22 ms, and over the 10 s window 27 ms. Against the 30 s
        timings, the computed part's moved 8 ms (starts) and 13 ms (ends) on average, at most 0.3 s; the
        10 s window's 13 and 18 ms, at most 1.3 s. A final alone is aligned over its full window; one
        decoded while others run or wait, over the computed part.
        """
        if not tokens:
            return []
        frames = int(seconds * 100) // 2 * 2
        if quick:
            encoded = encoded[:, :int(_computed_s(seconds) * 50)]
        alignment = self._model.find_alignment(tokenizer, [tokens], get_ctranslate2_storage(encoded), frames)[0]
        merge_punctuations(alignment, _PREPEND, _APPEND)
        return [
            Word(a["word"].strip(), round(min(a["start"], seconds), 3),
                 round(min(a["end"], seconds), 3), round(float(a["probability"]), 3))
            for a in alignment if a["word"].strip()
        ]

    @staticmethod
    def _rejected(text: str, avg_logprob: float, no_speech_prob: float) -> bool:
        if not text:
            return True
        if _silent(avg_logprob, no_speech_prob):
            return True
        if get_compression_ratio(text) > _REPETITIVE:  # still a loop after every fallback
            return True
        if _normalize(text) in _HALLUCINATIONS:
            return no_speech_prob > 0.3 or avg_logprob < -0.7
        return False
