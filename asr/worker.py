"""The one thread that runs Whisper: finals first, at most one waiting partial per stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from .engine import Transcript, WhisperEngine


class Overloaded(RuntimeError):
    """The finals queue is full: the server is past what its CPU can transcribe."""


@dataclass(eq=False)
class _Job:
    audio: np.ndarray
    language: str | None
    final: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)
    abandoned: bool = False  # set on the loop thread when nobody awaits the result any more


class DecodeWorker:
    """Runs decodes off the event loop, in priority order, behind bounded queues."""

    def __init__(self, engine: WhisperEngine, max_finals: int) -> None:
        self.engine = engine
        self._max_finals = max_finals
        self._cond = threading.Condition()
        self._finals: deque[_Job] = deque()
        self._partials: OrderedDict[Hashable, _Job] = OrderedDict()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="whisper-decode", daemon=True)
        self.busy_seconds = 0.0
        self.decodes = 0

    def start(self) -> None:
        self._thread.start()

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    @property
    def depth(self) -> int:
        return len(self._finals) + len(self._partials)

    async def final(self, audio: np.ndarray, language: str | None) -> Transcript | None:
        job = self._job(audio, language, final=True)
        with self._cond:
            if len(self._finals) >= self._max_finals:
                raise Overloaded("too many utterances waiting for transcription")
            self._finals.append(job)
            self._cond.notify()
        return await job.future

    async def partial(self, key: Hashable, audio: np.ndarray, language: str | None) -> Transcript | None:
        """None when there was no speech, or when a newer partial of the same stream replaced it."""
        job = self._job(audio, language, final=False)
        with self._cond:
            stale = self._partials.pop(key, None)
            self._partials[key] = job
            self._cond.notify()
        if stale is not None:
            stale.loop.call_soon_threadsafe(_resolve, stale.future, None)
        return await job.future

    def _job(self, audio: np.ndarray, language: str | None, final: bool) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(audio, language, final, loop, loop.create_future())
        job.future.add_done_callback(lambda _: setattr(job, "abandoned", True))
        return job

    def _next(self) -> _Job | None:
        with self._cond:
            while not self._closed and not self._finals and not self._partials:
                self._cond.wait()
            if self._finals:
                return self._finals.popleft()
            if self._partials:
                return self._partials.popitem(last=False)[1]
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            if job.abandoned:
                continue
            started = time.monotonic()
            try:
                result: Transcript | None | BaseException = self.engine.transcribe(
                    job.audio, job.language, job.final
                )
            except Exception as e:  # a broken decode fails its request, never the worker
                result = e
            self.busy_seconds += time.monotonic() - started
            self.decodes += 1
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, result)
            except RuntimeError:  # that loop is closed: nobody is waiting
                pass


def _resolve(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
