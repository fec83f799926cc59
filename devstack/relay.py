"""What an integration test gets: Dovecot + chatmail-metadata + push sink, with clients.

The ``relay`` fixture in ``tests/conftest.py`` builds one per test; it tracks the
clients it hands out so that teardown closes them even when the test failed.
"""

from __future__ import annotations

import contextlib
import imaplib
import time
from collections.abc import Callable

from devstack.accounts import USERS
from devstack.dovecot import DovecotInstance
from devstack.imap import ImapClient, RawImap
from devstack.lmtp import deliver
from devstack.metadata import MetadataServer
from devstack.pushsink import PushSink
from devstack.turn import TurnHelper


class Relay:
    """Dovecot + chatmail-metadata for one test; tracks clients so teardown closes them."""

    def __init__(
        self, dovecot: DovecotInstance, metadata: MetadataServer, push_sink: PushSink
    ) -> None:
        self.dovecot = dovecot
        self.metadata = metadata
        self.push_sink = push_sink
        self.users = dict(USERS)
        self._closers: list[Callable[[], object]] = []

    def imap(self, user: str = "alice@example.org") -> ImapClient:
        client = ImapClient(self.dovecot.imap_port, user, self.users[user])
        self._closers.append(lambda: _logout(client))
        return client

    def raw_imap(self, user: str | None = "alice@example.org") -> RawImap:
        """A raw IMAP connection, logged in as ``user`` (None: not logged in)."""
        client = RawImap(self.dovecot.imap_port)
        self._closers.append(client.close)
        if user is not None:
            client.login(user, self.users[user])
        return client

    def deliver(
        self, envelope_from: str, rcpt: str, message: bytes | None = None
    ) -> tuple[int, bytes]:
        return deliver(self.dovecot.lmtp_port, envelope_from, rcpt, message)

    def turn_helper(self, line: bytes = b"user:pass\n") -> TurnHelper:
        path = self.dovecot.run_dir / f"turn-{time.monotonic_ns()}.socket"
        helper = TurnHelper(path, line)
        self._closers.append(helper.close)
        return helper

    def close_clients(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()


def _logout(client: imaplib.IMAP4) -> None:
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()
