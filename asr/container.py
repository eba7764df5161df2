"""Whole audio files (an upload) to 16 kHz mono float32: the container is told by its first bytes.

Blocking: a caller on the event loop runs these on a thread. Only the demuxers of audio containers are
ever opened, each named explicitly: letting FFmpeg probe an upload would also admit playlists (HLS,
concat) that make it open other files or URLs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from .audio import G711, MAX_RATE, MIN_RATE, NARROWBAND_RATE, SAMPLE_RATE, Resampler

# What OpenAI's API lists as accepted, for error messages.
FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
RAW_ENCODINGS = ("linear16", "mulaw", "alaw")


class BadAudio(ValueError):
    """The bytes are not audio this server decodes, or hold no audio at all."""


@dataclass(frozen=True)
class FileAudio:
    """An upload, decoded."""

    samples: np.ndarray  # 16 kHz mono float32
    narrowband: bool  # sent at NARROWBAND_RATE or lower (a call's recording): its VAD hears it so (asr/vad.py)


class TooLong(ValueError):
    """The audio runs past the duration limit; decoding stopped there."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"the audio is longer than {limit_s:g} s, this server's limit")
        self.limit_s = limit_s


def _after_id3(data: bytes) -> bytes:
    """The bytes after an ID3v2 tag, which MP3 and AAC files may begin with."""
    if len(data) >= 10 and data[:3] == b"ID3":
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        return data[10 + size + (10 if data[5] & 0x10 else 0):]
    return data


def sniff(data: bytes) -> str | None:
    """The FFmpeg demuxer for these bytes, by their signature; None when they are no audio container."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # WebM too
    if data[:4] == b"fLaC":
        return "flac"
    if data[4:8] == b"ftyp":
        return "mov"  # MP4, M4A, 3GP
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    body = _after_id3(data)
    if len(body) >= 2 and body[0] == 0xFF and body[1] & 0xE0 == 0xE0:
        # Frame sync: layer bits 00 are AAC's ADTS, the others MPEG audio layers I to III.
        return "aac" if body[1] & 0x06 == 0 else "mp3"
    if data[:3] == b"ID3":
        return "mp3"  # a tag longer than what was sniffed
    return None


def decode(data: bytes, max_seconds: float) -> FileAudio:
    """A whole file in any container `sniff` knows, first audio stream, downmixed and resampled.

    Raises BadAudio for anything else or for a file without decodable audio, TooLong past `max_seconds`.
    A file cut short decodes up to where it breaks off.
    """
    fmt = sniff(data[:4096])
    if fmt is None:
        raise BadAudio("the file is not in an audio format this server decodes")
    resampler = Resampler()
    pieces: list[np.ndarray] = []
    samples = 0
    rate = SAMPLE_RATE
    limit = int(max_seconds * SAMPLE_RATE)
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt) as container:
            if not container.streams.audio:
                raise BadAudio("the file has no audio stream")
            try:
                for frame in container.decode(audio=0):
                    rate = frame.sample_rate
                    pcm = resampler.frame(frame)
                    pieces.append(pcm)
                    samples += pcm.size
                    if samples > limit:
                        raise TooLong(max_seconds)
            except av.error.FFmpegError:
                if not samples:  # broken from the start; a file cut short keeps what came before the cut
                    raise
            pieces.append(resampler.frame(None))
    except (BadAudio, TooLong):
        raise
    except (av.error.FFmpegError, ValueError, OSError, IndexError) as e:
        raise BadAudio(f"the file could not be decoded as {fmt}") from e
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if not audio.size:
        raise BadAudio("the file holds no audio")
    return FileAudio(audio, rate <= NARROWBAND_RATE)


def decode_raw(data: bytes, encoding: str, rate: int, channels: int, max_seconds: float) -> FileAudio:
    """Headerless audio: 16-bit little-endian PCM or G.711 (mu-law, A-law), interleaved channels."""
    if encoding not in RAW_ENCODINGS:
        raise BadAudio(f"encoding must be one of {', '.join(RAW_ENCODINGS)}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadAudio(f"sample_rate must be between {MIN_RATE} and {MAX_RATE}")
    if not 1 <= channels <= 8:
        raise BadAudio("channels must be between 1 and 8")
    width = 2 if encoding == "linear16" else 1
    frame_bytes = width * channels
    usable = len(data) - len(data) % frame_bytes
    if not usable:
        raise BadAudio("the body holds no audio")
    if usable / frame_bytes / rate > max_seconds:
        raise TooLong(max_seconds)
    raw = np.frombuffer(data[:usable], "<i2" if width == 2 else np.uint8)
    if encoding == "linear16":
        samples = raw.astype(np.float32) / 32768.0
    else:
        samples = G711[encoding][raw].astype(np.float32) / 32768.0
    mono = samples.reshape(-1, channels).mean(axis=1).astype(np.float32)
    if rate == SAMPLE_RATE:
        return FileAudio(mono, False)
    pcm = (np.clip(mono, -1, 1) * 32767).astype("<i2").tobytes()
    resampler = Resampler()
    return FileAudio(np.concatenate([resampler.pcm16(pcm, rate), resampler.frame(None)]), rate <= NARROWBAND_RATE)
