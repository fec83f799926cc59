"""The notifier against a real HTTP endpoint on 127.0.0.1: contract, retries, coalescing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatmail_common.outcome import Outcome
from chatmaild import dictproto as dp
from chatmaild import threadpolicy
from chatmaild.config import read_config
from chatmaild.database import connect
from chatmaild.jobqueue import RetryPolicy
from chatmaild.jobstore import JobStore
from chatmaild.metadata import MetadataDict
from chatmaild.notifier import Notifier
from chatmaild.pushtransport import HttpPushTransport, PushAnswer
from chatmaild.serverkeys import ServerKeys
from chatmaild.store import MetadataStore
from devstack.loopback import free_port
from devstack.pushsink import PushSink

GUID = b"0db9f01b8afe096b1c28000083ecc375"
USER = "alice@example.org"

FAST = RetryPolicy(delays=(0.05, 0.05, 0.05, 0.05), max_attempts=5, deadline=60.0)


class Relay:
    """Dict backend plus notifier on one database, driven with real dict events."""

    def __init__(self, tmp: Path, url: str, policy: RetryPolicy = FAST, workers: int = 4):
        ini = tmp / "chatmail.ini"
        ini.write_text(f"[params]\nmail_domain = example.org\nmailboxes_dir = {tmp}\n")
        self.db_path = tmp / "db.sqlite3"
        self.conn = connect(self.db_path)
        self.store = MetadataStore(self.conn)
        self.notifier = Notifier(
            lambda: JobStore.open(self.db_path),
            # Far beyond any answer a test holds back (sink.hold_answers): a held push is in
            # flight, not timed out and retried, however slow the machine.
            lambda: HttpPushTransport(url, timeout=60.0),
            workers,
            policy,
        )
        self.backend = MetadataDict(
            self.store, ServerKeys(read_config(ini)), hook=self.notifier, delivery_dict="lmtp"
        )
        self.txid = 0

    def commit(self, *ops: dp.Op, dict_name: str = "lmtp", user: str = USER) -> bytes:
        self.txid += 1
        ev = dp.Commit(str(self.txid), user, ops, dict_name)
        return dp.encode_reply(ev, self.backend.commit(ev))

    def add_token(self, token: str, user: str = USER) -> None:
        assert self.commit(
            dp.SetOp(b"priv/" + GUID + b"/devicetoken", token.encode()),
            dict_name="metadata",
            user=user,
        ).startswith(b"O")

    def new_mail(self, user: str = USER) -> bytes:
        return self.commit(dp.SetOp(b"priv/" + GUID + b"/messagenew", b""), user=user)

    def tokens(self, user: str = USER) -> list[str]:
        return self.store.valid_tokens(user, int(time.time()))

    def jobs(self) -> int:
        return JobStore(self.conn).count()

    def close(self) -> None:
        self.notifier.stop()
        self.conn.close()


@pytest.fixture
def relay(tmp_path: Path, sink: PushSink) -> Iterator[Relay]:
    r = Relay(tmp_path, sink.url)
    r.notifier.start()
    yield r
    sink.release_answers()  # a test that failed holding them: the workers stop at once
    r.close()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def test_retry_policy_schedule_matches_upstream() -> None:
    p = RetryPolicy()
    with pytest.raises(ValueError, match="at least one delay"):
        RetryPolicy(delays=())
    assert [p.next_due(k, 1e9, 0.0) for k in range(1, 5)] == [8.0, 64.0, 512.0, 4096.0]
    assert p.next_due(5, 1e9, 0.0) is None
    assert p.next_due(1, deadline=5.0, now=0.0) == 5.0  # past the deadline: at the deadline
    assert p.next_due(1, deadline=5.0, now=5.0) is None  # the deadline has come


def test_last_attempt_is_at_the_deadline() -> None:
    """delays 1 2 4, deadline 3 s, each attempt taking 10 ms: attempts at 0, about +1 and at
    +3 (the deadline), then dropped; not dropped at +1 because +1 +2 lands past +3."""
    p = RetryPolicy(delays=(1.0, 2.0, 4.0), max_attempts=5, deadline=3.0)
    due: float | None = 0.0
    attempts, times = 0, []
    while due is not None:
        times.append(due)
        attempts += 1
        due = p.next_due(attempts, 3.0, due + 0.01)
    assert times == [0.0, 1.01, 3.0]
    assert p.next_due(1, 3.0, 2.9) == 3.0  # due past the deadline: at it instead
    assert p.next_due(1, 3.0, 3.5) is None  # the deadline has passed
    assert RetryPolicy((1.0,), max_attempts=2, deadline=3.0).next_due(2, 3.0, 0.5) is None
    assert not p.expired(3.0, 3.0 + p.LATE_CLAIM_SECONDS)  # its last attempt, claimed late
    assert p.expired(3.0, 3.1 + p.LATE_CLAIM_SECONDS)


def test_each_token_posted_raw(relay: Relay, sink: PushSink) -> None:
    relay.add_token("tok-a")
    relay.add_token("tok-b")
    assert relay.new_mail() == f"O{relay.txid}\n".encode()
    sink.wait_for(2)
    assert sorted(sink.bodies()) == [b"tok-a", b"tok-b"]
    req = sink.requests[0]
    assert req.path == "/notify"
    assert "content-type" not in {k.lower() for k in req.headers}
    wait_until(lambda: relay.jobs() == 0)
    assert relay.notifier.metrics.sent._value.get() == 2


def test_job_is_on_disk_before_commit_reply(tmp_path: Path) -> None:
    r = Relay(tmp_path, f"http://127.0.0.1:{free_port()}/notify")  # workers not started
    try:
        r.add_token("tok-a")
        assert r.new_mail().startswith(b"O")
        other = connect(r.db_path)
        assert JobStore(other).count() == 1
        other.close()
    finally:
        r.conn.close()


def test_no_tokens_no_job(relay: Relay, sink: PushSink) -> None:
    assert relay.new_mail().startswith(b"O")
    assert relay.jobs() == 0
    time.sleep(0.1)
    assert sink.requests == []


def test_410_removes_exactly_that_token(relay: Relay, sink: PushSink) -> None:
    relay.add_token("dead")
    relay.add_token("alive")
    relay.add_token("dead", user="bob@example.org")
    sink.scripts["dead"] = [410]
    relay.new_mail()
    sink.wait_for(2)
    wait_until(lambda: relay.jobs() == 0)
    assert relay.tokens() == ["alive"]
    assert relay.tokens("bob@example.org") == ["dead"]
    assert relay.notifier.metrics.tokens_removed._value.get() == 1


def test_500_is_retried_until_200(relay: Relay, sink: PushSink) -> None:
    relay.add_token("flaky")
    sink.scripts["flaky"] = [500, 502, 200]
    relay.new_mail()
    sink.wait_for(3)
    wait_until(lambda: relay.jobs() == 0)
    assert [r.status for r in sink.requests] == [500, 502, 200]
    assert relay.notifier.metrics.retried._value.get() == 2
    assert relay.tokens() == ["flaky"]


def test_closed_port_is_retried_then_succeeds(tmp_path: Path, sink: PushSink) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/notify"
    # Attempts enough for the deadline: five 0.2 s apart were spent before a loaded machine
    # got the test thread round to opening the port (the job dropped, never sent).
    policy = RetryPolicy(delays=(0.2,), max_attempts=300, deadline=60.0)
    r = Relay(tmp_path, url, policy)
    r.notifier.start()
    try:
        r.add_token("tok")
        r.new_mail()
        wait_until(lambda: r.notifier.metrics.retried._value.get() >= 1)
        # The proxy comes up on the same port: the next retry gets through.
        late = PushSink(port=port)
        try:
            wait_until(lambda: r.jobs() == 0)
            assert r.notifier.metrics.sent._value.get() == 1
            assert late.bodies() == [b"tok"]
        finally:
            late.close()
    finally:
        r.close()


def test_dropped_after_max_attempts(relay: Relay, sink: PushSink) -> None:
    relay.add_token("never")
    sink.scripts["never"] = [500] * 10
    relay.new_mail()
    sink.wait_for(5)
    wait_until(lambda: relay.jobs() == 0)
    time.sleep(0.2)
    assert len(sink.requests) == 5
    assert relay.notifier.metrics.dropped._value.get() == 1


def test_dropped_after_deadline(tmp_path: Path, sink: PushSink) -> None:
    # Seconds, not tenths: with a 0.5 s deadline a loaded machine's first attempt (thread
    # start, connect, POST) could end past it, and the job was dropped after one.
    policy = RetryPolicy(delays=(1.2,) * 4, max_attempts=5, deadline=2.0)
    r = Relay(tmp_path, sink.url, policy)
    r.notifier.start()
    try:
        r.add_token("slowdeath")
        sink.scripts["slowdeath"] = [500] * 10
        r.new_mail()
        wait_until(lambda: r.jobs() == 0)
        # t=0, about t=1.2, and t=2: the next (about t=2.4) would land past the deadline,
        # so the last attempt is at it; dropped long before the 5 attempts the policy allows
        # (2 when the machine is so slow that the second attempt ends past the deadline).
        assert 2 <= len(sink.requests) <= 3
        assert r.notifier.metrics.dropped._value.get() == 1
    finally:
        r.close()


def test_coalescing_while_endpoint_is_slow(relay: Relay, sink: PushSink) -> None:
    relay.add_token("busy")
    sink.hold_answers()  # the endpoint is slow: every push stays in flight until all mail is in
    for _ in range(200):
        assert relay.new_mail().startswith(b"O")
    sink.release_answers()
    sink.wait_for(1)
    wait_until(lambda: relay.jobs() == 0)
    # The first job may be in flight when later mails arrive: at most one more is queued.
    assert 1 <= len(sink.requests) <= 2
    assert relay.notifier.metrics.coalesced._value.get() >= 198


def test_in_flight_job_does_not_absorb_new_mail(relay: Relay, sink: PushSink) -> None:
    relay.add_token("phone")
    sink.hold_answers()
    relay.new_mail()
    wait_until(lambda: _attempted(relay))
    relay.new_mail()  # the first one is in flight now (its answer held)
    sink.release_answers()
    sink.wait_for(2)
    assert sink.bodies() == [b"phone", b"phone"]


def _attempted(relay: Relay) -> bool:
    row = relay.conn.execute("SELECT max(attempts) FROM jobs").fetchone()
    return bool(row and row[0])


def test_messagenew_from_imap_dict_is_refused(relay: Relay, sink: PushSink) -> None:
    relay.add_token("tok")
    reply = relay.commit(dp.SetOp(b"priv/" + GUID + b"/messagenew", b""), dict_name="metadata")
    assert reply.startswith(b"F")
    assert relay.jobs() == 0
    time.sleep(0.1)
    assert sink.requests == []


def test_rolled_back_commit_queues_nothing(relay: Relay, sink: PushSink) -> None:
    relay.add_token("tok")
    reply = relay.commit(
        dp.SetOp(b"priv/" + GUID + b"/messagenew", b""),
        dp.SetOp(
            b"shared/" + GUID + b"/vendor/vendor.dovecot/pvt/server/vendor/deltachat/turn", b"x"
        ),
    )
    assert reply.startswith(b"F")
    assert relay.jobs() == 0
    assert relay.notifier._staged == []
    relay.new_mail()
    sink.wait_for(1)
    time.sleep(0.1)
    assert len(sink.requests) == 1


class ReRegisteredDuringPush:
    """Answers GONE to the first push, after the device registered the same token again
    and new mail arrived while that push was out (the interleaving the removal races)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pushes: list[str] = []

    def push(self, token: str) -> PushAnswer:
        self.pushes.append(token)
        if len(self.pushes) > 1:
            return PushAnswer(Outcome.SENT, "200")
        self.relay.add_token(token)
        assert self.relay.new_mail().startswith(b"O")
        return PushAnswer(Outcome.GONE, "410")

    def close(self) -> None:
        pass


def test_gone_keeps_a_token_registered_again_during_the_push(tmp_path: Path) -> None:
    relay = Relay(tmp_path, "http://127.0.0.1:9/notify")
    transport = ReRegisteredDuringPush(relay)
    relay.notifier = Notifier(lambda: JobStore.open(relay.db_path), lambda: transport, 2, FAST)
    relay.backend.hook = relay.notifier
    relay.notifier.start()
    try:
        relay.add_token("tok")
        relay.new_mail()
        wait_until(lambda: relay.jobs() == 0)
        assert relay.tokens() == ["tok"]  # the fresh registration survived the GONE
        assert transport.pushes == ["tok", "tok"]  # and so did the mail that came with it
        assert relay.notifier.metrics.tokens_removed._value.get() == 0
    finally:
        relay.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="a Linux scheduling policy")
def test_workers_and_committer_never_preempt_the_dict_loop(relay: Relay) -> None:
    """Woken, they would take the loop thread's core only to wait for its GIL."""
    background = [t for t in threading.enumerate() if t.name.startswith("notifier-")]
    assert len(background) == 4 + 1  # the workers and the job committer
    batch = os.SCHED_BATCH

    def policies() -> set[int]:
        return {os.sched_getscheduler(t.native_id) for t in background}

    wait_until(lambda: policies() == {batch})
    assert os.sched_getscheduler(0) != batch  # the loop's thread (here the test's) as it was


def _policy_in_a_thread(monkeypatch: pytest.MonkeyPatch, filtered: bool, allowed: str | None):
    monkeypatch.setattr(threadpolicy, "seccomp_filtered", lambda: filtered)
    if allowed is None:
        monkeypatch.delenv(threadpolicy.ALLOWED_ENV, raising=False)
    else:
        monkeypatch.setenv(threadpolicy.ALLOWED_ENV, allowed)
    seen: list[int] = []

    def run() -> None:
        threadpolicy.no_wakeup_preemption()
        seen.append(os.sched_getscheduler(0))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return seen[0]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="a Linux scheduling policy")
def test_under_a_seccomp_filter_the_policy_is_set_only_where_the_unit_allows_it(monkeypatch):
    """A refused sched_setscheduler can kill the process (systemd's default action)."""
    assert _policy_in_a_thread(monkeypatch, filtered=True, allowed=None) != os.SCHED_BATCH
    assert _policy_in_a_thread(monkeypatch, filtered=True, allowed="1") == os.SCHED_BATCH
    assert _policy_in_a_thread(monkeypatch, filtered=False, allowed=None) == os.SCHED_BATCH


def test_the_shipped_unit_allows_the_call_it_says_it_allows() -> None:
    unit = (Path(__file__).parent.parent / "systemd" / "chatmail-metadata.service").read_text()
    lines = unit.splitlines()
    assert "SystemCallFilter=sched_setscheduler" in lines
    assert lines.index("SystemCallFilter=sched_setscheduler") > lines.index(
        "SystemCallFilter=~@privileged @resources"
    )  # an allow after the deny: it is let through again
    assert f"Environment={threadpolicy.ALLOWED_ENV}=1" in lines
