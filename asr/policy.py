"""How the decode pool spends its workers under load. As the load grows, work gives way in this order:

- a partial with company (another decode running or waiting) attends over the busy window;
- partials never take the last idle worker: it stays free for the next final or early final;
- a partial that waited past STALE_PARTIAL_S is dropped, unless it is its utterance's first;
- (streams ask for no partials or early finals while finals wait: asr/stream.py;)
- a final with other finals or early finals waiting for a worker is decoded greedily instead of with
  beam search (finals running on other workers and partials are no company for it);
- a final or early final with as many of its kind waiting behind it as there are workers is in a
  burst: its worker takes its share of the burst and decodes them in one batch, greedily over the
  busy window (a piece after a hesitation still as the continuation of the words before it).

Pure functions of the queues' state, so that each rule can be read and tested without threads or a
model; asr/worker.py holds the queues and the workers, and asks these.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# A partial that waited this long describes speech the speaker has moved past: drop it, unless it is
# its utterance's first, the only text the speaker would see before the final.
STALE_PARTIAL_S = 1.0
# The most finals of a burst decoded together. A larger batch decodes a burst sooner in all, but each
# of its finals waits for the whole batch's decode, and its buffers raise the peak memory.
MAX_BATCH = 4


class Mode(NamedTuple):
    """How the engine decodes one job."""

    greedy: bool  # greedy search for a final instead of beam search (partials always are greedy)
    busy_window: bool  # attend over the busy window (--busy-decode-window-s) instead of the full one


def mode(final: bool, burst: bool, company: bool) -> Mode:
    """A final with company is greedy; one in a burst also takes the busy window; a partial takes it
    whenever it has company. Beam search over the full window is the most accurate and the dearest."""
    return Mode(greedy=final and (burst or company), busy_window=burst or (company and not final))


def has_company(final: bool, busy: int, finals: int, early_finals: int, partials: int) -> bool:
    """For a final: other finals or early finals wait (`finals`, `early_finals`). For a partial: another
    decode runs (`busy` workers) or waits.

    A final's beam search delays only the decodes that wait for its worker: one running on another worker
    runs on as it would, and partials give way to finals (they never take the last idle worker, and are
    shed once stale). Counted, a final running on the other worker, with nothing waiting, was what made most
    greedy finals at 16 streams greedy, and greedy search garbles the short and quiet pieces that hesitant
    speech is cut into (docs/accuracy.md).
    """
    if final:
        return bool(finals or early_finals)
    return bool(busy or finals or early_finals or partials)


def finals_busy(running: int, finals: int, early_finals: int) -> bool:
    """A final or early final runs (`running`, not counting those nobody awaits any more) or waits: no
    capacity to spare for an early final timed by the voice alone (asr/stream.py)."""
    return bool(running or finals or early_finals)


def in_burst(behind: int, workers: int) -> bool:
    """A final (or early final) with as many of its kind waiting behind it as there are workers."""
    return behind >= workers


def burst_share(behind: int, workers: int, busy: int) -> int:
    """How many finals of a burst one worker takes, the one at the head included: its share of the
    burst among the idle workers (`workers - busy`, itself included), at most MAX_BATCH."""
    return min(math.ceil((behind + 1) / max(1, workers - busy)), MAX_BATCH)


def partial_may_start(busy: int, workers: int) -> bool:
    """Partials never take the last idle worker, so that a final or early final never waits behind a
    partial that started just before it. With one worker there is nothing to keep free."""
    return busy < max(1, workers - 1)


def file_may_start(busy: int, workers: int, live: bool) -> bool:
    """A file's pieces wait for every live request; while live streams are open they never take the last
    idle worker either, so that a live final never waits behind a file's decode."""
    return busy < (max(1, workers - 1) if live else workers)


def stale(first: bool, waited_s: float) -> bool:
    """A partial to shed rather than decode (see STALE_PARTIAL_S)."""
    return not first and waited_s > STALE_PARTIAL_S
