"""``chatmail-metadata status``: facts from the database, the live service, and ``--check``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_chatmaild import ALICE, BOB, write_ini
from test_notifier import Relay

from chatmaild import cli, outcomelog, status
from chatmaild.database import SCHEMA_VERSION, Writer, connect
from chatmaild.jobqueue import RetryPolicy
from chatmaild.jobstore import JobStore
from chatmaild.outcomelog import PushRecord
from chatmaild.servicerow import ServiceRow, announce
from devstack.loopback import free_port, wait_until
from devstack.pushsink import PushSink

VENV_BIN = Path(sys.executable).parent

# The version 1 schema as released: a file of it must be migrated on open.
V1_SCHEMA = """
CREATE TABLE attributes (user TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (user, key)) WITHOUT ROWID;
CREATE TABLE tokens (user TEXT NOT NULL, token TEXT NOT NULL, guid TEXT NOT NULL DEFAULT '',
    created INTEGER NOT NULL, set_at INTEGER NOT NULL, touched INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, token));
CREATE TABLE jobs (id INTEGER PRIMARY KEY, user TEXT NOT NULL, token TEXT NOT NULL,
    created REAL NOT NULL, deadline REAL NOT NULL, due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX jobs_fresh ON jobs (user, token) WHERE attempts = 0;
PRAGMA user_version = 1;
"""


def status_command() -> list[str]:
    exe = VENV_BIN / "chatmail-metadata"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "chatmaild.cli"]


def run_status(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*status_command(), "status", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("chatmail-metadata status: error:")
    assert match in proc.stderr


@pytest.fixture
def ini(tmp_path) -> Path:
    # A proxy URL nothing listens on unless a test says otherwise: never leaves loopback.
    return write_ini(tmp_path, metadata=f"notify_url = http://127.0.0.1:{free_port()}/notify\n")


def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mailboxes" / "chatmail-metadata.sqlite3"


def populate(path: Path, now: float) -> None:
    """3 tokens of 2 addresses, 3 jobs (attempts 0, 1, 1; one 20 min late), outcomes."""
    conn = connect(path)
    try:
        with Writer(conn).transaction():
            for user, token in [(ALICE, "t-a1"), (ALICE, "t-a2"), (BOB, "t-b1")]:
                conn.execute(
                    "INSERT INTO tokens(user, token, created, set_at) VALUES (?,?,?,?)",
                    (user, token, int(now), int(now)),
                )
            jobs = JobStore(conn)
            policy = RetryPolicy()
            jobs.enqueue(ALICE, ["t-a1", "t-a2"], now - 1200, policy)
            jobs.enqueue(BOB, ["t-b1"], now + 30, policy)
        jobs.claim(1)
        jobs.claim(2)
        jobs.reschedule(2, now + 600, PushRecord(outcomelog.RETRIED, "503", now - 10))
        for ago, outcome, answer in [
            (30, outcomelog.SENT, "200"),
            (40, outcomelog.SENT, "200"),
            (50, outcomelog.RETRIED, "error (ConnectError: [Errno 111] refused)"),
            (2 * 3600, outcomelog.SENT, "200"),
            (3 * 3600, outcomelog.GONE, "410"),
            (5 * 3600, outcomelog.DROPPED, "deadline passed"),
            (3 * 86400, outcomelog.SENT, "200"),  # older than a day: not counted
        ]:
            jobs.finish(999, PushRecord(outcome, answer, now - ago))
    finally:
        conn.close()


def args_for(ini: Path, *extra: str):
    return status.build_parser().parse_args([str(ini), *extra])


# -- from the database --------------------------------------------------------------


def test_status_on_a_fresh_database(tmp_path, ini, capsys):
    connect(db_path(tmp_path)).close()
    assert cli.main(["status", str(ini)]) == 0
    out = capsys.readouterr().out
    assert "tokens     0 for 0 address(es)" in out
    assert "jobs       0\n" in out
    assert "last hour  sent 0, gone 0, retried 0, dropped 0" in out
    assert "last sent  none in the last 2 days" in out
    assert "service    not running" in out


def test_status_numbers_are_exact(tmp_path, ini):
    now = time.time()
    populate(db_path(tmp_path), now)
    report = status.gather(args_for(ini), now)
    facts = report.facts
    assert facts["addresses_with_tokens"] == 2
    assert facts["tokens"] == 3
    jobs = facts["jobs"]
    assert jobs["total"] == 3
    assert jobs["by_attempts"] == {"0": 1, "1": 2}
    assert jobs["due"] == 1  # job 2 was rescheduled, Bob's is not due yet
    assert jobs["oldest_due"] == pytest.approx(now - 1200)
    assert jobs["oldest_late_seconds"] == pytest.approx(1200, abs=0.1)
    assert jobs["overdue"] == 1
    assert facts["pushes"]["last_hour"] == {
        "sent": {"200": 2},
        "gone": {},
        "retried": {"503": 1, "error:ConnectError": 1},
        "dropped": {},
    }
    assert facts["pushes"]["last_day"] == {
        "sent": {"200": 3},
        "gone": {"410": 1},
        "retried": {"503": 1, "error:ConnectError": 1},
        "dropped": {"deadline passed": 1},
    }
    assert facts["last_success"] == pytest.approx(now - 30)
    assert facts["service"]["running"] is False


def test_outcome_log_is_pruned_to_two_days(tmp_path):
    conn = connect(tmp_path / "db.sqlite3")
    now = 1_800_000_000.0
    with Writer(conn).transaction():
        outcomelog.record(conn, PushRecord(outcomelog.SENT, "200", now - 3 * 86400))
        outcomelog.record(conn, PushRecord(outcomelog.SENT, "200", now - 86400))
        outcomelog.record(conn, PushRecord(outcomelog.SENT, "200", now))
    assert conn.execute("SELECT count(*) FROM push_outcomes").fetchone()[0] == 2
    with Writer(conn).transaction():
        outcomelog.record(conn, PushRecord(outcomelog.SENT, "200", now + 1))
    assert conn.execute("SELECT minute, count FROM push_outcomes").fetchall()[-1] == (
        int(now // 60),
        2,
    )


def test_json_shape(tmp_path, ini):
    populate(db_path(tmp_path), time.time())
    proc = run_status(ini, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {
        "database",
        "schema_version",
        "addresses_with_tokens",
        "tokens",
        "jobs",
        "pushes",
        "last_success",
        "service",
    }
    assert data["database"] == str(db_path(tmp_path))
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data["jobs"]) == {
        "total",
        "by_attempts",
        "due",
        "oldest_due",
        "oldest_late_seconds",
        "overdue",
    }
    assert set(data["pushes"]) == {"last_hour", "last_day"}
    assert set(data["pushes"]["last_hour"]) == set(outcomelog.OUTCOMES)
    assert set(data["service"]) == {
        "running",
        "pid",
        "started",
        "uptime_seconds",
        "socket",
        "metrics",
        "notify_url",
        "workers_configured",
        "workers_live",
        "dovecot_connections_by_protocol",
        "dict_connections_open",
        "embedded_proxy_up",
        "metrics_error",
    }
    proc = run_status(ini, "--json", "--check")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["problems"]


def test_missing_ini_and_missing_database_are_one_line_errors(tmp_path, ini):
    assert_one_line_error(run_status(tmp_path / "nope.ini"), "config file not found")
    proc = run_status(ini, "--check")
    assert_one_line_error(proc, f"database not found: {db_path(tmp_path)}")
    assert not db_path(tmp_path).exists()  # status never creates it
    db_path(tmp_path).write_bytes(b"not a database at all" * 100)
    assert_one_line_error(run_status(ini), "cannot read database")


def test_reading_a_closed_database_creates_no_side_files(tmp_path, ini):
    """As root on a stopped service, -wal/-shm owned by root would lock the service out."""
    connect(db_path(tmp_path)).close()
    before = sorted(os.listdir(db_path(tmp_path).parent))
    assert status.main([str(ini)]) == 0
    assert sorted(os.listdir(db_path(tmp_path).parent)) == before


def test_status_is_not_an_ini_for_the_service():
    """``status`` as the first word is the subcommand; a socket named so is ``./status``."""
    args = cli.build_parser().parse_args(["./status", "chatmail.ini"])
    assert (args.socket, args.config) == ("./status", "chatmail.ini")


# -- migration ------------------------------------------------------------------------


def test_version_1_database_is_migrated_on_open_and_keeps_its_rows(tmp_path, ini):
    path = db_path(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.executescript(V1_SCHEMA)
        old.execute("INSERT INTO tokens(user, token, created, set_at) VALUES ('a@x', 't', 1, 1)")
        old.execute(
            "INSERT INTO jobs(user, token, created, deadline, due) VALUES ('a@x','t',1,2,1)"
        )
        old.commit()
    # status reads a version 1 file as it is (no writes), without the outcome log
    facts = status.gather(args_for(ini), time.time()).facts
    assert (facts["schema_version"], facts["pushes"], facts["tokens"]) == (1, None, 1)
    assert status.main([str(ini)]) == 0

    conn = connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == 1
    assert conn.execute("SELECT id, token FROM jobs").fetchall() == [(1, "t")]
    JobStore(conn).finish(1, PushRecord(outcomelog.SENT, "200", time.time()))
    # rebuilt with AUTOINCREMENT: the id of the deleted (highest) job is not handed out again
    new_id = conn.execute(
        "INSERT INTO jobs(user, token, created, deadline, due) VALUES ('a@x','t',1,2,1)"
        " RETURNING id"
    ).fetchone()[0]
    assert new_id == 2
    conn.close()
    conn = connect(path)  # a second open changes nothing
    assert outcomelog.counts_since(conn, 0)["sent"] == {"200": 1}
    conn.close()


# -- --check against broken pieces ---------------------------------------------------


def stale_service(path: Path, socket_path: Path, url: str) -> None:
    """A row as a killed service leaves it: a pid that no longer exists."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    conn = connect(path)
    announce(conn, ServiceRow(dead.pid, time.time() - 60, str(socket_path), "", url, 4))
    conn.close()


def check_lines(ini: Path, *extra: object) -> list[str]:
    proc = run_status(ini, "--check", *extra)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    return proc.stdout.strip().splitlines()


def test_check_names_each_broken_piece(tmp_path, ini):
    now = time.time()
    populate(db_path(tmp_path), now)
    with contextlib.closing(connect(db_path(tmp_path))) as conn:  # no success in the last hour
        conn.execute(
            "DELETE FROM push_outcomes WHERE outcome = 'sent' AND minute > ?",
            (int((now - 3600) // 60),),
        )
    url = read_url(ini)
    stale_service(db_path(tmp_path), tmp_path / "gone.socket", url)
    lines = check_lines(ini)
    port = url.split(":")[2].split("/")[0]
    assert lines == [
        f"dict socket {tmp_path / 'gone.socket'}: No such file or directory",
        lines[1],
        "jobs: 1 due for more than 10 min (oldest 20 min late)",
        "no successful push in the last hour while jobs were due (last 2.0 h ago, "
        "2 failed attempt(s))",
        f"push proxy http://127.0.0.1:{port}/ unreachable: [Errno 111] Connection refused",
    ]
    assert lines[1].startswith("service not running (last pid ")
    # the threshold is an option
    assert not any(line.startswith("jobs:") for line in check_lines(ini, "--max-late", "30"))


def read_url(ini: Path) -> str:
    return next(
        line.split(" = ")[1] for line in ini.read_text().splitlines() if "notify_url" in line
    )


@pytest.mark.skipif(not shutil.which("chattr"), reason="needs chattr for a read-only file as root")
def test_check_database_read_only(tmp_path, ini):
    connect(db_path(tmp_path)).close()
    path = db_path(tmp_path)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)
    try:
        lines = check_lines(ini)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    assert f"database {path} not writable: attempt to write a readonly database" in lines


def test_check_overdue_without_any_outcome_is_still_no_success_while_due(tmp_path, ini):
    conn = connect(db_path(tmp_path))
    with Writer(conn).transaction():
        JobStore(conn).enqueue(ALICE, ["t"], time.time() - 120, RetryPolicy())
    conn.close()
    lines = check_lines(ini)
    assert (
        "no successful push in the last hour while jobs were due (none in the last 2 days, "
        "0 failed attempt(s))"
    ) in lines
    assert not any(line.startswith("jobs:") for line in lines)  # 2 min: not overdue yet


# -- against the running local stack ---------------------------------------------------


@pytest.fixture
def live_relay(relay, push_sink):
    """The relay fixture's chatmail-metadata, restarted with a metrics listener."""
    metadata = relay.metadata
    port = free_port()
    metadata.extra_args = ["--metrics", f"127.0.0.1:{port}"]
    try:
        metadata.restart()
        wait_for_service(relay)
        yield relay
    finally:
        metadata.extra_args = []
        metadata.restart()


def wait_for_service(relay) -> None:
    """Until the restarted process has written its row (it may listen a moment before) and,
    with a metrics listener, all its workers are up (they open their stores after)."""

    def announced() -> bool:
        args = status.build_parser().parse_args(ini_with_db(relay))
        service = status.gather(args, time.time()).facts["service"]
        started = service["running"] and service["pid"] == relay.metadata.proc.pid
        live = service["workers_live"]
        return started and (live is None or live == service["workers_configured"])

    wait_until(announced, 15.0, "chatmail-metadata's row in the database")


def ini_with_db(relay) -> list[str]:
    return [str(relay.metadata.ini_path), "--db", str(relay.metadata.db_path)]


def wait_for_sent(relay, count: int) -> dict:
    def sent() -> dict | None:
        facts = status.gather(status.build_parser().parse_args(ini_with_db(relay)), time.time())
        hour = facts.facts["pushes"]["last_hour"]
        return facts.facts if outcomelog.total(hour, outcomelog.SENT) >= count else None

    return wait_until(sent, 15.0, "a sent push in the outcome log")


def push_once(relay) -> None:
    typ, _ = relay.imap(ALICE).setmetadata("INBOX", {"/private/devicetoken": "status-token"})
    assert typ == "OK"
    code, text = relay.deliver(BOB, ALICE)
    assert code == 250, text


def test_check_green_on_the_local_stack(live_relay, dovecot_build):
    push_once(live_relay)
    facts = wait_for_sent(live_relay, 1)
    assert facts["pushes"]["last_hour"]["sent"] == {"200": 1}

    proc = run_status(*ini_with_db(live_relay), "--check")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")

    data = json.loads(run_status(*ini_with_db(live_relay), "--json").stdout)
    service = data["service"]
    assert service["running"] is True
    assert service["pid"] == live_relay.metadata.proc.pid
    assert service["uptime_seconds"] >= 0
    assert service["socket"] == str(live_relay.metadata.socket_path)
    assert service["workers_live"] == service["workers_configured"] == 12
    assert service["dovecot_connections_by_protocol"].get(dovecot_build.version, 0) >= 1
    assert data["tokens"] == 1
    assert data["jobs"]["total"] == 0

    plain = run_status(*ini_with_db(live_relay)).stdout
    assert "workers    12 of 12 live" in plain
    assert f"service    running, pid {live_relay.metadata.proc.pid}" in plain


def test_check_green_with_the_embedded_proxy(live_relay, push_sink):
    live_relay.metadata.restart(
        metadata={"notify_url": "embedded"},
        notifiers={"upstream_url": push_sink.url, "ubports": "false"},
    )
    wait_for_service(live_relay)
    proc = run_status(*ini_with_db(live_relay), "--check")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
    data = json.loads(run_status(*ini_with_db(live_relay), "--json").stdout)
    assert data["service"]["embedded_proxy_up"] is True
    assert data["service"]["notify_url"] == "embedded"


def test_check_socket_missing_and_workers_unknown_on_the_stack(relay):
    """Without --metrics workers are not checked (said so); a removed socket is a problem."""
    wait_for_service(relay)
    proc = run_status(*ini_with_db(relay), "--check")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == "ok (workers not checked: the service has no --metrics listener)\n"
    relay.metadata.socket_path.unlink()
    lines = check_lines(*ini_with_db(relay))
    assert lines == [f"dict socket {relay.metadata.socket_path}: No such file or directory"]


# -- the notifier writes the outcome log --------------------------------------------


def test_notifier_records_every_outcome_with_its_answer(tmp_path):
    """sent / gone / retried / dropped, each counted by the answer it got."""
    sink = PushSink()
    relay = Relay(tmp_path, sink.url)
    relay.notifier.start()
    try:
        for token in ("ok", "dead", "flaky", "never"):
            relay.add_token(token)
        sink.scripts.update(dead=[410], flaky=[503, 200], never=[500] * 10)
        relay.new_mail()
        wait_until(lambda: relay.jobs() == 0, 15.0, "every job finished")
    finally:
        relay.close()
        sink.close()
    with contextlib.closing(connect(relay.db_path)) as conn:
        counts = outcomelog.counts_since(conn, time.time() - 3600)
    assert counts == {
        "sent": {"200": 2},
        "gone": {"410": 1},
        "retried": {"500": 4, "503": 1},
        "dropped": {"500": 1},
    }
