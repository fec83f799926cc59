"""A full disk under chatmail-metadata's database (issue 10, CI fault tests).

The database lives on a small tmpfs (root only: the test mounts it); a filler file
takes the rest.  Commits must then answer ``F`` (never ``O`` for data that is not
on disk), nothing may be half-written, and once space returns commits succeed again
in the same process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers_dictwire import lookup_line, session, set_lines

from devstack.metadata import MetadataServer
from devstack.pushsink import PushSink

GUID = "0db9f01b8afe096b1c28000083ecc375"
USER = "alice@example.org"
TOKEN_KEY = f"priv/{GUID}/devicetoken".encode()
MESSAGENEW = f"priv/{GUID}/messagenew".encode()
BIG = 60 * 1024  # under max_value_bytes (64 KiB)


def key(n: int) -> bytes:
    return f"priv/{GUID}/vendor/vendor.dovecot/pvt/test/item{n}".encode()


def value(n: int) -> bytes:
    return (b"%05d" % n) * (BIG // 5)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs, unmounted afterwards (skips when it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until the file system says ENOSPC."""
    with path.open("wb", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return


def commit(server: MetadataServer, n: int, txid: str = "1") -> bytes:
    (reply,) = session(server.socket_path, "metadata", set_lines(txid, USER, key(n), value(n)))
    return reply


def lookup(server: MetadataServer, n: int) -> bytes:
    (reply,) = session(server.socket_path, "metadata", [lookup_line(key(n), USER)])
    return reply


def new_mail(server: MetadataServer) -> bytes:
    lines = [b"B1\t" + USER.encode(), b"S1\t" + MESSAGENEW + b"\t", b"C1"]
    (reply,) = session(server.socket_path, "lmtp", lines)
    return reply


def start_then_fill(server: MetadataServer, disk: Path) -> Path:
    """Start ``server``, store one value, then fill ``disk``; the filler file."""
    server.start()
    assert commit(server, 1) == b"O1"
    filler = disk / "filler"
    fill(filler)
    return filler


def job_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def test_a_full_disk_refuses_commits_keeps_data_and_recovers(tmp_path: Path, small_disk: Path):
    sink = PushSink()
    server = MetadataServer(tmp_path, tmp_path / "metadata.socket", sink.url)
    server.log_level = "INFO"
    server.db_path = small_disk / "metadata.sqlite3"
    try:
        server.start()
        assert session(server.socket_path, "metadata", set_lines("1", USER, TOKEN_KEY, b"tok"))
        stored = list(range(5))
        for n in stored:
            assert commit(server, n) == b"O1"
        offset = server.log_size()

        filler = small_disk / "filler"
        fill(filler)
        refused = list(range(100, 104))
        for n in refused:
            reply = commit(server, n)
            assert reply.startswith(b"F1\t"), reply
        assert new_mail(server).startswith(b"F1\t")  # its job cannot be written either

        # nothing half-written: earlier data intact, refused data absent, no job
        for n in stored:
            assert lookup(server, n) == b"O" + value(n)
        for n in refused:
            assert lookup(server, n) == b"N"
        with contextlib.closing(sqlite3.connect(f"file:{server.db_path}?mode=ro", uri=True)) as c:
            assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert job_count(server.db_path) == 0
        assert not sink.requests

        filler.unlink()  # space returns: the same process commits again
        assert commit(server, 200) == b"O1"
        assert lookup(server, 200) == b"O" + value(200)
        assert new_mail(server) == b"O1"
        sink.wait_for_body(b"tok")
        assert "Traceback" not in server.log_since(offset)
    finally:
        server.stop()
        sink.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_service_restarted_on_a_full_disk_serves_what_it_has(
    tmp_path: Path, small_disk: Path, how: str
):
    """A restart (the watchdog's, an operator's) while the disk is full: the service comes
    up and answers lookups (commits answer F), as before its start wrote the service row."""
    server = MetadataServer(tmp_path, tmp_path / "metadata.socket", "off")
    server.db_path = small_disk / "metadata.sqlite3"
    try:
        start_then_fill(server, small_disk)
        server.kill() if how == "kill" else server.stop()
        offset = server.log_size()
        server.start()
        assert lookup(server, 1) == b"O" + value(1)
        assert commit(server, 2).startswith(b"F1\t")
        assert "Traceback" not in server.log_since(offset)
    finally:
        server.stop()


def test_a_full_disk_is_one_error_line_per_episode_and_a_summary(tmp_path: Path, small_disk: Path):
    """Every refused commit is answered F, but the log gets one ERROR when the episode
    starts and one line with the count once a commit works again, not a line per commit."""
    server = MetadataServer(tmp_path, tmp_path / "metadata.socket", "off")
    server.log_level = "INFO"
    server.db_path = small_disk / "metadata.sqlite3"
    try:
        filler = start_then_fill(server, small_disk)
        offset = server.log_size()
        refused = 12
        for n in range(100, 100 + refused):
            assert commit(server, n).startswith(b"F1\t")
        during = server.log_since(offset)
        errors = [line for line in during.splitlines() if " ERROR chatmaild.metadata:" in line]
        assert len(errors) == 1, during
        filler.unlink()
        offset = server.log_size()
        assert commit(server, 200) == b"O1"
        assert commit(server, 201) == b"O1"
        after = [line for line in server.log_since(offset).splitlines() if "metadata:" in line]
        summaries = [line for line in after if f"{refused} commits refused" in line]
        assert len(summaries) == 1, after
        assert " INFO " in summaries[0]
    finally:
        server.stop()
