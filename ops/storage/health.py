"""Whether the data folder takes writes: every failed write says so, and a small probe write says
when it works again. While it fails, GET /ready answers 503 and stt_storage_errors_total counts."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from ops import metrics
from ops.storage.files import why, write_atomic
from ops.storage.writer import Writer

log = logging.getLogger("storage")

PROBE = ".probe"  # the small file written now and then to tell whether writes work
_PROBE_S = 30.0  # between two probe writes while writes work
_PROBE_FAILING_S = 2.0  # while they fail: GET /ready turns 200 soon after the disk recovers


def _probe_write(root: Path) -> None:
    """Writes and removes a small file: raises when the data folder takes no writes."""
    path = root / PROBE
    write_atomic(path, b"probe\n")
    path.unlink()


class StorageHealth:
    def __init__(self, root: Path, writer: Writer) -> None:
        self.root = root
        self.failing: str | None = None  # why writes fail (`No space left on device`), until a probe succeeds
        self._writer = writer
        self._failed_now = asyncio.Event()  # cuts the wait for the next probe short

    def state(self) -> dict[str, str]:
        """For GET /health and /ready: `storage` is ok, or failing and `storage_error` says why."""
        if self.failing is not None:
            return {"storage": "failing", "storage_error": self.failing}
        return {"storage": "ok"}

    def failed(self, op: str, reason: str) -> None:
        """Event loop: a write failed. GET /ready answers 503 until a probe write succeeds."""
        metrics.storage_error(op)
        if self.failing is None:
            log.error("storage: writing to %s failed (%s); GET /ready answers 503 until a write succeeds",
                      self.root, reason)
            self._failed_now.set()
        self.failing = reason

    async def probe(self, recovered: Callable[[], Awaitable[None]]) -> None:
        """A small write now and then, more often while writes fail: what tells that they work again.
        `recovered` runs once each time they do."""
        while True:
            try:
                await asyncio.wrap_future(self._writer.submit_quiet(_probe_write, self.root))
            except OSError as e:
                self.failed("probe", why(e))
            else:
                if self.failing is not None:
                    self.failing = None
                    log.info("storage: writing to %s works again", self.root)
                    await recovered()
            while True:  # until the next probe; a failure meanwhile makes it a failing one's, sooner
                self._failed_now.clear()
                try:
                    await asyncio.wait_for(self._failed_now.wait(), _PROBE_FAILING_S if self.failing else _PROBE_S)
                except asyncio.TimeoutError:
                    break
