"""The proxy's listener against hostile or broken clients (issue 10, findings 5 and 6).

Raw sockets against the real listener (:func:`notifiers.app.start_listener`):
misframed requests must never put a token into any log record, slow clients are
cut off by the idle and body timeouts, and a client that goes away mid-body is
a DEBUG line, not an ERROR traceback.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import pytest
from helpers_fdlimit import hard_limit, lowered_soft_limit

from devstack.loopback import free_port
from devstack.process import stop_and_collect
from notifiers.app import ListenerTimeouts, make_app, start_listener
from notifiers.debounce import Debouncer
from notifiers.providers.base import Delivery, Provider
from notifiers.service import NotifyService
from notifiers.tokens import Kind

SECRET = "SeCrEtTokenBytes0123456789abcdefghijklmnop"
TOKEN = "fcm-chat.delta:" + SECRET


class Recording(Provider):
    def __init__(self) -> None:
        self.name = "FCM"
        self.sent: list[str] = []

    async def send(self, token):
        self.sent.append(token.raw)
        return Delivery.sent()


def make_service() -> NotifyService:
    return NotifyService({Kind.FCM: Recording()}, debouncer=Debouncer(window=0.01))


async def exchange(port: int, data: bytes, *, wait: float = 2.0) -> bytes:
    """Send ``data`` and read until the server closes or ``wait`` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


def serve(test, timeouts: ListenerTimeouts | None = None, **app_options):
    """Run ``await test(port)`` against the app behind the production listener."""

    async def main():
        app = make_app(make_service(), **app_options)
        runner = await start_listener(app, "127.0.0.1", 0, timeouts=timeouts)
        try:
            port = runner.addresses[0][1]
            await test(port)
        finally:
            await runner.cleanup()

    asyncio.run(main())


def every_log_text(records: list[logging.LogRecord]) -> str:
    """Each record as a handler would write it, traceback included."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return "\n".join(formatter.format(record) for record in records)


def post(body: bytes, headers: str = "") -> bytes:
    return b"POST /notify HTTP/1.1\r\nHost: proxy\r\n" + headers.encode() + b"\r\n" + body


MISFRAMED = {
    # keep-alive: a good request first, then the token with a short Content-Length
    "short-content-length": post(b"x", "Content-Length: 0\r\n")
    + post(TOKEN.encode(), "Content-Length: 9\r\n"),
    # keep-alive: the token with no Content-Length at all (upstream's b'fcm-chat.delta:...')
    "missing-content-length": post(b"", "Content-Length: 0\r\n") + post(TOKEN.encode()),
    # the token as the very first request line
    "token-as-request-line": TOKEN.encode() + b"\r\n\r\n",
    "token-as-method": TOKEN.encode() + b" / HTTP/1.1\r\nHost: proxy\r\n\r\n",
    "token-in-path": f"GET /{TOKEN} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode(),
    "token-in-headers": f"GET / HTTP/1.1\r\nHost: proxy\r\nUser-Agent: {TOKEN}\r\n"
    f"Referer: {TOKEN}\r\n\r\n".encode(),
    "token-in-bad-header": f"GET / HTTP/1.1\r\nHost: proxy\r\n{TOKEN}\r\n\r\n".encode(),
    "token-in-chunked": b"POST /notify HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n" + TOKEN.encode() + b"\r\n\r\n",
    "token-after-http10": b"POST /notify HTTP/1.0\r\nContent-Length: 3\r\n\r\n" + TOKEN.encode(),
}


@pytest.mark.parametrize("data", MISFRAMED.values(), ids=MISFRAMED.keys())
def test_misframed_requests_never_log_a_token(data, caplog):
    caplog.set_level(logging.DEBUG)

    async def test(port):
        assert await exchange(port, data, wait=1.0)  # something was answered
        # and the listener still answers afterwards
        assert b"Hello, world!" in await exchange(port, b"GET / HTTP/1.0\r\n\r\n")

    serve(test)
    logged = every_log_text(caplog.records)
    assert SECRET not in logged
    assert SECRET[:12] not in logged


def test_a_refused_request_is_one_short_line_below_warning(caplog):
    caplog.set_level(logging.DEBUG)

    async def test(port):
        await exchange(port, MISFRAMED["missing-content-length"], wait=1.0)

    serve(test)
    refused = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelno < logging.WARNING and refused[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


FAST = ListenerTimeouts(keepalive=0.5, read=0.5)


async def closed_within(port: int, data: bytes, seconds: float) -> tuple[bytes, float]:
    """Send ``data``; the bytes the server sent before closing and how long that took."""
    started = time.monotonic()
    received = await exchange(port, data, wait=seconds)
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"connection still open after {seconds} s"
    return received, elapsed


@pytest.mark.parametrize(
    "partial",
    [
        b"",  # connected, nothing sent
        b"POST /notify HTTP/1.1\r\nHost: proxy\r\nContent-Le",  # headers not finished
        post(b"fcm-chat.delta:", "Content-Length: 200\r\n"),  # body not finished
        post(b"", "Content-Length: 200\r\n"),  # headers, then nothing
    ],
    ids=["idle", "partial-headers", "partial-body", "no-body"],
)
def test_slow_clients_are_cut_off(partial):
    async def test(port):
        await closed_within(port, partial, 3.0)

    serve(test, timeouts=FAST, read_timeout=FAST.read)


def test_many_slow_clients_are_all_cut_off():
    async def test(port):
        partials = [post(b"fcm", "Content-Length: 200\r\n")] * 50 + [b"POST /no"] * 50
        await asyncio.gather(*(closed_within(port, p, 4.0) for p in partials))
        assert b"Hello, world!" in await exchange(port, b"GET / HTTP/1.0\r\n\r\n")

    serve(test, timeouts=FAST, read_timeout=FAST.read)


def test_a_body_timeout_answers_408():
    async def test(port):
        received, _ = await closed_within(port, post(b"fcm", "Content-Length: 200\r\n"), 3.0)
        assert received.startswith(b"HTTP/1.1 408 ")

    serve(test, timeouts=FAST, read_timeout=FAST.read)


def test_a_client_gone_mid_body_is_a_debug_line(caplog):
    caplog.set_level(logging.DEBUG)

    async def test(port):
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"fcm-chat.delta:abc", "Content-Length: 500\r\n"))
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
        await asyncio.sleep(0.3)
        assert b"Hello, world!" in await exchange(port, b"GET / HTTP/1.0\r\n\r\n")

    serve(test)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if r.exc_info]
    assert any("went away" in r.getMessage() for r in caplog.records)


def test_the_notifiers_program_applies_all_of_it(tmp_path):
    """The real process: fd limit raised and logged, slow clients cut off, no token logged."""
    port = free_port()
    args = ["--log-provider", "--port", str(port), "--log-level", "DEBUG"]
    args += ["--keepalive-timeout", "0.5", "--read-timeout", "0.5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifiers.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lowered_soft_limit(),
    )

    async def client():
        deadline = time.monotonic() + 20
        while True:
            try:
                if b"Hello" in await exchange(port, b"GET / HTTP/1.0\r\n\r\n"):
                    break
            except ConnectionRefusedError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the proxy did not start"
            await asyncio.sleep(0.1)
        await closed_within(port, post(b"fcm", "Content-Length: 200\r\n"), 3.0)
        await closed_within(port, b"POST /notify HTTP/1.1\r\n", 3.0)
        for data in MISFRAMED.values():
            # Until the proxy closes (its answer sent, or the 0.5 s keep-alive over): a fixed
            # 1 s could end before a loaded proxy had read the request, then SIGTERM came
            # first and its refusal was never logged.
            await exchange(port, data, wait=20.0)

    try:
        asyncio.run(client())
        _, err = stop_and_collect(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"open files limit: raised from 256 to {hard_limit()}" in err
    assert "refused a malformed request" in err
    assert SECRET[:12] not in err


def test_timeouts_are_options_with_defaults():
    from notifiers.settings import settings_from_args, settings_from_mapping

    assert settings_from_args([], env={}).listener_timeouts == ListenerTimeouts(15.0, 10.0)
    given = settings_from_mapping({"keepalive_timeout": "5", "read_timeout": "2.5"}, env={})
    assert given.listener_timeouts == ListenerTimeouts(keepalive=5.0, read=2.5)
    with pytest.raises(ValueError, match="read_timeout"):
        settings_from_mapping({"read_timeout": "0"}, env={})
