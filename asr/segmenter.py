"""Turns a stream of VAD probabilities into utterances."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE
from .vad import WINDOW, SileroVAD

_WINDOW_S = WINDOW / SAMPLE_RATE

# Why an utterance ended: its endpoint silence, the length limit (split), the client asking for its final
# now (flush), or the end of the stream. A transport may say so: Deepgram's speech_final and from_finalize.
CAUSES = ("endpoint", "split", "flush", "end")


@dataclass(frozen=True)
class SegmenterConfig:
    threshold: float = 0.5  # probability that starts speech
    neg_threshold: float = 0.35  # speech goes on until the probability falls below this
    # Shorter bursts do not start speech; speech that begins within unfinished_endpoint_ms of one starts at it.
    min_speech_ms: int = 250
    preroll_ms: int = 300  # audio kept from before the onset: VAD fires after the first phoneme
    endpoint_ms: int = 600  # silence that ends an utterance
    # Silence that ends an utterance whose words so far stop mid-clause or are left open (the stream judges
    # that from its early final): a speaker who pauses after "for our purpose," has not finished. Longer
    # than most hesitations.
    unfinished_endpoint_ms: int = 1600
    # How much longer than endpoint_ms a pause may run while the stream still waits for that verdict (the
    # early final that would call it unfinished may be a decode away), where its audio comes faster than real
    # time; a stream that keeps pace waits for the verdict up to unfinished_endpoint_ms.
    verdict_wait_ms: int = 300
    tail_ms: int = 200  # silence kept after the last speech: Whisper ends words better with it
    # Never beyond Whisper's 30 s window. A shorter limit makes the final that ends a long sentence cheaper,
    # but cuts more sentences where the reader only took a breath.
    max_utterance_s: float = 20.0
    split_pause_ms: int = 160  # a pause long enough to split an utterance grown past half its limit
    # Silero's probability stays up for a while after the voice stops. A pause is counted from where
    # the audio itself fell this far below the utterance's loudest speech, so the endpoint comes that
    # much sooner after the real end of speech...
    quiet_db: float = 20.0
    # ... but never more than this ahead of the VAD, which must hear the pause too.
    max_hangover_ms: int = 250


@dataclass(frozen=True)
class SpeechStarted:
    utterance: int
    start: float


@dataclass(frozen=True)
class SpeechEnded:
    utterance: int
    start: float  # onset, seconds on the stream timeline
    end: float  # end of the last speech window
    audio: np.ndarray  # pre-roll + speech + tail
    audio_start: float  # timeline position of audio[0]
    continued: bool = False  # cut for length while the speaker went on, not ended by a pause
    cause: str = "endpoint"  # one of CAUSES
    voiced: int = 0  # the segmenter's `voiced` when it ended


SegmentEvent = SpeechStarted | SpeechEnded


class Segmenter:
    """Feed 16 kHz mono float32 audio; get utterance boundaries and their audio."""

    def __init__(self, vad: SileroVAD, config: SegmenterConfig) -> None:
        self.vad = vad
        self._recent: deque[np.ndarray] = deque()
        self.configure(config)
        self.unfinished = False  # set by the stream for the pause in progress; cleared when speech resumes
        self.judging = False  # set by the stream while the early final that judges this pause is decoded
        self.patient = False  # set by the stream while its audio keeps pace with real time: see _endpoint
        self._unprocessed = np.zeros(0, dtype=np.float32)
        self._position = 0  # windows seen since the stream began
        self._voiced = 0
        self._utterance = 0
        self._windows: list[np.ndarray] = []  # current (candidate) utterance, pre-roll included
        self._probs: list[float] = []
        self._first = 0  # window index of _windows[0]
        self._onset = 0  # window index where speech began
        self._speech = 0  # speech windows in the candidate
        self._silence = 0  # trailing windows below neg_threshold
        self._loudest = -np.inf  # level (dB) of the candidate's loudest speech window
        self._quiet = 0  # trailing windows quieter than quiet_db under it
        self._confirmed = False
        self._active = False
        # Speech was just cut off (flush, discard): until the VAD next hears silence, what it hears is the cut
        # speech's tail, a burst that is no word of its own and must not lead the next speech.
        self._cut = False

    def configure(self, config: SegmenterConfig) -> None:
        """New settings, from the next window on; the utterance in progress keeps what it has heard."""
        self.config = config
        self._preroll_windows = max(1, round(config.preroll_ms / 1000 / _WINDOW_S))
        self._endpoint_windows = max(1, round(config.endpoint_ms / 1000 / _WINDOW_S))
        self._unfinished_windows = max(self._endpoint_windows, round(config.unfinished_endpoint_ms / 1000 / _WINDOW_S))
        self._judging_windows = min(self._unfinished_windows,
                                    self._endpoint_windows + round(config.verdict_wait_ms / 1000 / _WINDOW_S))
        self._min_speech_windows = max(1, round(config.min_speech_ms / 1000 / _WINDOW_S))
        self._tail_windows = min(self._endpoint_windows, round(config.tail_ms / 1000 / _WINDOW_S))
        self._split_pause_windows = max(1, round(config.split_pause_ms / 1000 / _WINDOW_S))
        self._max_windows = int(config.max_utterance_s / _WINDOW_S)
        self._max_hangover_windows = round(config.max_hangover_ms / 1000 / _WINDOW_S)
        self._recent = deque(self._recent, maxlen=self._preroll_windows)

    @property
    def in_speech(self) -> bool:
        return self._confirmed

    @property
    def utterance(self) -> int:
        return self._utterance

    @property
    def _endpoint(self) -> int:
        """Windows of pause that end the utterance in progress. A verdict still being decoded is waited for as
        long as an unfinished one would hold the pause where the audio keeps pace with real time: there a late
        decode is time the speaker's pause takes too. Where it comes faster (a file sent at once), only
        verdict_wait_ms more: such a client runs through any pause before a decode comes back."""
        if self.unfinished or (self.judging and self.patient):
            return self._unfinished_windows
        return self._judging_windows if self.judging else self._endpoint_windows

    @property
    def overdue(self) -> bool:
        """The pause has run past the endpoint while its verdict is still being decoded."""
        return self.judging and self._confirmed and self._pause >= self._judging_windows

    @property
    def _pause(self) -> int:
        """Windows since the speaker stopped: the VAD says they have, the audio says since when."""
        if not self._silence:
            return 0
        return min(max(self._silence, self._quiet), self._silence + self._max_hangover_windows)

    @property
    def pause_ms(self) -> float:
        """How long the utterance in progress has been silent."""
        return self._pause * _WINDOW_S * 1000 if self._confirmed else 0.0

    @property
    def vad_pause_ms(self) -> float:
        """How long the VAD has heard no speech: `pause_ms` without the audio's head start."""
        return self._silence * _WINDOW_S * 1000 if self._confirmed else 0.0

    @property
    def voiced(self) -> int:
        """The last window the VAD did not call silence, counted from the stream's start, or, once a pause has
        begun, called speech. While it stands, no word has been said since: a decode of the utterance so far
        still holds, however the pause's start moves with the audio's level."""
        return self._voiced

    @property
    def speech_end(self) -> float:
        """Timeline position where the utterance in progress last had speech."""
        return round(self._speech_end * _WINDOW_S, 3)

    @property
    def _speech_end(self) -> int:
        return self._first + len(self._windows) - self._pause

    @property
    def decided(self) -> float:
        """Timeline position up to which the VAD has judged the audio."""
        return round(self._position * _WINDOW_S, 3)

    @property
    def onset(self) -> float:
        """Timeline position where the current utterance's speech began."""
        return round(self._onset * _WINDOW_S, 3)

    @property
    def audio_start(self) -> float:
        """Timeline position of speech_audio()[0]."""
        return round(self._first * _WINDOW_S, 3)

    def speech_audio(self) -> np.ndarray:
        """The utterance so far, pre-roll included (for partials and early finals)."""
        return np.concatenate(self._windows)

    def push(self, audio: np.ndarray) -> list[SegmentEvent]:
        """`audio` through the VAD, here and now."""
        windows = self.windows(audio)
        return self.advance(windows, self.vad(windows)) if windows.size else []

    def windows(self, audio: np.ndarray) -> np.ndarray:
        """The whole VAD windows that `audio` completes, (n, 512), n >= 0; the rest waits for more."""
        buf = np.concatenate([self._unprocessed, audio]) if self._unprocessed.size else audio
        n = buf.size // WINDOW
        self._unprocessed = buf[n * WINDOW :].copy()
        return buf[: n * WINDOW].reshape(n, WINDOW)

    def advance(self, windows: np.ndarray, probs: np.ndarray) -> list[SegmentEvent]:
        """`windows`, as `windows()` gave them, with the VAD's probability of each."""
        events: list[SegmentEvent] = []
        levels = 10 * np.log10(np.einsum("ij,ij->i", windows, windows) / WINDOW + 1e-12)
        for window, prob, level in zip(windows, probs, levels):
            self._step(window, float(prob), float(level), events)
            self._position += 1
        return events

    def flush(self, cause: str = "end") -> list[SegmentEvent]:
        """Whatever confirmed speech is in progress becomes an utterance now: at the end of the stream, or
        when a client asks for its final ("flush"). Segmenting goes on from the next audio."""
        events: list[SegmentEvent] = []
        # Mid-stream, the samples short of a whole window stay for the next one: positions on the
        # timeline are counted in windows, and must keep counting every sample the stream was fed.
        terminal = cause == "end"
        if self._confirmed:
            if terminal and self._unprocessed.size:
                self._windows.append(self._unprocessed)
            events.append(self._end(self._kept(), cause=cause))
        if terminal:
            self._unprocessed = np.zeros(0, dtype=np.float32)
        self._reset()
        self._cut = True
        return events

    def discard(self) -> None:
        """Forgets the audio heard so far, the utterance in progress and its pre-roll among it; no event.
        Its samples still count on the timeline (as silence)."""
        self._unprocessed = np.zeros_like(self._unprocessed)
        self._recent.clear()
        self._reset()
        self._cut = True

    def _step(self, window: np.ndarray, prob: float, level: float, events: list[SegmentEvent]) -> None:
        c = self.config
        # A doubtful window (between the two thresholds) carries speech on; once a pause has begun it does not
        # end the pause, and is no word said that would outdate a decode of the utterance so far.
        if prob >= c.threshold or (prob >= c.neg_threshold and not self._silence):
            self._voiced = self._position
        if not self._active:
            self._recent.append(window)
            if prob >= c.threshold:
                self._active = True
                self._windows = list(self._recent)
                self._recent.clear()  # what follows the utterance must not be taken for what came before it
                self._probs = [0.0] * (len(self._windows) - 1) + [prob]
                self._first = self._position - len(self._windows) + 1
                self._onset = self._position
                self._speech, self._silence = 1, 0
                self._loudest, self._quiet = level, 0
            elif prob < c.neg_threshold:
                self._cut = False
            return
        self._windows.append(window)
        self._probs.append(prob)
        if prob >= c.threshold:
            self._loudest = max(self._loudest, level)
        self._quiet = self._quiet + 1 if level < self._loudest - c.quiet_db else 0
        if prob < c.neg_threshold:
            self._silence += 1
        else:
            if prob >= c.threshold:
                if not self._confirmed and self._silence >= self._endpoint_windows:
                    # A burst too short to be speech ("The", then a pause) only starts the speech after it: that
                    # speech must still be long enough on its own.
                    self._speech = 0
                self._silence = 0
                self.unfinished = False
            if self._silence == 0:
                self._speech += 1
        if not self._confirmed:
            if self._speech >= self._min_speech_windows:
                self._confirmed = True
                self._utterance += 1
                events.append(SpeechStarted(self._utterance, round(self._onset * _WINDOW_S, 3)))
            elif self._silence >= (self._endpoint_windows if self._cut else self._unfinished_windows):
                self._discard()
            return
        length = len(self._windows)
        endpoint = self._endpoint
        if self._pause >= endpoint or (
            length > self._max_windows // 2 and self._silence >= self._split_pause_windows
        ):
            keep = self._kept()
            events.append(self._end(keep, continued=self._pause < endpoint))
            self._carry_over(keep)
        elif length >= self._max_windows:
            cut = self._quietest_point()
            events.append(self._end(cut, continued=True))
            self._carry_over(cut, still_speaking=True)
            events.append(SpeechStarted(self._utterance, round(self._onset * _WINDOW_S, 3)))

    def end_in_pause(self) -> SpeechEnded | None:
        """Declares the endpoint now, before the full silence, if the utterance is in a pause."""
        if not (self._confirmed and self._silence):
            return None
        keep = self._kept()
        event = self._end(keep)
        self._carry_over(keep)
        return event

    def end_if_due(self) -> SpeechEnded | None:
        """The utterance ends now if its pause has already reached the endpoint: the verdict it waited for came
        back between windows, and a client that has sent its pause may send nothing more."""
        return self.end_in_pause() if self._pause >= self._endpoint else None

    def _kept(self) -> int:
        """Windows an ending utterance keeps: through the VAD's end of speech, and the tail after it."""
        return len(self._windows) - self._silence + min(self._tail_windows, self._silence)

    def _end(self, keep: int, continued: bool = False, cause: str = "endpoint") -> SpeechEnded:
        return SpeechEnded(
            utterance=self._utterance,
            start=round(self._onset * _WINDOW_S, 3),
            end=round(min(self._speech_end, self._first + keep) * _WINDOW_S, 3),
            audio=np.concatenate(self._windows[:keep]),
            audio_start=self.audio_start,
            continued=continued,
            cause="split" if continued else cause,
            voiced=self._voiced,
        )

    def _quietest_point(self) -> int:
        # Forced split: cut where speech is least likely in the last quarter, not mid-word.
        lo = len(self._probs) * 3 // 4
        return lo + int(np.argmin(self._probs[lo:])) + 1

    def _carry_over(self, cut: int, still_speaking: bool = False) -> None:
        rest_windows, rest_probs = self._windows[cut:], self._probs[cut:]
        first = self._first + cut
        self._reset()
        if still_speaking:
            self._active = self._confirmed = True
            self._utterance += 1
            self._windows, self._probs = rest_windows, rest_probs
            self._first = self._onset = first
            self._speech = len(rest_windows)
        else:
            self._recent.extend(rest_windows)

    def _discard(self) -> None:
        self._recent.extend(self._windows)
        self._reset()

    def _reset(self) -> None:
        self.unfinished = False
        self._windows, self._probs = [], []
        self._speech = self._silence = self._quiet = 0
        self._loudest = -np.inf
        self._confirmed = self._active = False
