"""A real HTTP server on 127.0.0.1 that records push POSTs: the notifier's "proxy".

Answers are scripted per token (a list of statuses consumed in order, then the
default) and can be delayed, so tests can make the "proxy" slow, failing or gone.
"""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field

from devstack.loopback import HOST


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    at: float  # when the answer was decided (after ``delay``)
    arrived: float = 0.0  # when the request's body had been read (before ``delay``)


@dataclass
class PushSink:
    default_status: int = 200
    delay: float = 0.0
    scripts: dict[str, list[int]] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                arrived = time.time()
                if sink.delay:
                    time.sleep(sink.delay)
                status = sink._answer(body.decode("utf-8", "replace"))
                with sink._cond:
                    sink.requests.append(
                        Received(self.path, body, dict(self.headers), status, time.time(), arrived)
                    )
                    sink._cond.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{HOST}:{self.port}/notify"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _answer(self, token: str) -> int:
        with self._lock:
            script = self.scripts.get(token)
            if script:
                return script.pop(0)
            return self.default_status

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [r.body for r in self.requests]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` requests arrived; return them (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.requests)} of {count} push requests arrived")
                self._cond.wait(left)
            return list(self.requests)

    def wait_for_body(self, body: bytes, timeout: float = 10.0) -> None:
        """Wait until a request with exactly ``body`` arrived (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(r.body == body for r in self.requests):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no push request with body {body[:40]!r}")
                self._cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
