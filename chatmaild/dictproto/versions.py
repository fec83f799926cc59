"""The dict protocol versions Dovecot speaks, as data the parser consults.

A version is chosen by the major number of the peer's ``H`` line.  What differs
between releases is written here, not as ``if major >= 4`` in the parser:

* Dovecot 2.3 says ``H3\\t2\\t0\\t\\t<dict>`` and ``B<id>\\t<user>``; its header still
  defines ``D`` (async commit), although 2.3.19 never sends it.
* Dovecot 2.4 says ``H4\\t0\\t0\\t\\t<dict>`` and ``B<id>\\t<user>\\t<expire-secs>``, and
  has no ``D`` (2.4.1's ``dict-client.h``).

Both have ``V`` (hide log values), which owes no reply and is accepted.  A letter a
version does not have is an unknown command.  A major number no release uses is
served as the nearest known version (see reference/dovecot-2.4-dict-protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass

REPLY_OWING_COMMANDS = b"LICD"  # every other command is answered by nothing at all


@dataclass(frozen=True, slots=True)
class ProtocolVersion:
    """What one Dovecot release sends on a dict connection."""

    dovecot: str  # the release, as operators know it: "2.3"
    major: int  # the first field of its H line
    minor: int
    commands: bytes  # the command letters it has
    begin_has_expire: bool  # B<id>\t<user>\t<expire-secs> rather than B<id>\t<user>

    def hello_line(self, dict_name: str) -> bytes:
        """The ``H`` line this release sends (with its LF), for tests and tools."""
        return b"H%d\t%d\t0\t\t%s\n" % (self.major, self.minor, dict_name.encode())

    def owes_reply(self, letter: int) -> bool:
        return letter in self.commands and letter in REPLY_OWING_COMMANDS


DOVECOT_2_3 = ProtocolVersion("2.3", 3, 2, b"HLIBSUATVRCD", begin_has_expire=False)
DOVECOT_2_4 = ProtocolVersion("2.4", 4, 0, b"HLIBSUATVRC", begin_has_expire=True)

VERSIONS = (DOVECOT_2_3, DOVECOT_2_4)
# Before any H line (Dovecot always sends it first; tools and tests may not).
DEFAULT_VERSION = DOVECOT_2_3
_BY_MAJOR = {v.major: v for v in VERSIONS}


def version_for(major: int) -> tuple[ProtocolVersion, bool]:
    """The version to serve a peer saying ``H<major>``, and whether that major is known.

    An unknown major gets the nearest known one (the newer on a tie).
    """
    known = _BY_MAJOR.get(major)
    if known is not None:
        return known, True
    return min(VERSIONS, key=lambda v: (abs(v.major - major), -v.major)), False
