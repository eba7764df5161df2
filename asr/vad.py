"""Silero VAD on onnxruntime, streamed window by window with its recurrent state, and batched
across streams."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import weakref
from collections import deque
from typing import Callable

import numpy as np
import onnxruntime

from .audio import NARROWBAND_RATE, SAMPLE_RATE

WINDOW = 512  # samples per VAD decision (32 ms), fixed by the model
_CONTEXT = 64  # the model sees the tail of the previous window before each window
# Silero's recurrent state remembers the level of what it heard: after loud speech, a quiet speaker's
# words score low where a fresh state scores them high. Yet a fresh state warms up slowly, and scores a
# soft onset low where the state carried on scores it high. So each stream runs two states over the same
# audio, one carried on and one refreshed after every stretch of this much non-speech, and takes the
# higher probability of the two.
REFRESH_WINDOWS = 16  # 512 ms
_NON_SPEECH = 0.35  # below this a window is non-speech (the segmenter's end-of-speech threshold)
LIFT_DB = 30.0  # the most gain a quiet stream gets before Silero hears it (Lift)
LIFT_PEAK_DBFS = -30.0
LIFT_HOLD_WINDOWS = 31  # 1 s: a pause within a sentence is not lifted

log = logging.getLogger(__name__)


def default_model_path(rate: int = SAMPLE_RATE) -> str:
    """Silero VAD v6 as its `silero-vad` wheel ships it for onnxruntime, one window per stream and call.

    The wheel is installed without its dependencies (torch), and never imported: its package runs
    torch on import. At 16 kHz, its probabilities are those of the sequence-only v6 file that faster-whisper
    ships, to the last bit, but it takes a batch of streams, and most of a call's cost is the call
    (VadBatch). At 8 kHz, the wheel's file that takes either rate.
    """
    spec = importlib.util.find_spec("silero_vad")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed: pip install --no-deps -r requirements-nodeps.txt")
    name = "silero_vad_16k_op15.onnx" if rate == SAMPLE_RATE else "silero_vad.onnx"
    return os.path.join(list(spec.submodule_search_locations)[0], "data", name)


class SileroModel:
    """The ONNX sessions, one per rate, loaded once and shared by every stream (they are stateless)."""

    def __init__(self, path: str | None = None) -> None:
        self._sessions = {SAMPLE_RATE: _session(path or default_model_path()),
                          NARROWBAND_RATE: _session(default_model_path(NARROWBAND_RATE))}
        self._rates = {rate: np.array(rate, dtype=np.int64) for rate in self._sessions}  # the model's `sr` input

    def run(self, inputs: np.ndarray, state: np.ndarray,
            rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
        """`inputs`: one window at `rate` with its context per stream, (b, 576) at 16 kHz, (b, 288) at 8 kHz;
        `state`: (2, b, 128). Returns each stream's speech probability, (b,), and the next state."""
        probs, state = self._sessions[rate].run(None, {"input": inputs, "state": state, "sr": self._rates[rate]})
        return np.asarray(probs, dtype=np.float32).reshape(-1), state


def _session(path: str) -> onnxruntime.InferenceSession:
    opts = onnxruntime.SessionOptions()
    # One thread: a window is too small a job to share, and more threads would only contend with Whisper.
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


class Lift:
    """The gain that brings a quiet stream up before Silero hears it.

    Silero scores speech far quieter than it was trained on low, and lower still once Opus has coded it: a
    speaker at -67 dBFS lost whole phrases over WebRTC that the same audio unencoded kept. The gain brings the
    loudest window of the last `hold_windows` up to `peak_dbfs`, by at most `max_gain_db` and never down: it
    drops at once when louder sound comes, and rises once that sound is `hold_windows` old. Whisper hears the
    audio as it came (its own lift: engine.DecodeOptions.lift_dbfs).
    """

    def __init__(self, max_gain_db: float, peak_dbfs: float = LIFT_PEAK_DBFS,
                 hold_windows: int = LIFT_HOLD_WINDOWS) -> None:
        self.max_gain_db = max_gain_db
        self.peak_dbfs = peak_dbfs
        self._levels: deque[float] = deque(maxlen=hold_windows)

    def __call__(self, window: np.ndarray) -> np.float32:
        """The gain for `window`, the stream's next."""
        self._levels.append(10 * np.log10(float(np.dot(window, window)) / window.size + 1e-12))
        return np.float32(10 ** (min(self.max_gain_db, max(0.0, self.peak_dbfs - max(self._levels))) / 20))


class SileroVAD:
    """Per-stream VAD: whole 512-sample windows of 16 kHz float32 audio in, one probability each.

    The model runs `rows` times over each window: with the state carried on, and (refresh_windows > 0)
    with a state refreshed after non-speech. A quiet stream is lifted first (lift_db > 0: Lift).

    A stream sent at NARROWBAND_RATE or lower (a call: G.711) is heard at that rate (`narrowband`), as Silero
    was also trained to hear it: at 16 kHz it scores speech cut to a telephone line's band low."""

    def __init__(self, model: SileroModel, refresh_windows: int = REFRESH_WINDOWS, lift_db: float = LIFT_DB) -> None:
        self._model = model
        self._lift = Lift(lift_db) if lift_db > 0 else None
        self._refresh = refresh_windows  # 0: never, one state only
        self.rows = 2 if refresh_windows else 1
        self.rate = SAMPLE_RATE  # what the model hears the windows at
        self._reset()

    def _reset(self) -> None:
        self.state = np.zeros((2, self.rows, 128), dtype=np.float32)  # the recurrent states, (2, rows, 128)
        self._context = np.zeros(_CONTEXT * self.rate // SAMPLE_RATE, dtype=np.float32)
        self._quiet = 0  # windows of non-speech since the last speech or refresh

    @property
    def narrowband(self) -> bool:
        return self.rate != SAMPLE_RATE

    @narrowband.setter
    def narrowband(self, value: bool) -> None:
        """Heard at NARROWBAND_RATE or not, from the next window on; a change starts the model afresh."""
        rate = NARROWBAND_RATE if value else SAMPLE_RATE
        if rate != self.rate:
            self.rate = rate
            self._reset()

    def input(self, window: np.ndarray) -> np.ndarray:
        """The model's input for this stream's next window, once per state: the tail of the window
        before, then it, lifted, at `rate`. (rows, 576) at 16 kHz, (rows, 288) at 8 kHz."""
        gain = self._lift(window) if self._lift is not None else 1
        if gain != 1:
            window = window * gain
        if self.rate != SAMPLE_RATE:  # every other sample: the window holds nothing above 4 kHz to alias
            window = window[::SAMPLE_RATE // self.rate]
        inputs = np.tile(np.concatenate([self._context, window]), (self.rows, 1))
        self._context = window[-self._context.size:].copy()  # what the model heard of it: the next one's context
        return inputs

    def carry(self, state: np.ndarray, probs: np.ndarray) -> float:
        """The window `input` last gave left the model in `state` with probabilities `probs`, one per
        state; returns the stream's probability for it."""
        prob = float(probs.max())
        self._quiet = self._quiet + 1 if prob < _NON_SPEECH else 0
        if self._refresh and self._quiet >= self._refresh:
            state, self._quiet = state.copy(), 0
            state[:, 1] = 0.0
        self.state = state
        return prob

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """`windows`: shape (n, 512), in stream order; decided here and now, one call per window."""
        probs = np.empty(windows.shape[0], np.float32)
        for i, window in enumerate(windows):
            out, state = self._model.run(self.input(window), self.state, self.rate)
            probs[i] = self.carry(state, out)
        return probs


Done = Callable[[np.ndarray, np.ndarray], None]

# How long a batch waits for other streams' windows: long enough for streams sending in real time to
# meet in one call, and short, because an endpoint comes at most this much later.
_GATHER_S = 0.010
_PROMPT_WINDOWS = 4


class VadBatch:
    """Decides the windows of every stream that has some waiting in one onnxruntime call per window
    position, not stream by stream.

    Silero's cost is mostly per call: many streams' windows in one call cost far less than a call each.
    A lone stream's windows are decided at the loop's next turn. With others open, the batch waits
    _GATHER_S for their windows to join it, unless a stream has _PROMPT_WINDOWS waiting.
    """

    def __init__(self, model: SileroModel) -> None:
        self.model = model
        self._waiting: dict[SileroVAD, tuple[list[np.ndarray], Done]] = {}
        self._streams: weakref.WeakSet[SileroVAD] = weakref.WeakSet()  # open streams that have sent audio
        self._handle: asyncio.Handle | None = None  # the run to come
        self._urgent = False
        self.calls = 0
        self.windows = 0

    def submit(self, vad: SileroVAD, windows: np.ndarray, done: Done) -> None:
        """`done(windows, probabilities)` is called on the loop with all of this stream's windows
        submitted since the last batch, in order."""
        if vad in self._waiting:
            self._waiting[vad][0].append(windows)
        else:
            self._waiting[vad] = ([windows], done)
        self._streams.add(vad)
        # Alone, there is no one to wait for. A stream with a few windows waiting is not a microphone
        # in real time (a sender faster than that, or a loop that fell behind): waiting would only
        # let its finals pile up into bursts.
        urgent = len(self._streams) < 2 or sum(w.shape[0] for w in self._waiting[vad][0]) >= _PROMPT_WINDOWS
        if self._handle is not None and (self._urgent or not urgent):
            return
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_soon(self.run) if urgent else loop.call_later(_GATHER_S, self.run)
        self._urgent = urgent

    def cancel(self, vad: SileroVAD) -> None:
        """The stream has ended: its waiting windows are dropped."""
        self._waiting.pop(vad, None)
        self._streams.discard(vad)

    def pending(self, vad: SileroVAD) -> bool:
        return vad in self._waiting

    def run(self) -> None:
        """Decides every waiting window now."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        waiting, self._waiting = self._waiting, {}
        if not waiting:
            return
        vads = list(waiting)
        windows = [np.concatenate(waiting[v][0]) if len(waiting[v][0]) > 1 else waiting[v][0][0] for v in vads]
        probs = [np.empty(w.shape[0], np.float32) for w in windows]
        for k in range(max(w.shape[0] for w in windows)):
            for rate in (SAMPLE_RATE, NARROWBAND_RATE):  # one call per rate the streams are heard at
                rows = [i for i, w in enumerate(windows) if w.shape[0] > k and vads[i].rate == rate]
                if not rows:
                    continue
                inputs = np.concatenate([vads[i].input(windows[i][k]) for i in rows])
                state = np.concatenate([vads[i].state for i in rows], axis=1)
                out, state = self.model.run(inputs, state, rate)
                at = 0
                for i in rows:
                    n = vads[i].rows
                    probs[i][k] = vads[i].carry(state[:, at:at + n], out[at:at + n])
                    at += n
                self.calls += 1
                self.windows += len(rows)
        for vad, w, p in zip(vads, windows, probs):
            try:
                waiting[vad][1](w, p)
            except Exception:  # one session's failure must not cost the others their windows
                log.exception("a stream failed on its VAD decisions")
