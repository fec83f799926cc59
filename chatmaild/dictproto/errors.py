"""The two ways the dict protocol can go wrong, named after who made the mistake."""

from __future__ import annotations


class LocalProtocolError(Exception):
    """Our side tried to send something the peer cannot take (a bug in the caller).

    Raised by :meth:`DictConnection.send` instead of producing bytes: a second reply
    to one event, a reply out of command order, a reply to an event that owes none,
    or a reply of the wrong kind (Dovecot crashes or silently desynchronises on each).
    """


class RemoteProtocolError(Exception):
    """A line from the peer that cannot be served.  Internal: never leaves the package.

    The connection turns it into a :class:`Refusal` where the command owes a reply,
    and only counts and reports it otherwise.  ``txid`` names the transaction a broken
    ``S``/``U``/``A`` line belonged to, so that the transaction fails at its commit.
    """

    def __init__(self, reason: str, txid: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.txid = txid
