"""Dovecot's dict protocol ("proxy:" dict, 2.3 and 2.4), sans I/O.

Nothing here touches a socket or logs.  :class:`DictConnection` is a small state
machine: feed it raw bytes with ``receive_data``, pull events with ``next_event``
(``NEED_DATA`` when it needs more bytes), answer each event that owes a reply with
``send(event, reply)`` and write the bytes it returns.  The adapter
(``chatmaild/dictserver.py``) only moves bytes.

One job per module, each readable and testable alone (as in h11):

* ``escaping``: Dovecot's tab-escaping of fields;
* ``framing``: the byte stream into lines, the line-length limit and the oversize discard;
* ``versions``: the protocol versions Dovecot speaks (2.3: ``H3``; 2.4: ``H4``,
  ``B<id>\\t<user>\\t<expire>``, no ``D``) as a table;
* ``parsing``: one line into an event or a transaction command, per that table;
* ``events``: what the server sees, and what each event owes;
* ``transactions``: the connection state (open transactions, bounded memory);
* ``replies``: the typed replies and the only bytes they can become;
* ``connection``: all of the above, and the check that each owed reply is sent once,
  in order, and of the right kind;
* ``errors`` and ``sentinels``: the vocabulary.
"""

from .connection import DictConnection
from .errors import LocalProtocolError
from .escaping import split_fields, tabescape, tabunescape
from .events import (
    ITER_EXACT_KEY,
    ITER_NO_VALUE,
    ITER_RECURSE,
    Commit,
    Event,
    Hello,
    IncOp,
    Iterate,
    Lookup,
    Op,
    Refusal,
    ReplyOwing,
    SetOp,
    UnsetOp,
)
from .framing import DEFAULT_MAX_LINE
from .replies import (
    COMMIT_NOTFOUND,
    COMMITTED,
    NOT_FOUND,
    REPLY_TYPES,
    CommitReply,
    Failure,
    Found,
    IterateReply,
    LookupReply,
    Reply,
    Rows,
    commit_notfound,
    commit_reply,
    encode_reply,
    iterate_failure,
    iterate_reply,
    lookup_failure,
    lookup_reply,
    lookup_result,
)
from .sentinels import NEED_DATA
from .transactions import MAX_OPEN_TRANSACTIONS, TRANSACTION_VALUES_FACTOR
from .versions import DEFAULT_VERSION, DOVECOT_2_3, DOVECOT_2_4, VERSIONS, ProtocolVersion

__all__ = [
    "COMMITTED",
    "COMMIT_NOTFOUND",
    "DEFAULT_MAX_LINE",
    "DEFAULT_VERSION",
    "DOVECOT_2_3",
    "DOVECOT_2_4",
    "ITER_EXACT_KEY",
    "ITER_NO_VALUE",
    "ITER_RECURSE",
    "MAX_OPEN_TRANSACTIONS",
    "NEED_DATA",
    "NOT_FOUND",
    "REPLY_TYPES",
    "TRANSACTION_VALUES_FACTOR",
    "VERSIONS",
    "Commit",
    "CommitReply",
    "DictConnection",
    "Event",
    "Failure",
    "Found",
    "Hello",
    "IncOp",
    "Iterate",
    "IterateReply",
    "LocalProtocolError",
    "Lookup",
    "LookupReply",
    "Op",
    "ProtocolVersion",
    "Refusal",
    "Reply",
    "ReplyOwing",
    "Rows",
    "SetOp",
    "UnsetOp",
    "commit_notfound",
    "commit_reply",
    "encode_reply",
    "iterate_failure",
    "iterate_reply",
    "lookup_failure",
    "lookup_reply",
    "lookup_result",
    "split_fields",
    "tabescape",
    "tabunescape",
]
