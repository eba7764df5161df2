"""One live session on disk: its finals appended as they are said, its audio as it comes, and its
transcript files and session.json when it ends.

The first write that fails stops the session's saving (what is on disk stays readable), tells its
client once with a storage_failed error, and is logged once per kind: a full disk would otherwise
fail every write after it.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import protocol
from ops.storage.files import (AUDIO, FINALS, META, Unreadable, folder_name, is_regular, iso, json_bytes,
                               now, read_finals, why, write_atomic)
from ops.storage.formats import write_transcripts
from ops.storage.health import StorageHealth
from ops.storage.writer import Writer, call_soon

if TYPE_CHECKING:
    from sessions import Session

log = logging.getLogger("storage")

_SAVE_TIMEOUT_S = 10.0  # longest wait for the transcript files when a session ends
_AUDIO_CHUNK = 8000  # samples (0.5 s) gathered on the loop before they go to the writer thread
_AUDIO_FSYNC_S = 5.0  # audio seconds between two fsyncs of the recording
_AUDIO_BITRATE = 32000  # Opus at 32 kbit/s: transparent for speech, about 14 MB an hour

_OPS = {  # what each failing write was, for the log
    "create": "create its files", "append": f"append a final to {FINALS}", "fsync": f"fsync {FINALS}",
    "audio": "write its audio", "save": "write its transcript files",
}


def storage_failed_event(reason: str) -> dict[str, Any]:
    return protocol.error("storage_failed", f"this session's transcript is not being saved: the server cannot "
                          f"write to its data folder ({reason}); transcription goes on")


def log_failure(session_id: str, op: str, reason: str) -> None:
    log.error("session %s: cannot %s (%s): its transcript is not being saved", session_id, _OPS[op], reason)


class AudioRecorder:
    """16 kHz mono PCM to Ogg/Opus, written page by page as it comes. Writer thread only."""

    def __init__(self, path: Path) -> None:
        import av  # only when audio is recorded

        self._av = av
        self._file = open(path, "wb", buffering=0)  # what the muxer flushes goes straight to the kernel
        # flush_packets: each page leaves the muxer's buffer at once; page_duration: at most 0.5 s a page.
        self._container = av.open(self._file, "w", format="ogg",
                                  options={"flush_packets": "1", "page_duration": "500000"})
        self._stream = self._container.add_stream("libopus", rate=16000, layout="mono")
        self._stream.bit_rate = _AUDIO_BITRATE
        self._samples = 0
        self._synced = 0

    def write(self, pcm: np.ndarray) -> None:
        frame = self._av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        frame.pts = self._samples
        frame.time_base = fractions.Fraction(1, 16000)
        self._samples += pcm.size
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        if self._samples - self._synced >= _AUDIO_FSYNC_S * 16000:
            os.fsync(self._file.fileno())
            self._synced = self._samples

    def close(self) -> None:
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abandon(self) -> None:
        """After a failed write: the file is closed as it is; the disk would refuse the rest."""
        try:
            self._container.close()
        except Exception:
            pass  # the muxer's trailer, refused as the page before it was
        self._file.close()


class SessionRecord:
    """Writes one live session's folder. Runs on the event loop; disk work goes to the writer thread.

    `done` is called on the loop once the session's last files are written, refused or discarded.
    """

    def __init__(self, session: "Session", root: Path, writer: Writer, health: StorageHealth, *,
                 record_audio: bool, done: Callable[["SessionRecord"], None]) -> None:
        self.session = session
        self.started = now()
        self.folder = root / folder_name(self.started, session.id)
        self.finals = 0
        info = session.info()
        self.meta: dict[str, Any] = {
            "session_id": session.id, "transport": session.transport, "key_id": session.client.key or None,
            "started": iso(self.started),
            "ended": None, "reason": None, "model": info.get("model"), "language": info.get("language"),
            "utterances": 0, "audio": AUDIO if record_audio else None, "error": None,
        }
        self.error: str | None = None  # why the session is not being saved: set by the first failure
        self.written = False  # its transcript files and final session.json are on disk
        self.discarded = False
        self.retried = False  # its files were tried again once writes worked again
        self._writer = writer
        self._health = health
        self._record_audio = record_audio
        self._done = done
        self._stopped = False  # no more writes: read by the writer thread too
        self._logged: set[str] = set()
        self._told = False
        self._finished = False
        self._loop = asyncio.get_running_loop()
        # Inline, two small syscalls: the folder and the log must exist before the first final.
        self.folder.mkdir()
        self._fd: int | None = os.open(self.folder / FINALS,
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._audio: list[np.ndarray] = []
        self._audio_samples = 0
        self._recorder: AudioRecorder | None = None  # writer thread only
        self._audio_failed = False
        writer.submit(self._write_start)

    # Failures ---------------------------------------------------------------------------------

    def fail(self, op: str, reason: str) -> None:
        """Event loop: a write of this session failed."""
        self._health.failed(op, reason)
        self._stopped = True
        if self.error is None:
            self.error = f"storage_failed: {reason}"
        self.meta["error"] = self.error
        if op not in self._logged:
            self._logged.add(op)
            log_failure(self.session.id, op, reason)
        # Soon, not now: a failed append runs inside the final's own emit, which must reach clients first.
        self._loop.call_soon(self._tell)

    def _report(self, op: str, reason: str) -> None:  # writer thread
        self._stopped = True
        if self.error is None:
            self.error = f"storage_failed: {reason}"
        call_soon(self._loop, self.fail, op, reason)

    def _tell(self) -> None:
        """The client's one storage_failed error, while the session still has clients (before session.ended)."""
        if self._told or self._finished or self.error is None:
            return
        self._told = True
        self.session.emit(storage_failed_event(self.error.removeprefix("storage_failed: ")))

    # Writing ----------------------------------------------------------------------------------

    def _write_start(self) -> None:  # writer thread
        try:
            write_atomic(self.folder / META, json_bytes(self.meta))
        except OSError as e:
            self._report("create", why(e))

    def on_event(self, event: dict[str, Any]) -> None:
        """The session's recorder (Session.add_recorder): it runs before any transport's sink."""
        if event.get("type") != "transcript.final" or self._fd is None or self._stopped:
            return
        line = json.dumps({**event, "at": iso(now())}, ensure_ascii=False, separators=(",", ":"))
        data = (line + "\n").encode()
        try:
            # One append, into the page cache: microseconds. It is there before any transport sends the
            # event, so a killed process loses no final a client got.
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as e:
            self.fail("append", why(e))
            return
        self.finals += 1
        self._writer.submit(self._fsync, self._fd)  # against power loss too, without stalling the loop

    def _fsync(self, fd: int) -> None:  # writer thread
        if self._stopped:
            return
        try:
            os.fsync(fd)
        except OSError as e:
            self._report("fsync", why(e))

    def on_audio(self, pcm: np.ndarray) -> None:
        if self._stopped:
            return
        self._audio.append((np.clip(pcm, -1, 1) * 32767).astype(np.int16))
        self._audio_samples += pcm.size
        if self._audio_samples >= _AUDIO_CHUNK:
            self._flush_audio()

    def _flush_audio(self) -> None:
        if not self._audio:
            return
        chunk = np.concatenate(self._audio)
        self._audio, self._audio_samples = [], 0
        self._writer.submit(self._record, chunk)

    def _record(self, chunk: np.ndarray) -> None:  # writer thread
        if self._audio_failed or self._stopped:
            return
        try:
            if self._recorder is None:
                self._recorder = AudioRecorder(self.folder / AUDIO)
            self._recorder.write(chunk)
        except OSError as e:
            self._audio_failed = True  # _close_files abandons the recording
            self._report("audio", why(e))
        except Exception:  # not the disk: the transcript goes on being saved without the audio
            self._audio_failed = True
            log.exception("session %s: recording the audio failed; it stops here", self.session.id)

    async def finish(self) -> None:
        """After the session's last final, before session.ended: the files, then session.saved, or
        the client's storage_failed error if it has not had it yet."""
        session = self.session
        if self._record_audio:
            self._flush_audio()
        fd, self._fd = self._fd, None
        if session.reason == "bad_offer":
            # The offer was refused with a 400: no client ever knew this session.
            self.discarded = True
            future = self._writer.submit(self._discard, fd)
        else:
            self.meta.update(ended=iso(now()), reason=session.reason, utterances=self.finals)
            future = self._writer.submit(self._save, fd, dict(self.meta))
        # Live until the files are there: until then the transcript is read from finals.jsonl.
        future.add_done_callback(lambda _: call_soon(self._loop, self._done, self))
        saved = False
        try:
            saved = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), _SAVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("session %s: transcript not written within %ss", session.id, _SAVE_TIMEOUT_S)
        except Exception:
            log.exception("session %s: saving the transcript failed", session.id)
        if self.error is not None:
            self._tell()
        elif saved:
            session.emit(protocol.session_saved(session.id))
        self._finished = True

    def _save(self, fd: int | None, meta: dict[str, Any]) -> bool:  # writer thread
        self._close_files(fd)
        return self.write_files(meta)

    def write_files(self, meta: dict[str, Any]) -> bool:  # writer thread
        """The transcript files, then session.json, saying why when saving failed; False when the disk
        refused them."""
        meta = {**meta, "error": self.error, "audio": AUDIO if is_regular(self.folder / AUDIO) else None}
        try:
            write_transcripts(self.folder, read_finals(self.folder / FINALS))
            write_atomic(self.folder / META, json_bytes(meta))
        except (OSError, Unreadable) as e:
            self._report("save", why(e))
            return False
        self.written = True
        return True

    def _discard(self, fd: int | None) -> bool:  # writer thread
        self._close_files(fd)
        shutil.rmtree(self.folder, ignore_errors=True)
        return False

    def _close_files(self, fd: int | None) -> None:  # writer thread
        recorder, self._recorder = self._recorder, None
        if recorder is not None and self._audio_failed:
            recorder.abandon()
        elif recorder is not None:
            try:
                recorder.close()
            except OSError as e:
                self._report("audio", why(e))
            except Exception:
                log.exception("session %s: closing the audio recording failed", self.session.id)
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as e:
                if not self._stopped:  # else already told: the disk refuses, as it did
                    self._report("fsync", why(e))
            finally:
                os.close(fd)
