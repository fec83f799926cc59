"""New mail wakes the phone, end to end: IMAP token -> LMTP delivery -> Dovecot -> dict -> POST.

Real Dovecot, real IMAP and LMTP clients, the real chatmail-metadata process and a
real HTTP endpoint on 127.0.0.1 that records what the notifier posts.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from devstack.loopback import free_port
from devstack.pushsink import PushSink

ALICE = "alice@example.org"
BOB = "bob@example.org"
SENDER = "carol@example.net"

# Short retry schedule so the retry paths finish within a test.
FAST_RETRIES = {
    "notify_retry_delays": "0.2 0.2 0.2 0.2",
    "notify_max_attempts": "5",
    "notify_deadline": "60",
    "notify_timeout": "5",
}


def point_relay_at(relay, url: str, **extra: str) -> None:
    """Restart chatmail-metadata (same database) posting to ``url``."""
    relay.metadata.restart(metadata={"notify_url": url, **FAST_RETRIES, **extra})


def set_token(relay, token: str, user: str = ALICE) -> None:
    imap = relay.imap(user)
    typ, _ = imap.setmetadata("INBOX", {"/private/devicetoken": token})
    assert typ == "OK"


def get_tokens(relay, user: str = ALICE) -> bytes | None:
    typ, values = relay.imap(user).getmetadata("INBOX", "/private/devicetoken")
    assert typ == "OK"
    return values["/private/devicetoken"]


def deliver_ok(relay, sender: str = SENDER, rcpt: str = ALICE) -> None:
    code, text = relay.deliver(sender, rcpt)
    assert code == 250, text


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_two_tokens_both_posted(relay, sink):
    point_relay_at(relay, sink.url)
    set_token(relay, "token-one")
    set_token(relay, "token-two")
    deliver_ok(relay)
    sink.wait_for(2)
    assert sorted(sink.bodies()) == [b"token-one", b"token-two"]
    assert {r.path for r in sink.requests} == {"/notify"}


def test_mail_from_recipient_posts_nothing(relay, sink):
    point_relay_at(relay, sink.url)
    set_token(relay, "self-token")
    deliver_ok(relay, sender=ALICE, rcpt=ALICE)
    # A later mail from someone else does arrive, so the first one was really skipped.
    deliver_ok(relay)
    sink.wait_for(1)
    time.sleep(0.3)
    assert sink.bodies() == [b"self-token"]


def test_address_without_tokens(relay, sink):
    point_relay_at(relay, sink.url)
    deliver_ok(relay, rcpt=BOB)
    set_token(relay, "alice-token")
    deliver_ok(relay, rcpt=ALICE)
    sink.wait_for(1)
    time.sleep(0.3)
    assert sink.bodies() == [b"alice-token"]


def test_410_removes_exactly_that_token(relay, sink):
    point_relay_at(relay, sink.url)
    set_token(relay, "dead-token")
    set_token(relay, "live-token")
    set_token(relay, "dead-token", user=BOB)
    sink.scripts["dead-token"] = [410]
    deliver_ok(relay)
    sink.wait_for(2)
    wait_until(lambda: get_tokens(relay) == b"live-token", what="token removal")
    assert get_tokens(relay, BOB) == b"dead-token"


def test_500_is_retried_until_accepted(relay, sink):
    point_relay_at(relay, sink.url)
    set_token(relay, "flaky-token")
    sink.scripts["flaky-token"] = [500, 503]
    deliver_ok(relay)
    sink.wait_for(3)
    assert [r.status for r in sink.requests] == [500, 503, 200]
    assert get_tokens(relay) == b"flaky-token"


def test_closed_port_is_retried_until_the_proxy_is_up(relay):
    port = free_port()
    # Attempts enough for the deadline: the five of FAST_RETRIES, 0.2 s apart, could all be
    # spent before a loaded machine had read the log and opened the port (the job dropped).
    point_relay_at(relay, f"http://127.0.0.1:{port}/notify", notify_max_attempts="300")
    set_token(relay, "patient-token")
    offset = relay.metadata.log_size()
    deliver_ok(relay)
    relay.metadata.wait_for_log("retry 1", offset=offset)
    late = PushSink(port=port)
    try:
        late.wait_for(1)
        assert late.bodies() == [b"patient-token"]
    finally:
        late.close()


def test_job_past_its_attempts_is_dropped_and_counted(relay, sink):
    point_relay_at(relay, sink.url, notify_max_attempts="3")
    set_token(relay, "hopeless-token")
    sink.scripts["hopeless-token"] = [500] * 10
    offset = relay.metadata.log_size()
    deliver_ok(relay)
    relay.metadata.wait_for_log("dropped after 3 attempt(s)", offset=offset)
    time.sleep(0.5)
    assert len(sink.requests) == 3


def test_job_past_its_deadline_is_dropped(relay, sink):
    # Seven attempts by the schedule, but the 2 s deadline ends the job first: attempts
    # at about t=0, 0.5, 1, 1.5 and 2 (the last one at the deadline), fewer when a slow
    # machine stretches each attempt.  Whatever the load, the job is dropped by its
    # deadline, so it never reaches the seven attempts of the schedule.
    point_relay_at(relay, sink.url, notify_deadline="2", notify_retry_delays=" ".join(["0.5"] * 6))
    set_token(relay, "late-token")
    sink.scripts["late-token"] = [500] * 10
    offset = relay.metadata.log_size()
    deliver_ok(relay)
    relay.metadata.wait_for_log("dropped after", offset=offset)
    text = relay.metadata.log_since(offset)
    attempts = int(re.search(r"dropped after (\d+) attempt", text).group(1))
    assert attempts == len(sink.requests)
    assert 1 <= attempts <= 5


def test_many_deliveries_while_proxy_is_slow_are_coalesced(relay, sink):
    point_relay_at(relay, sink.url)
    set_token(relay, "popular-token")
    sink.delay = 1.0
    start = time.monotonic()
    for _ in range(200):
        deliver_ok(relay)
    elapsed = time.monotonic() - start
    sink.wait_for(1, timeout=20)
    time.sleep(2.5)  # let any queued job finish at the slow endpoint
    posts = Counter(sink.bodies())
    # One POST in flight absorbs nothing; everything delivered meanwhile waits in
    # one queued job.  200 deliveries take `elapsed` s, each POST takes 1 s.
    assert 1 <= posts[b"popular-token"] <= 2 + int(elapsed)
    # However long the deliveries took on this machine, far fewer pushes than mails
    # (a fixed "< 20" assumed the 200 deliveries finish within 18 s).
    assert posts[b"popular-token"] <= 200 // 4


def test_imap_client_setting_messagenew_triggers_nothing(relay, sink):
    point_relay_at(relay, sink.url)
    set_token(relay, "quiet-token")
    imap = relay.raw_imap()
    resp = imap.command('SETMETADATA INBOX (/private/messagenew "")')
    assert resp.status == "NO"
    time.sleep(0.5)
    assert sink.requests == []
