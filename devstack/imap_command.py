"""``scripts/run-local imap PORT USER PASSWORD COMMAND``: one IMAP command, its answer printed.

The guide's way to speak IMAP METADATA: curl does not print untagged answers
that carry literals.  Whatever goes wrong (a wrong password, a stopped stack,
a wrong argument) is one line on stderr naming what is at fault, never a
traceback.
"""

from __future__ import annotations

import sys

from devstack.imap import ImapResponse, LoginFailed, RawImap
from devstack.loopback import HOST

PROG = "run-local imap"
USAGE = f"usage: {PROG} PORT USER PASSWORD COMMAND"


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(USAGE, file=sys.stderr)
        return 2
    port, user, password, command = argv
    if not port.isdigit():
        return _fail(f"PORT must be the IMAP port the guide shows, not {port!r}", status=2)
    address = f"{HOST}:{port}"
    try:
        resp = run(int(port), user, password, command)
    except LoginFailed as exc:
        return _fail(f"{address}: {exc}")
    except ConnectionRefusedError:
        return _fail(f"nothing listens on {address}: is the local stack (scripts/run-local) up?")
    except OSError as exc:  # a timeout, a connection closed under us
        return _fail(f"{address}: {exc.strerror or exc}")
    except RuntimeError as exc:  # something else answered on that port
        return _fail(f"{address}: {exc}")
    for parts in resp.untagged:
        print("* " + b"".join(parts).decode("utf-8", "replace"))
    print(f"{resp.tag.decode()} {resp.status} {resp.text.decode('utf-8', 'replace')}")
    return 0 if resp.status == "OK" else 1


def run(port: int, user: str, password: str, command: str) -> ImapResponse:
    """Log in as ``user`` and send ``command`` exactly as given."""
    with RawImap(port) as imap:
        imap.login(user, password)
        return imap.command(command)


def _fail(message: str, status: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status
