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
        samples = np.frombuffer(data, dtype="<i2")
        if rate == SAMPLE_RATE:
            return samples.astype(np.float32) / 32768.0
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        return self.frame(frame)


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


class WebmDecoder:
    """Decodes the continuous WebM/Opus stream that MediaRecorder emits in chunks.

    libavformat's demuxer pulls bytes synchronously, so it runs on its own thread; decoded audio
    comes back to the loop through `on_audio`, and an exception (bad data) through `on_error`.
    """

    def __init__(self, on_audio: Callable[[np.ndarray], None], on_error: Callable[[str], None],
                 max_chunks: int = 32) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_audio, self._on_error = on_audio, on_error
        self._pipe = _Pipe(max_chunks)
        self._done = self._loop.create_future()
        threading.Thread(target=self._run, name="webm-decode", daemon=True).start()

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
            with av.open(self._pipe, mode="r", format="matroska") as container:
                for frame in container.decode(audio=0):
                    self._deliver(resampler.frame(frame))
            self._deliver(resampler.frame(None))
        except Exception as e:  # corrupt or non-WebM input ends this stream, not the server
            error = f"could not decode WebM/Opus: {e}"
        finally:
            while self._pipe.chunks.qsize():  # unblock a writer waiting on a dead decoder
                self._pipe.chunks.get_nowait()
        self._loop.call_soon_threadsafe(self._finish, error)

    def _deliver(self, pcm: np.ndarray) -> None:
        if pcm.size:
            self._loop.call_soon_threadsafe(self._on_audio, pcm)

    def _finish(self, error: str | None) -> None:
        if error is not None:
            self._on_error(error)
        if not self._done.done():
            self._done.set_result(None)
