"""WhisperLive (Collabora, PyPI whisper-live 0.10.0) on the same model and audio, over its own protocol.

Its server runs in bench/.venv-whisperlive (made by `make bench`) with torch replaced by
bench/torch_stub. Protocol: a JSON options message, SERVER_READY, float32 16 kHz binary frames,
b"END_OF_AUDIO"; the server re-sends its recent segments after each decode, and a segment is
final when it arrives with "completed": true.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / "bench" / ".venv-whisperlive" / "bin" / "python"
HOST = "127.0.0.2"
# WhisperLive marks the last words of an utterance final only after the same text comes back
# from ~11 decodes of the silence that follows: leave the microphone open long enough.
_MAX_TAIL_S = 30.0


class WhisperLiveServer:
    def __init__(self, model_path: str) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        code = ("from whisper_live.server import TranscriptionServer\n"
                f"TranscriptionServer().run({HOST!r}, {self.port}, backend='faster_whisper', "
                f"faster_whisper_custom_model_path={model_path!r}, single_model=True)")
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"whisperlive-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(VENV_PYTHON), "-c", code], stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": str(ROOT / "bench" / "torch_stub")},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("WhisperLive exited:\n" + self.log_path.read_text())
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("WhisperLive did not start:\n" + self.log_path.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


async def stream(url: str, pcm: np.ndarray, last_speech_end: float) -> tuple[float, list[tuple[float, dict]]]:
    """Streams like a microphone; returns the wall time of sample 0 and (arrival, event) pairs
    in this project's event shape, so both servers are scored by the same code."""
    uid = str(uuid.uuid4())
    events: list[tuple[float, dict]] = []
    completed: set[str] = set()
    ready = asyncio.Event()
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({
            "uid": uid, "language": "en", "task": "transcribe", "model": "tiny.en", "use_vad": True,
            "send_last_n_segments": 10, "no_speech_thresh": 0.45, "clip_audio": False,
            "same_output_threshold": 10, "audio_format": "float32"}))

        async def receive() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data, at = json.loads(msg.data), time.monotonic()
                if data.get("message") == "SERVER_READY":
                    ready.set()
                for seg in data.get("segments", []):
                    if seg.get("completed") and seg["start"] not in completed:
                        completed.add(seg["start"])
                        events.append((at, {"type": "transcript.final", "text": seg["text"],
                                            "start": float(seg["start"]), "end": float(seg["end"])}))
                    elif not seg.get("completed"):
                        events.append((at, {"type": "transcript.partial", "text": seg["text"],
                                            "start": float(seg["start"])}))

        reader = asyncio.create_task(receive())
        await asyncio.wait_for(ready.wait(), 60)
        chunk, silence = 1600, np.zeros(1600, np.float32)
        started, n = time.monotonic(), 0
        while True:
            audio = pcm[n * chunk : (n + 1) * chunk]
            tail = n * chunk / 16000 - pcm.size / 16000
            if audio.size == 0:
                settled = any(e["type"] == "transcript.final" and e["end"] >= last_speech_end - 0.35
                              for _, e in events)
                if settled or tail > _MAX_TAIL_S:
                    break
                audio = silence
            await asyncio.sleep(max(0.0, started + (n + 1) * 0.1 - time.monotonic()))
            await ws.send_bytes(audio.astype("<f4").tobytes())
            n += 1
        await ws.send_bytes(b"END_OF_AUDIO")
        try:
            await asyncio.wait_for(reader, 10)
        except asyncio.TimeoutError:
            reader.cancel()
    return started, events
