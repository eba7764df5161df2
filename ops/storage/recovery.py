"""Crash recovery and retention: sessions a crash left open are completed at startup, and sessions
that ended more than --retention-days ago are deleted, from the data folder and from the bucket alike
(a Shelf each). Each folder is handled on its own: whatever one does, the others are still completed or
deleted."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from ops import metrics
from ops.storage.files import (AUDIO, FINALS, META, Unreadable, folder_time, is_regular, iso, json_bytes,
                               last_write, once, read_finals, read_meta, why, write_atomic)
from ops.storage.formats import write_transcripts
from ops.storage.shelf import Shelf

log = logging.getLogger("storage")

RETENTION_INTERVAL_S = 3600.0  # how often old sessions are looked for, after the sweep at startup


def recover(root: Path, folders: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]]]:
    """At startup: sessions a crash left open get their files, and `interrupted` as the reason.
    Returns how many, and those the disk refused (tried again once writes work again)."""
    count, refused = 0, []
    for name, session_id in folders:
        try:
            count += _recover(root / name, name, session_id)
        except Unreadable as e:  # left as it is: a person may want to look at it
            once(name, "storage: skipped %s: %s", name, e)
        except OSError as e:
            metrics.storage_error("recover")
            once(name, "storage: cannot complete %s: %s", name, why(e))
            refused.append((name, session_id))
        except Exception:
            log.exception("storage: completing %s failed", name)
    return count, refused


def _recover(folder: Path, name: str, session_id: str) -> int:
    if not folder.is_dir():
        return 0  # deleted since
    meta = read_meta(folder)
    for tmp in folder.glob(".*.tmp"):  # a whole-file write cut short: its old file is intact
        if is_regular(tmp):
            tmp.unlink(missing_ok=True)
    if meta is not None and meta.get("ended"):
        return 0
    finals = read_finals(folder / FINALS)
    meta = {"session_id": session_id, "transport": None, "started": iso(folder_time(name)), "model": None,
            "language": None, **(meta or {})}
    meta.update(ended=iso(last_write(folder)), reason="interrupted", utterances=len(finals),
                audio=AUDIO if is_regular(folder / AUDIO) else None)
    write_transcripts(folder, finals)
    write_atomic(folder / META, json_bytes(meta))
    return 1


async def sweep(shelf: Shelf, retention_days: float, live: set[str], forget: Callable[[str], None]) -> int:
    """Deletes the sessions a shelf keeps that ended more than retention_days ago; never a live one.
    `forget` is told of each folder it deletes, even in part. Returns how many went whole."""
    cutoff = time.time() - retention_days * 86400
    deleted = 0
    for name, session_id in await shelf.names():
        if session_id in live:
            continue
        try:
            when = await shelf.age(name)
        except OSError as e:
            once(name, "retention: skipped %s: %s", name, e)
            continue
        if when is None or when >= cutoff:
            continue
        gone = await shelf.delete(name)
        forget(name)
        if not gone:
            once(name, "retention: could not delete all of %s", name)
            continue
        deleted += 1
    return deleted
