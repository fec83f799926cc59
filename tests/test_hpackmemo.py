"""MemoEncoder emits exactly what hpack's own encoder emits, through inserts, evictions
and table resizes, and never remembers a never-indexed header; MemoDecoder gives
exactly hpack's headers and keeps its checks."""

from __future__ import annotations

import h2.connection
import hpack
import pytest
from hpack import NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError

from notifiers.hpackmemo import MemoDecoder, MemoEncoder


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


def test_peer_shrinking_and_growing_its_header_table_mid_connection():
    """Through h2 itself: the server's SETTINGS_HEADER_TABLE_SIZE reaches the memo encoder,
    which signals the size update and never reuses an index the peer has evicted."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.encoder = MemoEncoder()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()

    def exchange() -> list:
        events = server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())  # the client's SETTINGS ack
        return events

    exchange()
    stream = 1
    for size in (4096, 0, 4096, 64, 4096):
        server.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: size})
        exchange()
        for _ in range(3):  # the same headers each time: remembered, until the table changes
            headers = [tuple(h) for h in request(0)]
            client.send_headers(stream, request(0), end_stream=True)
            got = [e for e in exchange() if isinstance(e, h2.events.RequestReceived)]
            assert [(bytes(n), bytes(v)) for n, v in got[0].headers] == [
                (n.encode(), v.encode()) for n, v in headers
            ]
            stream += 2


def test_huffman_coder_gives_hpacks_bytes_for_every_octet_and_length():
    """Every octet alone, every padding length, and random strings: hpack's exact bytes."""
    import random

    from notifiers.hpackmemo import BitStringHuffman

    ours, theirs = BitStringHuffman(), hpack.Encoder().huffman_coder
    rng = random.Random(11)
    samples = [bytes([b]) for b in range(256)] + [b"", b"/3/device/" + b"ab" * 32]
    samples += [rng.randbytes(rng.randrange(1, 200)) for _ in range(500)]
    for data in samples:
        assert ours.encode(data) == theirs.encode(data), data


def test_memo_decoder_gives_hpacks_headers_through_inserts_evictions_and_resizes():
    encoder, ours, theirs = hpack.Encoder(), MemoDecoder(), hpack.Decoder()
    for i in range(600):
        if i in (200, 400):  # the peer resizes: a table-size update starts the next block
            encoder.header_table_size = 120 if i == 200 else 4096
        block = encoder.encode(request(i))
        got, expected = ours.decode(block, raw=True), theirs.decode(block, raw=True)
        assert got == expected
        assert [type(h) for h in got] == [type(h) for h in expected]  # never-indexed kept
        assert ours.header_table.dynamic_entries == theirs.header_table.dynamic_entries
    assert ours._indexed  # noqa: SLF001 - the memo was used


def test_memo_decoder_keeps_hpacks_checks():
    encoder, small = hpack.Encoder(), MemoDecoder(max_header_list_size=100)
    small.decode(encoder.encode([("x-first", "1")]), raw=True)  # inserted at index 62
    small.decode(encoder.encode([("x-first", "1")]), raw=True)  # one indexed octet: kept
    assert small._indexed  # noqa: SLF001
    with pytest.raises(OversizedHeaderListError):  # 20 of 40 octets each, from the memo
        small.decode(encoder.encode([("x-first", "1")] * 20), raw=True)
    decoder = MemoDecoder()
    with pytest.raises(HPACKDecodingError):  # a table-size update after a header
        decoder.decode(b"\x82\x3f\xe1\x1f", raw=True)
    with pytest.raises(HPACKDecodingError):  # index 0 is not a field
        decoder.decode(b"\x80", raw=True)
    shrunk = MemoDecoder()
    shrunk.decode(b"\x82", raw=True)
    shrunk.max_allowed_table_size = 100  # we said so; the peer did not shrink
    with pytest.raises(InvalidTableSizeError):
        shrunk.decode(b"\x82", raw=True)


def test_memo_decoder_replaces_h2s_decoder_with_its_limits():
    conn = h2.connection.H2Connection()
    memo = MemoDecoder.replacing(conn.decoder)
    assert memo.max_header_list_size == conn.decoder.max_header_list_size
    assert memo.max_allowed_table_size == conn.decoder.max_allowed_table_size
    assert memo.header_table_size == conn.decoder.header_table_size
