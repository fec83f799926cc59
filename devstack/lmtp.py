"""Delivering mail into the dev-stack Dovecot over LMTP (what Postfix does on a relay)."""

from __future__ import annotations

import smtplib
import time

from devstack.loopback import HOST


def make_message(sender: str, rcpt: str, subject: str = "test", body: str = "hello") -> bytes:
    msgid = f"<{time.monotonic_ns()}@{sender.rpartition('@')[2] or 'localhost'}>"
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def deliver(
    port: int, envelope_from: str, rcpt: str, message: bytes | None = None
) -> tuple[int, bytes]:
    """One LMTP transaction to ``rcpt``; returns the reply to DATA (code, text)."""
    if message is None:
        message = make_message(envelope_from, rcpt)
    with smtplib.LMTP(HOST, port, timeout=30) as lmtp:
        code, resp = lmtp.ehlo("test.localhost")  # sends LHLO
        if code != 250:
            raise RuntimeError(f"LHLO failed: {code} {resp!r}")
        code, resp = lmtp.mail(envelope_from)
        if code != 250:
            return code, resp
        code, resp = lmtp.rcpt(rcpt)
        if code != 250:
            return code, resp
        return lmtp.data(message)
