"""The decode pool's load policy, as pure rules: no threads, no model (asr/policy.py)."""

from __future__ import annotations

from asr import policy
from asr.policy import Mode


def test_beam_search_over_the_full_window_goes_to_decodes_alone():
    assert policy.mode(final=True, burst=False, company=False) == Mode(greedy=False, busy_window=False)
    assert policy.mode(final=True, burst=False, company=True) == Mode(greedy=True, busy_window=False)
    assert policy.mode(final=True, burst=True, company=True) == Mode(greedy=True, busy_window=True)
    assert policy.mode(final=False, burst=False, company=False) == Mode(greedy=False, busy_window=False)
    assert policy.mode(final=False, burst=False, company=True) == Mode(greedy=False, busy_window=True)


def test_only_finals_waiting_are_company_for_a_final():
    def company(final=True, busy=0, finals=0, early_finals=0, partials=0):
        return policy.has_company(final, busy, finals, early_finals, partials)

    assert not company()
    assert not company(busy=2)  # partials or other finals running: this final delays none of them
    assert not company(partials=3)  # partials waiting give way to finals
    assert company(finals=1) and company(early_finals=1)
    # A partial has company in any other decode.
    assert company(final=False, busy=1) and company(final=False, partials=1)
    assert company(final=False, finals=1)


def test_an_early_final_by_the_voice_alone_waits_for_finals_running_or_waiting():
    assert not policy.finals_busy(running=0, finals=0, early_finals=0)
    assert policy.finals_busy(running=1, finals=0, early_finals=0)
    assert policy.finals_busy(running=0, finals=1, early_finals=0)
    assert policy.finals_busy(running=0, finals=0, early_finals=1)


def test_a_burst_is_shared_among_the_idle_workers():
    assert not policy.in_burst(behind=1, workers=2) and policy.in_burst(behind=2, workers=2)
    # 5 finals waiting, 2 idle workers: the first takes 3 of them (test_asr checks the pool does).
    assert policy.burst_share(behind=4, workers=2, busy=0) == 3
    assert policy.burst_share(behind=4, workers=2, busy=1) == policy.MAX_BATCH
    assert policy.burst_share(behind=40, workers=8, busy=0) == policy.MAX_BATCH


def test_partials_leave_the_last_idle_worker_free():
    assert policy.partial_may_start(busy=0, workers=1)
    assert not policy.partial_may_start(busy=1, workers=1)
    assert policy.partial_may_start(busy=0, workers=2) and not policy.partial_may_start(busy=1, workers=2)
    assert policy.partial_may_start(busy=2, workers=4) and not policy.partial_may_start(busy=3, workers=4)


def test_a_partial_is_shed_once_stale_unless_it_is_its_utterances_first():
    waited = policy.STALE_PARTIAL_S + 0.1
    assert policy.stale(first=False, waited_s=waited)
    assert not policy.stale(first=True, waited_s=waited)
    assert not policy.stale(first=False, waited_s=policy.STALE_PARTIAL_S / 2)
