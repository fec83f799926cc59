"""A stock Delta Chat core's push token, end to end: core -> Dovecot -> store -> delivery -> POST.

The client is the real core (libdeltachat 2.23.0 from the ``deltachat`` wheel, see
:mod:`devstack.deltachat_client`), configured against the dev-stack Dovecot on
127.0.0.1. It encrypts its push token to notifications.delta.chat's key and
uploads it itself (``SETMETADATA`` with a ``{924+}`` literal), so these tests pin
what the relay does with the tokens real phones send, which no hand-made token can.

Everything stays on loopback: the relay announces ``mail_domain = localhost`` as its
TURN host with credentials the core accepts, and each test checks from the core's
log that it resolved no other name.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devstack.deltachat_client import (
    LOOPBACK_MAIL_DOMAIN,
    LOOPBACK_NAMES,
    DeltaChatCore,
    load_capi,
    turn_helper_line,
)
from devstack.smtpsink import SmtpSink

try:
    load_capi()
    CORE_MISSING = None
except ImportError as exc:
    # CI installs the test extra, so there a missing core is a broken install, not a skip.
    if os.environ.get("CI"):
        raise
    CORE_MISSING = (
        f"deltachat (the Delta Chat core, test extra: pip install -e '.[test]') "
        f"cannot be imported: {exc}"
    )

pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.skipif(CORE_MISSING is not None, reason=CORE_MISSING or ""),
]

ALICE = "alice@example.org"
SENDER = "carol@example.net"
#: What the core makes of any token of up to 512 bytes (client-core.md §1.4): the
#: prefix, then base64 of 687 bytes (v6 PKESK to the notifications.delta.chat subkey,
#: SEIPD v2); the first 48 base64 characters encode the PKESK header and recipient.
CIPHERTEXT_LENGTH = 924
CIPHERTEXT_START = "openpgp:wV0GIQZErtwEO31W8g8V7/EP7v3PIdULmshEuE0Gx+29ifBR"
UPSTREAM_SKIP = "needs upstream forwarding (notifiers --upstream-url)"
TIMEOUT = 30.0


@dataclass
class Phone:
    """A configured, online core for alice with its push token stored by the relay."""

    core: DeltaChatCore
    account: int
    ciphertext: str


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    yield sink
    sink.close()


def loopback_relay(relay, metadata: dict[str, str], notifiers: dict[str, str] | None = None):
    """Restart chatmail-metadata so that a real core talking to it resolves only loopback names.

    The relay announces ``<mail_domain>:3478:<helper line>`` as TURN server, and the
    core resolves that host at once; with no parsable TURN value it would resolve its
    public fallback servers instead.
    """
    helper = relay.turn_helper(turn_helper_line())
    relay.metadata.restart(
        params={"mail_domain": LOOPBACK_MAIL_DOMAIN, "turn_socket_path": str(helper.path)},
        metadata=metadata,
        notifiers=notifiers or {},
    )


@pytest.fixture
def core(tmp_path) -> Iterator[DeltaChatCore]:
    """A core in ``tmp_path``; afterwards (all its events read) it must have resolved only
    loopback names. A one-off ``strace -f -e trace=connect,sendto`` of this file showed
    connects to 127.0.0.1 and Unix sockets only, and no DNS traffic."""
    with DeltaChatCore(base_dir=tmp_path) as c:
        yield c
    assert c.resolved_names <= LOOPBACK_NAMES, (
        f"the core resolved {sorted(c.resolved_names - LOOPBACK_NAMES)}: "
        "a DNS query could have left the machine"
    )


def bring_online(relay, core: DeltaChatCore, smtp_sink: SmtpSink) -> Phone:
    """Configure alice in ``core``, start it, and wait until the relay stored its token."""
    imap_port = relay.dovecot.imap_port
    account = core.add_account(ALICE, relay.users[ALICE], imap_port, smtp_sink.port)
    core.start_io(account)
    ciphertext = core.wait_for_stored_token(
        account, imap_port, ALICE, relay.users[ALICE], timeout=TIMEOUT
    )
    return Phone(core, account, ciphertext)


def stored_tokens(relay, user: str = ALICE) -> list[bytes]:
    typ, values = relay.imap(user).getmetadata("INBOX", "/private/devicetoken")
    assert typ == "OK"
    value = values["/private/devicetoken"]
    return value.split() if value else []


def deliver_ok(relay, rcpt: str = ALICE) -> None:
    code, text = relay.deliver(SENDER, rcpt)
    assert code == 250, text


def assert_client_format(ciphertext: str) -> None:
    """An ``openpgp:`` token exactly as core 1.151.4+ makes it, to notifications.delta.chat."""
    assert ciphertext.startswith(CIPHERTEXT_START), ciphertext[:60]
    assert len(ciphertext) == CIPHERTEXT_LENGTH
    packets = base64.b64decode(ciphertext.removeprefix("openpgp:"), validate=True)
    assert len(packets) == 687
    assert packets[0] == 0xC1  # new-format packet header, tag 1: PKESK


def test_core_token_is_stored_as_sent_and_posted_unchanged(relay, sink, smtp_sink, core):
    loopback_relay(relay, {"notify_url": sink.url})
    phone = bring_online(relay, core, smtp_sink)

    assert_client_format(phone.ciphertext)
    assert stored_tokens(relay) == [phone.ciphertext.encode()]
    assert core.push_token not in phone.ciphertext
    assert sink.requests == []

    deliver_ok(relay)
    sink.wait_for_body(phone.ciphertext.encode(), timeout=TIMEOUT)
    assert [(r.path, r.body) for r in sink.requests] == [("/notify", phone.ciphertext.encode())]


def _embedded_proxy_forwards() -> bool:
    """Whether the embedded proxy's settings know ``upstream_url`` (issue 8's forwarding)."""
    from notifiers.settings import settings_from_mapping

    try:
        settings_from_mapping({"upstream_url": "http://127.0.0.1:9/notify"}, env={})
    except ValueError:
        return False
    return True


@pytest.mark.skipif(not _embedded_proxy_forwards(), reason=UPSTREAM_SKIP)
def test_core_token_reaches_upstream_through_embedded_proxy(relay, sink, smtp_sink, core):
    """``notify_url = embedded`` in front of the central service: no local key opens a
    stock client's token, so the embedded proxy forwards the ciphertext unchanged."""
    # UBports needs no credentials and is on by default, with a public URL: off, so the
    # only way out of the embedded proxy is the loopback upstream. A short debounce
    # window in case forwarding sends on the trailing edge only.
    forwarding = {"upstream_url": sink.url, "ubports": "false", "debounce_seconds": "1"}
    loopback_relay(relay, {"notify_url": "embedded"}, notifiers=forwarding)
    phone = bring_online(relay, core, smtp_sink)
    assert_client_format(phone.ciphertext)

    deliver_ok(relay)
    sink.wait_for_body(phone.ciphertext.encode(), timeout=TIMEOUT)
    assert {r.body for r in sink.requests} == {phone.ciphertext.encode()}
