"""Switching a staged upstream relay over to chatmail-metadata and back (install-relay
--from-upstream / --rollback --root): every token and queued push accounted for, and
upstream's files exactly as they were afterwards."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from test_deploy import install

from chatmaild.database import connect
from chatmaild.store import MetadataStore

DOMAIN = "chat.example.org"
MAILBOXES = f"home/vmail/mail/{DOMAIN}"
SOCKET = "/run/chatmail-metadata/upstream.socket"  # not our default: it must be read
UNIT = "etc/systemd/system/chatmail-metadata.service"
INI = "/usr/local/lib/chatmaild/chatmail.ini"
EXEC = f"/usr/local/lib/chatmaild/venv/bin/chatmail-metadata {SOCKET} {INI}"
UPSTREAM_UNIT = f"""[Unit]
Description=Chatmail dict proxy for IMAP METADATA

[Service]
ExecStart={EXEC}
Restart=always
RestartSec=5
User=vmail
RuntimeDirectory=chatmail-metadata
UMask=0077

[Install]
WantedBy=multi-user.target
"""
A, B, C, D = (f"{name}@{DOMAIN}" for name in "abcd")
STATE = "var/lib/chatmail-metadata/upstream-switch"


def stage_upstream(root: Path, now: int) -> dict:
    """An upstream relay's files below ``root``; returns what the import must find."""
    files = {
        UNIT: UPSTREAM_UNIT,
        "etc/systemd/system/doveauth.service": "[Service]\nExecStart=/usr/local/bin/doveauth\n",
        "etc/dovecot/dovecot.conf": f"mail_attribute_dict = proxy:{SOCKET}:metadata\n",
        "etc/dovecot/push_notification.lua": "-- upstream's hook\n",
        "usr/local/lib/chatmaild/chatmail.ini": (
            f"[params]\nmail_domain = {DOMAIN}\nmailboxes_dir = /{MAILBOXES}\n"
        ),
        # dict form, list form (legacy), one expired token, a file that is not JSON
        f"{MAILBOXES}/{A}/metadata.json": json.dumps(
            {"devicetoken": {"openpgp:a1": now - 100, "openpgp:a2": now - 50}}
        ),
        f"{MAILBOXES}/{B}/metadata.json": json.dumps({"devicetoken": ["openpgp:b1"]}),
        f"{MAILBOXES}/{C}/metadata.json": json.dumps(
            {"devicetoken": {"openpgp:c1": now - 91 * 86400, "openpgp:c2": now - 10}}
        ),
        f"{MAILBOXES}/{D}/password": "x",
    }
    queue = {  # name: content, upstream's "<addr>\n<start_ts>\n<token>"
        "0a": f"{A}\n{now - 60}\nopenpgp:a1",
        "0b": f"{A}\n{now - 30}\nopenpgp:a1",  # same token, not yet sent: coalesced
        "0c": f"{B}\n{now - 600}\nopenpgp:b1",
        "0d": f"{C}\n{now - 6 * 3600}\nopenpgp:c2",  # past upstream's 5 h deadline
        "0e": "",  # empty (upstream's crash, fixed in b35e84e4)
        "0f": f"{A}\n{now}",  # partial: no token line
        "10.tmp": f"{A}\n{now}\nopenpgp:a2",  # interrupted write
    }
    for name, text in queue.items():
        files[f"{MAILBOXES}/pending_notifications/{name}"] = text
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {"jobs": {(A, now - 60, "openpgp:a1"), (B, now - 600, "openpgp:b1")}}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for rel, data in sorted(snapshot(root).items()):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def db(root: Path):
    return connect(root / MAILBOXES / "chatmail-metadata.sqlite3")


@pytest.fixture
def relay(tmp_path):
    root = tmp_path / "root"
    now = int(time.time())
    expected = stage_upstream(root, now)
    return root, now, expected


def test_switch_over_and_back_accounts_for_every_token_and_push(relay):
    root, now, expected = relay
    before = snapshot(root)

    res = install(root, "--from-upstream", lmtp_dict=f"proxy:{SOCKET}:metadata")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "systemctl stop chatmail-metadata.service (not run" in out
    assert "4 tokens imported" in out and "1 skipped expired" in out
    assert "6 queued pushes, 2 imported as jobs, 1 coalesced with a queued job" in out
    assert "1 skipped past their deadline, 2 skipped empty or partial, 1 skipped .tmp" in out
    assert "systemctl restart chatmail-metadata.socket chatmail-metadata.service (not run" in out

    conn = db(root)
    tokens = set(conn.execute("SELECT user, token FROM tokens"))
    assert tokens == {
        (A, "openpgp:a1"),
        (A, "openpgp:a2"),
        (B, "openpgp:b1"),
        (C, "openpgp:c2"),
    }  # c1 expired
    jobs = conn.execute("SELECT user, created, token, deadline, due, attempts FROM jobs").fetchall()
    assert {(u, int(c), t) for u, c, t, *_ in jobs} == expected["jobs"]
    for _, created, _, deadline, due, attempts in jobs:
        assert deadline == created + 5 * 3600 and due == created and attempts == 0

    # ours is configured on the socket Dovecot already uses, upstream's files are aside
    unit = (root / UNIT).read_text()
    assert f"chatmail-metadata {SOCKET} {INI}" in unit
    assert "/usr/local/lib/chatmail-metadata/venv/" in unit
    assert (
        f"ListenStream={SOCKET}"
        in (root / "etc/systemd/system/chatmail-metadata.socket").read_text()
    )
    state = (root / STATE).read_text()
    stamp = re.search(r"^switched_utc=(\S+)$", state, re.M).group(1)
    assert (root / f"{UNIT}.upstream-{stamp}").read_text() == UPSTREAM_UNIT
    aside = root / MAILBOXES / f"pending_notifications.upstream-{stamp}"
    assert sorted(p.name for p in aside.iterdir()) == ["0a", "0b", "0c", "0d", "0e", "0f", "10.tmp"]
    assert not (root / MAILBOXES / "pending_notifications").exists()

    # tokens stored after the switch, through the store: a new one, a refreshed one
    later = int(time.time()) + 2
    store = MetadataStore(conn)
    with store.transaction():
        store.add_token(D, "openpgp:d1", later)
        store.add_token(A, "openpgp:a1", later)
        store.add_token(B, "openpgp:b2", later)
    conn.close()

    res = install(root, "--rollback")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "systemctl disable --now chatmail-metadata.socket chatmail-metadata.service" in out
    assert "systemctl enable --now chatmail-metadata.service (not run" in out
    assert "2 tokens added and 1 refreshed in 3 metadata.json files" in out
    assert "2 queued pushes written for upstream" in out

    after = snapshot(root)
    changed = {f"{MAILBOXES}/{A}/metadata.json", f"{MAILBOXES}/{B}/metadata.json"}
    for rel, data in before.items():
        if "/pending_notifications/" in rel:  # imported: kept aside, byte-identical
            assert after[rel.replace("pending_notifications/", aside.name + "/")] == data
        elif rel not in changed:
            assert after[rel] == data, rel
    a = json.loads(after[f"{MAILBOXES}/{A}/metadata.json"])["devicetoken"]
    assert a == {"openpgp:a1": later, "openpgp:a2": now - 50}
    b = json.loads(after[f"{MAILBOXES}/{B}/metadata.json"])["devicetoken"]
    assert set(b) == {"openpgp:b1", "openpgp:b2"} and b["openpgp:b2"] == later
    d = json.loads(after[f"{MAILBOXES}/{D}/metadata.json"])["devicetoken"]
    assert d == {"openpgp:d1": later}
    # our units, snippet and drop-in are gone; upstream's unit is back
    assert not (root / "etc/systemd/system/chatmail-metadata.socket").exists()
    assert not (root / "etc/dovecot/conf.d/90-chatmail-metadata.conf").exists()
    assert after[UNIT] == UPSTREAM_UNIT.encode()
    # the still queued pushes are upstream queue files again, with their start times
    queue = root / MAILBOXES / "pending_notifications"
    found = {tuple(p.read_text().split("\n", 2)) for p in queue.iterdir()}
    assert {(u, int(s), t) for u, s, t in found} == expected["jobs"]
    assert not (root / STATE).exists()

    again = install(root, "--rollback")
    assert again.returncode == 1
    assert again.stderr.strip() == (
        "install-relay: no switch-over to roll back (state file /" + STATE + " missing)"
    )


def test_second_switch_is_a_no_op_and_dry_runs_change_nothing(relay):
    root, _, _ = relay
    h0 = tree_hash(root)
    dry = install(root, "--from-upstream", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would stop upstream's chatmail-metadata.service" in dry.stdout
    assert "2 imported as jobs" in dry.stdout and "dry run: nothing changed" in dry.stdout
    assert f"upstream chatmail-metadata: /{UNIT} (socket {SOCKET}" in dry.stdout
    assert tree_hash(root) == h0

    assert install(root, "--from-upstream").returncode == 0
    h1 = tree_hash(root)
    again = install(root, "--from-upstream")
    assert again.returncode == 0, again.stderr
    assert "already switched over from upstream at" in again.stdout
    assert "nothing to do" in again.stdout
    assert tree_hash(root) == h1

    dry = install(root, "--rollback", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would restore /etc/systemd/system/chatmail-metadata.service" in dry.stdout
    assert tree_hash(root) == h1


def test_errors_name_the_thing_at_fault(tmp_path):
    res = install(tmp_path / "empty", "--from-upstream")
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "install-relay: no upstream chatmail-metadata found "
        "(/etc/systemd/system/chatmail-metadata.service does not exist)"
    )
    ours = tmp_path / "ours"
    assert install(ours, "--mail-domain", "x.org").returncode == 0
    res = install(ours, "--from-upstream")
    assert res.returncode == 1
    assert "is already this project's" in res.stderr and len(res.stderr.splitlines()) == 1


def test_a_failed_import_restarts_upstream_and_moves_nothing(relay):
    root, _, _ = relay
    (root / MAILBOXES / "chatmail-metadata.sqlite3").write_bytes(b"not a database" * 100)
    h0 = tree_hash(root)
    res = install(root, "--from-upstream")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "chatmail-metadata.sqlite3" in res.stderr
    assert "systemctl start chatmail-metadata.service (not run" in res.stdout
    assert tree_hash(root) == h0 and not (root / STATE).exists()


def test_export_leaves_corrupt_files_and_missing_mailboxes_alone(tmp_path):
    from chatmaild.exporter import ExportStats, export_tokens

    mailboxes = tmp_path / "mail"
    (mailboxes / A).mkdir(parents=True)
    (mailboxes / A / "metadata.json").write_bytes(b"{not json")
    conn = connect(tmp_path / "db.sqlite3")
    store = MetadataStore(conn)
    now = int(time.time())
    with store.transaction():
        store.add_token(A, "openpgp:a1", now)
        store.add_token(D, "openpgp:d1", now)  # no mailbox directory
    stats = ExportStats()
    export_tokens(conn, mailboxes, now - 10, now, stats)
    assert (stats.corrupt, stats.no_mailbox, stats.files_written) == (1, 1, 0)
    assert (mailboxes / A / "metadata.json").read_bytes() == b"{not json"
    assert not (mailboxes / D).exists()


def test_rollback_of_a_relay_that_had_no_queue_directory_starts_upstream(relay):
    """Nothing was consumed (no pending_notifications at the switch): the rollback still
    finishes (under pipefail an empty grep must not end it before upstream is started)."""
    root, _, _ = relay
    queue = root / MAILBOXES / "pending_notifications"
    for f in queue.iterdir():
        f.unlink()
    queue.rmdir()
    assert install(root, "--from-upstream").returncode == 0
    res = install(root, "--rollback")
    assert res.returncode == 0, res.stderr
    assert "systemctl enable --now chatmail-metadata.service (not run" in res.stdout
    assert "rolled back: upstream's chatmail-metadata serves" in res.stdout
    assert (root / UNIT).read_text() == UPSTREAM_UNIT
    assert not (root / STATE).exists()


def test_a_dovecot_without_our_snippet_stops_the_switch_before_upstream_is_touched(relay):
    """What can fail before ours is installed is checked before upstream is stopped: an
    unsupported Dovecot must not leave the relay with neither service running."""
    root, _, _ = relay
    h0 = tree_hash(root)
    res = install(root, "--from-upstream", dovecot="2.5.0 (f00)")
    assert res.returncode == 1
    assert "no snippet for Dovecot 2.5" in res.stderr
    assert "systemctl stop" not in res.stdout
    assert tree_hash(root) == h0 and not (root / STATE).exists()


def test_a_rollback_interrupted_after_restoring_some_files_can_be_run_again(relay):
    """A rollback that stopped part way (files restored, state file still there) is
    rerun to the end: what is back already is left as it is."""
    root, _, _ = relay
    assert install(root, "--from-upstream").returncode == 0
    state = (root / STATE).read_text()
    lua = "/etc/dovecot/push_notification.lua"
    aside = re.search(rf"^moved\t{re.escape(lua)}\t(\S+)$", state, re.M).group(1)
    (root / aside.lstrip("/")).replace(root / lua.lstrip("/"))  # restored by the first run
    res = install(root, "--rollback")
    assert res.returncode == 0, res.stderr
    assert (root / lua.lstrip("/")).read_text() == "-- upstream's hook\n"
    assert (root / UNIT).read_text() == UPSTREAM_UNIT
    assert not (root / STATE).exists()


def test_a_switch_that_failed_after_moving_upstream_aside_is_finished_by_a_rerun(relay):
    """Upstream stopped and moved aside, ours not installed yet (here: the Dovecot conf.d
    is a file, so the snippet cannot be written): a rerun finishes the install, not
    "nothing to do"; the tokens were imported once, and a rollback still restores all."""
    root, _, _ = relay
    before = snapshot(root)
    blocker = root / "etc/dovecot/conf.d"
    blocker.write_text("in the way\n")
    failed = install(root, "--from-upstream", lmtp_dict=f"proxy:{SOCKET}:metadata")
    assert failed.returncode != 0
    assert (root / STATE).exists() and not (root / UNIT).exists()
    blocker.unlink()
    res = install(root, "--from-upstream", lmtp_dict=f"proxy:{SOCKET}:metadata")
    assert res.returncode == 0, res.stderr
    assert "nothing to do" not in res.stdout
    assert "was not finished" in res.stdout and "importing" not in res.stdout
    assert "systemctl restart chatmail-metadata.socket chatmail-metadata.service (not run" in (
        res.stdout
    )
    unit = (root / UNIT).read_text()
    assert "/usr/local/lib/chatmail-metadata/venv/" in unit
    assert SOCKET in (root / "etc/systemd/system/chatmail-metadata.socket").read_text()
    assert db(root).execute("SELECT count(*) FROM tokens").fetchone() == (4,)
    again = install(root, "--from-upstream")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert install(root, "--rollback").returncode == 0
    assert (root / UNIT).read_text() == UPSTREAM_UNIT
    lua = "etc/dovecot/push_notification.lua"
    assert (root / lua).read_bytes() == before[lua]


def test_a_switch_that_stopped_while_moving_upstream_aside_says_to_roll_back(relay):
    """The moves aside did not all happen: finishing could overwrite an upstream file that
    was never moved aside, so the rerun stops with one line naming --rollback."""
    root, _, _ = relay
    hook = root / "etc/dovecot/push_notification.lua"
    assert install(root, "--from-upstream").returncode == 0
    # Back to where a switch stopped after moving upstream's unit aside, before its Lua
    # hook: the hook is upstream's, none of ours is installed, the state names the unit.
    state = root / STATE
    lines = state.read_text().splitlines(True)
    state.write_text("".join(lines[:6]))
    assert lines[5].startswith("moved\t/" + UNIT + "\t")
    lua_aside = next(line.split("\t")[2].strip() for line in lines if "push_notification" in line)
    (root / lua_aside.lstrip("/")).replace(hook)
    for ours in ("etc/systemd/system/chatmail-metadata.socket", "etc/dovecot/conf.d"):
        shutil.rmtree(root / ours) if (root / ours).is_dir() else (root / ours).unlink()
    (root / UNIT).unlink()
    res = install(root, "--from-upstream")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--rollback" in res.stderr and "/" + STATE in res.stderr
    # ... and that rollback keeps the hook that was never moved aside (it is upstream's)
    res = install(root, "--rollback")
    assert res.returncode == 0, res.stderr
    assert hook.read_text() == "-- upstream's hook\n"
    assert (root / UNIT).read_text() == UPSTREAM_UNIT
