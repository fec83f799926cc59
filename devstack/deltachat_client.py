"""A real Delta Chat core (libdeltachat 2.23.0, in-process through CFFI) against the dev stack.

Tests that want to know what stock clients do, rather than what we think they do,
drive the core itself: the push token is set with the C API
``dc_accounts_set_push_device_token`` (no JSON-RPC method sets it), so the core
encrypts it to notifications.delta.chat's key as every app does and uploads it
with ``SETMETADATA`` on its own; everything else goes through the core's JSON-RPC
(``dc_jsonrpc_blocking_call``). See the reference notes client-core.md §4.

Loopback only: the account names its IMAP and SMTP servers as ``127.0.0.1`` with
explicit ports and ``plain`` security, so the core does no autoconfig, MX or DNS
lookup for them. The one name it resolves is the TURN host the relay announces
(``/shared/vendor/deltachat/turn``, which is chatmail.ini's ``mail_domain``), so a
relay a core talks to must use :data:`LOOPBACK_MAIL_DOMAIN` and a TURN helper that
answers :func:`turn_helper_line`: without a TURN value it can parse, the core falls
back to built-in public ICE servers and resolves their names (nine.testrun.org).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from devstack.imap import ImapClient
from devstack.loopback import HOST, wait_until

#: The only ``mail_domain`` a relay may announce to a real core: it resolves from
#: /etc/hosts, so the core's TURN lookup never becomes a DNS query.
LOOPBACK_MAIL_DOMAIN = "localhost"
#: A push token as the Android app passes it (``fcm-<applicationId>:<FCM token>``).
DEFAULT_PUSH_TOKEN = "fcm-chat.delta:devstack-test-token"
#: How many core log lines a failure report shows.
LOG_LINES_KEPT = 200
#: TURN credentials far enough ahead that the core does not refresh them during a test
#: (it re-fetches when they expire in less than 12 h).
TURN_VALIDITY = 7 * 24 * 3600
#: The core's resolver logs each name it looks up (src/net/dns.rs), with or without a
#: port: "No memory-cached DNS resolution for NAME available", "DNS resolution for
#: NAME:PORT failed", "Resolved NAME into ADDRESS".
RESOLVED_NAME_RE = re.compile(r"(?:DNS resolution for|Resolved) (\S+?)(?::\d+)?\.?(?:\s|$)")
#: What a core in the dev stack may resolve: no name here ever becomes a DNS query.
LOOPBACK_NAMES = frozenset({HOST, LOOPBACK_MAIL_DOMAIN})


def turn_helper_line(now: float | None = None) -> bytes:
    """What a chatmail-turn helper answers: ``<expiry unix time>:<password>``.

    The relay serves it as ``<mail_domain>:3478:<line>``, and the core insists that
    the first field is a timestamp (``user:pass`` makes it use its fallback servers).
    """
    expiry = int(time.time() if now is None else now) + TURN_VALIDITY
    return f"{expiry}:devstack-turn-secret\n".encode()


class DeltaChatError(RuntimeError):
    """The core refused a JSON-RPC call (the message is the core's)."""


def load_capi() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the ``deltachat`` wheel; ImportError if it is not installed."""
    from deltachat.capi import ffi, lib

    return ffi, lib


class DeltaChatCore:
    """One account manager of a real core in a temporary directory, with a push token set.

    The token is set before any account exists, as an app does at start, so the
    first inbox connection uploads it. :meth:`close` stops the core and removes
    the directory; use it as a context manager.
    """

    def __init__(self, push_token: str = DEFAULT_PUSH_TOKEN, base_dir: Path | None = None) -> None:
        self.ffi, self.lib = load_capi()
        self.push_token = push_token
        self.dir = Path(tempfile.mkdtemp(prefix="deltachat-", dir=base_dir))
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        #: Every name the core's resolver was asked for, from its log (all of it, not
        #: just the kept lines): a test asserts it stays within :data:`LOOPBACK_NAMES`.
        self.resolved_names: set[str] = set()
        self._ids = itertools.count(1)
        self._accounts = self.lib.dc_accounts_new(str(self.dir / "accounts").encode(), 1)
        if self._accounts == self.ffi.NULL:
            raise DeltaChatError(f"dc_accounts_new failed in {self.dir}")
        self.lib.dc_accounts_set_push_device_token(self._accounts, push_token.encode())
        self._emitter = self.lib.dc_accounts_get_event_emitter(self._accounts)
        self._events = threading.Thread(target=self._drain_events, daemon=True)
        self._events.start()
        self._rpc = self.lib.dc_jsonrpc_init(self._accounts)

    # -- JSON-RPC -----------------------------------------------------------

    def call(self, method: str, *params: Any) -> Any:
        """One JSON-RPC request; returns its result or raises :class:`DeltaChatError`."""
        request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        raw = self.lib.dc_jsonrpc_blocking_call(self._rpc, json.dumps(request).encode())
        if raw == self.ffi.NULL:
            raise DeltaChatError(f"{method}: no answer from the core")
        try:
            answer = json.loads(self.ffi.string(raw))
        finally:
            self.lib.dc_str_unref(raw)
        if "error" in answer:
            raise DeltaChatError(f"{method}: {answer['error'].get('message', answer['error'])}")
        return answer.get("result")

    def add_account(self, addr: str, password: str, imap_port: int, smtp_port: int) -> int:
        """A configured account on 127.0.0.1 (plain IMAP and SMTP); returns its id.

        Every server field is given, so the core skips autoconfig and tries exactly
        these two endpoints; the call returns after its IMAP and SMTP logins succeeded.
        """
        account = self.call("add_account")
        self.call(
            "add_or_update_transport",
            account,
            {
                "addr": addr,
                "password": password,
                "imapServer": HOST,
                "imapPort": imap_port,
                "imapSecurity": "plain",
                "smtpServer": HOST,
                "smtpPort": smtp_port,
                "smtpSecurity": "plain",
                "certificateChecks": "acceptInvalidCertificates",
            },
        )
        return account

    def start_io(self, account: int) -> None:
        self.call("start_io", account)

    def encrypted_device_token(self, account: int) -> str | None:
        """The ``openpgp:`` ciphertext the core made of the push token (and sends), or None."""
        return self.call("get_config", account, "encrypted_device_token") or None

    # -- waiting for the upload ---------------------------------------------

    def wait_for_stored_token(
        self, account: int, imap_port: int, addr: str, password: str, timeout: float = 30.0
    ) -> str:
        """Wait until the relay returns the core's ciphertext for ``addr``; return the ciphertext.

        Checks the relay through Dovecot (``GETMETADATA "INBOX" /private/devicetoken``
        as the user), so it proves the whole IMAP-to-store path, not just that the
        core encrypted something.
        """

        def stored() -> str | None:
            ciphertext = self.encrypted_device_token(account)
            if ciphertext is None:
                return None
            tokens = _stored_tokens(imap_port, addr, password)
            return ciphertext if ciphertext in tokens else None

        try:
            return str(wait_until(stored, timeout, f"the relay to store {addr}'s token", 0.1))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last core log lines:\n{self.log_text()}") from None

    # -- events and shutdown ------------------------------------------------

    def _drain_events(self) -> None:
        """Keep the core's log lines for failure reports; ends when the manager is gone."""
        lib, ffi = self.lib, self.ffi
        while True:
            event = lib.dc_get_next_event(self._emitter)
            if event == ffi.NULL:
                return
            try:
                text = lib.dc_event_get_data2_str(event)
                if text != ffi.NULL:
                    line = ffi.string(text).decode("utf-8", "replace")
                    lib.dc_str_unref(text)
                    self.log.append(line)
                    self.resolved_names.update(RESOLVED_NAME_RE.findall(line))
            finally:
                lib.dc_event_unref(event)

    def log_text(self) -> str:
        return "\n".join(self.log)

    def close(self) -> None:
        """Stop all I/O, release the core (which ends the event thread), remove the directory."""
        if self._accounts is None:
            return
        with contextlib.suppress(Exception):
            self.lib.dc_accounts_stop_io(self._accounts)
        self.lib.dc_jsonrpc_unref(self._rpc)
        self.lib.dc_accounts_unref(self._accounts)
        self._accounts = None
        self._events.join(10)
        if not self._events.is_alive():
            self.lib.dc_event_emitter_unref(self._emitter)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DeltaChatCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stored_tokens(imap_port: int, addr: str, password: str) -> list[str]:
    """The user's tokens as the relay answers them (space-joined in one value)."""
    client = ImapClient(imap_port, addr, password)
    try:
        typ, values = client.getmetadata("INBOX", "/private/devicetoken")
    finally:
        with contextlib.suppress(Exception):
            client.logout()
    value = values.get("/private/devicetoken") if typ == "OK" else None
    return value.decode().split() if value else []
