"""Work handed to a thread, and when to use which.

- `asyncio.to_thread`: a short blocking call awaited on the event loop (a queue put, a thread join).
  It runs on the loop's default executor, whose threads the process waits for when it stops.
- `on_daemon_thread` (here): work the process must not wait for when it stops (a model load may be a
  long download), or that changes its own thread (its niceness, which the threads it starts inherit).
- A `threading.Thread` of its own: a long-lived loop over a queue (the decode workers, the WebM demuxer).
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable


def on_daemon_thread(function: Callable[..., Any], *args: Any, name: str) -> concurrent.futures.Future:
    """Runs `function(*args)` on a new daemon thread; the future settles with its result or exception.

    Block on it with `.result()`, or await `asyncio.wrap_future(...)`: the loop gets the outcome, and a
    loop closed meanwhile is no error.
    """
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return  # cancelled before it started: nobody wants it
        try:
            future.set_result(function(*args))
        except BaseException as e:  # noqa: BLE001 - raised again where the future is read
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
