"""Open-file headroom (issue 10, finding 4): the soft RLIMIT_NOFILE is raised to the hard one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers_fdlimit import hard_limit, lowered_soft_limit

REPO = Path(__file__).resolve().parent.parent

LOWER_THEN_RAISE = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
from chatmail_common.fdlimit import raise_open_files_limit
limit = raise_open_files_limit()
now = resource.getrlimit(resource.RLIMIT_NOFILE)
print(limit.before, limit.soft, limit.hard, now[0], now[1], hard)
print(limit.describe())
"""


def test_soft_limit_is_raised_to_the_hard_limit():
    done = subprocess.run(
        [sys.executable, "-c", LOWER_THEN_RAISE],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    figures, description = done.stdout.splitlines()
    before, soft, hard, now_soft, now_hard, original_hard = map(int, figures.split())
    assert before == min(64, original_hard)
    assert soft == hard == now_soft == now_hard == original_hard
    assert f"from {before} to {hard}" in description or before == hard


def test_a_soft_limit_already_at_the_hard_limit_is_left_alone():
    from chatmail_common.fdlimit import raise_open_files_limit

    first = raise_open_files_limit()
    again = raise_open_files_limit()
    assert again.before == again.soft == again.hard == first.hard
    assert "raised" not in again.describe()


def test_the_notifiers_unit_sets_limit_nofile():
    for unit in ("notifiers.service", "chatmail-metadata.service"):
        lines = (REPO / "systemd" / unit).read_text().splitlines()
        assert any(line.startswith("LimitNOFILE=") for line in lines), unit


def test_chatmail_metadata_raises_and_logs_the_limit_at_start(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "chatmaild.cli", str(tmp_path / "s"), str(tmp_path / "no.ini")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lowered_soft_limit(),
    )
    assert done.returncode == 1  # the ini is missing: it stops, but after raising the limit
    assert f"open files limit: raised from 256 to {hard_limit()}" in done.stderr
