"""What the vendor-API tests share: devset speech laid out as a speaker says it, in the vendors' encodings."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from speech import GAP_S, Recording, recording

LEAD_S, TAIL_S = 0.5, 1.5  # a microphone opened before the first word, left open after the last


@dataclass(frozen=True)
class Speech:
    audio: np.ndarray  # 16 kHz float32
    reference: str  # what is said, the recordings' texts in order

    @property
    def seconds(self) -> float:
        return self.audio.size / 16000


def spoken(*ids: str) -> Speech:
    """The recordings one after another with a speaker's pauses, silence before and after."""
    recordings: list[Recording] = [recording(i) for i in ids]
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    parts = [np.zeros(int(LEAD_S * 16000), np.float32)]
    for r in recordings:
        parts += [r.audio, gap]
    parts.append(np.zeros(int(TAIL_S * 16000), np.float32))
    return Speech(np.concatenate(parts), " ".join(r.text for r in recordings))


async def paced(chunks: list[bytes], seconds_each: float, send, speed: float = 1.0) -> None:
    """Sends each chunk once its audio has been "captured", `speed` times real time."""
    started = time.monotonic()
    for n, chunk in enumerate(chunks):
        await asyncio.sleep(max(0.0, started + (n + 1) * seconds_each / speed - time.monotonic()))
        await send(chunk)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]
