"""Real speech for tests: the owners' devset, and word error rate as TESTING.md defines it."""

from __future__ import annotations

import json
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

DEVSET = Path(os.environ.get("STT_DEVSET", Path(__file__).resolve().parents[2] / "shared/eval/devset"))


@dataclass(frozen=True)
class Recording:
    id: str
    text: str
    audio: np.ndarray  # 16 kHz mono float32

    @property
    def seconds(self) -> float:
        return self.audio.size / 16000


def require_devset() -> Path:
    if (DEVSET / "manifest.jsonl").is_file():
        return DEVSET
    message = f"devset not found at {DEVSET}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


def load_devset() -> list[Recording]:
    root = require_devset()
    items = []
    for line in (root / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            items.append(Recording(entry["id"], entry["text"], read_wav(root / entry["wav"])))
    return items


def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words)."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        prev, row[0] = row[:], i
        for j in range(1, len(hyp) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ref[i - 1] != hyp[j - 1]))
    return row[len(hyp)], len(ref)


def wer(pairs: list[tuple[str, str]]) -> float:
    errors = words = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        errors, words = errors + e, words + n
    return errors / words
