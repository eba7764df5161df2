"""Opus decoded straight to 16 kHz mono, the rate and layout the pipeline runs at.

aiortc decodes Opus to 48 kHz stereo, which the server would then downmix and resample; libopus
synthesises any of its rates natively, at a fraction of that cost and with the same accuracy
(docs/performance.md). libopus is the copy that PyAV's wheel bundles (the one aiortc already decodes
with), or the system's; without either, aiortc's decoder is used.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fractions
import logging
from functools import cache
from pathlib import Path

import av
import numpy as np
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame

from asr.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

_MAX_SAMPLES = SAMPLE_RATE * 120 // 1000  # the longest Opus packet: 120 ms
_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)


@cache
def libopus() -> ctypes.CDLL | None:
    bundled = Path(av.__file__).resolve().parents[1] / "av.libs"
    candidates = [*sorted(bundled.glob("libopus*.so*")), ctypes.util.find_library("opus")]
    for candidate in filter(None, candidates):
        try:
            lib = ctypes.CDLL(str(candidate))
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode.restype = ctypes.c_int
        lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_int]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        return lib
    log.warning("libopus not found: Opus is decoded at 48 kHz stereo and resampled")
    return None


class Opus16kDecoder(Decoder):
    """aiortc's Decoder interface; its frames are 16 kHz mono s16."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        error = ctypes.c_int()
        self._state = lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(error))
        if error.value or not self._state:
            raise RuntimeError(f"opus_decoder_create failed ({error.value})")
        self._pcm = np.zeros(_MAX_SAMPLES, np.int16)

    def decode(self, encoded_frame: JitterFrame) -> list[av.AudioFrame]:
        data = encoded_frame.data
        if not data:  # libopus would conceal an empty packet; aiortc's decoder drops it
            return []
        n = self._lib.opus_decode(self._state, data, len(data), self._pcm.ctypes.data, _MAX_SAMPLES, 0)
        if n < 0:
            raise ValueError(f"libopus error {n}")
        frame = av.AudioFrame.from_ndarray(self._pcm[:n].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts, frame.time_base = encoded_frame.timestamp // 3, _TIME_BASE  # RTP's clock is 48 kHz
        return [frame]

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.opus_decoder_destroy(self._state)
            self._state = None


def opus_decoder() -> Decoder | None:
    """A 16 kHz mono Opus decoder, or None where libopus cannot be loaded."""
    lib = libopus()
    return None if lib is None else Opus16kDecoder(lib)
