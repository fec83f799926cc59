"""chatmail.ini reading: upstream's [params] unchanged, our optional [metadata]."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatmaild.config import (
    DEFAULT_NOTIFY_URL,
    DEFAULT_TURN_SOCKET,
    PACKAGED_APPVERSIONS,
    ConfigError,
    read_config,
)
from chatmaild.jobqueue import RetryPolicy

UPSTREAM_INI = """\
[params]

# mail domain (MUST be set to fully qualified chat mail domain)
mail_domain = chat.example.org

#
# If you only do private test deploys, you don't need to modify any settings below
#

#
# Account Restrictions
#

# how many mails a user can send out per minute
max_user_send_per_minute = 60

# maximum mailbox size of a chatmail address
max_mailbox_size = 500M

# maximum message size for an e-mail in bytes
max_message_size = 31457280

# days after which mails are unconditionally deleted
delete_mails_after = 20

# days after which large files (>200k) are unconditionally deleted
delete_large_after = 7

# days after which users without a successful login are deleted (database and mails)
delete_inactive_users_after = 90

# minimum length a username must have
username_min_length = 9

# maximum length a username can have
username_max_length = 9

# minimum length a password must have
password_min_length = 9

# list of chatmail addresses which can send outbound un-encrypted mail
passthrough_senders =

# list of e-mail recipients for which to accept outbound un-encrypted mails
# (space-separated, item may start with "@" to whitelist whole recipient domains)
passthrough_recipients = echo@{mail_domain} %percent-not-interpolated

#
# Deployment Details
#

# Directory where user mailboxes are stored
mailboxes_dir = {mailboxes_dir}

# SMTP outgoing filtermail and reinjection
filtermail_smtp_port = 10080
postfix_reinject_port = 10025

# if set to "True" IPv6 is disabled
disable_ipv6 = False
{extra}
#
# Privacy Policy
#

# postal address of privacy contact
privacy_postal =

# email address of privacy contact
privacy_mail =

# postal address of the privacy data officer
privacy_pdo =

# postal address of the privacy supervisor
privacy_supervisor =
"""


def upstream(tmp_path: Path, extra: str = "", mailboxes_dir: str | None = None) -> Path:
    path = tmp_path / "chatmail.ini"
    mb = mailboxes_dir if mailboxes_dir is not None else str(tmp_path / "mail")
    path.write_text(UPSTREAM_INI.format(mailboxes_dir=mb, extra=extra, mail_domain="{mail_domain}"))
    return path


def test_upstream_ini_unchanged(tmp_path):
    cfg = read_config(upstream(tmp_path))
    assert cfg.mail_domain == "chat.example.org"
    assert cfg.mailboxes_dir == tmp_path / "mail"
    assert cfg.iroh_relay == "https://chat.example.org"
    assert cfg.turn_socket_path == DEFAULT_TURN_SOCKET
    assert cfg.turn_hostname == "chat.example.org"
    assert cfg.appversions_path == PACKAGED_APPVERSIONS
    assert cfg.max_smtp_recipients == 1000
    assert cfg.database_path == tmp_path / "mail" / "chatmail-metadata.sqlite3"
    assert cfg.delivery_dict is None
    assert cfg.notifier.url == DEFAULT_NOTIFY_URL
    assert cfg.notifier.retry_delays == (8.0, 64.0, 512.0, 4096.0)
    assert cfg.notifier.max_attempts == 5
    assert cfg.notifier.deadline == 5 * 3600


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "https://chat.example.org"),
        ("iroh_relay = https://iroh.example.net\n", "https://iroh.example.net"),
        ("iroh_relay =   https://x.example  \n", "https://x.example"),
        ("iroh_relay =\n", None),
    ],
)
def test_iroh_relay(tmp_path, extra, expected):
    assert read_config(upstream(tmp_path, extra)).iroh_relay == expected


def test_turn_socket_path(tmp_path):
    cfg = read_config(upstream(tmp_path, "turn_socket_path = /run/x/turn.sock\n"))
    assert cfg.turn_socket_path == "/run/x/turn.sock"
    cfg = read_config(upstream(tmp_path, "turn_socket_path =\n"))
    assert cfg.turn_socket_path == DEFAULT_TURN_SOCKET


def test_mailboxes_dir_default(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_text("[params]\nmail_domain = c.example\n")
    cfg = read_config(path)
    assert cfg.mailboxes_dir == Path("/home/vmail/mail/c.example")
    assert cfg.path == path
    cfg = read_config(upstream(tmp_path, mailboxes_dir=""))
    assert cfg.mailboxes_dir == Path("/home/vmail/mail/chat.example.org")


def test_metadata_section(tmp_path):
    path = upstream(tmp_path)
    path.write_text(
        path.read_text() + "\n[metadata]\n"
        "database = /var/lib/cm/db.sqlite3\n"
        "delivery_dict = lmtp\n"
        "synchronous = full\n"
        "max_attributes = 7\n"
        "max_value_bytes = 100\n"
        "max_line_bytes = 2000\n"
        "max_smtp_recipients = 50\n"
        "notify_url = http://127.0.0.1:9/notify\n"
        "notify_workers = 3\n"
        "notify_timeout = 2.5\n"
        "notify_retry_delays = 0.1, 0.2 0.4\n"
        "notify_max_attempts = 4\n"
        "notify_deadline = 10\n"
    )
    cfg = read_config(path)
    assert cfg.database_path == Path("/var/lib/cm/db.sqlite3")
    assert cfg.delivery_dict == "lmtp"
    assert cfg.synchronous == "FULL"
    assert (cfg.limits.max_attributes, cfg.limits.max_value_bytes) == (7, 100)
    assert cfg.limits.max_line_bytes == 2000
    assert cfg.max_smtp_recipients == 50
    n = cfg.notifier
    assert (n.url, n.workers, n.timeout) == ("http://127.0.0.1:9/notify", 3, 2.5)
    assert n.retry_delays == (0.1, 0.2, 0.4)
    assert (n.max_attempts, n.deadline) == (4, 10.0)


def test_empty_metadata_values_keep_defaults(tmp_path):
    path = upstream(tmp_path)
    path.write_text(path.read_text() + "\n[metadata]\nmax_attributes =\nnotify_url =\n")
    cfg = read_config(path)
    assert cfg.limits.max_attributes == 256
    assert cfg.notifier.url == DEFAULT_NOTIFY_URL


def assert_one_line_error(path, match):
    with pytest.raises(ConfigError, match=match) as info:
        read_config(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.ini", "not found")


def test_directory_instead_of_file(tmp_path):
    assert_one_line_error(tmp_path, "cannot read")


def test_missing_params(tmp_path):
    path = tmp_path / "x.ini"
    path.write_text("[other]\nmail_domain = a.example\n")
    assert_one_line_error(path, r"\[params\]")


@pytest.mark.parametrize("body", ["[params]\n", "[params]\nmail_domain =\n", "[params]\nx = 1\n"])
def test_missing_mail_domain(tmp_path, body):
    path = tmp_path / "x.ini"
    path.write_text(body)
    assert_one_line_error(path, "mail_domain")


@pytest.mark.parametrize(
    "content",
    [
        b"this is not an ini file\nat all\n",
        b"[params\nmail_domain = x\n",
        b"[params]\nmail_domain = a\nmail_domain = b\n",
        b"[params]\n  indented continuation without key\n",
        b"\xff\xfe\x00garbage\x80\n",
        b"",
    ],
)
def test_garbage_file(tmp_path, content):
    path = tmp_path / "x.ini"
    path.write_bytes(content)
    assert_one_line_error(path, str(path).replace(".", r"\."))


@pytest.mark.parametrize(
    "line",
    [
        "max_attributes = many",
        "max_value_bytes = 1.5",
        "max_line_bytes = -1",
        "max_smtp_recipients = 1e3",
        "notify_timeout = soon",
        "notify_workers = x",
        "notify_max_attempts = -2",
        "notify_deadline = 5h",
        "notify_retry_delays = 8 sixty-four",
        # no delay at all: a worker's fallback delay would not exist (notify_max_attempts = 1
        # is how to switch retries off)
        "notify_retry_delays = ,",
        "synchronous = sometimes",
    ],
)
def test_bad_metadata_values(tmp_path, line):
    path = upstream(tmp_path)
    path.write_text(path.read_text() + f"\n[metadata]\n{line}\n")
    msg = assert_one_line_error(path, r"\[metadata\]")
    assert line.split()[0] in msg


@pytest.mark.parametrize(
    "line", ["notify_timeout = nan", "notify_deadline = nan", "notify_retry_delays = 8 -64"]
)
def test_non_finite_or_negative_numbers_rejected(tmp_path, line):
    path = upstream(tmp_path)
    path.write_text(path.read_text() + f"\n[metadata]\n{line}\n")
    assert_one_line_error(path, r"\[metadata\]")


@pytest.mark.parametrize(
    ("line", "hint"),
    [
        ("notify_retry_delay = 1 2 3", "notify_retry_delays"),  # a typo
        ("max_attribute = 7", "max_attributes"),
        ("turn_socket_path = /run/t.socket", None),  # a [params] key in the wrong section
    ],
)
def test_unknown_metadata_key_is_an_error(tmp_path, line, hint):
    """Like [notifiers]: a typo must not silently keep the default."""
    path = upstream(tmp_path)
    path.write_text(path.read_text() + f"\n[metadata]\ndelivery_dict = lmtp\n{line}\n")
    key = line.split()[0]
    msg = assert_one_line_error(path, rf"\[metadata\] unknown key '{key}'")
    assert msg.startswith(f"{path}: ")
    if hint is not None:
        assert f"did you mean {hint!r}" in msg


def test_every_metadata_key_read_is_accepted(tmp_path):
    """The keys README.md documents, plus appversions_path and max_smtp_recipients."""
    path = upstream(tmp_path)
    appversions = tmp_path / "appversions.json"
    path.write_text(
        path.read_text() + "\n[metadata]\n"
        f"appversions_path = {appversions}\n"
        "max_smtp_recipients = 50\n"
        "database =\n"
        "delivery_dict = lmtp\n"
        "max_attributes = 256\n"
        "max_value_bytes = 65536\n"
        "max_line_bytes = 1048576\n"
        "notify_url = embedded\n"
        "notify_workers = 12\n"
        "notify_timeout = 60\n"
        "notify_retry_delays = 8 64 512 4096\n"
        "notify_max_attempts = 5\n"
        "notify_deadline = 18000\n"
        "synchronous = NORMAL\n"
    )
    cfg = read_config(path)
    assert cfg.appversions_path == appversions
    assert cfg.notifier.retry_policy() == RetryPolicy()


def test_readme_ini_example_parses(tmp_path):
    """The [metadata] example in README.md is valid as printed."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```ini\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "chatmail.ini"
    path.write_text(f"[params]\nmail_domain = example.org\nmailboxes_dir = {tmp_path}\n{block}")
    cfg = read_config(path)
    assert cfg.delivery_dict == "lmtp"
    assert cfg.notifier.retry_delays == (8.0, 64.0, 512.0, 4096.0)
    assert cfg.synchronous == "NORMAL"
