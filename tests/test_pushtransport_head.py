"""parse_response_head: the plain-http transport's reading of a /notify answer's head
(status, Content-Length framing, keep-alive), without a socket."""

from __future__ import annotations

import http.client

import pytest

from chatmaild.pushtransport import ResponseHead, parse_response_head


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0", ResponseHead(200, 0, True)),
        (b"HTTP/1.1 410 Gone\r\ncontent-length:  5 ", ResponseHead(410, 5, True)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close", ResponseHead(200, 0, False)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0", ResponseHead(200, 0, False)),
        (
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2",
            ResponseHead(200, 2, True),
        ),
        # Not framed by Content-Length: the status counts, the connection is not reused.
        (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked", ResponseHead(503, None, False)),
        (b"HTTP/1.1 200 OK", ResponseHead(200, None, False)),
        (b"HTTP/1.1 100 Continue", ResponseHead(100, None, False)),
    ],
)
def test_status_length_and_keep_alive(head: bytes, expected: ResponseHead) -> None:
    assert parse_response_head(head) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"SSH-2.0-OpenSSH_9.2",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 200 OK\r\nno colon here",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
    ],
)
def test_a_malformed_head_is_an_http_error(head: bytes) -> None:
    with pytest.raises(http.client.HTTPException):
        parse_response_head(head)
