"""The connection's one-step path for ``S`` lines does exactly what the parser does (issue 11).

Every Delta Chat connect refreshes its device token, a ~1 KB ``S`` line, so
:meth:`DictConnection.next_event` adds an unescaped ``S`` line to its transaction
without the general parser.  Whatever the line holds (an unknown or failed transaction,
too few fields, a txid that is not UTF-8, a value over the limit), the transaction's
commit and the problems reported must be what the general path gives.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatmaild import dictproto as dp

fields = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b"", b"1", b"2", b"priv/x/devicetoken", b"\xff\xfe", b"\x01t", b"v" * 40]),
    ),
    max_size=4,
)


def _outcome(version: dp.ProtocolVersion, line: bytes, general: bool) -> tuple:
    """What a transaction with ``line`` in it comes to: events, errors, problems, open."""
    with pytest.MonkeyPatch.context() as mp:
        if general:  # the one-step path declines every line: the parser does it all
            mp.setattr(dp.DictConnection, "_set_unescaped", lambda self, line: False)
        conn = dp.DictConnection(max_value=32)
        begin = b"B1\talice\t0" if version.begin_has_expire else b"B1\talice"
        conn.receive_data(version.hello_line("d") + begin + b"\n" + line + b"\nC1\nC2\n")
        events = [ev for ev in conn.events() if not isinstance(ev, dp.Hello)]
        return events, conn.errors, list(conn.problems), conn.open_transactions


@pytest.mark.parametrize("version", dp.VERSIONS, ids=lambda v: v.dovecot)
@settings(max_examples=300)
@given(parts=fields)
@example(parts=[b"1", b"priv/g/devicetoken", b"openpgp:tok"])
@example(parts=[b"1", b"k"])
@example(parts=[b"2", b"k", b"v"])
@example(parts=[b"\xff", b"k", b"v"])
@example(parts=[b"1", b"k", b"v" * 40])
@example(parts=[b"1", b"k", b"v", b"extra"])
@example(parts=[b"1", b"k\x01t", b"v"])
def test_set_lines_give_what_the_parser_gives(version, parts):
    line = (b"S" + b"\t".join(parts)).replace(b"\n", b"")
    assert _outcome(version, line, general=False) == _outcome(version, line, general=True)
