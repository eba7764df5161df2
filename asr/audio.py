"""Everything that reaches the pipeline becomes 16 kHz mono float32 here, whatever it came as."""

from __future__ import annotations

import asyncio
import io
import queue
import threading
from typing import Callable

import av
import numpy as np

SAMPLE_RATE = 16000
MIN_RATE, MAX_RATE = 8000, 48000
NARROWBAND_RATE = 8000  # audio sampled at this rate or lower holds nothing above 4 kHz: telephone (G.711)


def active_level_db(audio: np.ndarray) -> float:
    """Active speech level, as devset-wide's notes measure it (after ITU-T P.56): the RMS, in dBFS, of the
    20 ms frames within 25 dB of the 95th-percentile frame. -inf for digital silence."""
    frame = SAMPLE_RATE // 50
    frames = audio[: audio.size // frame * frame].reshape(-1, frame).astype(np.float64)
    if not frames.size:
        return -np.inf
    power = np.einsum("ij,ij->i", frames, frames) / frame
    if power.max() < 1e-12:
        return -np.inf
    power_db = 10 * np.log10(power + 1e-20)
    return float(10 * np.log10(power[power_db >= np.percentile(power_db, 95) - 25].mean()))


def lifted(audio: np.ndarray, target_dbfs: float, max_gain_db: float = 40.0) -> np.ndarray:
    """`audio` with its speech brought up to an active level of `target_dbfs`, never down, never clipped.

    Whisper's log-mel input is not normalised for level: speech far quieter than it was trained on (a distant
    speaker at -65 dBFS) is misheard where the same speech louder is not. Digital silence stays as it is."""
    level_db = active_level_db(audio)
    if level_db == -np.inf:
        return audio
    gain = min(10 ** (min(target_dbfs - level_db, max_gain_db) / 20), 0.99 / float(np.abs(audio).max()))
    return (audio * gain).astype(np.float32) if gain > 1 else audio


class Resampler:
    """One resampler per stream: it carries filter state from frame to frame."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

    def frame(self, frame: av.AudioFrame | None) -> np.ndarray:
        """Any rate, layout and format in; None flushes what the filter still holds."""
        out = self._resampler.resample(frame)
        if not out:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in out]).astype(np.float32) / 32768.0

    def pcm16(self, data: bytes, rate: int) -> np.ndarray:
        """Little-endian 16-bit mono PCM at `rate`."""
        return self.samples(np.frombuffer(data, dtype="<i2"), rate)

    def samples(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """16-bit mono samples at `rate`."""
        if rate == SAMPLE_RATE:
            return samples.astype(np.float32) / 32768.0
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, "<i2").reshape(1, -1),
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        return self.frame(frame)


def _ulaw() -> np.ndarray:
    """ITU-T G.711 mu-law: each of the 256 codes as its 16-bit sample."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw() -> np.ndarray:
    """ITU-T G.711 A-law: each of the 256 codes as its 16-bit sample."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a >> 4) & 7
    magnitude = ((a & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = np.where(segment > 1, magnitude << np.maximum(segment - 1, 0), magnitude)
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


G711 = {"mulaw": _ulaw(), "alaw": _alaw()}  # a table per encoding: decoding one is an index
RAW_ENCODINGS = ("pcm_s16le", *G711)


class RawAudio:
    """Raw audio as a client cuts it, at any byte: 16-bit little-endian PCM or G.711 (8 bits a sample), at
    any rate and channel count, to 16 kHz mono. A sample (or frame) cut in two waits for its other half."""

    def __init__(self, encoding: str = "pcm_s16le", rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if encoding not in RAW_ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(RAW_ENCODINGS)}")
        self.encoding, self.rate, self.channels = encoding, rate, channels
        self._width = 2 if encoding == "pcm_s16le" else 1
        self._carry = b""
        self._resampler = Resampler()

    @property
    def narrowband(self) -> bool:
        """Nothing above 4 kHz: the stream's VAD hears it at NARROWBAND_RATE (asr/vad.py)."""
        return self.rate <= NARROWBAND_RATE

    def decode(self, data: bytes) -> np.ndarray:
        if self._carry:
            data = self._carry + data
        frame = self._width * self.channels
        whole = len(data) // frame * frame
        self._carry = data[whole:]
        if self._width == 2:
            samples = np.frombuffer(data, "<i2", whole // 2)
        else:
            samples = G711[self.encoding][np.frombuffer(data, np.uint8, whole)]
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).astype(np.int32).mean(axis=1).astype(np.int16)
        return self._resampler.samples(samples, self.rate)


# The first bytes of each container a client may stream, and the demuxer that reads it.
_MAGIC = ((b"RIFF", 0, "wav"), (b"OggS", 0, "ogg"), (b"\x1a\x45\xdf\xa3", 0, "matroska"), (b"fLaC", 0, "flac"),
          (b"ID3", 0, "mp3"))
SNIFF_BYTES = 12


def sniff(head: bytes) -> str | None:
    """The container `head` (at least SNIFF_BYTES of a stream's start) begins, by its magic bytes."""
    for magic, at, name in _MAGIC:
        if head[at:at + len(magic)] == magic:
            return "wav" if name == "wav" and head[8:12] != b"WAVE" else name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG audio frame's sync word
        return "mp3"
    return None


class _Pipe(io.RawIOBase):
    """A blocking, unseekable byte stream that the decoder thread reads and the loop writes."""

    def __init__(self, max_chunks: int) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue(max_chunks)
        self._left = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._left:
            if self._eof:
                return 0  # the demuxer may ask again after the end: keep answering "end"
            chunk = self.chunks.get()
            if chunk is None:
                self._eof = True
                return 0
            self._left = chunk
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


class StreamDecoder:
    """Decodes a container streamed in chunks: the WebM/Opus that MediaRecorder emits, or a file sent as
    it is read (WAV, Ogg, FLAC, MP3), `format` naming libavformat's demuxer.

    libavformat's demuxer pulls bytes synchronously, so it runs on its own thread; decoded audio
    comes back to the loop through `on_audio(pcm, narrowband)` (narrowband: sent at NARROWBAND_RATE or
    lower), and an exception (bad data) through `on_error`.
    """

    def __init__(self, on_audio: Callable[[np.ndarray, bool], None], on_error: Callable[[str], None],
                 max_chunks: int = 32, format: str = "matroska") -> None:
        self._loop = asyncio.get_running_loop()
        self._on_audio, self._on_error = on_audio, on_error
        self._format = format
        self._pipe = _Pipe(max_chunks)
        self._done = self._loop.create_future()
        threading.Thread(target=self._run, name=f"{format}-decode", daemon=True).start()

    async def write(self, data: bytes) -> None:
        try:
            self._pipe.chunks.put_nowait(data)
        except queue.Full:  # the decoder is behind: wait for it, and so stop reading the socket
            await asyncio.to_thread(self._pipe.chunks.put, data)

    async def close(self) -> None:
        """End of stream: wait until everything written has been decoded and delivered."""
        await asyncio.to_thread(self._pipe.chunks.put, None)
        await self._done

    def _run(self) -> None:
        resampler = Resampler()
        error = None
        try:
            with av.open(self._pipe, mode="r", format=self._format) as container:
                narrowband = False
                for frame in container.decode(audio=0):
                    narrowband = frame.sample_rate <= NARROWBAND_RATE
                    self._deliver(resampler.frame(frame), narrowband)
            self._deliver(resampler.frame(None), narrowband)
        except Exception as e:  # corrupt or other input ends this stream, not the server
            name = "WebM/Opus" if self._format == "matroska" else self._format.upper()
            error = f"could not decode {name}: {e}"
        finally:
            while self._pipe.chunks.qsize():  # unblock a writer waiting on a dead decoder
                self._pipe.chunks.get_nowait()
        self._loop.call_soon_threadsafe(self._finish, error)

    def _deliver(self, pcm: np.ndarray, narrowband: bool) -> None:
        if pcm.size:
            self._loop.call_soon_threadsafe(self._on_audio, pcm, narrowband)

    def _finish(self, error: str | None) -> None:
        if error is not None:
            self._on_error(error)
        if not self._done.done():
            self._done.set_result(None)
