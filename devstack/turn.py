"""A stand-in for the chatmail-turn credential socket (chatmail-metadata asks it per lookup)."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class TurnHelper:
    """Serves one line (``user:pass\\n``) per connection on a Unix socket, like chatmail-turn."""

    def __init__(self, path: Path, line: bytes = b"user:pass\n") -> None:
        self.path = path
        self.line = line
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                with contextlib.suppress(OSError):
                    conn.sendall(self.line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
