"""MetadataDict: key semantics, tokens, limits, messagenew hook and server keys."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import sqlite3

import pytest
from helpers_chatmaild import (
    ALICE,
    BOB,
    DAY,
    GUID,
    GUID_B,
    SERVER,
    T0,
    Clock,
    RecordingHook,
    Session,
    make_backend,
    make_config,
    priv,
    reply_bytes,
    shared,
    wire,
)

from chatmail_common.digest import token_digest
from chatmaild import dictproto as dp
from chatmaild import serverkeys
from chatmaild.metadata import split_key

OK = b"O1\n"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def hook():
    return RecordingHook()


@pytest.fixture
def backend(tmp_path, clock, hook):
    return make_backend(tmp_path, clock=clock, hook=hook)


@pytest.fixture
def s(backend):
    return Session(backend)


def is_failure(reply: bytes, txid: bytes = b"1") -> bool:
    return reply.startswith(b"F" + txid + b"\t") and reply.count(b"\n") == 1


# ---------------------------------------------------------------------------
# generic attributes


@pytest.mark.parametrize(
    "value",
    [b"pc", b"", b'a\tb\nc\rd\x01e\\f"g \xc3\xa4\xf0\x9f\x98\x80', b"\xff\xfe\x00", b"x" * 60000],
)
def test_attribute_roundtrip_byte_exact(s, value):
    key = priv("vendor/deltachat/x")
    assert s.set(key, value) == OK
    assert s.lookup(key) == b"O" + dp.tabescape(value) + b"\n"
    assert s.lookup(key, user=BOB) == b"N\n"


def test_attribute_unset(s):
    key = shared("comment")
    s.set(key, b"hello")
    assert s.unset(key) == OK
    assert s.lookup(key) == b"N\n"
    assert s.unset(key) == OK  # unsetting something never set is fine (mailbox DELETE does it)


def test_attribute_iterate(s):
    s.set(priv("comment"), b"pc")
    s.set(priv("vendor/deltachat/a"), b"1\t2")
    s.set(priv("vendor/deltachat/b/c"), b"")
    s.set(priv("comment", GUID_B), b"other mailbox")
    s.set(priv("secret"), b"bob's", user=BOB)
    out = s.iterate(priv(""), flags=0)
    assert out == (
        b"O" + priv("comment") + b"\tpc\n"
        b"O" + priv("vendor/deltachat/a") + b"\t1\x01t2\n"
        b"O" + priv("vendor/deltachat/b/c") + b"\t\n\n"
    )
    out = s.iterate(priv("vendor/deltachat"), flags=9)
    assert out == wire(
        b"O" + priv("vendor/deltachat/a") + b"\t", b"O" + priv("vendor/deltachat/b/c") + b"\t", b""
    )
    assert s.iterate(priv("vendor/deltachat/"), max_rows=1).count(b"\n") == 2
    assert s.iterate(b"priv/nothing/") == b"\n"


def test_iterate_never_leaves_prefix(s):
    s.set(priv("a"), b"1")
    s.set(priv("devicetoken"), b"tok")
    for prefix in [b"", b"p", b"priv/", priv(""), priv("a"), priv("d"), b"shared/", SERVER, b"z"]:
        for flags in (0, 9):
            out = s.iterate(prefix, flags=flags)
            lines = out.split(b"\n")
            assert lines[-2:] == [b"", b""]
            for row in lines[:-2]:
                assert row.startswith(b"O") and b"\t" in row
                assert dp.split_fields(row[1:])[0].startswith(prefix)


def test_multiple_sets_in_one_commit(s):
    out = s.send(
        b"B1\t" + ALICE.encode() + b"\n"
        b"S1\t" + priv("a") + b"\t1\n"
        b"S1\t" + priv("b") + b"\t2\n"
        b"U1\t" + priv("a") + b"\n"
        b"C1\n"
    )
    assert out == OK
    assert s.lookup(priv("a")) == b"N\n"
    assert s.lookup(priv("b")) == b"O2\n"


def test_atomic_increment(s):
    s.set(priv("n"), b"5")
    out = s.send(f"B2\t{ALICE}\nA2\t".encode() + priv("n") + b"\t-7\nC2\n")
    assert out == b"O2\n"
    assert s.lookup(priv("n")) == b"O-2\n"
    out = s.send(f"B3\t{ALICE}\nA3\t".encode() + priv("missing") + b"\t1\nC3\n")
    assert out == b"N3\n"


def test_unsupported_keys_refused(s):
    assert is_failure(s.set(b"other/x", b"v"))
    assert is_failure(s.set(b"priv", b"v"))


def test_lookup_of_odd_keys_is_n(s):
    for key in (b"", b"priv", b"priv/", b"nope/g/x", priv("messagenew")):
        assert s.lookup(key) == b"N\n"


def test_split_key():
    assert split_key(b"priv/g/a/b") == (b"priv", b"g", b"a/b")
    assert split_key(b"shared/g/") == (b"shared", b"g", b"")
    assert split_key(b"priv/g") is None
    assert split_key(b"public/g/x") is None


def test_token_digest_hides_token():
    tok = "openpgp:" + "A" * 100
    d = token_digest(tok)
    assert len(d) == 12 and "AAAA" not in d and d == token_digest(tok)


# ---------------------------------------------------------------------------
# limits


@pytest.fixture
def limited(tmp_path, clock):
    backend = make_backend(
        tmp_path, clock=clock, metadata="max_attributes = 3\nmax_value_bytes = 10\n"
    )
    return Session(backend)


def test_value_size_limit(limited):
    assert limited.set(priv("a"), b"x" * 10) == OK
    reply = limited.set(priv("b"), b"x" * 11)
    assert is_failure(reply) and b"limit" in reply
    assert limited.lookup(priv("b")) == b"N\n"


def test_attribute_count_limit(limited):
    for i in range(3):
        assert limited.set(priv(f"k{i}"), b"v", txid=str(i + 1)) == f"O{i + 1}\n".encode()
    assert is_failure(limited.set(priv("k3"), b"v", txid="7"), b"7")
    assert limited.lookup(priv("k3")) == b"N\n"
    # replacing and overwriting stays within the limit
    assert limited.set(priv("k0"), b"new") == OK
    out = limited.send(
        f"B1\t{ALICE}\nU1\t".encode() + priv("k1") + b"\nS1\t" + priv("k9") + b"\tv\nC1\n"
    )
    assert out == OK
    # the limit is per user
    assert limited.set(priv("k3"), b"v", user=BOB) == OK


def test_refused_commit_applies_nothing(limited):
    limited.set(priv("keep"), b"old")
    out = limited.send(
        wire(
            f"B4\t{ALICE}".encode(),
            b"S4\t" + priv("keep") + b"\tnew",
            b"S4\t" + priv("devicetoken") + b"\ttok1",
            b"U4\t" + priv("other"),
            b"S4\t" + priv("big") + b"\t" + b"x" * 11,
            b"C4",
        )
    )
    assert is_failure(out, b"4")
    assert limited.lookup(priv("keep")) == b"Oold\n"
    assert limited.lookup(priv("devicetoken")) == b"N\n"
    assert limited.lookup(priv("big")) == b"N\n"


def test_count_limit_refusal_applies_nothing(limited):
    parts = [f"B5\t{ALICE}\n".encode()]
    parts += [b"S5\t" + priv(f"k{i}") + b"\tv\n" for i in range(4)]
    parts += [b"S5\t" + priv("devicetoken") + b"\ttok\n", b"C5\n"]
    assert is_failure(limited.send(b"".join(parts)), b"5")
    assert limited.iterate(priv("")) == b"\n"


# ---------------------------------------------------------------------------
# devicetoken


def test_devicetoken_add_refresh_lookup(s):
    assert s.lookup(priv("devicetoken")) == b"N\n"
    assert s.set(priv("devicetoken"), b"openpgp:tok1") == OK
    assert s.set(priv("devicetoken"), b"tok2") == OK
    assert s.set(priv("devicetoken"), b"openpgp:tok1") == OK
    assert s.lookup(priv("devicetoken")) == b"Oopenpgp:tok1 tok2\n"
    # identity comes from the user, the mailbox GUID is opaque
    assert s.lookup(priv("devicetoken", GUID_B)) == b"Oopenpgp:tok1 tok2\n"
    assert s.lookup(priv("devicetoken"), user=BOB) == b"N\n"
    assert s.iterate(priv("devicetoken"), flags=0) == (
        b"O" + priv("devicetoken") + b"\topenpgp:tok1 tok2\n\n"
    )


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (b"", "empty device token"),
        (b"a" * 4097, "device token longer than 4096 bytes"),
        (b"tok\xc3\xa9", "device token is not ASCII"),
        (b"tok en", "device token contains spaces or control characters"),
        (b"tok\ten", "device token contains spaces or control characters"),
        (b"tok\x7f", "device token contains spaces or control characters"),
        (b"\x01tok", "device token contains spaces or control characters"),
    ],
)
def test_devicetoken_refused_with_the_reason_and_nothing_stored(s, token, why):
    assert s.set(priv("devicetoken"), token) == b"F1\t" + why.encode() + b"\n"
    assert s.lookup(priv("devicetoken")) == b"N\n"


def test_devicetoken_of_every_printable_ascii_byte_but_the_space_is_stored(s):
    token = bytes(range(0x21, 0x7F))
    assert s.set(priv("devicetoken"), token) == OK
    assert s.lookup(priv("devicetoken")) == b"O" + token + b"\n"


def test_devicetoken_unset_removes_all(s):
    s.set(priv("devicetoken"), b"t1")
    s.set(priv("devicetoken"), b"t2")
    s.set(priv("devicetoken"), b"b1", user=BOB)
    assert s.unset(priv("devicetoken")) == OK
    assert s.lookup(priv("devicetoken")) == b"N\n"
    assert s.lookup(priv("devicetoken"), user=BOB) == b"Ob1\n"


@pytest.mark.parametrize(
    "token", [b"", b"a b", b"tab\there", b"\xc3\xa4", b"x" * 4097, b"nl\nx", b"\x00"]
)
def test_invalid_devicetoken_refused(s, token):
    assert is_failure(s.set(priv("devicetoken"), token))
    assert s.lookup(priv("devicetoken")) == b"N\n"


def test_devicetoken_max_length_accepted(s):
    assert s.set(priv("devicetoken"), b"x" * 4096) == OK


def test_at_most_32_tokens(s, clock):
    for i in range(33):
        clock.advance(1)
        assert s.set(priv("devicetoken"), f"tok{i}".encode()) == OK
    tokens = s.lookup(priv("devicetoken"))[1:-1].split(b" ")
    assert len(tokens) == 32
    assert b"tok0" not in tokens and b"tok32" in tokens
    # refreshing the oldest protects it from the next eviction
    clock.advance(1)
    s.set(priv("devicetoken"), b"tok1")
    clock.advance(1)
    s.set(priv("devicetoken"), b"tokX")
    tokens = s.lookup(priv("devicetoken"))[1:-1].split(b" ")
    assert len(tokens) == 32 and b"tok1" in tokens and b"tok2" not in tokens


def test_token_validity_90_days(s, clock):
    s.set(priv("devicetoken"), b"old")
    clock.advance(10 * DAY)
    s.set(priv("devicetoken"), b"newer")
    clock.advance(80 * DAY - 1)
    assert s.lookup(priv("devicetoken")) == b"Oold newer\n"
    clock.advance(1)
    assert s.lookup(priv("devicetoken")) == b"Onewer\n"
    clock.advance(10 * DAY)
    assert s.lookup(priv("devicetoken")) == b"N\n"


def test_token_refresh_extends_validity(s, clock):
    s.set(priv("devicetoken"), b"tok")
    clock.advance(89 * DAY)
    s.set(priv("devicetoken"), b"tok")
    clock.advance(89 * DAY)
    assert s.lookup(priv("devicetoken")) == b"Otok\n"


def test_token_future_guard(s, clock):
    clock.advance(100)
    s.set(priv("devicetoken"), b"future")
    clock.now = T0  # the clock stepped back 100 s: more than 60 s in the future
    assert s.lookup(priv("devicetoken")) == b"N\n"
    clock.now = T0 + 41  # now 59 s ahead, so valid: the lookup above only filtered it out
    s.set(priv("devicetoken"), b"ok")  # pruning on add must not hurt a valid token
    assert s.lookup(priv("devicetoken")) == b"Ook future\n"


def test_lookup_of_expired_tokens_does_not_wait_for_a_writer(tmp_path, s, clock):
    """A lookup must never write: behind another writer it would block the event loop."""
    s.set(priv("devicetoken"), b"old")
    clock.advance(90 * DAY)
    store = s.backend.store
    # A write would now fail after 0.2 s ("database is locked") instead of blocking 30 s.
    store.conn.execute("PRAGMA busy_timeout=200")
    other = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        assert s.lookup(priv("devicetoken")) == b"N\n"
        assert s.iterate(priv("")) == b"\n"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert tokens_on_disk(store) == 1  # left for the next commit to prune


def test_messagenew_prunes_expired_tokens_in_its_commit(s, hook, clock):
    s.set(priv("devicetoken"), b"old")
    clock.advance(90 * DAY)
    s.set(priv("devicetoken"), b"fresh", user=BOB)
    assert tokens_on_disk(s.backend.store) == 2
    assert s.set(priv("messagenew"), b"") == OK
    assert tokens_on_disk(s.backend.store) == 1
    assert hook.calls == []


def tokens_on_disk(store) -> int:
    return store.conn.execute("SELECT count(*) FROM tokens").fetchone()[0]


# ---------------------------------------------------------------------------
# messagenew


def test_messagenew_calls_hook_inside_transaction(s, hook, clock):
    s.set(priv("devicetoken"), b"t1")
    s.set(priv("devicetoken"), b"t2")
    s.set(priv("devicetoken"), b"bobtok", user=BOB)
    assert s.set(priv("messagenew"), b"") == OK
    assert hook.calls == [(ALICE, ["t1", "t2"], T0, True)]
    assert hook.events == ["message_new", "committed"]
    assert s.lookup(priv("messagenew")) == b"N\n"
    assert s.iterate(priv("")) == b"O" + priv("devicetoken") + b"\tt1 t2\n\n"


def test_messagenew_only_valid_tokens(s, hook, clock):
    s.set(priv("devicetoken"), b"old")
    clock.advance(90 * DAY)
    s.set(priv("devicetoken"), b"fresh")
    s.set(priv("messagenew"), b"")
    assert hook.calls[0][1] == ["fresh"]


def test_messagenew_without_tokens(s, hook):
    assert s.set(priv("messagenew"), b"") == OK
    assert hook.calls == []
    assert hook.committed_calls <= 1


def test_messagenew_refused_commit_does_not_call_committed(s, hook):
    s.set(priv("devicetoken"), b"t1")
    out = s.send(f"B1\t{ALICE}\nS1\t".encode() + priv("messagenew") + b"\t\nS1\tbad/key\tv\nC1\n")
    assert is_failure(out)
    assert hook.committed_calls == 0


def test_messagenew_hook_failure_is_atomic(tmp_path, clock):
    hook = RecordingHook(fail=True)
    backend = make_backend(tmp_path, clock=clock, hook=hook)
    s = Session(backend)
    s.set(priv("devicetoken"), b"t1")
    ev = dp.Commit(
        "1", ALICE, (dp.SetOp(priv("a"), b"v"), dp.SetOp(priv("messagenew"), b"")), "metadata"
    )
    try:
        reply = reply_bytes(ev, backend.commit(ev))
    except Exception:
        reply = None  # the server adapter answers F for exceptions
    assert reply is None or reply.startswith(b"F1\t")
    assert s.lookup(priv("a")) == b"N\n"
    assert hook.committed_calls == 0


@pytest.mark.parametrize(
    ("delivery_dict", "dict_name", "ok"),
    [(None, "metadata", True), ("lmtp", "lmtp", True), ("lmtp", "metadata", False)],
)
def test_messagenew_delivery_dict(tmp_path, delivery_dict, dict_name, ok):
    hook = RecordingHook()
    backend = make_backend(tmp_path, hook=hook, delivery_dict=delivery_dict)
    Session(backend).set(priv("devicetoken"), b"t1")
    s = Session(backend, dict_name=dict_name)
    reply = s.set(priv("messagenew"), b"")
    if ok:
        assert reply == OK and len(hook.calls) == 1
    else:
        assert is_failure(reply) and hook.calls == [] and hook.committed_calls == 0
    # tokens can still be set from the IMAP dict either way
    assert s.set(priv("devicetoken"), b"t2") == OK


# ---------------------------------------------------------------------------
# server keys


def server_key(name: str) -> bytes:
    return SERVER + name.encode()


def test_maxsmtprecipients(s):
    assert s.lookup(server_key("maxsmtprecipients")) == b"O1000\n"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("", b"Ohttps://example.org\n"),
        ("iroh_relay = https://iroh.example.net/\n", b"Ohttps://iroh.example.net/\n"),
        ("iroh_relay =\n", b"N\n"),
        ("iroh_relay =   \n", b"N\n"),
    ],
)
def test_irohrelay(tmp_path, params, expected):
    s = Session(make_backend(tmp_path, params=params))
    assert s.lookup(server_key("irohrelay")) == expected


def test_appversions_packaged(s):
    out = s.lookup(server_key("appversions"))
    assert out.startswith(b"O") and out.count(b"\n") == 1
    assert "clients" in json.loads(dp.tabunescape(out[1:-1]))


def test_appversions_compact_one_line(tmp_path):
    path = tmp_path / "appversions.json"
    data = {"clients": [{"clientId": "x", "sources": [{"sourceId": "s\nnl", "v": 1}]}]}
    path.write_text(json.dumps(data, indent=4))
    s = Session(make_backend(tmp_path, metadata=f"appversions_path = {path}\n"))
    out = s.lookup(server_key("appversions"))
    assert out == b"O" + json.dumps(data, separators=(",", ":")).encode() + b"\n"
    path.write_text("{not json")
    assert s.lookup(server_key("appversions")) == b"N\n"
    path.unlink()
    assert s.lookup(server_key("appversions")) == b"N\n"


def test_unknown_server_key_is_plain_attribute(s):
    assert s.lookup(server_key("unknown")) == b"N\n"
    assert s.lookup(b"shared/" + GUID.encode() + b"/vendor/vendor.dovecot/pvt/server/x") == b"N\n"


@pytest.mark.parametrize("name", ["irohrelay", "turn", "maxsmtprecipients", "appversions"])
def test_server_keys_are_read_only(s, name):
    before = s.lookup(server_key("maxsmtprecipients"))
    assert is_failure(s.set(server_key(name), b"evil"))
    assert s.lookup(server_key("maxsmtprecipients")) == before


def test_server_keys_listed_under_prefix(s):
    out = s.iterate(SERVER, flags=9)
    keys = [dp.split_fields(r[1:])[0] for r in out.split(b"\n")[:-2]]
    assert server_key("maxsmtprecipients") in keys
    assert all(k.startswith(SERVER) for k in keys)


# -- TURN via a real Unix socket server


def turn_backend(tmp_path, sock_path):
    return make_backend(tmp_path, params=f"turn_socket_path = {sock_path}\n")


async def _lookup(backend, key):
    ev = dp.Lookup(key, ALICE)
    reply = backend.lookup(ev)
    if inspect.isawaitable(reply):
        reply = await reply
    return reply_bytes(ev, reply)


def test_turn_success(tmp_path):
    sock_path = tmp_path / "turn.socket"
    backend = turn_backend(tmp_path, sock_path)

    async def main():
        async def handle(reader, writer):
            writer.write(b"user:pass\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, path=str(sock_path))
        async with server:
            return await _lookup(backend, server_key("turn"))

    assert asyncio.run(main()) == b"Oexample.org:3478:user:pass\n"


def test_turn_missing_socket(tmp_path):
    backend = turn_backend(tmp_path, tmp_path / "absent.socket")
    assert asyncio.run(_lookup(backend, server_key("turn"))) == b"N\n"


def test_turn_empty_answer(tmp_path):
    sock_path = tmp_path / "turn.socket"
    backend = turn_backend(tmp_path, sock_path)

    async def main():
        async def handle(reader, writer):
            writer.close()

        server = await asyncio.start_unix_server(handle, path=str(sock_path))
        async with server:
            return await _lookup(backend, server_key("turn"))

    assert asyncio.run(main()) == b"N\n"


async def _silent_server_lookup(tmp_path):
    sock_path = tmp_path / "turn.socket"
    backend = turn_backend(tmp_path, sock_path)
    release = asyncio.Event()

    async def handle(reader, writer):  # accepts, never answers
        await release.wait()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(sock_path))
    async with server:
        try:
            return await asyncio.wait_for(_lookup(backend, server_key("turn")), 1.5)
        finally:
            release.set()


def test_turn_silent_server_answers_n_after_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(serverkeys, "TURN_TIMEOUT", 0.2)
    monkeypatch.setattr(
        serverkeys,
        "read_turn_credentials",
        functools.partial(serverkeys.read_turn_credentials, timeout=0.2),
    )
    assert asyncio.run(_silent_server_lookup(tmp_path)) == b"N\n"


def test_turn_timeout_constant_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(serverkeys, "TURN_TIMEOUT", 0.2)
    assert asyncio.run(_silent_server_lookup(tmp_path)) == b"N\n"


def test_iterate_does_not_list_expired_devicetoken(s, clock):
    s.set(priv("devicetoken"), b"tok")
    clock.advance(91 * DAY)
    assert s.iterate(priv(""), flags=0) == b"\n"


def test_missing_turn_helper_warns_once_caches_the_failure_and_recovers(
    tmp_path, monkeypatch, caplog
):
    sock_path = tmp_path / "turn.socket"
    clock = Clock()
    failures = []
    keys = serverkeys.ServerKeys(
        make_config(tmp_path, f"turn_socket_path = {sock_path}\n"),
        on_turn_failure=lambda: failures.append(1),
        clock=clock,
    )
    attempts = []
    real_read = serverkeys.read_turn_credentials

    async def counting_read(path, timeout=None):
        attempts.append(path)
        return await real_read(path, timeout)

    monkeypatch.setattr(serverkeys, "read_turn_credentials", counting_read)

    async def handle(reader, writer):
        writer.write(b"user:pass\n")
        await writer.drain()
        writer.close()

    async def main():
        answers = [await keys.turn() for _ in range(1000)]
        assert answers == [None] * 1000
        assert len(attempts) == 1 and failures == [1]  # one socket attempt in the window
        server = await asyncio.start_unix_server(handle, path=str(sock_path))
        async with server:
            assert await keys.turn() is None  # still inside the cached failure
            clock.advance(serverkeys.TURN_FAILURE_CACHE_SECONDS)
            assert await keys.turn() == b"example.org:3478:user:pass"
            assert await keys.turn() == b"example.org:3478:user:pass"
        assert len(attempts) == 3

    with caplog.at_level("INFO", logger="chatmaild.serverkeys"):
        asyncio.run(main())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines
    assert "unavailable" in lines[0][1] and "answers again" in lines[1][1]
