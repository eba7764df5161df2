"""Saved transcripts and audio: each session's finals on disk as they happen, its transcript when it ends.

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

Every whole-file write goes to a temporary file, is fsynced, then renamed over the old one: no reader
ever sees half a file. Disk work runs on one writer thread per server, in order, off the event loop.

What cannot be read (a folder name that is no time, a session.json that is no JSON object, a file that
is a folder, a link or a FIFO) is skipped and logged once: one broken entry never stops the listing,
the recovery or the retention sweep of the others.

What cannot be written (a full or read-only disk) stops that session's saving at its first failure: its
client gets one `storage_failed` error and transcription goes on; session.json says why once the disk
takes writes again. Until a small probe write succeeds, GET /ready answers 503 (stt_storage_errors_total
counts the failures).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
import json
import logging
import os
import re
import shutil
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from aiohttp import web

import auth
import metrics
import protocol
from errors import ApiError

if TYPE_CHECKING:
    from sessions import Session, SessionRegistry

log = logging.getLogger(__name__)

FINALS = "finals.jsonl"
META = "session.json"
AUDIO = "audio.opus"
TEXT_FORMATS = {  # format: (file, content type)
    "txt": ("transcript.txt", "text/plain"),
    "srt": ("transcript.srt", "application/x-subrip"),
    "vtt": ("transcript.vtt", "text/vtt"),
}
SESSION_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as sessions.py makes them
FOLDER = re.compile(r"(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)_([0-9a-f]{32})")
_FOLDER_TIME = "%Y-%m-%dT%H-%M-%SZ"

RETENTION_INTERVAL_S = 3600.0  # how often old sessions are looked for, after the sweep at startup
_SAVE_TIMEOUT_S = 10.0  # longest wait for the transcript files when a session ends
_AUDIO_CHUNK = 8000  # samples (0.5 s) gathered on the loop before they go to the writer thread
_AUDIO_FSYNC_S = 5.0  # audio seconds between two fsyncs of the recording
_AUDIO_BITRATE = 32000  # Opus at 32 kbit/s: transparent for speech, about 14 MB an hour
_DEFAULT_LIMIT, _MAX_LIMIT = 20, 100
PROBE = ".probe"  # the small file written now and then to tell whether writes work
_PROBE_S = 30.0  # between two probe writes while writes work
_PROBE_FAILING_S = 2.0  # while they fail: GET /ready turns 200 soon after the disk recovers


# Times -------------------------------------------------------------------------------------------

def _now() -> datetime:
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


# Files -------------------------------------------------------------------------------------------

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


def _probe_write(root: Path) -> None:
    """Writes and removes a small file: raises when the data folder takes no writes."""
    path = root / PROBE
    write_atomic(path, b"probe\n")
    path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Unreadable(Exception):
    """A stored file that is there but cannot be read or parsed: its session is skipped."""


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
    data = read_file(path)
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
        once(f"{path}:{bad}", "%s: skipped %d line(s) that are not finals", path, bad)
    return finals


def read_meta(folder: Path) -> dict[str, Any] | None:
    """A folder's session.json; None when there is none yet. Unreadable when it is not a JSON object."""
    data = read_file(folder / META)
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise Unreadable(f"{META}: not a JSON object")
    return meta


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=2) + "\n").encode()


# Transcript formats ------------------------------------------------------------------------------

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


# Audio -------------------------------------------------------------------------------------------

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


# One session -------------------------------------------------------------------------------------

_OPS = {  # what each failing write was, for the log
    "create": "create its files", "append": f"append a final to {FINALS}", "fsync": f"fsync {FINALS}",
    "audio": "write its audio", "save": "write its transcript files",
}


class SessionRecord:
    """Writes one live session's folder. Runs on the event loop; disk work goes to the writer thread.

    The first write that fails stops the session's saving (what is on disk stays readable), tells its
    client once, and is logged once per kind: a full disk would otherwise fail every write after it.
    """

    def __init__(self, storage: "Storage", session: "Session") -> None:
        self.storage = storage
        self.session = session
        self.started = _now()
        self.folder = storage.root / folder_name(self.started, session.id)
        self.finals = 0
        info = session.info()
        self.meta: dict[str, Any] = {
            "session_id": session.id, "transport": session.transport, "key_id": session.client.key or None,
            "started": iso(self.started),
            "ended": None, "reason": None, "model": info.get("model"), "language": info.get("language"),
            "utterances": 0, "audio": AUDIO if storage.record_audio else None, "error": None,
        }
        self.error: str | None = None  # why the session is not being saved: set by the first failure
        self.written = False  # its transcript files and final session.json are on disk
        self.discarded = False
        self.retried = False  # its files were tried again once writes worked again
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
        storage.submit(self._write_start)

    # Failures ---------------------------------------------------------------------------------

    def fail(self, op: str, reason: str) -> None:
        """Event loop: a write of this session failed."""
        self.storage.failed(op, reason)
        self._stopped = True
        if self.error is None:
            self.error = f"storage_failed: {reason}"
        self.meta["error"] = self.error
        if op not in self._logged:
            self._logged.add(op)
            log.error("session %s: cannot %s (%s): its transcript is not being saved", self.session.id,
                      _OPS[op], reason)
        # Soon, not now: a failed append runs inside the final's own emit, which must reach clients first.
        self._loop.call_soon(self._tell)

    def _report(self, op: str, reason: str) -> None:  # writer thread
        self._stopped = True
        if self.error is None:
            self.error = f"storage_failed: {reason}"
        _call_soon(self._loop, self.fail, op, reason)

    def _tell(self) -> None:
        """The client's one storage_failed error, while the session still has clients (before session.ended)."""
        if self._told or self._finished or self.error is None:
            return
        self._told = True
        self.session.emit(storage_failed_event(self.error.removeprefix("storage_failed: ")))

    # Writing ----------------------------------------------------------------------------------

    def _write_start(self) -> None:  # writer thread
        try:
            write_atomic(self.folder / META, _json_bytes(self.meta))
        except OSError as e:
            self._report("create", _why(e))

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "transcript.final" or self._fd is None or self._stopped:
            return
        line = json.dumps({**event, "at": iso(_now())}, ensure_ascii=False, separators=(",", ":"))
        data = (line + "\n").encode()
        try:
            # One append, into the page cache: microseconds. It is there before any transport sends the
            # event (this sink is the session's first), so a killed process loses no final a client got.
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as e:
            self.fail("append", _why(e))
            return
        self.finals += 1
        self.storage.submit(self._fsync, self._fd)  # against power loss too, without stalling the loop

    def _fsync(self, fd: int) -> None:  # writer thread
        if self._stopped:
            return
        try:
            os.fsync(fd)
        except OSError as e:
            self._report("fsync", _why(e))

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
        self.storage.submit(self._record, chunk)

    def _record(self, chunk: np.ndarray) -> None:  # writer thread
        if self._audio_failed or self._stopped:
            return
        try:
            if self._recorder is None:
                self._recorder = AudioRecorder(self.folder / AUDIO)
            self._recorder.write(chunk)
        except OSError as e:
            self._audio_failed = True  # _close_files abandons the recording
            self._report("audio", _why(e))
        except Exception:  # not the disk: the transcript goes on being saved without the audio
            self._audio_failed = True
            log.exception("session %s: recording the audio failed; it stops here", self.session.id)

    async def finish(self) -> None:
        """After the session's last final, before session.ended: the files, then session.saved, or
        the client's storage_failed error if it has not had it yet."""
        session = self.session
        if self.storage.record_audio:
            self._flush_audio()
        fd, self._fd = self._fd, None
        if session.reason == "bad_offer":
            # The offer was refused with a 400: no client ever knew this session.
            self.discarded = True
            future = self.storage.submit(self._discard, fd)
        else:
            self.meta.update(ended=iso(_now()), reason=session.reason, utterances=self.finals)
            future = self.storage.submit(self._save, fd, dict(self.meta))
        # Live until the files are there: until then the transcript is read from finals.jsonl.
        future.add_done_callback(lambda _: _call_soon(self._loop, self.storage.done, self))
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
            write_atomic(self.folder / META, _json_bytes(meta))
        except (OSError, Unreadable) as e:
            self._report("save", _why(e))
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
                self._report("audio", _why(e))
            except Exception:
                log.exception("session %s: closing the audio recording failed", self.session.id)
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as e:
                if not self._stopped:  # else already told: the disk refuses, as it did
                    self._report("fsync", _why(e))
            finally:
                os.close(fd)


def storage_failed_event(reason: str) -> dict[str, Any]:
    return protocol.error("storage_failed", f"this session's transcript is not being saved: the server cannot "
                          f"write to its data folder ({reason}); transcription goes on")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """From the writer thread, onto the event loop."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is gone: so is the server


def _why(error: OSError | Unreadable) -> str:
    """What a failed write says, without the path: `No space left on device`."""
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


# The store ---------------------------------------------------------------------------------------

class Storage:
    def __init__(self, root: str | Path, *, record_audio: bool = False, retention_days: float = 0.0) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)  # fails at startup, loudly, if it cannot
        self.record_audio = record_audio
        self.retention_days = retention_days
        self.failing: str | None = None  # why writes fail (`No space left on device`), until a probe succeeds
        self._live: dict[str, SessionRecord] = {}
        # Ended sessions whose files the disk refused: listed from memory, written once it takes them.
        self._unsaved: dict[str, SessionRecord] = {}
        self._unrecovered: list[tuple[str, str]] = []  # sessions a crash left open and the disk refused
        self._failed_now = asyncio.Event()  # cuts the wait for the next probe short
        self._owners: dict[str, str | None] = {}  # folder name -> key id; a session's owner never changes
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage")
        self._background: list[asyncio.Task] = []

    # Sessions (event loop) --------------------------------------------------------------------

    def attach(self, session: "Session") -> None:
        """A registry observer: called once per new session, before it emits anything."""
        try:
            record = SessionRecord(self, session)
        except OSError as e:  # the session goes on, unsaved, and its client is told after session.started
            reason = _why(e)
            self.failed("create", reason)
            log.error("session %s: cannot %s (%s): its transcript is not being saved", session.id,
                      _OPS["create"], reason)
            asyncio.get_running_loop().call_soon(session.emit, storage_failed_event(reason))
            return
        except Exception:  # the session goes on, unsaved
            log.exception("session %s: not stored", session.id)
            return
        self._live[session.id] = record
        session.add_sink(record.on_event)
        if self.record_audio:
            session.add_audio_tap(record.on_audio)
        session.on_finish(record.finish)

    def done(self, record: SessionRecord) -> None:
        session_id = record.session.id
        if self._live.get(session_id) is record:
            del self._live[session_id]
            if not record.written and not record.discarded:
                self._unsaved[session_id] = record

    def record(self, session_id: str) -> SessionRecord | None:
        """A session this server has in memory: live, or ended and not yet written."""
        return self._live.get(session_id) or self._unsaved.get(session_id)

    # The data folder's health (event loop) ----------------------------------------------------

    def failed(self, op: str, reason: str) -> None:
        """A write failed: GET /ready answers 503 until a probe write succeeds."""
        metrics.storage_error(op)
        if self.failing is None:
            log.error("storage: writing to %s failed (%s); GET /ready answers 503 until a write succeeds",
                      self.root, reason)
            self._failed_now.set()
        self.failing = reason

    async def _probe(self) -> None:
        """A small write now and then, more often while writes fail: what tells that they work again."""
        while True:
            try:
                await asyncio.wrap_future(self._writer.submit(_probe_write, self.root))
            except OSError as e:
                self.failed("probe", _why(e))
            else:
                if self.failing is not None:
                    self.failing = None
                    log.info("storage: writing to %s works again", self.root)
                    for record in list(self._unsaved.values()):
                        self._save_late(record)
                    if self._unrecovered:
                        unrecovered, self._unrecovered = self._unrecovered, []
                        await self._complete(unrecovered)
            while True:  # until the next probe; a failure meanwhile makes it a failing one's, sooner
                self._failed_now.clear()
                try:
                    await asyncio.wait_for(self._failed_now.wait(), _PROBE_FAILING_S if self.failing else _PROBE_S)
                except asyncio.TimeoutError:
                    break

    def _save_late(self, record: SessionRecord) -> None:
        """Writes the files of a session the disk refused when it ended; tried once, when writes work again."""
        if record.retried:
            return
        record.retried = True
        future = self._writer.submit(record.write_files, dict(record.meta))
        loop = asyncio.get_running_loop()

        def saved() -> None:
            if record.written and self._unsaved.get(record.session.id) is record:
                del self._unsaved[record.session.id]
                log.info("session %s: its files are written now", record.session.id)

        future.add_done_callback(lambda _: _call_soon(loop, saved))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Runs on the writer thread, after everything submitted before it; failures are logged."""
        def run() -> Any:
            try:
                return fn(*args)
            except Exception:
                log.exception("storage: %s failed", getattr(fn, "__name__", fn))
                raise
        return self._writer.submit(run)

    # Startup, retention, shutdown -------------------------------------------------------------

    async def start(self) -> None:
        # Listed now, before the server takes sessions: only these can have been left open by a crash.
        before = self._folders()
        self._background = [asyncio.create_task(self._maintain(before)), asyncio.create_task(self._probe())]

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.to_thread(self._writer.shutdown, wait=True)

    async def _maintain(self, before: list[tuple[str, str]]) -> None:
        await self._complete(before)
        while self.retention_days > 0:
            try:
                deleted = await asyncio.to_thread(self.sweep, set(self._live) | set(self._unsaved))
                if deleted:
                    log.info("retention: deleted %d session(s) older than %g day(s)", deleted,
                             self.retention_days)
            except Exception:
                log.exception("retention: the sweep failed; next one in %gs", RETENTION_INTERVAL_S)
            await asyncio.sleep(RETENTION_INTERVAL_S)

    async def _complete(self, folders: list[tuple[str, str]]) -> None:
        try:
            recovered, self._unrecovered = await asyncio.to_thread(self.recover, folders)
            if recovered:
                log.info("storage: %d session(s) interrupted by a crash were completed", recovered)
        except Exception:
            log.exception("storage: completing interrupted sessions failed")

    def _folders(self) -> list[tuple[str, str]]:
        """(folder name, session id) of every stored session, newest first: real folders (not links)
        named by a real time and an id. Anything else in the data folder is not storage's."""
        found = []
        with os.scandir(self.root) as entries:
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

    def recover(self, folders: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]]]:
        """At startup: sessions a crash left open get their files, and `interrupted` as the reason.
        Returns how many, and those the disk refused (tried again once writes work again)."""
        count, refused = 0, []
        for name, session_id in folders:  # whatever one folder does, the others are still completed
            try:
                count += self._recover(self.root / name, name, session_id)
            except Unreadable as e:  # left as it is: a person may want to look at it
                once(name, "storage: skipped %s: %s", name, e)
            except OSError as e:
                metrics.storage_error("recover")
                once(name, "storage: cannot complete %s: %s", name, _why(e))
                refused.append((name, session_id))
            except Exception:
                log.exception("storage: completing %s failed", name)
        return count, refused

    def _recover(self, folder: Path, name: str, session_id: str) -> int:
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
        meta.update(ended=iso(_last_write(folder)), reason="interrupted", utterances=len(finals),
                    audio=AUDIO if is_regular(folder / AUDIO) else None)
        write_transcripts(folder, finals)
        write_atomic(folder / META, _json_bytes(meta))
        return 1

    def sweep(self, live: set[str]) -> int:
        """Deletes sessions that ended more than --retention-days ago; never a live one."""
        cutoff = time.time() - self.retention_days * 86400
        deleted = 0
        for name, session_id in self._folders():
            if session_id in live:
                continue
            folder = self.root / name
            try:
                try:
                    ended = parse_iso((read_meta(folder) or {}).get("ended"))
                except Unreadable:
                    ended = None
                # No end time (a crash, another server's live session, an unreadable session.json):
                # the last write is the age.
                when = ended.timestamp() if ended is not None else _last_write(folder).timestamp()
            except OSError as e:
                once(name, "retention: skipped %s: %s", name, e)
                continue
            if when < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                self._owners.pop(name, None)
                if os.path.lexists(folder):
                    once(name, "retention: could not delete all of %s", name)
                    continue
                deleted += 1
        return deleted

    # Reading (worker threads) -----------------------------------------------------------------

    async def folder(self, session_id: str, viewer: str | None) -> Path:
        """The folder of a stored session the viewer may see, found by listing: never a path made
        from the request. Another key's session is a 404, as an unknown one: its id reveals nothing."""
        record = self.record(session_id)
        if record is not None:
            if not visible(viewer, record.meta["key_id"]):
                raise _unknown()
            return record.folder
        return await asyncio.to_thread(self._find, session_id, viewer)

    def _find(self, session_id: str, viewer: str | None) -> Path:
        for name, found in self._folders():
            if found == session_id:
                try:
                    if visible(viewer, self.owner(name, found, {})):
                        return self.root / name
                except Unreadable as e:  # not listed, so not found either
                    once(name, "storage: skipped %s: %s", name, e)
        raise _unknown()

    def owner(self, name: str, session_id: str, live: dict[str, dict[str, Any]]) -> str | None:
        """The id of the key that opened a stored session; None when access was open, or for a
        session saved before owners were recorded. Unreadable for a session that cannot be listed."""
        if session_id in live:
            return live[session_id].get("key_id")
        if name in self._owners:
            return self._owners[name]
        folder = self.root / name
        meta = read_meta(folder)
        owner = meta.get("key_id") if meta is not None else None
        owner = owner if isinstance(owner, str) and owner else None
        if meta is not None and meta.get("ended"):
            self._owners[name] = owner  # complete: its owner and its readability stay as they are
        else:
            read_finals(folder / FINALS)  # an unfinished session is listed from its finals
        return owner

    def entry(self, folder: Path, live: dict[str, dict[str, Any]]) -> dict[str, Any]:
        session_id = FOLDER.fullmatch(folder.name).group(2)
        meta = live[session_id] if session_id in live else read_meta(folder) or {}
        status = meta.get("status") or ("ended" if meta.get("ended") else "interrupted")
        started = folder_time(folder.name)
        entry = {
            "session_id": session_id, "status": status,
            "transport": meta.get("transport"), "key_id": meta.get("key_id"),
            "started": meta.get("started") or iso(started), "ended": meta.get("ended"),
            "reason": meta.get("reason") or ("interrupted" if status == "interrupted" else None),
            "error": meta.get("error"), "model": meta.get("model"), "language": meta.get("language"),
            "utterances": meta.get("utterances"),
            "transcript": f"/v1/sessions/{session_id}/transcript",
            "audio": f"/v1/sessions/{session_id}/audio" if is_regular(folder / AUDIO) else None,
        }
        if status == "interrupted":
            entry["utterances"] = len(read_finals(folder / FINALS))
        return entry

    def live_view(self) -> dict[str, dict[str, Any]]:
        """Event loop: what the files do not say (yet) about the sessions this server has in memory."""
        view = {sid: {**r.meta, "status": "ended"} for sid, r in self._unsaved.items()}
        view.update((sid, {**r.meta, "utterances": r.finals, "status": "live"}) for sid, r in self._live.items())
        return view

    def page(self, limit: int, before: str | None, page: int | None,
             live: dict[str, dict[str, Any]], viewer: str | None) -> dict[str, Any]:
        folders = []
        for name, sid in self._folders():
            try:
                if visible(viewer, self.owner(name, sid, live)):
                    folders.append((name, sid))
            except Unreadable as e:
                once(name, "storage: skipped %s: %s", name, e)
        if before is not None:
            index = next((i for i, (_, sid) in enumerate(folders) if sid == before), None)
            if index is None:
                raise ApiError(404, "unknown_session", "before: no such stored session")
            first = index + 1
        else:
            first = ((page or 1) - 1) * limit
        chosen = folders[first : first + limit]
        sessions = []
        for name, _ in chosen:
            try:
                sessions.append(self.entry(self.root / name, live))
            except Unreadable as e:  # broken since it was found readable: left out of this page
                once(name, "storage: skipped %s: %s", name, e)
        body: dict[str, Any] = {"sessions": sessions, "total": len(folders), "limit": limit, "next": None}
        if first + limit < len(folders):
            body["next"] = (f"/v1/sessions?limit={limit}&page={page + 1}" if page is not None
                            else f"/v1/sessions?limit={limit}&before={chosen[-1][1]}")
        if page is not None:
            body["page"] = page
        return body

    def transcript(self, folder: Path, fmt: str, live: dict[str, dict[str, Any]]) -> str | dict[str, Any]:
        if fmt == "json":
            return {**self.entry(folder, live), "finals": read_finals(folder / FINALS)}
        if FOLDER.fullmatch(folder.name).group(2) not in live:
            path = folder / TEXT_FORMATS[fmt][0]
            try:
                data = read_file(path)
            except Unreadable as e:
                once(str(path), "storage: %s: %s; served from %s", folder.name, e, FINALS)
                data = None
            if data is not None:
                return data.decode("utf-8", "replace")
            # Interrupted, not yet completed: the log says the same.
        return RENDER[fmt](read_finals(folder / FINALS))


def visible(viewer: str | None, owner: str | None) -> bool:
    """viewer: the request's key id, None while access is open (every session is then visible).
    A session with no owner (opened while access was open) is visible only while it is open."""
    return viewer is None or owner == viewer


def _unknown() -> ApiError:
    return ApiError(404, "unknown_session", "no such stored session")


def _last_write(folder: Path) -> datetime:
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


# HTTP --------------------------------------------------------------------------------------------

STORAGE = web.AppKey("storage", Storage)
_ENABLED = web.AppKey("storage_enabled", bool)


def install(app: web.Application, registry: "SessionRegistry") -> None:
    """Routes always; the store itself when --data-dir is set."""
    config = registry.config
    app[_ENABLED] = bool(config.data_dir)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_get("/v1/sessions/{session_id}/transcript", get_transcript)
    app.router.add_get("/v1/sessions/{session_id}/audio", get_audio)
    if not config.data_dir:
        return
    storage = Storage(config.data_dir, record_audio=config.record_audio,
                      retention_days=config.retention_days)
    app[STORAGE] = storage
    registry.observers.append(storage.attach)

    async def start(_: web.Application) -> None:
        log.info("storing sessions in %s%s", storage.root, " with their audio" if storage.record_audio else "")
        await storage.start()

    async def close(_: web.Application) -> None:
        await storage.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)


def health(app: web.Application) -> dict[str, str]:
    """For GET /health and /ready: `storage` is ok, failing (and `storage_error` says why) or off."""
    store = app.get(STORAGE)
    if store is None:
        return {"storage": "off"}
    if store.failing is not None:
        return {"storage": "failing", "storage_error": store.failing}
    return {"storage": "ok"}


def _storage(request: web.Request) -> Storage:
    if not request.app[_ENABLED]:
        raise ApiError(404, "storage_off", "this server stores no sessions (--data-dir is empty)")
    return request.app[STORAGE]


def _session_id(value: str) -> str:
    if not SESSION_ID.fullmatch(value):
        raise _unknown()
    return value


def _viewer(request: web.Request) -> str | None:
    """Whose sessions the request sees: its key's id; None (everyone's) while access is open.
    Saved sessions need the key itself (auth.TOKEN_ROUTES), so the id is never a token's."""
    return auth.grant(request).key_id or None


def _query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    unknown = set(request.query) - allowed
    if unknown:
        raise ApiError(400, "unknown_option", f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return dict(request.query)


def _positive_int(query: dict[str, str], name: str, default: int | None, most: int | None = None) -> int | None:
    if name not in query:
        return default
    value = query[name]
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) < 1 or (most is not None and int(value) > most):
        raise ApiError(400, "bad_option", f"{name} must be an integer from 1"
                       + (f" to {most}" if most is not None else ""))
    return int(value)


async def list_sessions(request: web.Request) -> web.Response:
    storage = _storage(request)
    query = _query(request, {"limit", "before", "page"})
    limit = _positive_int(query, "limit", _DEFAULT_LIMIT, _MAX_LIMIT)
    page = _positive_int(query, "page", None)
    before = query.get("before")
    if before is not None and page is not None:
        raise ApiError(400, "bad_option", "give before or page, not both")
    if before is not None and not SESSION_ID.fullmatch(before):
        raise ApiError(400, "bad_option", "before must be a session id")
    body = await asyncio.to_thread(storage.page, limit, before, page, storage.live_view(), _viewer(request))
    return web.json_response(body)


async def get_session(request: web.Request) -> web.Response:
    storage = _storage(request)
    session_id = _session_id(request.match_info["session_id"])
    _query(request, set())
    folder = await storage.folder(session_id, _viewer(request))
    return web.json_response(await asyncio.to_thread(_or_gone, storage.entry, folder, storage.live_view()))


async def get_transcript(request: web.Request) -> web.Response:
    storage = _storage(request)
    session_id = _session_id(request.match_info["session_id"])
    fmt = _query(request, {"format"}).get("format", "json")
    if fmt != "json" and fmt not in TEXT_FORMATS:
        raise ApiError(400, "bad_option", "format must be json, txt, srt or vtt")
    folder = await storage.folder(session_id, _viewer(request))
    body = await asyncio.to_thread(_or_gone, storage.transcript, folder, fmt, storage.live_view())
    if fmt == "json":
        return web.json_response(body)
    return web.Response(text=body, content_type=TEXT_FORMATS[fmt][1], charset="utf-8")


async def get_audio(request: web.Request) -> web.StreamResponse:
    storage = _storage(request)
    session_id = _session_id(request.match_info["session_id"])
    _query(request, set())
    path = (await storage.folder(session_id, _viewer(request))) / AUDIO
    if not await asyncio.to_thread(is_regular, path):
        raise ApiError(404, "no_audio", "this session's audio was not recorded")
    return web.FileResponse(path, headers={"Content-Type": "audio/ogg"})


def _or_gone(fn: Callable[..., Any], *args: Any) -> Any:
    """Retention may delete a folder between finding and reading it; what cannot be read is not listed."""
    try:
        return fn(*args)
    except FileNotFoundError:
        raise _unknown() from None
    except Unreadable as e:
        once(args[0].name, "storage: skipped %s: %s", args[0].name, e)
        raise _unknown() from None
