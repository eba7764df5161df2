"""One stream's speech pipeline: 16 kHz audio in, protocol events out."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from . import events
from .audio import SAMPLE_RATE
from .engine import Before, Transcript, Word
from .events import Event
from .segmenter import Segmenter, SegmenterConfig, SpeechEnded, SpeechStarted
from .text import answer
from .vad import VadBatch
from .worker import DecodePool, Overloaded

log = logging.getLogger(__name__)

# Half a second of speech is often too little for Whisper to say anything credible: the first
# partial is asked for again after this much more audio, not after a whole partial interval.
_FIRST_PARTIAL_RETRY_MS = 200
# A long utterance's partial costs about what its final does. A stream asks for the next partial only after
# at least 1 / _PARTIAL_SHARE times as long as the last took to come back: its partials keep a worker busy at
# most that share of the time, and leave the rest to finals and to other streams.
_PARTIAL_SHARE = 0.5
# A piece is continued from the last final with words only where it began within _LEAD_PAUSE_S of that one's
# speech end, or within _REACH_S where that final did not end its sentence: the speaker is still in it after a
# pause longer than the endpoint such a final waits for. Continued, a new sentence often comes back without
# its end mark, and its pause then waits for that endpoint too. A context from long ago is not its own.
_REACH_S = 4.0
# A lead holds at most _LEAD_PAUSE_S of the pause, and the last final's words of the _LEAD_S before the lead's
# end: each word of a longer one is a decoder step more. A final that heard no words is heard again whole, pause
# and all, before a piece begun within _LEAD_PAUSE_S of it.
_LEAD_PAUSE_S = 2.0
_LEAD_S = 3.0
# A lead's words are not forced on the piece after them where their mean probability is under _DOUBTFUL, or
# where they are a whole final of _FEW_WORDS or fewer, however sure: see _unforceable.
_DOUBTFUL = 0.5
_FEW_WORDS = 2
# A final that heard no words waits for a piece begun within _LEAD_PAUSE_S of its speech, which hears its audio
# again, until the VAD has judged _UNHEARD_MARGIN_S more: time for such a piece to be confirmed as speech.
_UNHEARD_MARGIN_S = 0.4
# A stream keeps pace with real time while its audio since an early final was asked for runs at most this far
# ahead of the clock: network jitter, not a client that sends faster.
_PACE_SLACK_S = 0.25
# Two words take longer to say than this much speech: a final of one word twice in less was one word written
# twice (see _said_once).
_TWO_WORDS_S = 0.5


@dataclass(frozen=True)
class StreamOptions:
    language: str | None  # None: detect per utterance
    partials: bool = True
    partial_interval_ms: int = 600
    early_final_ms: int = 160  # pause after which the final is decoded ahead of the endpoint; 0: off
    # A pause this long ends the utterance when its early final already ends a sentence.
    sentence_endpoint_ms: int = 400
    context_chars: int = 200  # of the last finals, in the prompt after one that stopped mid-clause or of a
    # continued piece; 0: never
    fragment_s: float = 20.0  # speech up to this long is decoded as the last final's continuation; 0: never
    prompt: str = ""  # Whisper's initial prompt: before every utterance, the names and style to expect


@dataclass(frozen=True)
class _Said:
    """One final, as the decodes after it are conditioned on it."""

    language: str | None  # None: not known (no words were heard)
    text: str
    continued: bool  # cut for length while the speaker went on
    speech_end: float
    words: list[Word]  # timed on the stream timeline
    audio_start: float | None  # where its audio began on the timeline; None once that audio is forgotten


class _Recent:
    """The last `seconds` of a stream's audio, sliced by timeline position."""

    def __init__(self, seconds: float) -> None:
        self._limit = int(seconds * SAMPLE_RATE)
        self._chunks: deque[np.ndarray] = deque()
        self._held = 0
        self._end = 0  # timeline sample after the last one held

    def append(self, pcm: np.ndarray) -> None:
        self._chunks.append(pcm)
        self._held += pcm.size
        self._end += pcm.size
        while self._held - self._chunks[0].size >= self._limit:
            self._held -= self._chunks.popleft().size

    def between(self, start: float, end: float) -> np.ndarray | None:
        """The audio from `start` to `end` seconds, or None where it is no longer (or not yet) held."""
        first, last = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
        if first < self._end - self._held or last > self._end or first >= last:
            return None
        held = np.concatenate(self._chunks)
        offset = self._end - self._held
        return held[first - offset:last - offset]


class _Unheard:
    """A final that heard no words, until it is known whether a piece after it will hear its audio again."""

    def __init__(self, said: _Said) -> None:
        self.said = said  # as remembered for the piece after it
        # By when such a piece has begun and been confirmed as speech.
        self.until = said.speech_end + _LEAD_PAUSE_S + _UNHEARD_MARGIN_S
        self.again: asyncio.Future[bool] = asyncio.get_running_loop().create_future()  # True: hear it again

    def settle(self, again: bool) -> None:
        if not self.again.done():
            self.again.set_result(again)


@dataclass
class _EarlyFinal:
    utterance: int
    voiced: int  # the segmenter's `voiced` when it was asked for: no word said since while it stands
    result: asyncio.Future
    alone: bool  # decoded with no audio before it: nothing said within reach, or its audio forgotten
    decided: float  # the segmenter's `decided` when it was asked for
    asked: float  # and the loop's clock


class SpeechStream:
    """Feeds the segmenter, asks the decode pool for partials and finals, emits events in order."""

    def __init__(self, pool: DecodePool, segmenter: Segmenter, options: StreamOptions,
                 emit: Callable[[Event], None], vad_batch: VadBatch | None = None) -> None:
        self._pool = pool
        self._segmenter = segmenter
        self._vad_batch = vad_batch  # None: each feed's windows are decided at once
        self.options = options
        self._emit = emit
        self.samples = 0
        self.utterances = 0
        self._partial_task: asyncio.Task | None = None
        self._partial_audio = 0  # utterance samples covered by the last partial request
        self._partial_s = 0.0  # how long the utterance's last partial took to come back
        self._previous_words: list[str] = []  # of this utterance's last partial; [] before the first
        self._last_final: asyncio.Task | None = None
        self._finals_pending = 0
        self._early_final: _EarlyFinal | None = None
        self._final_done = asyncio.Event()
        self._said: deque[_Said] = deque()  # the last finals with words, at least one; then maybe an empty one
        # Held: the lead, its gap and the fragment, with room for pre-roll, tail and windows yet to be decided.
        self._recent = _Recent(_LEAD_S + _REACH_S + options.fragment_s + 4.0) if options.fragment_s else None
        self._key = id(self)  # this stream's slot in the pool's keyed queues
        self._unheard: _Unheard | None = None  # the final that heard no words, waiting for what comes after it
        self._flushed = -1.0  # timeline position of the last flush

    @property
    def utterance(self) -> int:
        """The number of the latest utterance begun (1, 2, 3...): once none is in progress, every utterance up
        to it has ended, or was discarded."""
        return self._segmenter.utterance

    @property
    def narrowband(self) -> bool:
        """The client sends audio at NARROWBAND_RATE or lower: the VAD hears it at that rate (asr/vad.py)."""
        return self._segmenter.vad.narrowband

    @narrowband.setter
    def narrowband(self, value: bool) -> None:
        self._segmenter.vad.narrowband = value

    async def wait_capacity(self, max_pending: int) -> None:
        """Until at most `max_pending` finals wait: a sender faster than real time pauses here."""
        while self._finals_pending > max_pending:
            self._final_done.clear()
            await self._final_done.wait()

    def feed(self, pcm: np.ndarray) -> None:
        """16 kHz mono float32. Cheap: VAD and bookkeeping only; decoding is queued."""
        self.samples += pcm.size
        if self._recent is not None:
            self._recent.append(pcm)
        windows = self._segmenter.windows(pcm)
        if not windows.size:
            return
        if self._vad_batch is None:
            self._advance(windows, self._segmenter.vad(windows))
        else:
            self._vad_batch.submit(self._segmenter.vad, windows, self._advance)

    def _advance(self, windows: np.ndarray, probs: np.ndarray) -> None:
        # A verdict that came since the last windows sets the endpoint these are judged by; while it is
        # still being decoded, the endpoint waits a little for it.
        self._maybe_end_sentence()
        ahead = self._early_final
        self._segmenter.judging = ahead is not None and not ahead.result.done()
        self._segmenter.patient = self._segmenter.judging and self._keeps_pace(ahead, windows)
        for event in self._segmenter.advance(windows, probs):
            self._on_segment(event)
        if self._segmenter.overdue:  # decoded now as the final it would have been at the endpoint
            self._pool.promote(self._key)
        if self._unheard is not None and self._segmenter.decided >= self._unheard.until:
            self._unheard.settle(again=True)
        self._maybe_early_final()
        self._maybe_end_sentence()
        self._maybe_partial()

    async def finish(self) -> None:
        """End of input: close the utterance in progress and wait until its final is sent."""
        self.flush("end")
        await self.finals_sent()

    def flush(self, cause: str = "flush") -> bool:
        """Ends the utterance in progress now, whatever its pause: its speech.stopped comes at once, its
        final once decoded. The stream goes on. True when there was one to end."""
        self._decide_waiting_windows()
        ended = self._segmenter.flush(cause)
        for event in ended:
            self._on_segment(event)
        self._flushed = self._segmenter.decided
        if self._unheard is not None:  # its final is asked for now, not after more audio
            self._unheard.settle(again=True)
        return bool(ended)

    async def finals_sent(self) -> None:
        """Until every utterance ended so far has had its final emitted."""
        if self._last_final is not None:
            await asyncio.shield(self._last_final)

    def discard(self) -> None:
        """Forgets the audio fed so far that no utterance has taken: the utterance in progress ends with
        neither speech.stopped nor a final, and no partial of it comes after. Finals of utterances
        already ended still come."""
        self._decide_waiting_windows()  # what came before is heard first: an endpoint in it stands
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()
        self._drop_early_final()
        self._segmenter.discard()
        # The audio forgotten lies before the next fragment: it must not be decoded with it.
        self._said = deque(replace(s, words=[], audio_start=None) for s in self._said)

    def configure(self, options: StreamOptions, segmenter: SegmenterConfig) -> None:
        """New options for the audio that comes next (a client changed its session)."""
        self.options = options
        self._segmenter.configure(segmenter)

    def _decide_waiting_windows(self) -> None:
        if self._vad_batch is not None and self._vad_batch.pending(self._segmenter.vad):
            self._vad_batch.run()

    def close(self) -> None:
        if self._vad_batch is not None:
            self._vad_batch.cancel(self._segmenter.vad)
        self._drop_early_final()
        for task in (self._partial_task, self._last_final):
            if task is not None and not task.done():
                task.cancel()

    def _keeps_pace(self, ahead: _EarlyFinal, windows: np.ndarray) -> bool:
        """The audio since `ahead` was asked for, `windows` included, has come no faster than real time."""
        heard = self._segmenter.decided + windows.size / SAMPLE_RATE - ahead.decided
        return heard - (asyncio.get_running_loop().time() - ahead.asked) <= _PACE_SLACK_S

    def _maybe_early_final(self) -> None:
        """Decode the final while the endpoint silence runs, so it is ready when the endpoint is."""
        seg = self._segmenter
        ahead = self._early_final
        if ahead is not None and (ahead.utterance != seg.utterance or seg.voiced != ahead.voiced):
            self._drop_early_final()  # speech resumed: that early final is stale
            ahead = None
        early = self.options.early_final_ms
        # Only on spare capacity: an early final must never push a final back. A pool with no final running
        # or waiting (partials give way to finals) starts one as soon as the voice has stopped for `early`
        # ms; a busy one waits until the VAD agrees: early finals timed by the voice alone begin in short
        # pauses mid-sentence too, and under load the decodes they waste cost more latency than the sooner
        # endpoint saves.
        pause = seg.pause_ms if self._pool.finals_idle else seg.vad_pause_ms
        if (ahead is None and early and seg.in_speech and pause >= early
                and not self._pool.finals_waiting):
            audio = seg.speech_audio()
            before = self._before_fragment(seg.onset, seg.speech_end, seg.audio_start)
            result = self._pool.early_final(self._key, audio, self.options.language, before)
            self._early_final = _EarlyFinal(seg.utterance, seg.voiced, result, alone=before.audio is None,
                                            decided=seg.decided, asked=asyncio.get_running_loop().time())
            result.add_done_callback(self._on_verdict)

    def _on_verdict(self, result: asyncio.Future) -> None:
        """An early final came back: its verdict applies now, not with the next audio, which a client that has
        sent its pause and waits for the final may never send."""
        if self._early_final is None or self._early_final.result is not result:
            return
        self._segmenter.judging = False
        self._maybe_end_sentence()
        event = self._segmenter.end_if_due()
        if event is not None:
            self._on_segment(event)

    def _maybe_end_sentence(self) -> None:
        """The early final judges the pause: a finished sentence needs less silence to be sure of; words that
        stop mid-clause, several words that Whisper left without an end mark, or a word or two it guessed with
        nothing before them, need more. A lone word left bare ("Three", "Six": an answer or a number) takes
        the plain endpoint."""
        seg, ahead = self._segmenter, self._early_final
        if (ahead is None or not ahead.result.done() or ahead.result.cancelled()
                or ahead.result.exception() is not None
                or ahead.utterance != seg.utterance or ahead.voiced != seg.voiced):
            return
        result = ahead.result.result()
        if result is None:
            return
        if ahead.alone and _guessed(result):  # with nothing before it, only the words after it can tell
            seg.unfinished = True
        elif finished(result.text, result.language):
            if seg.pause_ms >= self.options.sentence_endpoint_ms:
                event = seg.end_in_pause()
                if event is not None:
                    self._on_segment(event)
        elif unfinished(result.text, result.language) or len(result.text.split()) > 1:
            seg.unfinished = True

    def _drop_early_final(self) -> None:
        if self._early_final is not None:
            self._early_final.result.cancel()
            self._early_final = None

    def _take_final(self, event: SpeechEnded) -> asyncio.Future:
        ahead, self._early_final = self._early_final, None
        if ahead is not None and ahead.utterance == event.utterance and ahead.voiced == event.voiced:
            self._pool.promote(self._key)
            return ahead.result
        if ahead is not None:
            ahead.result.cancel()
        before = self._before_fragment(event.start, event.end, event.audio_start)
        return self._pool.final(event.audio, self.options.language, before)

    def _on_segment(self, event: SpeechStarted | SpeechEnded) -> None:
        if isinstance(event, SpeechStarted):
            if self._unheard is not None:  # begun soon enough, this piece hears that audio again
                self._unheard.settle(again=not self._near(self._unheard.said, event.start))
            self._partial_audio = 0
            self._partial_s = 0.0
            self._previous_words = []
            self._emit(events.speech_started(event.utterance, event.start))
            return
        self.utterances += 1
        if self._partial_task is not None and not self._partial_task.done():
            self._partial_task.cancel()  # its text could only come after speech.stopped: not decoded
        self._emit(events.speech_stopped(event.utterance, event.end))
        self._finals_pending += 1
        try:
            pending = self._take_final(event)
        except Overloaded as e:
            pending = asyncio.get_running_loop().create_future()
            pending.set_exception(e)
        self._last_final = asyncio.create_task(self._final(event, pending, self._last_final))

    async def _final(self, event: SpeechEnded, pending: asyncio.Future,
                     previous: asyncio.Task | None) -> None:
        decoded = True
        try:
            result = await pending
        except Overloaded as e:
            result, decoded = None, False
            self._emit(events.error(events.OVERLOADED, str(e)))
        except Exception:
            log.exception("final decode failed")
            result, decoded = None, False
            self._emit(events.error(events.DECODE_FAILED, "transcription of an utterance failed"))
        if previous is not None:
            await asyncio.shield(previous)  # finals leave in utterance order
        if decoded:
            result = _said_once(result, event)
            self._remember(result, event)
            if result is None:
                result = await self._heard_again(event)
        self._finals_pending -= 1
        self._final_done.set()
        self._emit(_final_event(event, result, self.options.language))

    async def _heard_again(self, event: SpeechEnded) -> Transcript | None:
        """A final that heard no words. The piece after it hears its audio again where it begins soon
        (`_after_no_words`); where none does, it is heard once more with Whisper's encoder over the whole
        window, as offline: over a short piece's own encoding, with the encoding of silence pasted on, Whisper
        may call a lone word silence ("six" alone, with --model base). Only on a pool with no final to do."""
        unheard = self._unheard = _Unheard(self._said[-1])
        seg = self._segmenter
        if seg.utterance > event.utterance:
            unheard.settle(again=False)  # a piece began while this final was decoded: it goes out as it is
        elif self._recent is None or self._flushed >= event.end or seg.decided >= unheard.until:
            unheard.settle(again=True)
        try:
            if not await unheard.again or not self._pool.finals_idle:
                return None
            result = await self._pool.final(event.audio, self.options.language, self._before(), whole=True)
        except Overloaded:
            return None
        except Exception:
            log.exception("decode of a final heard again failed")  # the final stays empty
            return None
        finally:
            self._unheard = None
        result = _said_once(result, event)
        if result is not None:
            self._said.pop()  # the empty final remembered for the piece after it
            self._remember(result, event)
        return result

    def _remember(self, result: Transcript | None, event: SpeechEnded) -> None:
        """`result` None: Whisper heard no words in it."""
        if result is None:
            language = self.options.language or (self._said[-1].language if self._said else None)
            said = _Said(language, "", event.continued, event.end, [], event.audio_start)
        else:
            said = _Said(result.language, result.text, event.continued, event.end, [
                replace(w, start=event.audio_start + w.start, end=event.audio_start + w.end) for w in result.words],
                event.audio_start)
        # The finals with words that context_chars covers, at least the last; an empty final only as the last,
        # for the piece after it may be decoded with its audio.
        kept = [s for s in self._said if s.text] + ([said] if said.text else [])
        while len(kept) > 1 and sum(len(s.text) for s in kept) > self.options.context_chars:
            kept.pop(0)
        self._said = deque(kept if said.text else [*kept, said])

    @property
    def _last_words(self) -> _Said | None:
        """The last final with words: an empty one, kept only as the very last, says nothing of what was said."""
        return next((s for s in reversed(self._said) if s.text), None)

    def _before(self) -> Before:
        """What this stream said last. Its text is continued only where its last final stopped mid-clause
        (cut for length, or a pause after "including"): after a whole sentence, tiny.en tends to say a
        prompt again ("You can call me Abigail Klaflin."). Its language stands where detection is unsure."""
        last = self._last_words
        if last is None:
            return Before(self.options.prompt.strip())
        language = last.language
        prior = language if self.options.language is None else None
        if (not self.options.context_chars or not (last.continued or unfinished(last.text, language))
                or (self.options.language or language) != language):
            return Before(self.options.prompt.strip(), language=prior)
        return Before(self._prompt_text(language), prior)

    def _prompt_text(self, language: str, last: str | None = None) -> str:
        """A decode's previous-text prompt: the client's prompt, then up to `context_chars` of the last finals
        in `language`, the last one's text replaced by `last` where given."""
        texts = [s.text for s in self._said if s.language == language]
        if last is not None:
            texts[-1] = last
        said = " ".join(t for t in texts if t)[-self.options.context_chars:] if self.options.context_chars else ""
        return f"{self.options.prompt.strip()} {said}".strip()

    def _before_fragment(self, start: float, end: float, audio_start: float) -> Before:
        """What a final of speech from `start` to `end` (its audio from `audio_start`) is decoded after: for a
        piece begun soon after the last final, the end of that final's audio and words (heard again where
        Whisper doubted them, or where they were a word or two), and the words before; else, soon after a final
        that heard no words, that final's audio."""
        before = self._before()
        if self._recent is None or end - start > self.options.fragment_s:
            return before
        return self._after_words(before, start, audio_start) or self._after_no_words(before, start, audio_start)

    def _near(self, said: _Said, start: float) -> bool:
        """A piece begun at `start` goes on from `said`: soon after it, in its language."""
        reach = _REACH_S if said.text and not finished(said.text, said.language) else _LEAD_PAUSE_S
        return start - said.speech_end <= reach and (self.options.language or said.language) == said.language

    def _after_words(self, before: Before, start: float, audio_start: float) -> Before | None:
        last = self._last_words
        if last is None or not last.words or not self._near(last, start):
            return None
        # The last final's words from at most _LEAD_S before the lead's end, cut between two words.
        lead_end = min(audio_start, last.speech_end + _LEAD_PAUSE_S)
        words = last.words
        kept = [i for i, w in enumerate(words) if w.start >= lead_end - _LEAD_S]
        if not kept:
            return None
        first = kept[0]  # its onset as the pre-roll would keep it, or the gap after the word before
        lead_start = max(words[first].start - 0.1, words[first - 1].end) if first else words[0].start - 0.3
        audio = self._recent.between(max(0.0, lead_start), lead_end)
        if audio is None:
            return None
        earlier = self._prompt_text(last.language, last=" ".join(w.word for w in words[:first]))
        if _unforceable(words, first):
            return replace(before, audio=audio, spoken="", earlier=earlier, shown=True, onset=start - audio_start)
        # Without its end mark: begun this soon, the fragment may well go on the sentence, and after a period
        # Whisper starts a new one ("who's. Place." for "whose place").
        spoken = " ".join(w.word for w in words[first:]).rstrip(".!?。！？…")
        return replace(before, audio=audio, spoken=spoken, earlier=earlier)

    def _after_no_words(self, before: Before, start: float, audio_start: float) -> Before:
        """A final that heard no words is heard again before the piece after it, nothing forced: alone, a lone
        "Yet" before a pause said nothing, and the piece after it, "these thoughts affected", "He starts
        affected"."""
        last = self._said[-1] if self._said else None
        if last is None or last.text or last.audio_start is None or not self._near(last, start):
            return before
        audio = self._recent.between(last.audio_start, audio_start)
        return before if audio is None else replace(before, audio=audio, spoken="", earlier=before.text)

    @property
    def _no_words_shown(self) -> bool:
        """The utterance in progress has had no partial with words: it is retried soon, and first."""
        return not self._previous_words

    def _maybe_partial(self) -> None:
        # In a pause there is nothing new to show, and the final's decode is about to need a worker;
        # while finals wait, a partial would only delay them.
        if (not (self.options.partials and self._segmenter.in_speech) or self._segmenter.pause_ms
                or self._pool.finals_waiting):
            return
        if self._partial_task is not None and not self._partial_task.done():
            return
        audio = self._segmenter.speech_audio()
        interval_ms = self.options.partial_interval_ms
        if self._no_words_shown:
            interval_ms = min(interval_ms, _FIRST_PARTIAL_RETRY_MS)
        else:
            interval_ms = max(interval_ms, 1000 * self._partial_s / _PARTIAL_SHARE)
        interval = int(interval_ms * SAMPLE_RATE / 1000)
        # The first partial goes as soon as speech is confirmed; then one per interval of new audio.
        if self._partial_audio and audio.size - self._partial_audio < interval:
            return
        self._partial_audio = audio.size
        self._partial_task = asyncio.create_task(self._partial(self._segmenter.utterance, audio))

    async def _partial(self, utterance: int, audio: np.ndarray) -> None:
        asked = asyncio.get_running_loop().time()
        try:
            result = await self._pool.partial(self._key, audio, self.options.language,
                                              first=self._no_words_shown, before=self._before())
        except Exception:
            log.exception("partial decode failed")
            return
        if utterance == self._segmenter.utterance:
            self._partial_s = asyncio.get_running_loop().time() - asked
        # A partial that comes back after its utterance ended would arrive after speech.stopped.
        if result is None or utterance != self._segmenter.utterance or not self._segmenter.in_speech:
            return
        words = result.text.split()
        stable = _common_prefix(self._previous_words, words)
        self._previous_words = words
        self._emit(events.transcript_partial(utterance, result.text, " ".join(stable), self._segmenter.onset))


# English words a sentence does not end on: an early final that ends on one was cut mid-clause, whatever
# punctuation Whisper gave it.
_CONTINUING = frozenset("""a an the and or but nor of to for with from into onto as than which whose whereas
because if although though whether my your his her its our their including""".split())
_SENTENCE_END = (".", "?", "!", "。", "？", "！")
_CLAUSE_END = (",", ";", ":", "-", "–", "—", "...", "…", "，", "、", "；", "：")
_MARKS = ".?!,;:-–—…"  # what ends an English word in Whisper's text


def _last_word(text: str) -> str:
    words = text.rstrip(_MARKS).split()
    return words[-1].strip("\"'").lower() if words else ""


def finished(text: str, language: str) -> bool:
    """`text` reads as a whole sentence: it ends with . ? ! (or their CJK forms), and in English not on a
    word that must be followed by more."""
    text = text.rstrip()
    if not text.endswith(_SENTENCE_END) or text.endswith(("...", "…")):
        return False
    return language != "en" or _last_word(text) not in _CONTINUING


def unfinished(text: str, language: str) -> bool:
    """`text` stops mid-clause: on a comma, colon or dash, or in English on a word such as "the" or
    "including". Text that ends on neither kind of mark (Whisper leaves some endings bare) is neither
    finished nor unfinished."""
    text = text.rstrip()
    return text.endswith(_CLAUSE_END) or (language == "en" and _last_word(text) in _CONTINUING)


def _doubted(words: list[Word]) -> bool:
    return sum(w.probability for w in words) / len(words) < _DOUBTFUL


def _unforceable(words: list[Word], first: int) -> bool:
    """A final's words from `first` on are no start to force on the piece after them: Whisper was unsure of
    them (a lone "He" heard as "Hey, big.", 0.09 and 0.52, made "began a confused complaint" "Ganna confused
    complaint"), or they are the whole of a final of a word or two, which Whisper guesses alone and may be
    sure of ("I'll go." for a lone "A" made "golden fortune" "fold in fortune")."""
    return _doubted(words[first:]) or (not first and len(words) <= _FEW_WORDS)


def _guessed(result: Transcript) -> bool:
    """A word or two that Whisper doubted, and no answer: heard alone, most often a sentence's first word before
    a hesitation ("Had he" as "Harris.", "The" as "then"). A number, a yes or a no said alone is an answer
    ("Six.", "No.", doubted too), not a guess."""
    words = result.words
    return 0 < len(words) <= _FEW_WORDS and _doubted(words) and not answer(result.text, result.language)


def _said_once(result: Transcript | None, event: SpeechEnded) -> Transcript | None:
    """A final of one word twice in less speech than two words take, as one word. Whisper writes a lone short
    word twice: "One, one." for 0.16 s of speech under load, "six six" for 0.26 s over a telephone line, where
    offline Whisper on the same audio reads it once. Spaced languages only: in Chinese, "谢谢" is one word."""
    if (result is None or len(result.words) != 2 or event.end - event.start >= _TWO_WORDS_S
            or result.text != " ".join(w.word for w in result.words)):
        return result
    first, second = result.words
    bare, again = first.word.rstrip(_MARKS), second.word.rstrip(_MARKS)
    if not bare or bare.casefold() != again.casefold():
        return result
    word = replace(first, word=bare + second.word[len(again):])  # with the second's mark: "One, one." is "One."
    return replace(result, text=word.word, words=[word])


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return b[:n]


def _final_event(event: SpeechEnded, result: Transcript | None, language: str | None) -> Event:
    if result is None:
        return events.transcript_final(event.utterance, "", event.start, event.end, language, [], event.cause)
    offset = event.audio_start
    words = [events.word(w.word, round(offset + w.start, 3), round(offset + w.end, 3), w.probability)
             for w in result.words]
    return events.transcript_final(event.utterance, result.text, event.start, event.end, result.language, words,
                                   event.cause)
