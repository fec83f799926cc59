"""``chatmail-metadata`` as a subprocess: help, startup errors, readiness, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_chatmaild import ALICE, priv

from chatmaild.database import connect
from chatmaild.store import TOKEN_VALIDITY, MetadataStore
from devstack.process import stop_and_collect

VENV_BIN = Path(sys.executable).parent
EXE = VENV_BIN / "chatmail-metadata"


def command() -> list[str]:
    if EXE.exists():
        return [str(EXE)]
    return [sys.executable, "-m", "chatmaild.cli"]


def write_ini(directory: Path, mailboxes: Path, extra: str = "") -> Path:
    path = directory / "chatmail.ini"
    path.write_text(f"[params]\nmail_domain = example.org\nmailboxes_dir = {mailboxes}\n{extra}")
    return path


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command(), *map(str, args)], capture_output=True, text=True, timeout=30, **kw
    )


def assert_clean_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    # startup INFO log lines may come first; the error itself is one last line
    assert errors == lines[-1:], proc.stderr
    assert lines[-1].startswith("chatmail-metadata: error:")
    assert match in lines[-1]
    assert "Traceback" not in proc.stderr


def notify_listener(tmp_path: Path) -> tuple[socket.socket, dict[str, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, and the env naming it."""
    path = tmp_path / "notify.socket"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(path))
    notify.settimeout(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["NOTIFY_SOCKET"] = str(path)
    return notify, env


def test_help():
    proc = run(["--help"])
    assert proc.returncode == 0
    assert "socket" in proc.stdout and "config" in proc.stdout and "--db" in proc.stdout


def test_missing_ini(tmp_path):
    assert_clean_error(run([tmp_path / "s", tmp_path / "nope.ini"]), "not found")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("garbage without sections\n", "invalid config"),
        ("[params]\n", "mail_domain"),
        ("[params]\nmail_domain = x\n[metadata]\nmax_attributes = lots\n", "max_attributes"),
    ],
)
def test_invalid_ini(tmp_path, content, match):
    ini = tmp_path / "chatmail.ini"
    ini.write_text(content)
    assert_clean_error(run([tmp_path / "s", ini]), match)


def test_missing_mailboxes_dir(tmp_path):
    ini = write_ini(tmp_path, tmp_path / "nope")
    assert_clean_error(run([tmp_path / "s", ini]), "does not exist")


def test_missing_database_directory(tmp_path):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    proc = run([tmp_path / "s", ini, "--db", tmp_path / "nope" / "db.sqlite3"])
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "s").exists()


# Capabilities that let root ignore file permissions; without them a directory owned by
# another user with mode 0755 is read-only to root as well.
PERMISSION_OVERRIDES = "-dac_override,-dac_read_search,-fowner"


def run_unable_to_write(locked: Path, args) -> subprocess.CompletedProcess:
    """Run with ``locked`` unwritable for the child.  Root ignores permissions, so as root
    ``locked`` goes to nobody (0755) and the child runs as root without the capabilities
    that override permissions: it still reads the checkout and the test's files wherever
    they are (a clone under /root is not readable by nobody)."""
    if os.geteuid() != 0:
        locked.chmod(0o555)
        try:
            return run(args)
        finally:
            locked.chmod(0o755)
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's permission overrides")
    os.chown(locked, pwd.getpwnam("nobody").pw_uid, -1)
    locked.chmod(0o755)
    setpriv = ["setpriv", "--inh-caps=-all", f"--bounding-set={PERMISSION_OVERRIDES}"]
    proc = subprocess.run(
        [*setpriv, *command(), *map(str, args)], capture_output=True, text=True, timeout=30
    )
    if proc.stderr.startswith("setpriv:"):  # e.g. no CAP_SETPCAP in this container
        pytest.skip(f"cannot drop root's permission overrides: {proc.stderr.strip()}")
    return proc


def test_unwritable_database_directory(tmp_path):
    (tmp_path / "mb").mkdir(mode=0o755)
    ini = write_ini(tmp_path, tmp_path / "mb")
    proc = run_unable_to_write(tmp_path / "mb", [tmp_path / "s", ini])
    assert_clean_error(proc, "cannot open database")


def test_socket_in_unwritable_directory_names_the_socket(tmp_path):
    mailboxes = tmp_path / "mb"
    mailboxes.mkdir()
    mailboxes.chmod(0o777)  # the database can be created, the socket cannot
    (tmp_path / "run").mkdir(mode=0o755)
    sock = tmp_path / "run" / "metadata.socket"
    proc = run_unable_to_write(tmp_path / "run", [sock, write_ini(tmp_path, mailboxes)])
    assert_clean_error(proc, f"cannot listen on socket {sock}: Permission denied")


@pytest.mark.parametrize("mode", ["9999", "rw-rw----", "17777", ""])
def test_socket_mode_must_be_octal(tmp_path, mode):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    proc = run([tmp_path / "metadata.socket", ini, "--socket-mode", mode])
    assert proc.returncode == 2, proc.stderr  # a usage error, as argparse reports them
    last = proc.stderr.strip().splitlines()[-1]
    assert f"--socket-mode: expected an octal mode such as 0660, got {mode!r}" in last
    assert "<lambda>" not in proc.stderr and "Traceback" not in proc.stderr


def test_socket_in_missing_directory(tmp_path):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    assert_clean_error(run([tmp_path / "nope" / "metadata.socket", ini]), "does not exist")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--notify-url", "embeded"], "notify_url must be"),
        (["--notify-url", "ftp://x.org/notify"], "notify_url must be"),
        (["--metrics", "foo"], "expected HOST:PORT"),
        (["--metrics", "127.0.0.1:99999"], "expected HOST:PORT"),
    ],
)
def test_bad_notify_url_and_metrics_address(tmp_path, args, match):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    assert_clean_error(run([tmp_path / "metadata.socket", ini, *args]), match)


def test_bad_notify_url_in_ini(tmp_path):
    (tmp_path / "mb").mkdir()
    ini = write_ini(
        tmp_path, tmp_path / "mb", "[metadata]\nnotify_url = notifications.delta.chat\n"
    )
    assert_clean_error(run([tmp_path / "metadata.socket", ini]), "notify_url must be")


def test_socket_path_is_a_regular_file(tmp_path):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    (tmp_path / "s").write_text("keep me")
    assert_clean_error(run([tmp_path / "s", ini]), "not a socket")
    assert (tmp_path / "s").read_text() == "keep me"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_shuts_down_cleanly(tmp_path, sig):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    sock_path = tmp_path / "metadata.socket"
    notify, env = notify_listener(tmp_path)
    proc = subprocess.Popen(
        [*command(), str(sock_path), str(ini), "--socket-mode", "0660"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert b"READY=1" in notify.recv(4096)  # sent after the socket listens
        assert (os.stat(sock_path).st_mode & 0o777) == 0o660
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(str(sock_path))
            a = ALICE.encode()
            c.sendall(
                b"H3\t2\t0\t\tmetadata\n"
                b"B1\t" + a + b"\nS1\t" + priv("devicetoken") + b"\ttok\nC1\n"
                b"L" + priv("devicetoken") + b"\t" + a + b"\n"
            )
            data = b""
            while data.count(b"\n") < 2:
                chunk = c.recv(4096)
                assert chunk, data
                data += chunk
            assert data == b"O1\nOtok\n"
        _, err = stop_and_collect(proc, 20, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert proc.returncode == 0, err
    assert not sock_path.exists()
    assert "Traceback" not in err
    assert "tok\n" not in err
    assert (tmp_path / "mb" / "chatmail-metadata.sqlite3").exists()


def assert_answers_a_lookup(sock_path: str | Path) -> None:
    """Connect to the dict socket and look up a token nobody stored: ``N``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(20)
        c.connect(str(sock_path))
        c.sendall(b"H3\t2\t0\t\tmetadata\nL" + priv("devicetoken") + b"\t" + ALICE.encode() + b"\n")
        assert c.recv(100) == b"N\n"


def test_socket_activation_and_watchdog(tmp_path):
    """As systemd starts it: the socket passed in (fd 3), READY=1 and WATCHDOG=1 pings."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate missing (package systemd)")
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    sock_path = tmp_path / "activated.socket"
    notify, env = notify_listener(tmp_path)
    env["WATCHDOG_USEC"] = "400000"
    # systemd-socket-activate listens, then execs the service when a client connects.
    proc = subprocess.Popen(
        [
            activate,
            "-l",
            str(sock_path),
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "WATCHDOG_USEC",
            "-E",
            "PATH",
            *command(),
            str(sock_path),
            str(ini),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.02)
        assert_answers_a_lookup(sock_path)  # the connection that made systemd start it
        # STATUS= datagrams (the figures, issue 10) come between the pings: set aside here.
        messages = []
        while len(messages) < 3:
            message = notify.recv(4096)
            if not message.startswith(b"STATUS="):
                messages.append(message)
        assert b"READY=1" in messages[0]
        assert messages[1:] == [b"WATCHDOG=1", b"WATCHDOG=1"]  # every 0.2 s
        _, err = stop_and_collect(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert proc.returncode == 0, err
    assert sock_path.exists()  # an activated socket belongs to systemd: not unlinked


@contextlib.contextmanager
def killed_if_left_running(proc: subprocess.Popen) -> Iterator[None]:
    """Whatever the test did, no child outlives it."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# What systemd does before it execs a socket-activated service: the listening socket
# becomes fd 3, LISTEN_FDS=1 and LISTEN_PID the service's pid (exec keeps it).
AS_SYSTEMD = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def serve_inherited_socket_once(listener: socket.socket, ini: Path, env: dict[str, str]) -> None:
    """One service start under a ``.socket`` unit: answer one lookup on the inherited
    socket's path, then stop cleanly on SIGTERM."""
    path = listener.getsockname()
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_SYSTEMD, str(listener.fileno()), *command(), path, str(ini)],
        env=env,
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with killed_if_left_running(proc):
        assert_answers_a_lookup(path)
        _, err = stop_and_collect(proc, 20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_inherited_socket_survives_a_restart(tmp_path):
    """Under a ``.socket`` unit systemd keeps the listening socket across service restarts;
    its path must stay, or Dovecot cannot reach the restarted service (Python 3.13's
    ``create_unix_server`` unlinks the path on close unless told not to)."""
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    sock_path = tmp_path / "inherited.socket"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:  # the .socket unit
        listener.bind(str(sock_path))
        listener.listen()
        for _start in range(2):
            serve_inherited_socket_once(listener, ini, env)
            assert sock_path.exists()  # the socket belongs to systemd: not unlinked


def test_journald_format_when_stderr_is_the_journal(tmp_path):
    """JOURNAL_STREAM naming our stderr: <N> priority prefixes and no own timestamp."""
    err_path = tmp_path / "stderr"
    code = (
        "import logging, sys; from chatmail_common.logsetup import configure_logging; "
        "configure_logging('INFO'); logging.getLogger('x').warning('careful'); "
        "logging.getLogger('x').info('fine')"
    )
    with err_path.open("w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        subprocess.run([sys.executable, "-c", code], env=env, stderr=err, timeout=30, check=True)
    assert err_path.read_text().splitlines() == ["<4>x: careful", "<6>x: fine"]


def test_metrics_port_taken_is_a_one_line_error_before_any_push(tmp_path):
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run([tmp_path / "metadata.socket", ini, "--metrics", f"127.0.0.1:{port}"])
    assert_clean_error(proc, f"--metrics 127.0.0.1:{port}")
    assert "notifier started" not in proc.stderr  # nothing was pushed first
    assert not (tmp_path / "metadata.socket").exists()


@pytest.mark.parametrize(
    "line", ["host = 0.0.0.0", "port = 9100", "body-limit = 4096", "log_level = DEBUG"]
)
def test_embedded_proxy_refuses_a_standalone_only_option_in_one_line(tmp_path, line):
    """The embedded proxy has no HTTP API and logs at chatmail-metadata's level: an option
    that would do nothing there is refused at start, naming it, not silently ignored."""
    (tmp_path / "mb").mkdir()
    extra = f"[metadata]\nnotify_url = embedded\n[notifiers]\nlog_provider = true\n{line}\n"
    ini = write_ini(tmp_path, tmp_path / "mb", extra)
    proc = run([tmp_path / "metadata.socket", ini])
    key = line.split(" ", 1)[0].replace("-", "_")
    assert_clean_error(proc, f"[notifiers] of {ini}): {key}: ")
    assert "notifier started" not in proc.stderr
    assert not (tmp_path / "metadata.socket").exists()


def token_rows(db: Path) -> set[tuple[str, str]]:
    conn = connect(db)
    try:
        return set(conn.execute("SELECT user, token FROM tokens"))
    finally:
        conn.close()


def test_service_prunes_an_expired_token_nobody_refreshes_or_mails(tmp_path):
    """A token past its 90 days whose user never sets a token again and never gets mail
    must not stay in the table forever: the running service sweeps it out."""
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb", "[metadata]\nnotify_url = off\n")
    db = tmp_path / "metadata.sqlite3"
    conn = connect(db)
    store = MetadataStore(conn)
    now = int(time.time())
    with store.transaction():
        store.add_token("gone@example.org", "old-token", now - TOKEN_VALIDITY - 3600)
        store.add_token(ALICE, "live-token", now - 3600)
    conn.close()
    notify, env = notify_listener(tmp_path)
    proc = subprocess.Popen(
        [*command(), str(tmp_path / "metadata.socket"), str(ini), "--db", str(db)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with killed_if_left_running(proc), contextlib.closing(notify):
        assert b"READY=1" in notify.recv(4096)
        deadline = time.monotonic() + 20
        while ("gone@example.org", "old-token") in token_rows(db):
            assert time.monotonic() < deadline, "the expired token is still stored"
            time.sleep(0.1)
        assert token_rows(db) == {(ALICE, "live-token")}
        _, err = stop_and_collect(proc, 20)
    assert proc.returncode == 0, err


def test_second_service_on_the_same_database_refuses_in_one_line(tmp_path):
    """Two services on one database would both push its jobs, and the attribute cache is
    exact only for the one writer: the second refuses, naming the database and the pid
    of the first; after the first is killed (-9: no clean shutdown) a new one starts."""
    (tmp_path / "mb").mkdir()
    ini = write_ini(tmp_path, tmp_path / "mb")
    notify, env = notify_listener(tmp_path)
    first = subprocess.Popen(
        [*command(), str(tmp_path / "a.socket"), str(ini)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert b"READY=1" in notify.recv(4096)
        proc = run([tmp_path / "b.socket", ini])
        assert_clean_error(proc, f"is in use by another chatmail-metadata (pid {first.pid})")
        assert str(tmp_path / "mb" / "chatmail-metadata.sqlite3") in proc.stderr
        assert not (tmp_path / "b.socket").exists()
        first.kill()
        first.wait()
        second = subprocess.Popen(
            [*command(), str(tmp_path / "b.socket"), str(ini)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert b"READY=1" in notify.recv(4096)
            assert_answers_a_lookup(tmp_path / "b.socket")
            _, err = stop_and_collect(second, 20, signal.SIGTERM)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        assert second.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        notify.close()
