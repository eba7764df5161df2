"""Silero VAD on onnxruntime, streamed window by window with its recurrent state."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime

SAMPLE_RATE = 16000
WINDOW = 512  # samples per VAD decision (32 ms), fixed by the model
_CONTEXT = 64  # the model sees the tail of the previous window before each window


def default_model_path() -> str:
    # faster-whisper ships the Silero VAD v6 ONNX file; using it keeps torch out of the tree.
    from faster_whisper.utils import get_assets_path

    return os.path.join(get_assets_path(), "silero_vad_v6.onnx")


class SileroModel:
    """The ONNX session, loaded once and shared by every stream (it is stateless)."""

    def __init__(self, path: str | None = None) -> None:
        opts = onnxruntime.SessionOptions()
        # One thread: a window costs ~0.1 ms, and threads would only contend with Whisper.
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            path or default_model_path(), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def run(self, windows: np.ndarray, h: np.ndarray, c: np.ndarray):
        return self._session.run(None, {"input": windows, "h": h, "c": c})


class SileroVAD:
    """Per-stream VAD: whole 512-sample windows of 16 kHz float32 audio in, one probability each."""

    def __init__(self, model: SileroModel) -> None:
        self._model = model
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """`windows`: shape (n, 512), n >= 1, in stream order."""
        n = windows.shape[0]
        contexts = np.empty((n, _CONTEXT), dtype=np.float32)
        contexts[0] = self._context
        contexts[1:] = windows[:-1, -_CONTEXT:]
        self._context = windows[-1, -_CONTEXT:].copy()
        # The model runs the rows as a sequence through its LSTM, carrying h and c.
        probs, self._h, self._c = self._model.run(
            np.ascontiguousarray(np.concatenate([contexts, windows], axis=1), dtype=np.float32),
            self._h,
            self._c,
        )
        return np.asarray(probs, dtype=np.float32).reshape(n)
