"""The decode workers: the threads that run Whisper, finals first, then early finals, then partials,
then files."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator

import numpy as np

from . import policy
from .engine import Abandoned, Before, Transcript, WhisperEngine


class Overloaded(RuntimeError):
    """The finals queue is full: the server is past what its CPU can transcribe."""


@dataclass(eq=False)
class _Job:
    audio: np.ndarray
    language: str | None
    final: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)
    queued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # set on the loop thread when nobody awaits the result any more
    first: bool = False  # a partial for an utterance that shows no words yet
    before: Before = Before()  # what the stream said before
    whole: bool = False  # encoded over the whole window (WhisperEngine.transcribe)
    # How the engine is to decode it, set when a worker takes it (asr/policy.py).
    greedy: bool = False
    busy_window: bool = False
    # A file's pieces, decoded together at offline accuracy (`audio` is unused); `befores` one per piece.
    pieces: list[np.ndarray] | None = None
    befores: list[Before] | None = None


class DecodePool:
    """Runs decodes off the event loop on `--decode-workers` decode workers (threads), in priority
    order, behind bounded queues.

    Finals are FIFO and bounded. Early finals (decoded while the endpoint silence is still
    running) and partials are keyed by stream: a newer one replaces the waiting one, so each
    stream holds at most one of each. Streams stop asking for partials and early finals while
    finals wait (see `finals_waiting`). How a worker decodes what it takes under load (greedy,
    over the busy window, a burst's finals in one batch) and which partials it sheds is
    asr/policy.py's.

    What an operator watches: the counters below, read at any time, and `on_partial(seconds)`, called
    on the event loop for each partial that said something, with the time from its request to its
    text. A stream asks for a partial as the newest audio it covers arrives, so that is the partial's
    latency; replaced, shed and empty partials are not reported.
    """

    def __init__(self, engine: WhisperEngine, max_finals: int, workers: int = 1,
                 on_partial: Callable[[float], None] | None = None) -> None:
        self.engine = engine
        self._max_finals = max_finals
        self._on_partial = on_partial
        self._cond = threading.Condition()
        self._finals: deque[_Job] = deque()
        self._early_finals: OrderedDict[Hashable, _Job] = OrderedDict()
        self._partials: OrderedDict[Hashable, _Job] = OrderedDict()
        self._files: deque[_Job] = deque()  # file pieces: only what live streams leave
        # Whether live streams are open (the server sets it): while they are, file pieces never take the
        # last idle thread, so that a live final never waits behind a file's decode.
        self.live: Callable[[], bool] = lambda: True
        self._closed = False
        self._running: list[list[_Job]] = []  # what each busy worker decodes
        self._workers = [threading.Thread(target=self._run, name=f"whisper-decode-{i}", daemon=True)
                         for i in range(workers)]
        self.busy_seconds = 0.0
        self.decodes = 0
        self.busy_window_decodes = 0  # accuracy traded for capacity: an operator watches these two
        self.greedy_decodes = 0
        self.batched_decodes = 0  # finals of bursts, decoded together
        self.shed_partials = 0

    def start(self) -> None:
        for thread in self._workers:
            thread.start()

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._workers:
            await asyncio.to_thread(thread.join)

    @property
    def _busy(self) -> int:
        """Workers decoding now."""
        return len(self._running)

    @property
    def depth(self) -> int:
        return len(self._finals) + len(self._early_finals) + len(self._partials)

    @property
    def idle(self) -> bool:
        """No decode runs or waits."""
        return not (self._busy or self.depth)

    @property
    def finals_idle(self) -> bool:
        """No final or early final waits, or runs for someone who still awaits it."""
        with self._cond:
            running = sum(jobs[0].final and not all(j.abandoned for j in jobs) for jobs in self._running)
            return not policy.finals_busy(running, len(self._finals), len(self._early_finals))

    @property
    def finals_waiting(self) -> int:
        """Finals not yet started: while any wait, extra work would only delay them."""
        return len(self._finals)

    def final(self, audio: np.ndarray, language: str | None, before: Before = Before(),
              whole: bool = False) -> asyncio.Future:
        job = self._job(audio, language, final=True, before=before, whole=whole)
        with self._cond:
            if len(self._finals) >= self._max_finals:
                raise Overloaded("too many utterances waiting for transcription")
            self._finals.append(job)
            self._cond.notify()
        return job.future

    def early_final(self, key: Hashable, audio: np.ndarray, language: str | None,
                    before: Before = Before()) -> asyncio.Future:
        """A final decoded ahead of the endpoint; resolves to None if a newer one replaced it."""
        return self._keyed(self._early_finals, key, self._job(audio, language, final=True, before=before))

    def promote(self, key: Hashable) -> None:
        """The endpoint came: the stream's waiting early final becomes its final."""
        with self._cond:
            job = self._early_finals.pop(key, None)
            if job is not None:
                self._finals.append(job)

    def partial(self, key: Hashable, audio: np.ndarray, language: str | None,
                first: bool = False, before: Before = Before()) -> asyncio.Future:
        """Resolves to None when there was no speech, or the partial was replaced or shed.

        `first`: the utterance shows no words yet. Such a partial goes ahead of the streams that
        already show some, so that under load a speaker still sees their words begin soon.
        """
        job = self._job(audio, language, final=False, first=first, before=before)
        future = self._keyed(self._partials, key, job)
        if self._on_partial is not None:
            future.add_done_callback(lambda _: self._answered(job))
        return future

    def _answered(self, job: _Job) -> None:
        future = job.future
        if not future.cancelled() and future.exception() is None and future.result() is not None:
            self._on_partial(time.monotonic() - job.queued)

    def pieces(self, audios: list[np.ndarray], language: str | None, befores: list[Before]) -> asyncio.Future:
        """A file's pieces, decoded together after every live request (engine.transcribe_pieces); resolves to
        their transcripts. Bounded by its callers: each file keeps a few of these in flight."""
        job = self._job(np.zeros(0, np.float32), language, final=True)
        job.pieces, job.befores = audios, befores
        with self._cond:
            self._files.append(job)
            self._cond.notify()
        return job.future

    def _keyed(self, queue: OrderedDict[Hashable, _Job], key: Hashable, job: _Job) -> asyncio.Future:
        with self._cond:
            stale = queue.pop(key, None)
            queue[key] = job
            if job.first:
                queue.move_to_end(key, last=False)
            self._cond.notify()
        if stale is not None:
            _resolve(stale.future, None)
        job.future.add_done_callback(lambda _: self._forget(queue, key, job))
        return job.future

    def _forget(self, queue: OrderedDict[Hashable, _Job], key: Hashable, job: _Job) -> None:
        """A waiting job its stream gave up on (a partial at the utterance's end, an early final when speech
        resumed) leaves its queue at once: it would count as work in `depth` and `idle`."""
        with self._cond:
            if queue.get(key) is job:
                del queue[key]

    def _job(self, audio: np.ndarray, language: str | None, final: bool, first: bool = False,
             before: Before = Before(), whole: bool = False) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(audio, language, final, loop, loop.create_future(), first=first, before=before, whole=whole)
        job.future.add_done_callback(lambda _: setattr(job, "abandoned", True))
        return job

    def _next(self) -> list[_Job]:
        """The next jobs: one, or a burst of finals decoded together. The calling worker counts as busy
        from here until it reports back through `_done`."""
        with self._cond:
            jobs = self._pick()
            if jobs:
                self._running.append(jobs)
            return jobs

    def _pick(self) -> list[_Job]:
        """Under the lock: waits for work this worker may take; [] once the pool closes."""
        while True:
            while not (self._closed or self._finals or self._early_finals or self._partials_allowed()
                       or self._files_allowed()):
                # `live` changes without a notify: a waiting file piece looks again now and then.
                self._cond.wait(0.5 if self._files else None)
            if self._finals:
                job = self._finals.popleft()
                return self._take_finals(job, list(self._finals), self._finals.popleft)
            if self._early_finals:
                job = self._early_finals.popitem(last=False)[1]
                return self._take_finals(job, list(self._early_finals.values()),
                                         lambda: self._early_finals.popitem(last=False)[1])
            if self._partials_allowed():
                job = self._partials.popitem(last=False)[1]
                if policy.stale(job.first, time.monotonic() - job.queued):
                    self.shed_partials += 1
                    job.loop.call_soon_threadsafe(_resolve, job.future, None)
                    continue
                return [self._take(job, burst=False)]
            if self._files_allowed():
                return [self._files.popleft()]
            return []

    def _take_finals(self, job: _Job, behind: list[_Job], pop: Callable[[], _Job]) -> list[_Job]:
        """A final, and in a burst (as many waiting behind it as there are workers) those behind it
        in the same language, up to this worker's share of the burst, to decode in one batch."""
        if not policy.in_burst(len(behind), len(self._workers)):
            return [self._take(job, burst=False)]
        batch = [job]
        for other in behind[:policy.burst_share(len(behind), len(self._workers), self._busy) - 1]:
            if job.language is None or other.language != job.language:
                break
            batch.append(pop())
        return [self._take(j, burst=True) for j in batch]

    def _take(self, job: _Job, burst: bool) -> _Job:
        """Under the lock: sets how `job` is decoded, from what else runs or waits."""
        company = policy.has_company(job.final, self._busy, len(self._finals), len(self._early_finals),
                                     len(self._partials))
        job.greedy, job.busy_window = policy.mode(job.final, burst, company)
        return job

    def _partials_allowed(self) -> bool:
        return bool(self._partials) and policy.partial_may_start(self._busy, len(self._workers))

    def _files_allowed(self) -> bool:
        """After every live request, and while streams are open, never on the last idle thread."""
        if not self._files or self._partials_allowed():
            return False
        return policy.file_may_start(self._busy, len(self._workers), self.live())

    def _run(self) -> None:
        while taken := self._next():
            jobs = [job for job in taken if not job.abandoned]  # nobody awaits them: no decode
            started = time.monotonic()
            # Each as soon as it is ready, not when the whole batch is.
            for delivered, (job, outcome) in enumerate(self._outcomes(jobs), 1):
                if delivered == len(jobs):
                    # Idle before the last result is seen, so that a decode asked for on seeing it finds
                    # this worker free (and, alone, gets beam search).
                    self._done(time.monotonic() - started, taken)
                self._deliver(job, outcome, batched=len(jobs) > 1)
            if not jobs:
                self._done(0.0, taken)

    def _outcomes(self, jobs: list[_Job]) -> Iterator[tuple[_Job, Transcript | None | BaseException]]:
        """One outcome per job."""
        waiting = list(jobs)
        try:
            for job, result in self._decode(jobs):
                waiting.remove(job)
                yield job, result
        except Exception as e:  # a broken decode fails its requests, never the pool
            for job in waiting:
                yield job, e

    def _decode(self, jobs: list[_Job]) -> Iterator[tuple[_Job, Transcript | None]]:
        if len(jobs) == 1 and jobs[0].pieces is not None:
            job = jobs[0]
            yield job, self.engine.transcribe_pieces(job.pieces, job.language, job.befores)
        elif len(jobs) == 1:
            job = jobs[0]
            yield job, self.engine.transcribe(job.audio, job.language, job.final, greedy=job.greedy,
                                              busy_window=job.busy_window, before=job.before, whole=job.whole,
                                              stop=lambda: job.abandoned)
        elif jobs:
            for i, result in self.engine.transcribe_burst([job.audio for job in jobs], jobs[0].language,
                                                          [job.before for job in jobs]):
                yield jobs[i], result

    def _deliver(self, job: _Job, result: Transcript | None | BaseException, batched: bool) -> None:
        if isinstance(result, Abandoned):  # stopped part way, for a future already done: no decode to count
            return
        with self._cond:  # counted before the loop can see the result
            self.decodes += 1
            self.batched_decodes += batched
            self.busy_window_decodes += job.busy_window
            self.greedy_decodes += job.greedy
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, result)
        except RuntimeError:  # that loop is closed: nobody is waiting
            pass

    def _done(self, seconds: float, taken: list[_Job]) -> None:
        """A worker is through with what `_next` gave it."""
        with self._cond:
            self._running = [jobs for jobs in self._running if jobs is not taken]
            self.busy_seconds += seconds
            self._cond.notify()  # a partial held back for a free worker may start now


def _resolve(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
