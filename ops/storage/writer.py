"""The writer thread: all of storage's disk work, one job at a time in the order it was asked for,
off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Callable

log = logging.getLogger("storage")


class Writer:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage")

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Runs on the writer thread, after everything submitted before it; failures are logged."""
        def run() -> Any:
            try:
                return fn(*args)
            except Exception:
                log.exception("storage: %s failed", getattr(fn, "__name__", fn))
                raise
        return self._pool.submit(run)

    def submit_quiet(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """As submit, for a caller that reads the failure itself (the probe: a full disk is no bug)."""
        return self._pool.submit(fn, *args)

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """From the writer thread, onto the event loop."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is gone: so is the server
