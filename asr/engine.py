"""The shared faster-whisper model and how one utterance is decoded."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.transcribe import get_ctranslate2_storage, get_suppressed_tokens, merge_punctuations

from . import models, text
from .audio import SAMPLE_RATE, lifted
from .text import Decoded
from .threads import on_daemon_thread

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """Nobody awaits the decode any more: it stops at its next step (encoder, search, word timings)."""


def _going_on(stop: Callable[[], bool]) -> None:
    if stop():
        raise Abandoned


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
    language: str | None = None  # kept where detection is unsure
    # The audio just before a final's (ending where it begins) and the words said in it: the final is
    # decoded as their continuation (see WhisperEngine.transcribe). None: alone.
    audio: np.ndarray | None = field(default=None, compare=False)
    spoken: str = ""  # forced as the continuation's start; "": the audio is heard again, nothing forced
    earlier: str = ""  # what was said before `spoken`: the continuation's previous-text prompt
    # Heard again, the audio's words were given already (doubtful ones): those heard in it are left out.
    shown: bool = False
    onset: float = 0.0  # where the piece's speech begins in its own audio, after the pre-roll


@dataclass(frozen=True)
class _Input:
    """What one decode hears and is prompted with: a piece alone, or (with a `prefix`, the words before it
    forced as the transcript's start) the piece after the audio before it."""

    encoded: np.ndarray
    previous: list[int]  # previous-text tokens
    prefix: list[int]
    seconds: float  # of the piece, which caps the new tokens
    lead_s: float = 0.0  # of the audio before the piece in `encoded`
    shown: bool = False  # the words heard in that audio are not the piece's: see Before.shown
    onset_s: float = 0.0  # into the piece, where its speech begins

    @property
    def continues(self) -> bool:
        """Decoded after what came before it, rather than alone."""
        return bool(self.prefix) or self.lead_s > 0

    def prompt(self, tokenizer: Tokenizer) -> list[int]:
        return text.prompt(tokenizer, self.previous) + self.prefix

    def max_length(self, tokenizer: Tokenizer) -> int:
        return text.max_length(tokenizer, self.seconds, self.previous) + len(self.prefix)


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 5  # finals; partials are always greedy
    cpu_threads: int = 1  # per decode: parallel single-threaded decodes beat one wide decode on CPU
    workers: int = 1  # decode workers: decodes that may run at once
    # Whisper's encoder is built for 30 s, and its cost grows with what it hears. It runs over the
    # utterance plus 1 to 3 s only, and its output is padded with the encoding of silence, computed
    # once, to the window the decoder attends over: padded to Whisper's own 30 s the words are as
    # offline, and a shorter window loses some. Attending over a longer window costs every decode
    # more, so partials while other decodes run or wait, and finals in a burst, take the busy window
    # (asr/policy.py).
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
    # Speech quieter than this active level (dBFS) is brought up to it before Whisper hears it; None: never.
    lift_dbfs: float | None = -40.0


# The encoder hears at least _ENCODE_PAD_S of silence after the utterance, rounded up to whole
# _ENCODE_STEP_S: a few buffer sizes rather than one per utterance length, so that freed buffers
# fit the next decode's and the heap stops growing.
_ENCODE_STEP_S = 2.0
_ENCODE_PAD_S = 1.0
_FALLBACK_TEMPERATURES = (0.2, 0.4)
# Speech runs at 3 or more tokens a second. A continuation with fewer tokens than its piece has seconds past
# the first 2 (pre-roll, a lone word, the endpoint's tail) left words unsaid: the piece is decoded alone.
_CONTINUATION_SLACK_S = 2.0
# A stream's language changes only where Whisper is sure of the new one: on a short piece it often
# hears a neighbouring language, unsure ("zum Stillstand" as Portuguese).
_SURE_OF_LANGUAGE = 0.5
_PREPEND, _APPEND = "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、"


def _computed_s(seconds: float) -> float:
    """How much of an utterance of `seconds` the encoder runs over: at least _ENCODE_PAD_S more."""
    return min(30.0, math.ceil((seconds + _ENCODE_PAD_S) / _ENCODE_STEP_S) * _ENCODE_STEP_S)


def _load_niced(nice: int, load: Callable[[], WhisperModel]) -> WhisperModel:
    """`load()` on a thread of its own with `nice` added to its niceness: CTranslate2 starts its
    compute threads there, and a Linux thread inherits its creator's niceness.

    Under load the decodes and the event loop that takes in every stream's audio compete for the
    same cores. At the same priority a backlog of finals can take the loop's share: the server then
    falls behind the audio, the peers' ICE consent checks time out and their sessions close. Niced,
    decodes get what the loop leaves.
    """
    if not nice or not sys.platform.startswith("linux"):  # elsewhere the niceness is the process's
        return load()

    def run() -> WhisperModel:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
        return load()

    # A daemon, as server.py's loading thread: a stop during a long download does not wait for it.
    return on_daemon_thread(run, name="model-load-niced").result()


class WhisperEngine:
    """One faster-whisper model. Its methods block: only the decode workers call them."""

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
                   greedy: bool = False, busy_window: bool = False,
                   before: Before = Before(), whole: bool = False,
                   stop: Callable[[], bool] = lambda: False) -> Transcript | None:
        """Text of one utterance, or None when there is no credible speech in it.

        `greedy` (for a final: partials always are) and `busy_window` (`busy_window_s` instead of
        `window_s`) trade accuracy for time when other decodes run or wait. `before`: what the stream said
        just before: its text is continued, its language kept where this utterance's is unsure. `whole`:
        the encoder runs over the whole window, as offline, not over the utterance and a little after it.
        `stop()` true: nobody awaits the result any more; the decode ends at its next step with Abandoned.
        """
        window = self.options.busy_window_s if busy_window else self.options.window_s
        # A continued final is heard and timed over the audio before it and its own: the piece alone is
        # encoded only where it is needed.
        encoded = functools.cache(lambda: self._encode_window(audio, window) if whole else self._encode(audio, window))
        continued = final and before.audio is not None
        after = functools.cache(functools.partial(self._encode_after, before, audio, window))
        if language is None:
            # A piece that goes on from the audio before it is told by both: alone, a short piece is often
            # heard as a neighbouring language ("zum Stillstand" as Portuguese).
            heard = after() if continued else encoded()
            token, probability = self._ct2.detect_language(get_ctranslate2_storage(heard))[0][0]
            language = token[2:-2]
            if before.language and probability < _SURE_OF_LANGUAGE:
                language = before.language
        tokenizer = self._tokenizer(language)
        lead = self._continuation_input(after, audio, tokenizer, before) if continued else None
        if lead is not None:
            _going_on(stop)
            _, (result,) = self._batched(tokenizer, [lead], beam_size=1 if greedy else self.options.beam_size)
            continued = self._continued(result, tokenizer, lead)
            if continued is not None:
                decoded, lead = continued
                _going_on(stop)
                return self._transcript(decoded, tokenizer, encoded, audio, final, quick_words=greedy, lead=lead)
        previous = text.previous_tokens(tokenizer, before.text, self.options.context_tokens)
        decoded = self._generate(encoded(), tokenizer, audio.size / SAMPLE_RATE, final, greedy, previous, stop=stop)
        _going_on(stop)
        return self._transcript(decoded, tokenizer, encoded, audio, final, quick_words=greedy)

    def _continuation_input(self, encoded: Callable[[], np.ndarray], audio: np.ndarray, tokenizer: Tokenizer,
                            before: Before) -> _Input | None:
        """What decodes a piece as heard after the audio before it: that audio's words forced as the transcript's
        start (Whisper's prefix), the words said before those as the previous-text prompt. Decoded alone, a piece cut
        at a hesitation begins a sentence of its own ("It confused." for "a confused"), "ask not" after a pause
        came back "as not", "two" in kitchen noise as nothing. None where there is nothing before it to
        continue."""
        if before.audio is None or before.language not in (None, tokenizer.language_code):
            return None
        # Forced tokens are decoded one step each, as dearly as generated ones; the prompt goes in one pass.
        previous = text.previous_tokens(tokenizer, before.earlier, self.options.context_tokens)
        return _Input(encoded(), previous,
                      tokenizer.encode(" " + before.spoken.strip()) if before.spoken.strip() else [],
                      audio.size / SAMPLE_RATE, before.audio.size / SAMPLE_RATE, before.shown, before.onset)

    def _encode_after(self, before: Before, audio: np.ndarray, window_s: float) -> np.ndarray:
        """The piece encoded after the audio before it."""
        return self._encode(np.concatenate([before.audio, audio]), window_s)

    def _continued(self, result, tokenizer: Tokenizer, lead: _Input) -> tuple[Decoded, _Input] | None:
        """Only the new words of a continuation's decode, and the input as they were decoded (the words heard
        again in shown audio as its prefix); None where they are nothing, the context again, or doubtful: the
        piece is then decoded alone."""
        decoded = self._outcome(result, tokenizer, lead.max_length(tokenizer))
        if lead.shown:
            lead = replace(lead, prefix=self._heard_in_lead(tokenizer, decoded.tokens, lead), shown=False)
        prefix = lead.prefix
        if decoded.tokens[:len(prefix)] != prefix:  # CTranslate2 returns the forced prefix with the new words
            return None
        new = decoded.tokens[len(prefix):]
        # The prefix went without its end mark, which Whisper may then write first ("? Still more"): that mark
        # belongs to the words before, not to the fragment.
        while new and text.punctuation(tokenizer.decode(new[:1])):
            new = new[1:]
        decoded = decoded._replace(tokens=new)
        # Greedy, Whisper may finish the word the lead was cut in and stop there: "can..." for the 5 s of a new
        # sentence after it.
        if (not decoded.tokens or len(decoded.tokens) < lead.seconds - _CONTINUATION_SLACK_S
                or not text.settled(decoded, tokenizer)
                or text.silent(decoded.avg_logprob, decoded.no_speech_prob)
                or text.repeats(tokenizer, decoded.tokens, lead.previous + prefix)):
            return None
        return decoded, lead

    def _heard_in_lead(self, tokenizer: Tokenizer, tokens: list[int], lead: _Input) -> list[int]:
        """The first of `tokens` that are words heard in the lead audio: ended before the piece's speech began.
        A word's start is a poor guide, for the alignment stretches a word after a pause back over it; and the
        lead's last word may run on over the pause into the piece's pre-roll ("keeping this" heard again ended
        "this" there, and the piece came back "this declaration")."""
        if not tokens:
            return []
        alignment = self._alignment(tokenizer, tokens, lead.encoded, lead.lead_s + lead.seconds, quick=True)
        cut = 0
        for word in alignment:
            if word["end"] > lead.lead_s + lead.onset_s:
                break
            cut += len(word["tokens"])
        return tokens[:cut]

    def transcribe_burst(self, audios: list[np.ndarray], language: str,
                         befores: list[Before] | None = None) -> Iterator[tuple[int, Transcript | None]]:
        """Finals of a burst, as `transcribe(final=True, greedy=True, busy_window=True)` gives them,
        in one batched decode, which costs less than decoding them one by one: each step of Whisper's
        decoder reads all of its weights, once for the whole batch. A piece that goes on from the words
        before it is decoded as their continuation in the same batch, as `transcribe` would.

        Yields (index, transcript) as each is ready, so that one need not wait for the word timings
        of all the others: first those the batch settled, then, one at a time, the doubtful ones that
        go on alone (to the temperature fallback, or decoded without their lead).
        """
        window = self.options.busy_window_s
        befores = befores or [Before()] * len(audios)
        tokenizer = self._tokenizer(language)
        encoded = [functools.cache(functools.partial(self._encode, audio, window)) for audio in audios]
        texts = [text.previous_tokens(tokenizer, b.text, self.options.context_tokens) for b in befores]
        leads = [self._continuation_input(functools.partial(self._encode_after, before, audio, window), audio,
                                          tokenizer, before) for audio, before in zip(audios, befores)]
        inputs, results = self._batched(tokenizer, [
            lead or _Input(e(), previous, [], audio.size / SAMPLE_RATE)
            for lead, e, previous, audio in zip(leads, encoded, texts, audios)], beam_size=1)
        tried: list[Decoded | None] = []
        for n, (result, piece) in enumerate(zip(results, inputs)):
            if not piece.continues:
                tried.append(self._outcome(result, tokenizer, piece.max_length(tokenizer)))
                continue
            continued = self._continued(result, tokenizer, piece)
            if continued is not None:
                inputs[n] = continued[1]
            tried.append(None if continued is None else continued[0])
        for i in sorted(range(len(audios)), key=lambda i: tried[i] is None or not text.settled(tried[i], tokenizer)):
            seconds = audios[i].size / SAMPLE_RATE
            continued = inputs[i].continues and tried[i] is not None
            if continued:
                decoded = tried[i]
            elif not inputs[i].continues:
                decoded = self._generate(encoded[i](), tokenizer, seconds, final=True, greedy=True,
                                         previous=inputs[i].previous, tried=tried[i])
            else:  # the continuation failed: alone, as `transcribe` decodes it
                decoded = self._generate(encoded[i](), tokenizer, seconds, final=True, greedy=True, previous=texts[i])
            yield i, self._transcript(decoded, tokenizer, encoded[i], audios[i], True, quick_words=True,
                                      lead=inputs[i] if continued else None)

    def _batched(self, tokenizer: Tokenizer, inputs: list[_Input], **attempt) -> tuple[list[_Input], list]:
        """One decode of several inputs. One batch puts its start-of-transcript token at one position: every
        previous-text context is cut to the shortest, and the inputs are returned so cut."""
        shortest = min(len(i.previous) for i in inputs)
        inputs = [replace(i, previous=i.previous[len(i.previous) - shortest:]) for i in inputs]
        frames = max(i.encoded.shape[1] for i in inputs)
        batch = get_ctranslate2_storage(np.concatenate([self._pad(i.encoded, frames) for i in inputs]))
        return inputs, self._decode(batch, tokenizer, [i.prompt(tokenizer) for i in inputs],
                                    max(i.max_length(tokenizer) for i in inputs), **attempt)

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
        inputs, results = self._batched(tokenizer, [
            _Input(e, text.previous_tokens(tokenizer, b.text, self.options.context_tokens), [], a.size / SAMPLE_RATE)
            for e, b, a in zip(encoded, befores or [Before()] * len(audios), audios)], beam_size=self.options.beam_size)
        transcripts = []
        for i, (result, piece) in enumerate(zip(results, inputs)):
            decoded = self._generate(encoded[i], tokenizer, piece.seconds, final=True, greedy=False,
                                     previous=piece.previous, tried=self._outcome(result, tokenizer,
                                                                                  piece.max_length(tokenizer)))
            transcripts.append(self._transcript(decoded, tokenizer, lambda e=encoded[i]: e, audios[i], True))
        return transcripts

    def _transcript(self, decoded: Decoded, tokenizer: Tokenizer, encoded: Callable[[], np.ndarray],
                    audio: np.ndarray, final: bool, quick_words: bool = False,
                    lead: _Input | None = None) -> Transcript | None:
        """`encoded()`: the piece's encoding; `lead`: the continuation `decoded` was decoded as, if it was."""
        heard = tokenizer.decode(decoded.tokens).strip()
        said = text.spell_lone_digits(heard) if tokenizer.language_code == "en" else heard
        if text.rejected(said, decoded.avg_logprob, decoded.no_speech_prob):
            return None
        seconds = audio.size / SAMPLE_RATE
        words = self._words(tokenizer, decoded.tokens, encoded, seconds, quick_words, lead) if final else []
        if len(words) == 1:
            words = [replace(words[0], word=said)]
        elif said != heard and len(words) == len(said.split()):  # digits spelt, word by word
            words = [replace(w, word=spelt) for w, spelt in zip(words, said.split())]
        return Transcript(text=said, language=tokenizer.language_code, words=words)

    def _encode(self, audio: np.ndarray, window_s: float) -> np.ndarray:
        """Encoder output over max(window_s, audio + 1 to 3 s), of which only audio + 1 to 3 s is computed."""
        return self._pad(self._encode_window(audio, _computed_s(audio.size / SAMPLE_RATE)), int(window_s * 50))

    def _busy_window(self, encoded: np.ndarray, seconds: float) -> np.ndarray:
        """`encoded`, of an utterance of `seconds`, cut to the busy window: what follows is silence."""
        return encoded[:, :int(max(self.options.busy_window_s, _computed_s(seconds)) * 50)]

    def _pad(self, encoded: np.ndarray, frames: int) -> np.ndarray:
        """`encoded` extended with the encoding of silence to `frames` (at most Whisper's 1500)."""
        frames = min(self._silence.shape[1], frames)
        if encoded.shape[1] >= frames:
            return encoded
        return np.concatenate([encoded, self._silence[:, encoded.shape[1]:frames]], axis=1)

    def _encode_window(self, audio: np.ndarray, window: float) -> np.ndarray:
        padded = np.zeros(int(window * SAMPLE_RATE), np.float32)
        if self.options.lift_dbfs is not None:
            audio = lifted(audio, self.options.lift_dbfs)
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
                  previous: list[int] = (), tried: Decoded | None = None,
                  stop: Callable[[], bool] = lambda: False) -> Decoded:
        """Greedy for partials; beam search with temperature fallback for finals, as offline.

        `previous`: context tokens the decoder continues. A decode with context that is doubtful or only
        says the context again is tried once more without it, and the fallback never has it, so that a
        misheard context cannot carry over into the text.
        `tried`: the outcome of the first attempt, already decoded (in a batch). The fallback's five
        sampled hypotheses attend over the busy window, which bounds their memory.
        """
        beam_size = self.options.beam_size if final and not greedy else 1
        storage = get_ctranslate2_storage(encoded)
        attempts = [(storage, list(previous), {"beam_size": beam_size})]
        if previous:
            attempts.append((storage, [], {"beam_size": beam_size}))
        if final:
            busy = get_ctranslate2_storage(self._busy_window(encoded, seconds))
            attempts += [(busy, [], {"beam_size": 1, "sampling_temperature": t, "sampling_topk": 0,
                                      "num_hypotheses": 5}) for t in _FALLBACK_TEMPERATURES]
        best = None
        for number, (storage, context, attempt) in enumerate(attempts):
            _going_on(stop)
            if number == 0 and tried is not None:
                candidate = tried
            else:
                max_length = text.max_length(tokenizer, seconds, context)
                result = self._decode(storage, tokenizer, [text.prompt(tokenizer, context)], max_length, **attempt)[0]
                candidate = self._outcome(result, tokenizer, max_length)
            if context and text.repeats(tokenizer, candidate.tokens, context):
                continue  # the context said again, not the audio
            if best is None or candidate.avg_logprob > best.avg_logprob:
                best = candidate
            if text.settled(candidate, tokenizer):
                return candidate
        assert best is not None  # the last attempt has no context
        return best

    def _decode(self, encoded, tokenizer: Tokenizer, prompts: list[list[int]], max_length: int, **attempt) -> list:
        """Whisper's decoder over a batch of encodings, each with its prompt."""
        return self._ct2.generate(
            encoded, prompts, max_length=max_length, return_scores=True, return_no_speech_prob=True,
            suppress_blank=True, suppress_tokens=get_suppressed_tokens(tokenizer, [-1]), **attempt,
        )

    @staticmethod
    def _outcome(result, tokenizer: Tokenizer, max_length: int) -> Decoded:
        """Tokens, average log probability and no-speech probability of one generated sequence."""
        tokens = [t for t in result.sequences_ids[0][:max_length] if t < tokenizer.eot]
        # Words first: on a copy spelt in other tokens, the token check alone would cut inside the second copy.
        tokens = text.cut_loop(text.cut_word_loop(tokenizer, tokens))
        return Decoded(tokens, result.scores[0] * len(tokens) / (len(tokens) + 1), result.no_speech_prob)

    def _words(self, tokenizer: Tokenizer, tokens: list[int], encoded: Callable[[], np.ndarray], seconds: float,
               quick: bool, lead: _Input | None = None) -> list[Word]:
        """Word timings from the decoder's cross-attention over `encoded()`, or, `quick`, over its computed
        part alone (the utterance plus 1 to 3 s).

        Over the computed part alone the alignment costs less, and its timings stay within what a
        reader could tell from the full window's; over the busy window they stray further, at no
        saving. So a final alone is aligned over its full window, and one decoded while others run
        or wait over the computed part.

        A continuation's words are timed as they were decoded, after its prefix over the audio before it
        and its own, unless a word spans both (a prefix that ends inside a word): then over its own.
        """
        if not tokens:
            return []
        if lead is not None:
            alignment = self._alignment(tokenizer, lead.prefix + tokens, lead.encoded, lead.lead_s + seconds, quick)
            ends = [0, *np.cumsum([len(a["tokens"]) for a in alignment])]
            if len(lead.prefix) in ends:
                return self._timed(alignment[ends.index(len(lead.prefix)):], seconds, lead.lead_s)
        return self._timed(self._alignment(tokenizer, tokens, encoded(), seconds, quick), seconds)

    def _alignment(self, tokenizer: Tokenizer, tokens: list[int], encoded: np.ndarray, seconds: float,
                   quick: bool) -> list[dict]:
        frames = int(seconds * 100) // 2 * 2
        if quick:
            encoded = encoded[:, :int(_computed_s(seconds) * 50)]
        return self._model.find_alignment(tokenizer, [tokens], get_ctranslate2_storage(encoded), frames)[0]

    @staticmethod
    def _timed(alignment: list[dict], seconds: float, offset: float = 0.0) -> list[Word]:
        """Words of `alignment`, their times less `offset`, within the utterance's `seconds`."""
        merge_punctuations(alignment, _PREPEND, _APPEND)
        return [
            Word(a["word"].strip(), round(min(max(a["start"] - offset, 0.0), seconds), 3),
                 round(min(max(a["end"] - offset, 0.0), seconds), 3), round(float(a["probability"]), 3))
            for a in alignment if a["word"].strip()
        ]
