"""The one thread that runs Whisper: finals first, then speculative finals, then partials."""

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
    """Runs decodes off the event loop, in priority order, behind bounded queues.

    Finals are FIFO and bounded. Speculative finals (decoded while the endpoint silence is still
    running) and partials are keyed by stream: a newer one replaces the waiting one, so each
    stream holds at most one of each and a busy server sheds them before any final.
    """

    def __init__(self, engine: WhisperEngine, max_finals: int) -> None:
        self.engine = engine
        self._max_finals = max_finals
        self._cond = threading.Condition()
        self._finals: deque[_Job] = deque()
        self._speculative: OrderedDict[Hashable, _Job] = OrderedDict()
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
        return len(self._finals) + len(self._speculative) + len(self._partials)

    def final(self, audio: np.ndarray, language: str | None) -> asyncio.Future:
        job = self._job(audio, language, final=True)
        with self._cond:
            if len(self._finals) >= self._max_finals:
                raise Overloaded("too many utterances waiting for transcription")
            self._finals.append(job)
            self._cond.notify()
        return job.future

    def speculate(self, key: Hashable, audio: np.ndarray, language: str | None) -> asyncio.Future:
        """A final decoded ahead of the endpoint; resolves to None if a newer one replaced it."""
        return self._keyed(self._speculative, key, self._job(audio, language, final=True))

    def promote(self, key: Hashable) -> None:
        """The endpoint came: the stream's waiting speculative final becomes a real one."""
        with self._cond:
            job = self._speculative.pop(key, None)
            if job is not None:
                self._finals.append(job)

    def partial(self, key: Hashable, audio: np.ndarray, language: str | None) -> asyncio.Future:
        """Resolves to None when there was no speech, or a newer partial of the stream replaced it."""
        return self._keyed(self._partials, key, self._job(audio, language, final=False))

    def _keyed(self, queue: OrderedDict[Hashable, _Job], key: Hashable, job: _Job) -> asyncio.Future:
        with self._cond:
            stale = queue.pop(key, None)
            queue[key] = job
            self._cond.notify()
        if stale is not None:
            _resolve(stale.future, None)
        return job.future

    def _job(self, audio: np.ndarray, language: str | None, final: bool) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(audio, language, final, loop, loop.create_future())
        job.future.add_done_callback(lambda _: setattr(job, "abandoned", True))
        return job

    def _next(self) -> _Job | None:
        with self._cond:
            while not (self._closed or self._finals or self._speculative or self._partials):
                self._cond.wait()
            if self._finals:
                return self._finals.popleft()
            for queue in (self._speculative, self._partials):
                if queue:
                    return queue.popitem(last=False)[1]
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
