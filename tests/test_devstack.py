"""The dev stack's own behaviour where it is not exercised by the integration tests."""

from __future__ import annotations

import shutil

import pytest

from devstack.dovecot import DovecotInstance, make_run_dir
from devstack.process import StartError


def test_failed_start_shows_dovecot_stderr_and_log(failing_dovecot):
    run_dir = make_run_dir()
    try:
        dovecot = DovecotInstance(run_dir, str(failing_dovecot))
        with pytest.raises(StartError) as info:
            dovecot.start()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    message = str(info.value)
    assert message.startswith(f"Dovecot did not start (config {run_dir}/dovecot.conf)")
    assert "stand-in failure" in message
    assert "stand-in log line" in message
    assert "status 89" in message
