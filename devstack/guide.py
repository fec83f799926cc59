"""The guide ``scripts/run-local`` prints once the stack is up: where things are, what to try.

Every command in it works from any directory (absolute paths, 127.0.0.1
addresses), since a user pastes them into whatever shell they have open.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from devstack.dovecot import REPO, DovecotInstance
from devstack.metadata import MetadataServer

RUN_LOCAL = REPO / "scripts" / "run-local"


def guide(
    run_dir: Path, dovecot: DovecotInstance, metadata: MetadataServer, metrics_port: int
) -> str:
    """The guide's text; each command is on its own line, indented by five spaces."""
    imap, lmtp = dovecot.imap_port, dovecot.lmtp_port
    imapcmd = f"{shlex.quote(str(RUN_LOCAL))} imap {imap}"
    status = " ".join(
        shlex.quote(str(part))
        for part in (
            REPO / ".venv" / "bin" / "chatmail-metadata",
            "status",
            metadata.ini_path,
            "--db",
            metadata.db_path,
        )
    )
    return f"""
== chatmail push, local stack (Ctrl-C stops it) ==
  Dovecot IMAP       127.0.0.1:{imap}   users alice@example.org / alicepass, bob@example.org / bobpass
  Dovecot LMTP       127.0.0.1:{lmtp}
  chatmail-metadata  dict socket {metadata.socket_path}
                     database {metadata.db_path}
                     metrics http://127.0.0.1:{metrics_port}/metrics
  push proxy         embedded, log-only provider (nothing leaves this machine)
  files              {run_dir}  (Dovecot log: {dovecot.log_path})

alice has a demo device token already (set with IMAP SETMETADATA, as Delta Chat does).

1. Deliver a mail to alice and watch the push below ("sent (attempt 1)", and the
   log provider's "would send" line):
     swaks --server 127.0.0.1:{lmtp} --protocol LMTP --from carol@example.net --to alice@example.org
   or, without swaks:
     python3 -c 'import smtplib; smtplib.LMTP("127.0.0.1", {lmtp}).sendmail("carol@example.net", ["alice@example.org"], "From: carol@example.net\\r\\nSubject: hi\\r\\n\\r\\nhello\\r\\n")'
2. Register a token for bob, then read it back (IMAP METADATA):
     {imapcmd} bob@example.org bobpass 'SETMETADATA INBOX (/private/devicetoken "fcm-chat.delta:demo")'
     {imapcmd} bob@example.org bobpass 'GETMETADATA INBOX /private/devicetoken'
3. Read the server keys Delta Chat asks for:
     {imapcmd} bob@example.org bobpass 'GETMETADATA "" (/shared/vendor/deltachat/irohrelay /shared/vendor/deltachat/maxsmtprecipients /shared/vendor/deltachat/appversions)'
4. Mail from alice to herself wakes nothing; more mail within 10 s is debounced
   into one trailing push. The counters:
     curl -s http://127.0.0.1:{metrics_port}/metrics | grep chatmail_push
5. Is push working? The relay's own summary, and the check monitoring runs ("ok", exit 0):
     {status}
     {status} --check

-- chatmail-metadata log --"""
