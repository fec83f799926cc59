"""A job for a token with no push in flight is written claimed by the dict commit itself."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_notifier import Relay, wait_until

from chatmaild.outcomelog import SENT, PushRecord, counts_since, record_many
from devstack.pushsink import PushSink


@pytest.fixture
def sink() -> Iterator[PushSink]:
    s = PushSink()
    yield s
    s.close()


@pytest.fixture
def relay(tmp_path: Path, sink: PushSink) -> Iterator[Relay]:
    """A started relay whose one user has the token ``phone``; the sink answers slowly."""
    sink.delay = 0.3
    r = Relay(tmp_path, sink.url)
    r.notifier.start()
    r.add_token("phone")
    yield r
    r.close()


def _attempts(relay: Relay) -> list[int]:
    return [a for (a,) in relay.conn.execute("SELECT attempts FROM jobs ORDER BY id")]


def test_first_attempt_is_on_disk_with_the_commit_and_needs_no_claim(
    relay: Relay, sink: PushSink
) -> None:
    assert relay.new_mail().startswith(b"O")
    # Right after the C reply: the attempt is counted, before any request is sent.
    assert _attempts(relay) == [1]
    sink.wait_for(1)
    wait_until(lambda: relay.jobs() == 0)
    commits = relay.notifier._commits
    assert commits is not None
    assert commits.ops == 1  # the finish; no claim was written


def test_second_delivery_in_flight_waits_fresh_and_coalesces(relay: Relay, sink: PushSink) -> None:
    relay.new_mail()
    relay.new_mail()  # the first push is in flight (or about to be): a fresh job
    relay.new_mail()  # absorbed by that fresh job
    assert sorted(_attempts(relay)) == [0, 1]
    sink.wait_for(2)
    wait_until(lambda: relay.jobs() == 0)
    time.sleep(0.1)
    assert sink.bodies() == [b"phone", b"phone"]


def test_without_workers_jobs_stay_fresh(tmp_path: Path, sink: PushSink) -> None:
    relay = Relay(tmp_path, sink.url)  # not started: nobody would send a claimed job
    try:
        relay.add_token("phone")
        relay.new_mail()
        relay.new_mail()
        assert _attempts(relay) == [0]
    finally:
        relay.close()


def test_outcomes_of_a_batch_are_one_bucket_pruned_once_a_minute() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE push_outcomes (minute INTEGER, outcome TEXT, answer TEXT, count INTEGER,"
        " last_at REAL, PRIMARY KEY (minute, outcome, answer))"
    )
    now = 1_000_000.0
    conn.execute("INSERT INTO push_outcomes VALUES (1, 'sent', '200', 7, 60.0)")  # old bucket
    cutoff = record_many(conn, [PushRecord(SENT, "200", now + i) for i in range(3)])
    assert cutoff is not None
    assert counts_since(conn, now - 60) == {
        SENT: {"200": 3},
        "gone": {},
        "retried": {},
        "dropped": {},
    }
    assert conn.execute("SELECT count(*) FROM push_outcomes WHERE minute = 1").fetchone() == (0,)
    conn.execute("INSERT INTO push_outcomes VALUES (2, 'sent', '200', 1, 120.0)")
    # The same minute again: the cutoff has not moved, so nothing is deleted this time.
    assert record_many(conn, [PushRecord(SENT, "200", now + 5)], cutoff) == cutoff
    assert conn.execute("SELECT count(*) FROM push_outcomes WHERE minute = 2").fetchone() == (1,)
    assert conn.execute(
        "SELECT count, last_at FROM push_outcomes WHERE minute = ?", (int(now // 60),)
    ).fetchone() == (4, now + 5)
