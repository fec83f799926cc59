"""The connection's one-step path for ``L`` lines makes exactly what the parser makes (issue 11).

Delta Chat's login reads four server keys, one ``L`` line each, so
:meth:`DictConnection.next_event` turns an unescaped ``L`` line into its ``Lookup``
without the general parser; any line, escaped or not, well-formed or not, must still
give the event (or the refusal) the general path gives, for every protocol version.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatmaild import dictproto as dp
from chatmaild.dictproto.errors import RemoteProtocolError
from chatmaild.dictproto.parsing import PARSERS_BY_VERSION, parse_line

fields = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b"", b"priv/x/devicetoken", b"alice@example.org", b"\xff\xfe", b"\x01t"]),
    ),
    max_size=4,
)


@pytest.mark.parametrize("version", dp.VERSIONS, ids=lambda v: v.dovecot)
@settings(max_examples=400)
@given(parts=fields)
@example(parts=[])
@example(parts=[b"shared/g/vendor/x", b"alice@example.org"])
@example(parts=[b"k", b""])
@example(parts=[b"k", b"\xff"])
@example(parts=[b"k\x01tx", b"alice"])
@example(parts=[b"k", b"alice", b"extra"])
def test_lookup_lines_give_what_the_parser_gives(version, parts):
    line = (b"L" + b"\t".join(parts)).replace(b"\n", b"")
    conn = dp.DictConnection()
    conn.receive_data(version.hello_line("d") + line + b"\n")
    events = [ev for ev in conn.events() if not isinstance(ev, dp.Hello)]
    assert len(events) == 1  # an L line owes one reply, whatever it holds
    (ev,) = events
    try:
        want = parse_line(line, PARSERS_BY_VERSION[version], version)
    except RemoteProtocolError as exc:
        assert isinstance(ev, dp.Refusal) and ev.command == "L"
        assert exc.reason in ev.reason
    else:
        assert ev == want and type(ev) is dp.Lookup
    assert conn.send(ev, None if isinstance(ev, dp.Refusal) else dp.NOT_FOUND)[:1] in b"NF"
