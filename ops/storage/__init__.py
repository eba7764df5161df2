"""Saved transcripts and audio: each session's finals on disk as they happen, its transcript when it ends.
With --storage-url, each ended session's folder goes to an S3-compatible bucket, from which every
replica sharing it reads the stored sessions; the data folder keeps live sessions, and ended ones until
they are uploaded.

One folder per session under --data-dir, named by start time and id
(`2026-11-21T09-30-00Z_5f0c...`):

- `finals.jsonl`: one line per transcript.final, the event as sent plus `at` (wall-clock time). The line
  reaches the kernel (os.write) before any transport sees the event, so a killed server never loses a
  final its client got; an fsync follows on the writer thread.
- `session.json`: id, transport, key_id, started, ended, reason, model, language, utterances, audio.
  Written at the start and again at the end. `key_id` names the API key that opened the session (its id,
  never the key): with access control on, each key sees only its own sessions.
- `transcript.txt`, `transcript.srt`, `transcript.vtt`: written when the session ends.
- `audio.opus` (--record-audio): the 16 kHz mono audio received, Ogg/Opus, streamed as it arrives.
  Ogg pages carry checksums: a file cut short by a crash decodes up to its last whole page.

The modules, one job each:

- `files`: the folder's layout, whole-file writes (temp file, fsync, rename) and reads that trust nothing.
- `formats`: txt, srt and vtt from a session's finals.
- `writer`: the one writer thread that does all disk work, in order, off the event loop.
- `record`: one live session's folder (its finals, audio and closing files) and the Ogg/Opus recorder.
- `health`: whether writes work: the failure counter, the probe, /ready's `storage` state.
- `recovery`: completing sessions a crash left open, and the retention sweep.
- `s3`: the bucket of --storage-url, an S3-compatible object store (aiobotocore, on the event loop).
- `shelf`: where stored sessions are kept, the data folder or the bucket, behind the same questions.
- `upload`: ended sessions from the data folder to the bucket, retried while it fails.
- `catalog`: stored sessions read back, found by listing the shelves and shown only to the key that
  opened them.
- `store`: `Storage`, which ties these together for one data folder (and its bucket).
- `routes`: the HTTP routes under /v1/sessions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from ops.storage import routes
from ops.storage.store import STORAGE, Storage

if TYPE_CHECKING:
    from sessions import SessionRegistry

__all__ = ["STORAGE", "Storage", "health", "install"]

log = logging.getLogger("storage")


def install(app: web.Application, registry: "SessionRegistry") -> None:
    """Routes always; the store itself when --data-dir is set."""
    config = registry.config
    routes.add_routes(app)
    if not config.data_dir:
        return
    storage = Storage(config.data_dir, record_audio=config.record_audio,
                      retention_days=config.retention_days, storage_url=config.storage_url)
    app[STORAGE] = storage
    registry.observers.append(storage.attach)

    async def start(_: web.Application) -> None:
        log.info("storing sessions in %s%s%s", storage.root, " with their audio" if storage.record_audio else "",
                 f", uploaded to {storage.bucket.url} when they end" if storage.bucket is not None else "")
        await storage.start()

    async def close(_: web.Application) -> None:
        await storage.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)


def health(app: web.Application) -> dict[str, str]:
    """For GET /health and /ready: `storage` is ok, failing (and `storage_error` says why) or off."""
    storage = app.get(STORAGE)
    return storage.state() if storage is not None else {"storage": "off"}
