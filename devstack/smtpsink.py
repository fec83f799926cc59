"""An SMTP server on 127.0.0.1 that accepts everything and keeps it: a real client's "submission".

The dev stack has no Postfix, but a Delta Chat core configures an account only
after its SMTP login succeeded (EHLO, AUTH), and may send mail later. This sink
answers just enough of RFC 5321 and RFC 4954 (AUTH PLAIN and LOGIN, any
credentials) for that, keeps each message in memory and delivers nothing, so a
test with a real client never sends mail anywhere.
"""

from __future__ import annotations

import socketserver
import threading
from dataclasses import dataclass, field

from devstack.loopback import HOST

EHLO_REPLY = b"250-localhost\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n"
# RFC 4954 LOGIN prompts: base64 of "Username:" and "Password:".
LOGIN_PROMPTS = (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n")


@dataclass
class SmtpMessage:
    mail_from: str
    rcpt_to: list[str]
    data: bytes


@dataclass
class SmtpSink:
    """Accepts any login and any message on 127.0.0.1:``port`` (0: a free port)."""

    port: int = 0
    messages: list[SmtpMessage] = field(default_factory=list)
    logins: int = 0

    def __post_init__(self) -> None:
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                sink._serve(self.rfile, self.wfile)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._lock = threading.Lock()
        self.server = Server((HOST, self.port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _serve(self, rfile, wfile) -> None:
        def reply(line: bytes) -> None:
            wfile.write(line if line.endswith(b"\r\n") else line + b"\r\n")
            wfile.flush()

        reply(b"220 localhost ESMTP devstack sink")
        mail_from, rcpt_to = "", []
        while line := rfile.readline():
            verb, _, arg = line.strip().partition(b" ")
            verb = verb.upper()
            if verb in (b"EHLO", b"LHLO"):
                reply(EHLO_REPLY)
            elif verb == b"HELO":
                reply(b"250 localhost")
            elif verb == b"AUTH":
                mechanism, _, initial = arg.partition(b" ")
                if mechanism.upper() == b"PLAIN" and not initial:
                    reply(b"334 ")
                    rfile.readline()
                elif mechanism.upper() == b"LOGIN":
                    for prompt in LOGIN_PROMPTS:
                        reply(prompt)
                        rfile.readline()
                with self._lock:
                    self.logins += 1
                reply(b"235 2.7.0 accepted")
            elif verb == b"MAIL":
                mail_from, rcpt_to = arg.decode("utf-8", "replace"), []
                reply(b"250 2.1.0 ok")
            elif verb == b"RCPT":
                rcpt_to.append(arg.decode("utf-8", "replace"))
                reply(b"250 2.1.5 ok")
            elif verb == b"DATA":
                reply(b"354 go ahead")
                data = b"".join(iter(lambda: _data_line(rfile), None))
                with self._lock:
                    self.messages.append(SmtpMessage(mail_from, rcpt_to, data))
                reply(b"250 2.0.0 kept")
            elif verb in (b"RSET", b"NOOP"):
                reply(b"250 2.0.0 ok")
            elif verb == b"QUIT":
                reply(b"221 2.0.0 bye")
                return
            else:
                reply(b"502 5.5.2 not implemented")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _data_line(rfile) -> bytes | None:
    """One line of a DATA body with its dot-stuffing removed; None at the final ``.``."""
    line = rfile.readline()
    if line in (b".\r\n", b".\n", b""):
        return None
    return line[1:] if line.startswith(b"..") else line
