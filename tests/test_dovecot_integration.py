"""Integration tests: a real Dovecot with the shipped config and Lua hook, talking to a
real ``chatmail-metadata`` process (fixtures in ``conftest.py``), each test against
Dovecot 2.3 and 2.4 (the ``dovecot_build`` fixture).

Every test gets a fresh, empty metadata database; the Dovecot instance (and the
users' maildirs) are shared by the session.  After each test the fixture fails it
if the Dovecot log shows a panic, a fatal error or a killed process.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from devstack.imap import ImapClient, ImapResponse, Literal
from devstack.loopback import wait_until

pytestmark = pytest.mark.dovecot

ALICE = "alice@example.org"
BOB = "bob@example.org"
SENDER = "sender@example.net"

DELTACHAT_SERVER_GET = (
    'GETMETADATA "" (/shared/comment /shared/admin /shared/vendor/deltachat/irohrelay '
    "/shared/vendor/deltachat/turn /shared/vendor/deltachat/maxsmtprecipients "
    "/shared/vendor/deltachat/appversions)"
)
DC = "/shared/vendor/deltachat/"


def openpgp_token(length: int = 924) -> str:
    """An ``openpgp:`` + base64 token of exactly ``length`` characters (like Delta Chat's)."""
    b64_len = length - len("openpgp:")
    assert b64_len % 4 == 0
    raw = os.urandom(b64_len // 4 * 3)
    token = "openpgp:" + base64.b64encode(raw).decode()
    assert len(token) == length
    return token


def new_mail_line(user: str) -> str:
    return f"new mail for {user}"


# ---------------------------------------------------------------------------
# Capabilities and device tokens


def test_capabilities_after_login(relay):
    imap = relay.raw_imap(None)
    resp = imap.login(ALICE, relay.users[ALICE])
    caps = resp.text.split(b"]")[0].split()
    for cap in (b"METADATA", b"XDELTAPUSH", b"XCHATMAIL", b"LITERAL+"):
        assert cap in caps


def test_devicetoken_quoted_form(relay):
    token = openpgp_token()
    imap = relay.raw_imap()
    # Byte for byte what Delta Chat core sends.
    resp = imap.command(f'SETMETADATA "INBOX" (/private/devicetoken "{token}")')
    assert resp.status == "OK", resp.text
    resp = imap.command("GETMETADATA INBOX /private/devicetoken")
    assert resp.status == "OK", resp.text
    assert resp.metadata() == {"/private/devicetoken": token.encode()}


@pytest.mark.parametrize("plus", [True, False], ids=["literal-plus", "literal-sync"])
def test_devicetoken_literal_form(relay, plus):
    token = openpgp_token(924)
    imap = relay.raw_imap()
    resp = imap.command(
        "SETMETADATA INBOX (/private/devicetoken ", Literal(token.encode(), plus=plus), ")"
    )
    assert resp.status == "OK", resp.text
    # Read back through imaplib in another session.
    typ, values = relay.imap().getmetadata("INBOX", "/private/devicetoken")
    assert typ == "OK"
    assert values == {"/private/devicetoken": token.encode()}


def test_two_tokens_are_space_joined(relay):
    t1, t2 = openpgp_token(), openpgp_token()
    imap = relay.imap()
    assert imap.setmetadata("INBOX", {"/private/devicetoken": t1})[0] == "OK"
    # A second device of the same user, in its own session.
    assert relay.imap().setmetadata("INBOX", {"/private/devicetoken": t2})[0] == "OK"
    typ, values = imap.getmetadata("INBOX", "/private/devicetoken")
    assert typ == "OK"
    assert values["/private/devicetoken"] == f"{t1} {t2}".encode()
    # Tokens are per user: bob has none.
    typ, values = relay.imap(BOB).getmetadata("INBOX", "/private/devicetoken")
    assert typ == "OK"
    assert values == {"/private/devicetoken": None}


# ---------------------------------------------------------------------------
# Server metadata (GETMETADATA "")


def test_server_metadata_as_delta_chat_asks(relay):
    imap = relay.raw_imap()
    resp = imap.command(DELTACHAT_SERVER_GET)
    assert resp.status == "OK", resp.text
    assert b"()" not in resp.raw_untagged
    values = resp.metadata()
    assert values == {
        "/shared/comment": None,
        "/shared/admin": None,
        DC + "irohrelay": b"https://example.org",
        DC + "turn": None,  # no TURN helper socket
        DC + "maxsmtprecipients": b"1000",
        DC + "appversions": values[DC + "appversions"],
    }
    appversions = values[DC + "appversions"]
    assert appversions is not None
    assert b"\n" not in appversions and b"\r" not in appversions
    parsed = json.loads(appversions)
    assert isinstance(parsed, dict)
    assert json.dumps(parsed, separators=(",", ":")).encode() == appversions


def test_turn_credentials_from_helper(relay):
    helper = relay.turn_helper(b"user:pass\n")
    relay.metadata.restart(params={"turn_socket_path": str(helper.path)})
    imap = relay.raw_imap()
    resp = imap.command(DELTACHAT_SERVER_GET)
    assert resp.status == "OK", resp.text
    assert b"()" not in resp.raw_untagged
    values = resp.metadata()
    assert values[DC + "turn"] == b"example.org:3478:user:pass"
    assert values[DC + "maxsmtprecipients"] == b"1000"
    assert helper.connections >= 1
    # The helper going away answers NIL again, in the same session.
    helper.close()
    resp = imap.command(f'GETMETADATA "" {DC}turn')
    assert resp.status == "OK", resp.text
    assert resp.metadata() == {DC + "turn": None}


@pytest.mark.chatmail_ini(params={"iroh_relay": "https://iroh.example.org"})
def test_configured_iroh_relay(relay):
    typ, values = relay.imap().getmetadata("", DC + "irohrelay")
    assert typ == "OK"
    assert values == {DC + "irohrelay": b"https://iroh.example.org"}


def test_server_keys_are_read_only(relay):
    typ, _ = relay.imap().setmetadata("", {DC + "irohrelay": "https://evil.example"})
    assert typ == "NO"
    typ, values = relay.imap().getmetadata("", DC + "irohrelay")
    assert values == {DC + "irohrelay": b"https://example.org"}


# ---------------------------------------------------------------------------
# Generic attributes


@pytest.mark.parametrize(
    "mailbox,entry,value",
    [
        ("INBOX", "/private/devicetoken", openpgp_token()),
        ("INBOX", "/private/vendor/test/comment", "a comment"),
        ("INBOX", "/shared/vendor/test/shared", "shared value"),
        ("", "/private/vendor/deltachat/something", "server-level value"),
    ],
    ids=["devicetoken", "private", "shared", "server-level"],
)
def test_nil_deletes(relay, mailbox, entry, value):
    imap = relay.imap()
    assert imap.setmetadata(mailbox, {entry: value})[0] == "OK"
    assert imap.getmetadata(mailbox, entry) == ("OK", {entry: value.encode()})
    assert imap.setmetadata(mailbox, {entry: None})[0] == "OK"
    assert imap.getmetadata(mailbox, entry) == ("OK", {entry: None})
    # Deleting what is not there is fine too.
    assert imap.setmetadata(mailbox, {entry: None})[0] == "OK"


def test_empty_string_is_not_nil(relay):
    imap = relay.raw_imap()
    assert imap.command('SETMETADATA INBOX (/private/vendor/test/empty "")').status == "OK"
    resp = imap.command("GETMETADATA INBOX /private/vendor/test/empty")
    assert resp.metadata() == {"/private/vendor/test/empty": b""}


WEIRD = 'tab\there cr\rlf\nctrl\x01 back\\slash quote" äöü €😀 end'.encode()


@pytest.mark.parametrize("plus", [True, False], ids=["literal-plus", "literal-sync"])
@pytest.mark.parametrize(
    "mailbox,entry",
    [("INBOX", "/private/vendor/test/weird"), ('""', "/shared/vendor/test/weird")],
    ids=["private", "shared-server"],
)
def test_value_bytes_round_trip(relay, plus, mailbox, entry):
    imap = relay.raw_imap()
    resp = imap.command(f"SETMETADATA {mailbox} ({entry} ", Literal(WEIRD, plus=plus), ")")
    assert resp.status == "OK", resp.text
    resp = imap.command(f"GETMETADATA {mailbox} {entry}")
    assert resp.status == "OK", resp.text
    assert resp.metadata() == {entry: WEIRD}
    # And from a new session, so nothing is served from a cache in the imap process.
    resp = relay.raw_imap().command(f"GETMETADATA {mailbox} {entry}")
    assert resp.metadata() == {entry: WEIRD}


BIG = base64.b64encode(os.urandom(300 * 1024 * 3 // 4))  # 300 KiB of printable ASCII


def test_big_value_refused_under_default_limit(relay):
    assert len(BIG) == 300 * 1024
    imap = relay.raw_imap()
    resp = imap.command("SETMETADATA INBOX (/private/vendor/test/big ", Literal(BIG), ")")
    assert resp.status == "NO", resp.text
    resp = imap.command("GETMETADATA INBOX /private/vendor/test/big")
    assert resp.status == "OK"
    assert resp.metadata() == {"/private/vendor/test/big": None}
    # The session still works after the refusal.
    assert imap.command("NOOP").status == "OK"


@pytest.mark.chatmail_ini(metadata={"max_value_bytes": 400000})
def test_big_value_stored_with_higher_limit(relay):
    imap = relay.raw_imap()
    resp = imap.command("SETMETADATA INBOX (/private/vendor/test/big ", Literal(BIG), ")")
    assert resp.status == "OK", resp.text
    resp = relay.raw_imap().command("GETMETADATA INBOX /private/vendor/test/big")
    assert resp.status == "OK", resp.text
    assert resp.metadata()["/private/vendor/test/big"] == BIG


@pytest.mark.chatmail_ini(metadata={"max_value_bytes": 4000000, "max_line_bytes": 100000})
def test_dict_line_over_limit_refused(relay):
    imap = relay.raw_imap()
    resp = imap.command("SETMETADATA INBOX (/private/vendor/test/big ", Literal(BIG), ")")
    assert resp.status == "NO", resp.text
    # Both the IMAP session and the dict server carry on.
    resp = imap.command('SETMETADATA INBOX (/private/vendor/test/small "ok")')
    assert resp.status == "OK", resp.text
    resp = imap.command("GETMETADATA INBOX (/private/vendor/test/big /private/vendor/test/small)")
    assert resp.metadata() == {
        "/private/vendor/test/big": None,
        "/private/vendor/test/small": b"ok",
    }


def test_depth_infinity_lists_private_entries(relay):
    token = openpgp_token()
    imap = relay.imap()
    entries = {
        "/private/devicetoken": token,
        "/private/vendor/test/a": "va",
        "/private/vendor/test/deep/b": "vb",
        "/private/comment": "private comment",
    }
    assert imap.setmetadata("INBOX", entries)[0] == "OK"
    assert imap.setmetadata("INBOX", {"/shared/vendor/test/s": "not private"})[0] == "OK"
    # Bob's entries never show up in alice's listing.
    assert relay.imap(BOB).setmetadata("INBOX", {"/private/vendor/test/bob": "b"})[0] == "OK"
    typ, values = imap.getmetadata("INBOX", "/private", depth="infinity")
    assert typ == "OK"
    assert values == {k: v.encode() for k, v in entries.items()}
    typ, values = imap.getmetadata("INBOX", "/private/vendor/test", depth="1")
    assert typ == "OK"
    assert values == {"/private/vendor/test/a": b"va"}


def test_mailbox_delete_removes_attributes(relay):
    imap = relay.raw_imap()
    assert imap.command("CREATE foo").status == "OK"
    try:
        resp = imap.command(
            'SETMETADATA foo (/private/comment "foo-private" /shared/vendor/test/z "foo-shared")'
        )
        assert resp.status == "OK", resp.text
        resp = imap.command("GETMETADATA foo (/private/comment /shared/vendor/test/z)")
        assert resp.metadata() == {
            "/private/comment": b"foo-private",
            "/shared/vendor/test/z": b"foo-shared",
        }
        keys_before = relay.metadata.stored_keys(ALICE)
        foo_keys = [k for k in keys_before if k.endswith((b"/comment", b"/vendor/test/z"))]
        assert len(foo_keys) == 2
    finally:
        resp = imap.command("DELETE foo")
    assert resp.status == "OK", resp.text
    # Dovecot iterated and unset them: nothing of foo is left in the store.
    assert not set(foo_keys) & set(relay.metadata.stored_keys(ALICE))
    assert imap.command("CREATE foo").status == "OK"
    resp = imap.command("GETMETADATA foo (/private/comment /shared/vendor/test/z)")
    assert resp.metadata() == {"/private/comment": None, "/shared/vendor/test/z": None}
    assert imap.command("DELETE foo").status == "OK"


def test_deleting_a_mailbox_keeps_inbox_tokens(relay):
    inbox_token = openpgp_token()
    imap = relay.raw_imap()
    assert imap.command(f'SETMETADATA INBOX (/private/devicetoken "{inbox_token}")').status == "OK"
    assert imap.command("CREATE tokenbox").status == "OK"
    try:
        resp = imap.command(f'SETMETADATA tokenbox (/private/devicetoken "{openpgp_token()}")')
        assert resp.status == "OK", resp.text
    finally:
        assert imap.command("DELETE tokenbox").status == "OK"
    resp = imap.command("GETMETADATA INBOX /private/devicetoken")
    assert resp.status == "OK", resp.text
    assert inbox_token.encode() in (resp.metadata()["/private/devicetoken"] or b"").split()


def test_many_concurrent_sessions(relay):
    n = 30
    barrier = threading.Barrier(n)

    def session(i: int) -> tuple[str, bytes | None, bytes | None]:
        user = ALICE if i % 2 == 0 else BOB
        entry = f"/private/vendor/test/session{i}"
        client = ImapClient(relay.dovecot.imap_port, user, relay.users[user])
        try:
            barrier.wait(30)
            typ, _ = client.setmetadata("INBOX", {entry: f"value {i}"})
            assert typ == "OK"
            _, mine = client.getmetadata("INBOX", entry)
            # The other user's entry of the same name is not visible.
            other = f"/private/vendor/test/session{i ^ 1}"
            _, theirs = client.getmetadata("INBOX", other)
            return user, mine[entry], theirs[other]
        finally:
            client.logout()

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(session, range(n)))
    for i, (_user, mine, theirs) in enumerate(results):
        assert mine == f"value {i}".encode()
        assert theirs is None
    # Everything is visible afterwards, listing included.
    typ, values = relay.imap().getmetadata("INBOX", "/private/vendor/test", depth="1")
    assert typ == "OK"
    assert len(values) == n // 2


# ---------------------------------------------------------------------------
# The dict server going away and coming back


def test_dict_server_restart_during_session(relay):
    token = openpgp_token()
    imap = relay.raw_imap()
    assert imap.command(f'SETMETADATA INBOX (/private/devicetoken "{token}")').status == "OK"
    assert imap.command('SETMETADATA INBOX (/private/vendor/test/x "kept")').status == "OK"

    relay.metadata.stop()
    resp = imap.command("GETMETADATA INBOX /private/devicetoken")
    assert resp.status == "NO", resp.text
    resp = imap.command('SETMETADATA INBOX (/private/vendor/test/y "lost")')
    assert resp.status == "NO", resp.text
    assert imap.command("NOOP").status == "OK"

    relay.metadata.start()
    # Dovecot's dict client does not retry a failed connect within the same second
    # (it repeats the cached error), so the first command may still fail briefly.
    resp = wait_until(
        lambda: _ok(
            imap.command("GETMETADATA INBOX (/private/devicetoken /private/vendor/test/x)")
        ),
        timeout=30,  # a restart and Dovecot's reconnect on a loaded machine
        what="GETMETADATA to work again after the restart",
        interval=0.1,
    )
    assert resp.metadata() == {
        "/private/devicetoken": token.encode(),
        "/private/vendor/test/x": b"kept",
    }
    assert imap.command('SETMETADATA INBOX (/private/vendor/test/y "now")').status == "OK"
    resp = imap.command("GETMETADATA INBOX /private/vendor/test/y")
    assert resp.metadata() == {"/private/vendor/test/y": b"now"}


# ---------------------------------------------------------------------------
# LMTP delivery and the Lua hook


def test_delivery_signals_new_mail(relay):
    assert relay.imap().setmetadata("INBOX", {"/private/devicetoken": openpgp_token()})[0] == "OK"
    offset = relay.metadata.log_size()
    code, resp = relay.deliver(SENDER, ALICE)
    assert code == 250, resp
    relay.metadata.wait_for_log(new_mail_line(ALICE), offset)
    assert f"{new_mail_line(ALICE)}: 1 token(s)" in relay.metadata.log_since(offset)
    assert new_mail_line(BOB) not in relay.metadata.log_since(offset)


def test_delivery_posts_token_to_push_proxy(relay):
    """End to end: IMAP token -> LMTP delivery -> Lua -> dict -> notifier -> HTTP POST."""
    token = openpgp_token()
    assert relay.imap(BOB).setmetadata("INBOX", {"/private/devicetoken": token})[0] == "OK"
    assert relay.deliver(SENDER, BOB)[0] == 250
    relay.push_sink.wait_for_body(token.encode())


def test_mail_from_oneself_signals_nothing(relay):
    offset = relay.metadata.log_size()
    # The From header decides; its case does not matter.
    code, resp = relay.deliver(ALICE, ALICE, make_message_from("Alice@Example.org", ALICE))
    assert code == 250, resp
    # A delivery from someone else afterwards: once its signal is logged, the
    # self-sent one (delivered and hooked before it) would have been logged too.
    code, resp = relay.deliver(SENDER, ALICE)
    assert code == 250, resp
    relay.metadata.wait_for_log(new_mail_line(ALICE), offset)
    assert relay.metadata.count_in_log(new_mail_line(ALICE), offset) == 1


def test_delivery_to_two_users(relay):
    offset = relay.metadata.log_size()
    assert relay.deliver(SENDER, ALICE)[0] == 250
    assert relay.deliver(SENDER, BOB)[0] == 250
    relay.metadata.wait_for_log(new_mail_line(ALICE), offset)
    relay.metadata.wait_for_log(new_mail_line(BOB), offset)


def test_imap_client_cannot_set_messagenew(relay):
    offset = relay.metadata.log_size()
    imap = relay.raw_imap()
    resp = imap.command('SETMETADATA INBOX (/private/messagenew "")')
    assert resp.status == "NO", resp.text
    assert new_mail_line(ALICE) not in relay.metadata.log_since(offset)
    assert imap.command("NOOP").status == "OK"


def test_delivery_succeeds_while_dict_server_is_down(relay):
    relay.metadata.stop()
    offset = relay.dovecot.log_size()
    code, resp = relay.deliver(SENDER, ALICE)
    assert code == 250, resp
    # The Lua hook caught the failure and logged it instead of failing the delivery.
    relay.dovecot.wait_for_log(
        "chatmail push: cannot signal new mail for alice@example.org", offset
    )
    relay.metadata.start()
    offset = relay.metadata.log_size()

    def delivered_and_signalled() -> bool:
        # As in the IMAP case, a connect error may be repeated within the same second.
        assert relay.deliver(SENDER, ALICE)[0] == 250
        return new_mail_line(ALICE) in relay.metadata.log_since(offset)

    # 30 s: LMTP deliveries and a restarted process on a loaded machine (5 s was tight).
    wait_until(delivered_and_signalled, 30, "a delivery to be signalled again", interval=0.1)


def _ok(resp: ImapResponse) -> ImapResponse | None:
    return resp if resp.status == "OK" else None


def make_message_from(from_header: str, rcpt: str) -> bytes:
    return (
        f"From: {from_header}\r\nTo: {rcpt}\r\nSubject: note to self\r\n"
        f"Message-ID: <{os.urandom(8).hex()}@example.org>\r\n\r\nhello me\r\n"
    ).encode()
