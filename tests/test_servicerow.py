"""ServiceRow.alive: the pid the service announced, and only while it is that process."""

from __future__ import annotations

import subprocess
import time

from chatmaild.servicerow import ServiceRow


def row(pid: int, started: float) -> ServiceRow:
    return ServiceRow(pid, started, "/run/x.socket", "", "off", 0)


def test_a_pid_taken_by_a_process_started_after_the_row_is_not_the_service():
    """After a kill -9 (row left "running") the pid may be reused: status must not call
    that process the service, scrape its ports or report its uptime."""
    later = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        assert not row(later.pid, time.time() - 3600).alive()  # announced an hour before
        assert row(later.pid, time.time()).alive()  # announced by it (after it started)
    finally:
        later.kill()
        later.wait()


def test_a_stopped_or_vanished_service_is_not_alive():
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not row(gone.pid, time.time()).alive()
    stopped = ServiceRow(1, time.time(), "/s", "", "off", 0, stopped=time.time())
    assert not stopped.alive()
