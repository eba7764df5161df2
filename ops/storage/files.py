"""The data folder's layout, and how its files are written whole and read without trusting them.

Writes go to a temporary file that is fsynced and renamed, so no reader ever sees half a file. Reads
follow no link and never block on a FIFO; what is there but cannot be read raises Unreadable, and the
caller skips that one session, logging it once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("storage")

FINALS = "finals.jsonl"
META = "session.json"
AUDIO = "audio.opus"
SESSION_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as sessions.py makes them
FOLDER = re.compile(r"(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)_([0-9a-f]{32})")
_FOLDER_TIME = "%Y-%m-%dT%H-%M-%SZ"


# Times -------------------------------------------------------------------------------------------

def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(t: datetime) -> str:
    t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_iso(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def folder_name(started: datetime, session_id: str) -> str:
    return f"{started.astimezone(timezone.utc).strftime(_FOLDER_TIME)}_{session_id}"


def folder_time(name: str) -> datetime | None:
    """The start time a session folder's name holds; None when the name is no real time."""
    m = FOLDER.fullmatch(name)
    if m is None:
        return None
    try:
        return datetime.strptime(m.group(1), _FOLDER_TIME).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def session_folders(root: Path) -> list[tuple[str, str]]:
    """(folder name, session id) of every stored session, newest first: real folders (not links)
    named by a real time and an id. Anything else in the data folder is not storage's."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            m = FOLDER.fullmatch(entry.name)
            try:
                if m is None or not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            if folder_time(entry.name) is None:
                once(entry.name, "storage: skipped %s: its name holds no valid time", entry.name)
                continue
            found.append((entry.name, m.group(2)))
    found.sort(reverse=True)
    return found


def last_write(folder: Path) -> datetime:
    """The newest modification time in a folder. Links are not followed (one may loop), and what
    cannot be looked at does not count."""
    newest = os.lstat(folder).st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except OSError:
                pass
    return datetime.fromtimestamp(newest, timezone.utc)


# Writing -----------------------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes) -> None:
    """The whole file or the old one, never half: temp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk gets its space back
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode()


# Reading -----------------------------------------------------------------------------------------

class Unreadable(Exception):
    """A stored file that is there but cannot be read or parsed: its session is skipped."""


def why(error: OSError | Unreadable) -> str:
    """What a failed write says, without the path: `No space left on device`."""
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


_reported: set[str] = set()


def once(key: str, message: str, *args: Any) -> None:
    """One warning line per broken entry per process: listings come again and again."""
    if key not in _reported:
        _reported.add(key)
        log.warning(message, *args)


def read_file(path: Path) -> bytes | None:
    """A regular file's bytes; None when there is none. A link is not followed and a FIFO does not
    block the thread: the server makes neither, so either is unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unreadable(f"{path.name}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unreadable(f"{path.name}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise Unreadable(f"{path.name}: {e.strerror}") from None
    finally:
        os.close(fd)


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_final(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("text"), str)
            and all(isinstance(value.get(k), (int, float)) for k in ("start", "end")))


def read_finals(path: Path) -> list[dict[str, Any]]:
    """The finals of a finals.jsonl; a last line cut short by a crash is left out, and so is any line
    that is not a final. Unreadable when the file is there but cannot be read."""
    return parse_finals(read_file(path), str(path))


def parse_finals(data: bytes | None, label: str) -> list[dict[str, Any]]:
    """The finals of a finals.jsonl's bytes (None: no file); `label` names it in the log."""
    if data is None:
        return []
    finals, bad = [], 0
    for line in data.split(b"\n")[:-1]:  # what follows the last newline is not a whole line
        try:
            final = json.loads(line)
        except ValueError:
            final = None
        if _is_final(final):
            finals.append(final)
        else:
            bad += 1
    if bad:
        once(f"{label}:{bad}", "%s: skipped %d line(s) that are not finals", label, bad)
    return finals


def read_meta(folder: Path) -> dict[str, Any] | None:
    """A folder's session.json; None when there is none yet. Unreadable when it is not a JSON object."""
    return parse_meta(read_file(folder / META))


def parse_meta(data: bytes | None) -> dict[str, Any] | None:
    """A session.json's bytes as a dict (None: no file). Unreadable when they are not a JSON object."""
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise Unreadable(f"{META}: not a JSON object")
    return meta
