"""The sans-I/O dict protocol: escaping, framing, parsing, transactions, versions, replies."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from chatmaild import dictproto as dp

REPLY_OWING = (dp.Lookup, dp.Iterate, dp.Commit, dp.Refusal)
NO_REPLY_LETTERS = b"HBSUATVR"
REPLY_LETTERS = b"LICD"
# What owes a reply in each release (written out here, not read from dp.VERSIONS).
REPLY_LETTERS_OF = {"2.3": b"LICD", "2.4": b"LIC"}
# A connection before any H line (served as 2.3), and one that said each release's hello.
PRELUDES = {"no hello": b"", "2.3": b"H3\t2\t0\t\tmetadata\n", "2.4": b"H4\t0\t0\t\tmetadata\n"}
EXPIRE = {"no hello": b"", "2.3": b"", "2.4": b"\t0"}  # 2.4's B<id>\t<user>\t<expire-secs>
by_version = pytest.mark.parametrize("hello", list(PRELUDES))

# Lines (without their LF) biased towards the protocol's letters and separators.
_field_bytes = st.binary(max_size=40)
_letter = st.sampled_from(list(b"HLIBSUATVRCDXO\x01\t ") + [0x80, 0xFF])
_tab_joined = st.lists(
    st.one_of(_field_bytes, st.sampled_from([b"1", b"2", b"0", b"9", b"-3", b"alice", b""])),
    max_size=6,
).map(b"\t".join)
lines_st = st.one_of(
    st.builds(lambda c, rest: bytes([c]) + rest, _letter, _tab_joined),
    st.binary(max_size=60),
).map(lambda b: b.replace(b"\n", b""))


def is_reply_owing(ev) -> bool:
    return isinstance(ev, REPLY_OWING)


def feed_lines(conn: dp.DictConnection, lines: list[bytes]) -> list[list[dp.Event]]:
    """Feed one line at a time; the events each line produced."""
    out = []
    for line in lines:
        conn.receive_data(line + b"\n")
        out.append(conn.events())
    return out


def connection(hello: str, *lines: bytes, **kw) -> dp.DictConnection:
    """A connection that said ``hello`` (a key of PRELUDES) and got ``lines``; B lines get
    the version's third field."""
    conn = dp.DictConnection(**kw)
    conn.receive_data(PRELUDES[hello])
    for line in lines:
        conn.receive_data(line + (EXPIRE[hello] if line[:1] == b"B" else b"") + b"\n")
    conn.events()
    assert conn.version.dovecot == ("2.3" if hello == "no hello" else hello)
    assert conn.open_transactions == sum(line[:1] == b"B" for line in lines)
    return conn


def feed_and_expect(conn: dp.DictConnection, lines: list[bytes]) -> tuple[list, list[int]]:
    """Like feed_lines, plus the replies each line owes by the letter tables above, for
    the version the connection serves when the line arrives (an H line may change it)."""
    events, owed = [], []
    for line in lines:
        letters = REPLY_LETTERS_OF[conn.version.dovecot]
        owed.append(1 if line[:1] and line[0] in letters else 0)
        events.extend(feed_lines(conn, [line]))
    return events, owed


STOCK_REPLY = {dp.Lookup: dp.NOT_FOUND, dp.Iterate: dp.Rows(()), dp.Commit: dp.COMMITTED}


def answer(conn: dp.DictConnection, ev: dp.Event) -> bytes | None:
    """Answer ``ev`` through the connection as a server would: a Refusal with its own
    failure, the others with a stock reply; None for an event that owes nothing."""
    if not is_reply_owing(ev):
        return None
    return conn.send(ev, STOCK_REPLY.get(type(ev)))


def check_refusal(conn: dp.DictConnection, ev: dp.Event) -> None:
    """Answer ``ev`` (events must be checked in order); a refusal is one F line."""
    reply = answer(conn, ev)
    if isinstance(ev, dp.Refusal):
        assert reply[:1] == b"F"
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1


# ---------------------------------------------------------------------------
# tabescape / tabunescape


@given(st.binary())
@example(b'a\tb\nc\rd\x01e\\f"g \xc3\xa4\xf0\x9f\x98\x80')
@example(b"\x01\x01t\x00")
def test_tabescape_roundtrip(data):
    escaped = dp.tabescape(data)
    for raw in (b"\t", b"\n", b"\r", b"\x00"):
        assert raw not in escaped
    assert dp.tabunescape(escaped) == data


def test_tabescape_matches_dovecot_table():
    assert dp.tabescape(b"\x01\t\n\r\x00") == b"\x011\x01t\x01n\x01r\x010"
    assert dp.tabescape(b'\\"\xe2\x82\xac') == b'\\"\xe2\x82\xac'
    # observed on the wire (reference §3.2)
    wire = b'a\x01tb\x01nc\x01rd\x011e\\f"g'
    assert dp.tabunescape(wire) == b'a\tb\nc\rd\x01e\\f"g'


def test_tabunescape_unknown_escape_yields_the_char():
    assert dp.tabunescape(b"\x01x\x01\\") == b"x\\"


@given(st.lists(st.binary(), min_size=1, max_size=8))
def test_split_then_unescape(fields):
    line = b"\t".join(dp.tabescape(f) for f in fields)
    assert dp.split_fields(line) == fields


def test_split_never_strips():
    assert dp.split_fields(b"1\tkey\t") == [b"1", b"key", b""]
    assert dp.split_fields(b" a \t b ") == [b" a ", b" b "]


# ---------------------------------------------------------------------------
# Parser invariants (property based)


@by_version
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(lines_st, max_size=25))
def test_parser_one_reply_per_reply_letter(hello, lines):
    conn = connection(hello, b"B1\talice", b"B2\tbob")
    per_line, owed = feed_and_expect(conn, lines)
    for line, events, expected in zip(lines, per_line, owed, strict=True):
        owing = [ev for ev in events if is_reply_owing(ev)]
        for ev in events:
            check_refusal(conn, ev)
        if expected:
            assert len(owing) == 1, (line, events)
        else:
            assert owing == [], (line, events)
    assert conn.replies_owed == 0


@by_version
@settings(max_examples=200)
@given(
    letter=st.sampled_from(list(NO_REPLY_LETTERS)),
    rest=st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)
def test_no_reply_commands_never_owe_a_reply(hello, letter, rest):
    conn = connection(hello, b"B1\talice", b"B7\tbob")
    (events,) = feed_lines(conn, [bytes([letter]) + rest])
    assert not any(is_reply_owing(ev) for ev in events)


@by_version
@settings(max_examples=200)
@given(
    letter=st.sampled_from(list(REPLY_LETTERS)),
    rest=st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)
def test_reply_commands_owe_exactly_one_reply_even_malformed(hello, letter, rest):
    conn = connection(hello, b"B1\talice")
    (events,) = feed_lines(conn, [bytes([letter]) + rest])
    owed = 1 if letter in REPLY_LETTERS_OF.get(hello, REPLY_LETTERS) else 0
    assert sum(map(is_reply_owing, events)) == owed
    for ev in events:
        check_refusal(conn, ev)


@st.composite
def stream_and_cuts(draw):
    lines = draw(st.lists(lines_st, max_size=20))
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return lines, stream, cuts


@by_version
@settings(max_examples=300)
@given(data=stream_and_cuts(), max_line=st.sampled_from([8, 16, 40, dp.DEFAULT_MAX_LINE]))
def test_arbitrary_chunking_gives_the_same_events(hello, data, max_line):
    lines, stream, cuts = data
    assume(len(PRELUDES[hello]) <= max_line + 1)  # the 16-byte hello fits all but the 8 limit
    whole = connection(hello, b"B1\talice", max_line=max_line)
    per_line, owed = feed_and_expect(whole, lines)
    expected = [ev for evs in per_line for ev in evs]

    chunked = connection(hello, b"B1\talice", max_line=max_line)
    got = []
    start = 0
    for cut in [*cuts, len(stream)]:
        chunked.receive_data(stream[start:cut])
        got.extend(chunked.events())
        start = cut
    assert got == expected
    owing = sum(owed)
    assert sum(map(is_reply_owing, got)) == owing


@by_version
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(hello, data):
    conn = connection(hello, max_line=64)
    conn.receive_data(data)
    for ev in conn.events():
        check_refusal(conn, ev)
    assert conn.replies_owed == 0


@pytest.mark.parametrize(
    "line",
    [
        b"I" + b"1" * 5000 + b"\t0\tpriv/\talice",
        b"H" + b"3" * 5000 + b"\t2\t0\t\tmetadata",
        b"A1\tpriv/g/x\t" + b"9" * 5000,
    ],
)
def test_huge_numbers_do_not_raise(line):
    conn = dp.DictConnection()
    feed_lines(conn, [b"B1\talice"])
    (events,) = feed_lines(conn, [line])
    owing = [ev for ev in events if is_reply_owing(ev)]
    assert len(owing) == (1 if line[:1] == b"I" else 0)


# ---------------------------------------------------------------------------
# Commands


def test_hello_records_dict_name_and_gets_no_reply():
    conn = dp.DictConnection()
    (events,) = feed_lines(conn, [b"H3\t2\t0\t\tmetadata"])
    assert events == [dp.Hello(3, 2, "metadata")]
    assert conn.dict_name == "metadata"


def test_lookup_and_iterate_fields_are_unescaped_not_stripped():
    conn = dp.DictConnection()
    lines = [b"Lpriv/g/a\x01tb \talice@example.org", b"I9\t0\tpriv/g/ \talice@example.org"]
    [[lk], [it]] = feed_lines(conn, lines)
    assert lk == dp.Lookup(b"priv/g/a\tb ", "alice@example.org")
    assert it == dp.Iterate(9, 0, b"priv/g/ ", "alice@example.org")


def test_transaction_ops_in_order():
    conn = dp.DictConnection()
    feed_lines(conn, [b"H3\t2\t0\t\tmetadata"])
    evs = feed_lines(
        conn,
        [
            b"B1\talice",
            b"S1\tpriv/g/a\tv\x01n1",
            b"U1\tpriv/g/b",
            b"A1\tpriv/g/c\t-3",
            b"T1\t1\t2",
            b"V1",
            b"C1",
        ],
    )
    assert evs[:-1] == [[]] * 6
    assert evs[-1] == [
        dp.Commit(
            "1",
            "alice",
            (dp.SetOp(b"priv/g/a", b"v\n1"), dp.UnsetOp(b"priv/g/b"), dp.IncOp(b"priv/g/c", -3)),
            "metadata",
        )
    ]


def test_empty_value_set_keeps_empty_value():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"B1\talice", b"S1\tpriv/g/messagenew\t", b"C1"])
    assert evs[-1] == [dp.Commit("1", "alice", (dp.SetOp(b"priv/g/messagenew", b""),), "")]


def test_set_without_value_fails_the_commit():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"B1\talice", b"S1\tpriv/g/k", b"C1"])
    assert evs[1] == []
    [ref] = evs[2]
    assert isinstance(ref, dp.Refusal) and conn.send(ref).startswith(b"F1\t")


def test_several_transactions_open_at_once():
    conn = dp.DictConnection()
    evs = feed_lines(
        conn,
        [
            b"B1\talice",
            b"S1\tpriv/g/comment\tpc",
            b"B2\talice",
            b"S2\tshared/g/z\tsz",
            b"I9\t0\tpriv/g/\talice",
            b"C1",
            b"C2",
        ],
    )
    assert conn.open_transactions == 0
    assert isinstance(evs[4][0], dp.Iterate)
    assert evs[5] == [dp.Commit("1", "alice", (dp.SetOp(b"priv/g/comment", b"pc"),), "")]
    assert evs[6] == [dp.Commit("2", "alice", (dp.SetOp(b"shared/g/z", b"sz"),), "")]


def test_same_id_on_two_connections_is_independent():
    a, b = dp.DictConnection(), dp.DictConnection()
    feed_lines(a, [b"B1\talice", b"S1\tpriv/g/k\ta"])
    feed_lines(b, [b"B1\tbob", b"S1\tpriv/g/k\tb"])
    [[ca]] = feed_lines(a, [b"C1"])
    [[cb]] = feed_lines(b, [b"C1"])
    assert (ca.user, ca.ops) == ("alice", (dp.SetOp(b"priv/g/k", b"a"),))
    assert (cb.user, cb.ops) == ("bob", (dp.SetOp(b"priv/g/k", b"b"),))


def test_rollback_discards():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"B1\talice", b"S1\tpriv/g/k\tv", b"R1", b"C1"])
    assert evs[2] == []
    assert conn.open_transactions == 0
    [ref] = evs[3]
    assert isinstance(ref, dp.Refusal) and conn.send(ref).startswith(b"F1\t")


def test_unknown_transaction_ids():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"S9\tpriv/g/k\tv", b"U9\tk", b"R9", b"T9\t1\t2", b"C9", b"D8"])
    assert evs[:4] == [[], [], [], []]
    assert [conn.send(e)[:3] for [e] in evs[4:]] == [b"F9\t", b"F8\t"]
    assert conn.errors >= 6


def test_begin_reuses_id_after_commit():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"B1\ta", b"C1", b"B1\tb", b"S1\tk\tv", b"C1"])
    assert evs[1] == [dp.Commit("1", "a", (), "")]
    assert evs[4] == [dp.Commit("1", "b", (dp.SetOp(b"k", b"v"),), "")]


def test_non_utf8_user():
    conn = dp.DictConnection()
    evs = feed_lines(
        conn,
        [b"Lpriv/g/k\t\xff\xfe", b"I9\t0\tpriv/\t\xc3", b"B1\t\xff", b"S1\tk\tv", b"C1"],
    )
    for e in evs:
        for ev in e:
            check_refusal(conn, ev)
    assert [len(e) for e in evs] == [1, 1, 0, 0, 1]
    assert all(isinstance(e[0], dp.Refusal) for e in (evs[0], evs[1], evs[4]))


def test_empty_user_is_refused():
    conn = dp.DictConnection()
    [[ev]] = feed_lines(conn, [b"Lpriv/g/k\t"])
    assert isinstance(ev, dp.Refusal)


def test_empty_and_unknown_lines_get_no_reply():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"", b"X1\tfoo", b"O1", b"\t", b"\r"])
    assert evs == [[]] * 5


def test_value_with_cr_is_kept():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"B1\talice", b"S1\tk\tv\r", b"C1"])
    assert evs[2][0].ops == (dp.SetOp(b"k", b"v\r"),)


# ---------------------------------------------------------------------------
# Long lines


def test_long_line_under_default_limit_is_accepted():
    conn = dp.DictConnection()
    value = b"x" * 307_200
    evs = feed_lines(conn, [b"B1\talice", b"S1\tk\t" + value, b"C1"])
    assert evs[2][0].ops == (dp.SetOp(b"k", value),)


@pytest.mark.parametrize("chunk", [7, 100, 10_000])
def test_oversized_lines_dropped_with_f_and_other_transactions_survive(chunk):
    conn = dp.DictConnection(max_line=1000)
    big = b"y" * 5000
    stream = b"".join(
        line + b"\n"
        for line in [
            b"B1\talice",
            b"B2\talice",
            b"S1\tpriv/g/a\t1",
            b"Lpriv/g/" + big + b"\talice",  # F
            b"S2\tpriv/g/b\t" + big,  # poisons tx 2
            b"I9\t0\tpriv/" + big + b"\talice",  # F
            b"S1\tpriv/g/c\t3",
            b"Lpriv/g/a\talice",
            b"C1",
            b"C2",
        ]
    )
    events = []
    for i in range(0, len(stream), chunk):
        conn.receive_data(stream[i : i + chunk])
        events.extend(conn.events())
    assert len(events) == 5
    l_big, i_big, lookup, c1, c2 = events
    replies = [answer(conn, ev) for ev in events]
    assert isinstance(l_big, dp.Refusal) and replies[0].startswith(b"F")
    assert isinstance(i_big, dp.Refusal) and replies[1].startswith(b"F")
    assert lookup == dp.Lookup(b"priv/g/a", "alice")
    assert c1 == dp.Commit(
        "1", "alice", (dp.SetOp(b"priv/g/a", b"1"), dp.SetOp(b"priv/g/c", b"3")), ""
    )
    assert isinstance(c2, dp.Refusal) and replies[4].startswith(b"F2\t")
    assert conn.open_transactions == 0


def test_oversized_commit_line_answers_f_and_drops_tx():
    conn = dp.DictConnection(max_line=50)
    evs = feed_lines(conn, [b"B1\talice", b"C1" + b"\t" * 100])
    [ref] = evs[1]
    assert isinstance(ref, dp.Refusal) and conn.send(ref).startswith(b"F")
    assert conn.open_transactions == 0


def test_line_exactly_at_limit_is_accepted():
    conn = dp.DictConnection(max_line=20)
    line = b"Lk\t" + b"u" * 17
    assert len(line) == 20
    [[ev]] = feed_lines(conn, [line])
    assert ev == dp.Lookup(b"k", "u" * 17)
    [[ev]] = feed_lines(conn, [line + b"u"])
    assert isinstance(ev, dp.Refusal)


def test_buffer_bounded_while_discarding():
    conn = dp.DictConnection(max_line=1000)
    conn.receive_data(b"L")
    for _ in range(200):
        conn.receive_data(b"z" * 997)
        assert conn.events() == []
        assert conn.buffered_bytes <= 2000
    conn.receive_data(b"\tu\nLk\tu\n")
    evs = conn.events()
    assert isinstance(evs[0], dp.Refusal)
    assert evs[1] == dp.Lookup(b"k", "u")


# ---------------------------------------------------------------------------
# Reply builders


@st.composite
def iterate_inputs(draw):
    alphabet = st.sampled_from([b"a", b"b", b"/", b"\t", b"\n", b"\x01", b"\xff", b""])
    short = st.lists(alphabet, max_size=6).map(b"".join)
    prefix = draw(short)
    keys = draw(st.lists(st.one_of(short, short.map(lambda s: prefix + s)), max_size=10))
    rows = [(k, draw(st.binary(max_size=10))) for k in keys]
    flags = draw(st.sampled_from([0, 1, 8, 9, 0x10, 0x18]))
    max_rows = draw(st.integers(0, 4))
    return prefix, rows, flags, max_rows


@settings(max_examples=300)
@given(iterate_inputs())
def test_iterate_reply_only_rows_under_prefix_with_tab(data):
    prefix, rows, flags, max_rows = data
    out = dp.iterate_reply(prefix, rows, flags, max_rows)
    assert out.endswith(b"\n\n") or out == b"\n"
    lines = out.split(b"\n")
    assert lines[-2:] == [b"", b""]
    body = lines[:-2]
    if max_rows:
        assert len(body) <= max_rows
    expected = [(k, v) for k, v in rows if k.startswith(prefix)]
    if flags & dp.ITER_EXACT_KEY:
        expected = [(k, v) for k, v in expected if k == prefix]
    if max_rows:
        expected = expected[:max_rows]
    got = []
    for row in body:
        assert row[:1] == b"O"
        assert b"\t" in row
        fields = dp.split_fields(row[1:])
        assert fields[0].startswith(prefix)
        got.append((fields[0], fields[1]))
    if flags & dp.ITER_NO_VALUE:
        expected = [(k, b"") for k, _ in expected]
    assert got == expected
    # The same bytes when the rows go back through the connection that asked for them.
    conn = dp.DictConnection()
    conn.receive_data(b"I%d\t%d\t" % (flags, max_rows) + dp.tabescape(prefix) + b"\tu\n")
    (ev,) = conn.events()
    assert ev == dp.Iterate(flags, max_rows, prefix, "u")
    assert conn.send(ev, dp.Rows(rows)) == out


@given(st.one_of(st.none(), st.binary()))
def test_lookup_reply_is_one_line(value):
    out = dp.lookup_reply(value)
    assert out[:1] in (b"O", b"N") and out.count(b"\n") == 1 and out.endswith(b"\n")
    if value is not None:
        assert dp.tabunescape(out[1:-1]) == value


@given(st.text(), st.text(min_size=1).filter(lambda s: "\x00" not in s))
def test_failure_and_commit_builders(reason, txid):
    for out in (
        dp.lookup_failure(reason),
        dp.iterate_failure(reason),
        dp.commit_reply(txid, reason),
        dp.commit_reply(txid),
        dp.commit_notfound(txid),
    ):
        assert out[:1] in (b"O", b"N", b"F")
        assert out.count(b"\n") == 1 and out.endswith(b"\n")
    assert dp.commit_reply(txid) == b"O" + dp.tabescape(txid.encode()) + b"\n"
    f = dp.commit_reply(txid, reason)
    fields = dp.split_fields(f[1:-1])
    assert fields[0] == txid.encode() and len(fields) == 2


def test_commit_reply_examples():
    assert dp.commit_reply("7") == b"O7\n"
    assert dp.commit_reply("7", "no\tway\n") == b"F7\tno\x01tway\x01n\n"
    assert dp.commit_notfound("7") == b"N7\n"
    assert dp.lookup_reply(None) == b"N\n"
    assert dp.lookup_reply(b"") == b"O\n"
    assert dp.iterate_reply(b"p/", [], 9, 0) == b"\n"
    assert dp.iterate_reply(b"p/", [(b"p/x", b"v"), (b"q", b"w")], 9, 0) == b"Op/x\t\n\n"


def test_refusal_iterate_with_unknown_flags():
    conn = dp.DictConnection()
    [[ev]] = feed_lines(conn, [b"Ix\t0\tp\tu"])
    assert isinstance(ev, dp.Refusal)


def test_oversized_value_fails_its_transaction_when_it_arrives():
    conn = dp.DictConnection(max_value=10)
    conn.receive_data(b"B1\tu\nS1\tpriv/g/k\t" + b"x" * 11 + b"\nS1\tpriv/g/j\tok\nB2\tu\n")
    conn.receive_data(b"S2\tpriv/g/k\t0123456789\nC1\nC2\n")
    first, second = conn.events()
    assert isinstance(first, dp.Refusal)
    assert conn.send(first) == b"F1\tvalue of 11 bytes exceeds the limit of 10 bytes\n"
    assert isinstance(second, dp.Commit)  # the other transaction is untouched
    assert second.ops == (dp.SetOp(b"priv/g/k", b"0123456789"),)


def test_transaction_buffering_is_bounded():
    conn = dp.DictConnection(max_value=10)
    conn.receive_data(b"B1\tu\n")
    for i in range(dp.TRANSACTION_VALUES_FACTOR + 1):
        conn.receive_data(b"S1\tpriv/g/k%d\t0123456789\n" % i)
    conn.receive_data(b"C1\n")
    (event,) = conn.events()
    assert isinstance(event, dp.Refusal)
    assert b"transaction too large" in conn.send(event)
    assert conn.open_transactions == 0


# ---------------------------------------------------------------------------
# Replies go through the connection: once each, in order, of the event's kind


def owed_events(*lines: bytes) -> tuple[dp.DictConnection, list[dp.Event]]:
    conn = dp.DictConnection()
    conn.receive_data(b"".join(line + b"\n" for line in lines))
    return conn, conn.events()


def test_typed_replies_and_their_bytes():
    conn, (lk1, lk2, lk3, it1, it2, c1, c2, c3) = owed_events(
        b"Lk\tu", b"Lk\tu", b"Lk\tu", b"I0\t0\tp/\tu", b"I0\t0\tp/\tu",
        b"B1\tu", b"C1", b"B2\tu", b"C2", b"B3\tu", b"C3",
    )  # fmt: skip
    assert conn.replies_owed == 8
    assert conn.send(lk1, dp.Found(b"a\tb")) == b"Oa\x01tb\n"
    assert conn.send(lk2, dp.NOT_FOUND) == b"N\n"
    assert conn.send(lk3, dp.Failure("no\nway")) == b"Fno\x01nway\n"
    rows = [(b"p/a", b"1"), (b"q/b", b"2")]
    assert conn.send(it1, dp.Rows(rows)) == b"Op/a\t1\n\n"
    assert conn.send(it2, dp.Failure("broken")) == b"Fbroken\n"
    assert conn.send(c1, dp.COMMITTED) == b"O1\n"
    assert conn.send(c2, dp.COMMIT_NOTFOUND) == b"N2\n"
    assert conn.send(c3, dp.Failure("full")) == b"F3\tfull\n"
    assert conn.replies_owed == 0


def test_refusal_is_answered_with_its_own_failure_or_another():
    conn, (r1, r2) = owed_events(b"C7", b"Lk\t\xff")
    assert isinstance(r1, dp.Refusal) and isinstance(r2, dp.Refusal)
    assert (r1.command, r1.txid, r1.reason) == ("C", "7", "unknown transaction")
    assert conn.send(r1) == b"F7\tunknown transaction\n"
    assert conn.send(r2, dp.Failure("internal error")) == b"Finternal error\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"Lk\tu", dp.Found(b"v")),
        (b"I9\t0\tp\tu", dp.Rows([])),
        (b"C1", dp.COMMITTED),
        (b"C9", None),  # a Refusal
    ],
)
def test_second_reply_to_one_event_is_refused(line, reply):
    conn, [ev] = owed_events(b"B1\tu", line)
    first = conn.send(ev, reply)
    assert first.endswith(b"\n")
    with pytest.raises(dp.LocalProtocolError, match="owes no reply .already answered"):
        conn.send(ev, reply)
    with pytest.raises(dp.LocalProtocolError):
        conn.send(ev, dp.Failure("again"))


@pytest.mark.parametrize(
    ("line", "wrong"),
    [
        (b"Lk\tu", dp.COMMITTED),
        (b"Lk\tu", dp.Rows([(b"k", b"v")])),
        (b"Lk\tu", b"Ov\n"),  # bytes of one's own: never
        (b"Lk\tu", None),
        (b"I9\t0\tp\tu", dp.Found(b"v")),
        (b"I9\t0\tp\tu", dp.NOT_FOUND),
        (b"I9\t0\tp\tu", [(b"p", b"v")]),  # rows must come as Rows
        (b"C1", dp.NOT_FOUND),
        (b"C1", dp.Found(b"1")),
        (b"C1", None),
        (b"C9", dp.COMMITTED),  # a Refusal takes only a failure
        (b"C9", dp.NOT_FOUND),
    ],
)
def test_wrong_kind_of_reply_is_refused_and_changes_nothing(line, wrong):
    conn, [ev] = owed_events(b"B1\tu", line)
    with pytest.raises(dp.LocalProtocolError, match=f"a {type(ev).__name__} is answered with"):
        conn.send(ev, wrong)
    assert conn.replies_owed == 1  # still owed: the right reply goes out afterwards
    assert conn.send(ev, dp.Failure("x"))[:1] == b"F"
    assert conn.replies_owed == 0


def test_replies_leave_in_command_order():
    conn, (first, second) = owed_events(b"La\tu", b"Lb\tu")
    with pytest.raises(dp.LocalProtocolError, match="out of command order"):
        conn.send(second, dp.NOT_FOUND)
    assert conn.send(first, dp.NOT_FOUND) == b"N\n"
    assert conn.send(second, dp.Found(b"b")) == b"Ob\n"


def test_hello_and_foreign_events_owe_no_reply():
    conn, [hello] = owed_events(b"H3\t2\t0\t\tmetadata")
    with pytest.raises(dp.LocalProtocolError, match="a Hello owes no reply"):
        conn.send(hello, dp.NOT_FOUND)
    other, [lookup] = owed_events(b"Lk\tu")
    with pytest.raises(dp.LocalProtocolError, match="not an event of this connection"):
        conn.send(lookup, dp.NOT_FOUND)
    with pytest.raises(dp.LocalProtocolError, match="not an event of this connection"):
        other.send(dp.Lookup(b"k", "u"), dp.NOT_FOUND)  # equal, but not the one handed out
    assert other.send(lookup, dp.NOT_FOUND) == b"N\n"
    with pytest.raises(dp.LocalProtocolError, match="Hello owes no reply"):
        dp.encode_reply(hello, dp.NOT_FOUND)


def test_sentinels_are_their_own_type():
    for sentinel in (dp.NEED_DATA, dp.NOT_FOUND, dp.COMMITTED, dp.COMMIT_NOTFOUND):
        assert type(sentinel) is sentinel
        assert repr(sentinel) == sentinel.__name__
    assert dp.lookup_result(None) is dp.NOT_FOUND
    assert dp.lookup_result(b"") == dp.Found(b"")
    assert dp.DictConnection().next_event() is dp.NEED_DATA


def test_protocol_errors_are_reported_not_logged():
    conn, events = owed_events(b"Xjunk", b"S9\tk\tv", b"", b"C5")
    assert [type(ev) for ev in events] == [dp.Refusal]
    assert conn.errors == 4
    assert list(conn.problems) == [
        "dict protocol error: 'X': unknown command",
        "dict protocol error: 'S': unknown transaction id '9'",
        "dict protocol error: empty line",
        "dict protocol error: commit of unknown transaction '5'",
    ]
    conn.receive_data(b"\n" * 1000)
    assert conn.events() == [] and conn.errors == 1004
    assert len(conn.problems) <= 64  # bounded if nobody takes them


@pytest.mark.parametrize("letter", [b"C", b"D", b"S", b"R"])
def test_problem_text_of_a_huge_unknown_txid_is_clipped_when_built(letter):
    """A 1 MiB transaction id is the client's to choose; the problem text is ours to keep short."""
    txid = b"x" * (dp.DEFAULT_MAX_LINE - 16)
    rest = b"	k	v" if letter == b"S" else b""
    conn, events = owed_events(letter + txid + rest)
    [problem] = conn.problems
    assert len(problem) < 400, problem[:100]
    for ev in events:  # the reply still names the id exactly (the protocol needs it)
        reply = conn.send(ev)
        assert reply.startswith(b"F" + txid + b"\t") and len(reply) < len(txid) + 400


# ---------------------------------------------------------------------------
# Protocol versions


def test_h4_hello_serves_dovecot_2_4():
    conn = dp.DictConnection()
    assert conn.version is dp.DOVECOT_2_3  # before any H line
    (events,) = feed_lines(conn, [b"H4\t0\t0\t\tlmtp"])
    assert events == [dp.Hello(4, 0, "lmtp")]
    assert conn.version is dp.DOVECOT_2_4 and conn.dict_name == "lmtp"
    assert conn.protocol_major == 4
    assert not conn.problems and conn.replies_owed == 0
    assert dp.DOVECOT_2_4.hello_line("lmtp") == b"H4\t0\t0\t\tlmtp\n"
    assert dp.DOVECOT_2_3.hello_line("metadata") == b"H3\t2\t0\t\tmetadata\n"


def test_three_field_begin():
    conn = dp.DictConnection()
    evs = feed_lines(
        conn,
        [
            b"H4\t0\t0\t\tmetadata",
            b"B1\talice@example.org\t0",
            b"S1\tpriv/g/devicetoken\ttok1",
            b"C1",
            b"B2\talice@example.org\t3600",
            b"C2",
            b"B3\tbob@example.org",  # Dovecot's own 2.4 server reads the expiry as optional
            b"C3",
        ],
    )
    assert evs[3] == [
        dp.Commit("1", "alice@example.org", (dp.SetOp(b"priv/g/devicetoken", b"tok1"),), "metadata")
    ]
    assert evs[3][0].expire_secs == 0
    assert evs[5] == [dp.Commit("2", "alice@example.org", (), "metadata", expire_secs=3600)]
    assert evs[7] == [dp.Commit("3", "bob@example.org", (), "metadata")]
    assert conn.errors == 0


def test_begin_with_a_bad_expiry_opens_nothing():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"H4\t0\t0\t\tm", b"B1\talice\tsoon", b"S1\tk\tv", b"C1"])
    assert evs[1:3] == [[], []]
    [ref] = evs[3]
    assert isinstance(ref, dp.Refusal) and conn.send(ref) == b"F1\tunknown transaction\n"


def test_third_begin_field_is_not_read_on_2_3():
    """2.3 defines no expiry: an extra field is ignored, as any extra field is."""
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"H3\t2\t0\t\tm", b"B1\talice\tsoon", b"C1"])
    assert evs[2] == [dp.Commit("1", "alice", (), "m")]


def test_async_commit_exists_only_in_2_3():
    old = dp.DictConnection()
    evs = feed_lines(old, [b"H3\t2\t0\t\tm", b"B1\ta", b"D1"])
    assert evs[2] == [dp.Commit("1", "a", (), "m")]
    new = dp.DictConnection()
    evs = feed_lines(new, [b"H4\t0\t0\t\tm", b"B1\ta\t0", b"D1", b"C1"])
    assert evs[2] == []  # an unknown command: 2.4 never sends it, so it owes nothing
    assert list(new.problems) == ["dict protocol error: 'D': unknown command"]
    assert evs[3] == [dp.Commit("1", "a", (), "m")]


@pytest.mark.parametrize(
    ("major", "served"),
    [(2, dp.DOVECOT_2_3), (1, dp.DOVECOT_2_3), (5, dp.DOVECOT_2_4), (99, dp.DOVECOT_2_4)],
)
def test_unknown_major_warns_once_and_is_served_as_the_nearest(major, served):
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"H%d\t7\t0\t\tmetadata" % major, b"H%d\t8" % major, b"Lk\tu"])
    assert evs[0] == [dp.Hello(major, 7, "metadata")] and evs[1] == [dp.Hello(major, 8, "")]
    assert conn.version is served and conn.protocol_major == major
    assert list(conn.problems) == [
        f"dict client speaks protocol {major}.7, which no known Dovecot does;"
        f" serving it as Dovecot {served.dovecot}"
    ]
    assert conn.errors == 0  # a warning, not a protocol error
    assert conn.send(evs[2][0], dp.NOT_FOUND) == b"N\n"


def test_version_table():
    assert [v.dovecot for v in dp.VERSIONS] == ["2.3", "2.4"]
    assert (dp.DOVECOT_2_3.major, dp.DOVECOT_2_3.minor) == (3, 2)
    assert (dp.DOVECOT_2_4.major, dp.DOVECOT_2_4.minor) == (4, 0)
    for version in dp.VERSIONS:
        assert set(version.commands) >= set(b"HLIBSUATVRC")
        owed = bytes(letter for letter in version.commands if version.owes_reply(letter))
        assert owed == REPLY_LETTERS_OF[version.dovecot]
    assert b"D" in dp.DOVECOT_2_3.commands and b"D" not in dp.DOVECOT_2_4.commands
    assert not dp.DOVECOT_2_3.begin_has_expire and dp.DOVECOT_2_4.begin_has_expire


# ---------------------------------------------------------------------------
# Framing alone


def test_line_buffer_alone():
    from chatmaild.dictproto.framing import LineBuffer, Oversized

    buf = LineBuffer(max_line=10)
    buf.feed(b"Lk\tu\nS1\t" + b"x" * 20)
    assert buf.next_line() == b"Lk\tu"
    assert buf.next_line() is dp.NEED_DATA
    assert buf.buffered == 0  # over the limit without its LF: dropped as it came
    buf.feed(b"yyy\nC1\n")
    dropped = buf.next_line()
    assert type(dropped) is Oversized and dropped.head == b"S1\t" + b"x" * 20
    assert buf.next_line() == b"C1"
    assert buf.next_line() is dp.NEED_DATA
