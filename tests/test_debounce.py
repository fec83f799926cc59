"""The debouncer: leading + trailing edge, bounded memory, nothing lost (fake clock)."""

from __future__ import annotations

import math
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from notifiers.debounce import Debouncer

W = 10.0


def test_leading_send_then_one_trailing_send_at_window_end():
    d = Debouncer(W)
    assert d.hit("a", 0.0) is True
    assert d.next_due() is None  # nothing owed yet
    assert d.hit("a", 1.0) is False
    assert d.hit("a", 2.0) is False
    assert d.hit("a", 9.9) is False
    assert d.next_due() == W
    assert d.due(9.99) == []
    assert d.due(W) == ["a"]  # exactly one trailing send for three suppressed hits
    assert d.next_due() is None
    assert d.due(100.0) == []


def test_trailing_send_opens_a_new_window():
    d = Debouncer(W)
    assert d.hit("a", 0.0)
    assert not d.hit("a", 5.0)
    assert d.due(10.0) == ["a"]
    assert not d.hit("a", 12.0)  # inside the window opened by the trailing send
    assert d.next_due() == 20.0
    assert d.due(20.0) == ["a"]
    assert d.hit("a", 30.0)  # window over, nothing owed: leading send again


def test_late_due_call_starts_the_window_when_handed_out():
    d = Debouncer(W)
    assert d.hit("a", 0.0)
    assert not d.hit("a", 1.0)
    assert not d.hit("a", 15.0)  # overdue trailing send still covers this hit
    assert d.due(15.0) == ["a"]
    assert not d.hit("a", 24.0)  # 9 s after the actual send
    assert d.due(25.0) == ["a"]


def test_suppressed_hits_do_not_extend_the_window():
    d = Debouncer(W)
    assert d.hit("a", 0.0)
    for t in range(1, 10):
        assert not d.hit("a", float(t))
    assert d.next_due() == W  # not 9 + W


def test_single_hit_needs_no_trailing_send_and_tokens_are_independent():
    d = Debouncer(W)
    assert d.hit("a", 0.0)
    assert d.hit("b", 0.5)
    assert d.due(50.0) == []
    assert d.hit("a", 50.0)
    assert d.hit("b", 50.0)
    assert len(d) == 2


def test_old_generations_are_dropped():
    d = Debouncer(W)
    for i in range(100):
        assert d.hit(f"t{i}", 0.0)
    assert len(d) == 100
    d.due(10.0)
    d.due(20.0)
    d.due(30.0)
    assert len(d) == 0


def test_cap_is_respected_and_evicted_pending_entries_are_not_lost():
    d = Debouncer(W, max_entries=10)
    assert d.hit("p", 0.0)
    assert not d.hit("p", 0.1)  # owes a trailing send
    for i in range(50):
        assert d.hit(f"t{i}", 0.2 + i * 0.01)
        assert len(d) <= 10
    assert d.next_due() == -math.inf  # "p" was evicted while owing a send: due at once
    assert d.due(1.0) == ["p"]
    assert len(d) <= 10
    assert d.due(W) == []  # and only once


def test_evicted_pending_entry_hit_again_is_not_sent_twice():
    d = Debouncer(W, max_entries=1)
    assert d.hit("p", 0.0)
    assert not d.hit("p", 0.1)
    assert d.hit("x", 0.2)  # evicts "p", which owes a send -> handed out by due()
    assert not d.hit("p", 0.4)  # covered by the ready send
    sent = d.due(0.5)
    assert sent == ["p"]
    assert d.due(W + 1) == []


def test_plaintext_is_kept_only_for_owed_sends():
    d = Debouncer(W)
    d.hit("secret-token", 0.0)
    assert not any(isinstance(k, str) for k in d._cur)  # digests only
    d.hit("secret-token", 1.0)
    assert d.pending_count == 1


# A hit sequence: per step, a time advance and a token index.
steps = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=15.0), st.integers(min_value=0, max_value=4)),
    max_size=60,
)


def _simulate(seq, max_entries):
    """Drive the debouncer like the service does: due() at each next_due and after each hit."""
    d = Debouncer(W, max_entries=max_entries)
    sends: dict[str, list[float]] = defaultdict(list)
    hits: dict[str, list[float]] = defaultdict(list)
    clock = 0.0

    def run_due_until(t: float) -> None:
        nonlocal clock
        while (nd := d.next_due()) is not None and nd <= t:
            clock = max(nd, clock)  # -inf means "already due": now
            for tok in d.due(clock):
                sends[tok].append(clock)

    for advance, idx in seq:
        target = clock + advance
        run_due_until(target)
        clock = target
        token = f"tok{idx}"
        hits[token].append(clock)
        if d.hit(token, clock):
            sends[token].append(clock)
        run_due_until(clock)
    run_due_until(clock + 10 * W)
    return hits, sends


@settings(max_examples=300, deadline=None)
@given(steps)
def test_property_no_double_send_within_a_window_and_every_hit_covered(seq):
    hits, sends = _simulate(seq, max_entries=1000)
    for token, times in sends.items():
        for a, b in zip(times, times[1:], strict=False):
            assert b - a >= W - 1e-9, (token, times)
    for token, times in hits.items():
        for t in times:
            assert any(t <= s <= t + W + 1e-9 for s in sends[token]), (token, t, sends[token])


@settings(max_examples=200, deadline=None)
@given(steps, st.integers(min_value=1, max_value=4))
def test_property_nothing_lost_under_a_tiny_cap(seq, cap):
    hits, sends = _simulate(seq, max_entries=cap)
    for token, times in hits.items():
        for t in times:
            assert any(t <= s <= t + W + 1e-9 for s in sends[token]), (token, t, sends[token])
