"""Parsed H lines are reused across connections (chatmaild.dictproto.connection._HELLOS);
each connection still takes its version, dict name and warning from its own line."""

from __future__ import annotations

from chatmaild import dictproto as dp
from chatmaild.dictproto import connection


def hello(conn: dp.DictConnection, line: bytes) -> dp.Hello:
    conn.receive_data(line + b"\n")
    (ev,) = conn.events()
    assert isinstance(ev, dp.Hello)
    return ev


def test_same_line_same_event_each_connection_its_own_state():
    connection._HELLOS.clear()  # room for this line whatever ran before
    line = b"H4\t0\t0\t\thello-cache-test"
    first, second = dp.DictConnection(), dp.DictConnection()
    ev1 = hello(first, line)
    ev2 = hello(second, line)
    assert ev1 == ev2 == dp.Hello(4, 0, "hello-cache-test")
    assert line in connection._HELLOS
    for conn in (first, second):
        assert conn.version is dp.DOVECOT_2_4
        assert conn.dict_name == "hello-cache-test"
        assert conn.protocol_major == 4


def test_unknown_major_warns_on_every_connection_that_says_it():
    line = b"H9\t0\t0\t\tfuture"
    for _ in range(2):
        conn = dp.DictConnection()
        hello(conn, line)
        assert conn.version is dp.DOVECOT_2_4
        assert len(conn.problems) == 1 and "protocol 9.0" in conn.problems[0]


def test_bounded_in_count_and_length():
    for i in range(connection.MAX_HELLOS + 4):
        hello(dp.DictConnection(), b"H3\t2\t0\t\tmany-%d" % i)
    long = b"H3\t2\t0\t\t" + b"x" * connection.MAX_HELLO_LINE
    assert hello(dp.DictConnection(), long).dict_name == "x" * connection.MAX_HELLO_LINE
    assert len(connection._HELLOS) <= connection.MAX_HELLOS
    assert long not in connection._HELLOS


def test_a_bad_hello_is_never_cached():
    conn = dp.DictConnection()
    conn.receive_data(b"H3\n")
    assert conn.events() == []
    assert conn.errors == 1
    assert b"H3" not in connection._HELLOS
