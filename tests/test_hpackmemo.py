"""MemoEncoder emits exactly what hpack's own encoder emits, through inserts, evictions
and table resizes, and never remembers a never-indexed header."""

from __future__ import annotations

import hpack
from hpack import NeverIndexedHeaderTuple

from notifiers.hpackmemo import MemoEncoder


def request(i: int) -> list:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "api.push.apple.com"),
        NeverIndexedHeaderTuple(":path", f"/3/device/{i:064x}"),
        ("apns-topic", "chat.delta"),
        ("apns-priority", str(i % 7)),  # new values insert (and later evict) entries
        ("content-length", "42"),
    ]


def test_same_bytes_as_hpack_through_inserts_evictions_and_resizes():
    ours, theirs, decoder = MemoEncoder(), hpack.Encoder(), hpack.Decoder()
    for i in range(600):
        if i in (200, 400):
            size = 120 if i == 200 else 4096
            ours.header_table_size = size
            theirs.header_table_size = size
        headers = request(i)
        block = ours.encode(headers)
        assert block == theirs.encode(headers)
        assert [tuple(h) for h in decoder.decode(block)] == [tuple(h) for h in headers]


def test_repeated_headers_are_remembered_but_never_indexed_ones_are_not():
    encoder = MemoEncoder()
    for _ in range(3):
        encoder.encode([(":method", "POST"), NeverIndexedHeaderTuple(":path", "/secret")])
    assert (b":method", b"POST", True) in encoder._memo
    assert not any(b"/secret" in key for key in encoder._memo)
