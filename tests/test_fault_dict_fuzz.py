"""Live fuzz of a running ``chatmail-metadata``'s dict socket (issue 10, fault tests in CI).

Hypothesis generates connection scripts: valid commands with mutated fields,
garbage, over-long lines, embedded TABs and escape bytes, interleaved transactions
(B/S/U/A/T/C/R) on several connections at once, both Dovecot hellos, and abrupt
disconnects mid-line.  Every reply must follow the grammar (``helpers_dictwire``),
a sentinel token set before must still read back, SQLite must find its database
intact, and the server's log must hold no ERROR and no traceback.  Bounded: a fixed
number of examples, derandomized, so the run is the same each time.
"""

from __future__ import annotations

import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers_dictwire import Exchange, lookup_line, run, session, set_lines
from helpers_fuzz import bounded
from hypothesis import given
from hypothesis import strategies as st

from chatmaild import dictproto as dp
from devstack.metadata import MetadataServer
from devstack.pushsink import PushSink

GUID = "0db9f01b8afe096b1c28000083ecc375"
SENTINEL_USER = "sentinel@example.org"
SENTINEL_TOKEN = b"sentinel-token-0123456789"
TOKEN_KEY = f"priv/{GUID}/devicetoken".encode()
USERS = ["alice@example.org", "bob@example.org", SENTINEL_USER.replace("sentinel", "sent1nel")]
KEYS = [
    TOKEN_KEY,
    f"priv/{GUID}/messagenew".encode(),
    f"priv/{GUID}/vendor/vendor.dovecot/pvt/server/vendor/deltachat/irohrelay".encode(),
    f"shared/{GUID}/vendor/vendor.dovecot/pvt/server/vendor/deltachat/turn".encode(),
    f"shared/{GUID}/comment".encode(),
    f"priv/{GUID}/".encode(),
    b"priv/not-a-guid/devicetoken",
    b"",
]
HUGE = (1 << 20) + 100  # over the default max_line_bytes


def no_lf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\\n")


# Field bytes: plain, or with TABs, escape bytes (\x01 + letter), NUL, CR, UTF-8, noise.
noise = st.binary(max_size=30).map(no_lf)
tricky = st.sampled_from([b"\t", b"\x01", b"\x011", b"\x01t", b"\x01n", b"\x01r", b"\x00", b"\r"])
fields = st.one_of(
    st.sampled_from(KEYS),
    st.text(max_size=20).map(lambda s: no_lf(s.encode())),
    noise,
    st.tuples(st.sampled_from(KEYS), tricky, noise).map(lambda t: b"".join(t)),
)
users = st.one_of(st.sampled_from(USERS).map(str.encode), fields)
txids = st.one_of(st.sampled_from([b"1", b"2", b"3", b"17"]), fields)
numbers = st.one_of(st.integers(-(10**20), 10**20).map(lambda n: str(n).encode()), fields)


def line(letter: bytes, *parts: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(*parts).map(lambda p: letter + b"\t".join(p))


commands = st.one_of(
    line(b"L", fields, users),
    line(b"I", numbers, numbers, fields, users),
    line(b"B", txids, users),
    line(b"B", txids, users, numbers),  # the 2.4 layout (an error on 2.3)
    line(b"S", txids, fields, fields),
    line(b"U", txids, fields),
    line(b"A", txids, fields, numbers),
    line(b"T", txids, numbers),
    line(b"R", txids),
    line(b"C", txids),
    line(b"D", txids),
    line(b"V", txids),
    # garbage: anything that is not a hello (a second H line would switch the version)
    noise.filter(lambda b: not b.startswith(b"H")),
    st.just(b""),
)


values = st.one_of(st.text(max_size=30).map(lambda s: dp.tabescape(s.encode())), fields)


@st.composite
def transaction(draw, version: dp.ProtocolVersion) -> list[bytes]:
    """A well-formed B ... C/R in ``version``'s layout, so most examples reach the store."""
    t = draw(st.sampled_from([b"1", b"2", b"3", b"17"]))
    begin = b"B" + t + b"\t" + draw(st.sampled_from(USERS)).encode()
    if version.begin_has_expire:
        begin += b"\t0"
    ops = draw(
        st.lists(
            st.one_of(
                line(b"S" + t + b"\t", st.sampled_from(KEYS), values),
                line(b"U" + t + b"\t", st.sampled_from(KEYS)),
                line(b"A" + t + b"\t", st.sampled_from(KEYS), numbers),
            ),
            max_size=4,
        )
    )
    end = draw(st.sampled_from([b"C", b"C", b"R"]))
    return [begin, *ops, end + t]


@st.composite
def exchange(draw) -> Exchange:
    version = draw(st.sampled_from([dp.DOVECOT_2_3, dp.DOVECOT_2_4]))
    lines: list[bytes] = []
    parts = st.one_of(commands.map(lambda c: [c]), transaction(version))
    for part in draw(st.lists(parts, max_size=25)):
        lines += part
    # interleaved transactions on one connection: shuffle within the script
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    huge = draw(st.sampled_from([None, None, None, b"L", b"S1\t", b"C", b"x"]))
    return Exchange(
        version=version,
        dict_name=draw(st.sampled_from(["metadata", "lmtp", "other"])),
        lines=lines,
        huge_at=None if huge is None else draw(st.integers(0, len(lines))),
        huge_head=huge or b"",
        huge_size=HUGE,
        # tiny pieces split lines across writes; a huge line goes in big ones
        chunk=draw(st.sampled_from([7, 100, 4096] if huge is None else [1 << 16])),
        tail=draw(st.sampled_from([b"L" + TOKEN_KEY, b"B1\talice", b"S1\tpriv/x\tv"])),
        abrupt=draw(st.integers(0, 4)) == 0,
        cut=draw(st.sampled_from([0.3, 1.0])),
    )


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    run_dir: Path = tmp_path_factory.mktemp("fuzz")
    sink = PushSink()
    server = MetadataServer(run_dir, run_dir / "metadata.socket", sink.url)
    server.log_level = "INFO"
    server.start()
    try:
        yield server
    finally:
        server.stop()
        sink.close()


def test_live_dict_fuzz_keeps_replies_data_and_log_clean(metadata: MetadataServer) -> None:
    sock = metadata.socket_path
    offset = metadata.log_size()
    assert session(sock, "metadata", set_lines("1", SENTINEL_USER, TOKEN_KEY, SENTINEL_TOKEN)) == [
        b"O1"
    ]

    seen: list[bytes] = []  # every reply stream checked, to show the fuzz reached the store

    @bounded(max_examples=50)
    @given(st.lists(exchange(), min_size=1, max_size=4))
    def fuzz(exchanges: list[Exchange]) -> None:
        with ThreadPoolExecutor(len(exchanges)) as pool:
            for done in pool.map(lambda ex: run(sock, ex), exchanges):
                seen.append(done.received)
        # the server still answers, and the sentinel is untouched
        assert session(sock, "metadata", [lookup_line(TOKEN_KEY, SENTINEL_USER)]) == [
            b"O" + SENTINEL_TOKEN
        ]

    fuzz()
    replies = b"".join(seen).split(b"\n")
    # not a vacuous pass: commits were applied and refused, lookups found values
    for shape in (rb"O(1|2|3|17)", rb"F(1|2|3|17)\t.+", rb"N", rb"F\t.+"):
        assert any(re.fullmatch(shape, r) for r in replies), shape
    assert len(replies) > 50
    assert metadata.running
    with sqlite3.connect(f"file:{metadata.db_path}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    log = metadata.log_since(offset)
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    "lines, data",
    [
        ([b"Lk\tu"], b""),  # no reply
        ([b"Lk\tu"], b"O1\nO2\n"),  # one too many
        ([b"Lk\tu"], b"W\n"),  # a letter this server never sends
        ([b"C7"], b"O8\n"),  # the wrong id
        ([b"I0\t0\tk\tu"], b"Okey-without-tab\n\n"),
        ([b"Sk\tv"], b"O\n"),  # S owes nothing
        ([b"Lk\tu"], b"O"),  # no LF
    ],
)
def test_the_grammar_check_catches_a_wrong_reply(lines, data) -> None:
    from helpers_dictwire import BadReply, check_replies, owed_kinds

    with pytest.raises(BadReply):
        check_replies(owed_kinds(dp.DOVECOT_2_3, lines), data)
