"""Transcript formats: a session's finals as plain text, SubRip and WebVTT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ops.storage.files import write_atomic

TEXT_FORMATS = {  # format: (file, content type)
    "txt": ("transcript.txt", "text/plain"),
    "srt": ("transcript.srt", "application/x-subrip"),
    "vtt": ("transcript.vtt", "text/vtt"),
}


def _spoken(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finals with words: a final with empty text (a cough, a door) makes no line or cue."""
    return [f for f in finals if str(f.get("text", "")).strip()]


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(float(seconds) * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def render_txt(finals: list[dict[str, Any]]) -> str:
    return "".join(_one_line(f["text"]) + "\n" for f in _spoken(finals))


def render_srt(finals: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{i}\n{_timestamp(f['start'], ',')} --> {_timestamp(f['end'], ',')}\n{_one_line(f['text'])}\n"
        for i, f in enumerate(_spoken(finals), 1))


def render_vtt(finals: list[dict[str, Any]]) -> str:
    def escape(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return "WEBVTT\n\n" + "\n".join(
        f"{_timestamp(f['start'], '.')} --> {_timestamp(f['end'], '.')}\n{escape(_one_line(f['text']))}\n"
        for f in _spoken(finals))


RENDER: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "txt": render_txt, "srt": render_srt, "vtt": render_vtt}


def write_transcripts(folder: Path, finals: list[dict[str, Any]]) -> None:
    for fmt, (name, _) in TEXT_FORMATS.items():
        write_atomic(folder / name, RENDER[fmt](finals).encode())
