"""The sans-I/O dict protocol: escaping, framing, parsing, transactions, reply builders."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatmaild import dictproto as dp

REPLY_OWING = (dp.Lookup, dp.Iterate, dp.Commit, dp.Refusal)
NO_REPLY_LETTERS = b"HBSUATVR"
REPLY_LETTERS = b"LICD"

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


def check_refusal(ev: dp.Event) -> None:
    if isinstance(ev, dp.Refusal):
        assert ev.reply[:1] == b"F"
        assert ev.reply.endswith(b"\n") and ev.reply.count(b"\n") == 1


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


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines_st, max_size=25))
def test_parser_one_reply_per_reply_letter(lines):
    conn = dp.DictConnection()
    prelude = [b"H3\t2\t0\t\tmetadata", b"B1\talice", b"B2\tbob"]
    feed_lines(conn, prelude)
    for line, events in zip(lines, feed_lines(conn, lines), strict=True):
        owing = [ev for ev in events if is_reply_owing(ev)]
        for ev in events:
            check_refusal(ev)
        if line[:1] and line[0] in REPLY_LETTERS:
            assert len(owing) == 1, (line, events)
        else:
            assert owing == [], (line, events)


@settings(max_examples=200)
@given(
    st.sampled_from(list(NO_REPLY_LETTERS)),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)
def test_no_reply_commands_never_owe_a_reply(letter, rest):
    conn = dp.DictConnection()
    feed_lines(conn, [b"B1\talice", b"B7\tbob"])
    (events,) = feed_lines(conn, [bytes([letter]) + rest])
    assert not any(is_reply_owing(ev) for ev in events)


@settings(max_examples=200)
@given(
    st.sampled_from(list(REPLY_LETTERS)),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)
def test_reply_commands_owe_exactly_one_reply_even_malformed(letter, rest):
    conn = dp.DictConnection()
    feed_lines(conn, [b"B1\talice"])
    (events,) = feed_lines(conn, [bytes([letter]) + rest])
    assert sum(map(is_reply_owing, events)) == 1


@st.composite
def stream_and_cuts(draw):
    lines = draw(st.lists(lines_st, max_size=20))
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return lines, stream, cuts


@settings(max_examples=300)
@given(stream_and_cuts(), st.sampled_from([8, 16, 40, dp.DEFAULT_MAX_LINE]))
def test_arbitrary_chunking_gives_the_same_events(data, max_line):
    lines, stream, cuts = data
    whole = dp.DictConnection(max_line)
    whole.receive_data(b"B1\talice\n")
    whole.events()
    expected = [ev for evs in feed_lines(whole, lines) for ev in evs]

    chunked = dp.DictConnection(max_line)
    chunked.receive_data(b"B1\talice\n")
    chunked.events()
    got = []
    start = 0
    for cut in [*cuts, len(stream)]:
        chunked.receive_data(stream[start:cut])
        got.extend(chunked.events())
        start = cut
    assert got == expected
    owing = sum(1 for line in lines if line[:1] and line[0] in REPLY_LETTERS)
    assert sum(map(is_reply_owing, got)) == owing


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data):
    conn = dp.DictConnection(max_line=64)
    conn.receive_data(data)
    for ev in conn.events():
        check_refusal(ev)


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
    assert isinstance(ref, dp.Refusal) and ref.reply.startswith(b"F1\t")


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
    assert isinstance(ref, dp.Refusal) and ref.reply.startswith(b"F1\t")


def test_unknown_transaction_ids():
    conn = dp.DictConnection()
    evs = feed_lines(conn, [b"S9\tpriv/g/k\tv", b"U9\tk", b"R9", b"T9\t1\t2", b"C9", b"D8"])
    assert evs[:4] == [[], [], [], []]
    assert [e.reply[:3] for [e] in evs[4:]] == [b"F9\t", b"F8\t"]
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
            check_refusal(ev)
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
    assert isinstance(l_big, dp.Refusal) and l_big.reply.startswith(b"F")
    assert isinstance(i_big, dp.Refusal) and i_big.reply.startswith(b"F")
    assert lookup == dp.Lookup(b"priv/g/a", "alice")
    assert c1 == dp.Commit(
        "1", "alice", (dp.SetOp(b"priv/g/a", b"1"), dp.SetOp(b"priv/g/c", b"3")), ""
    )
    assert isinstance(c2, dp.Refusal) and c2.reply.startswith(b"F2\t")
    assert conn.open_transactions == 0


def test_oversized_commit_line_answers_f_and_drops_tx():
    conn = dp.DictConnection(max_line=50)
    evs = feed_lines(conn, [b"B1\talice", b"C1" + b"\t" * 100])
    [ref] = evs[1]
    assert isinstance(ref, dp.Refusal) and ref.reply.startswith(b"F")
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
        assert len(conn._buf) <= 2000
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
    assert first.reply == b"F1\tvalue of 11 bytes exceeds the limit of 10 bytes\n"
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
    assert b"transaction too large" in event.reply
    assert conn.open_transactions == 0
