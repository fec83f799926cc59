"""The relay installer (staged into a temporary root) and the systemd units' hardening."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "systemd").glob("*.service"))


SNIPPET = "etc/dovecot/conf.d/90-chatmail-metadata.conf"
# What `doveconf -f protocol=lmtp mail_attribute` prints for the 2.4 snippet.
LMTP_ATTRIBUTE_24 = "mail_attribute {\n  dict proxy {\n    name = lmtp\n  }\n}"


def install(
    root: Path, *args: str, lmtp_dict: str = "", dovecot: str = "2.3.19.1 (9b53102964)"
) -> subprocess.CompletedProcess:
    """Stage the installer into ``root``; a stand-in doveconf answers ``lmtp_dict`` and a
    stand-in ``dovecot`` on PATH says ``dovecot --version`` is ``dovecot``.  The importer
    and exporter (--from-upstream, --rollback) run on this interpreter and checkout."""
    root.mkdir(parents=True, exist_ok=True)
    fake = root.parent / f"{root.name}-doveconf"
    fake.write_text(f"#!/bin/sh\necho '{lmtp_dict}'\n")
    fake.chmod(0o755)
    bin_dir = root.parent / f"{root.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "dovecot").write_text(f"#!/bin/sh\necho '{dovecot}'\n")
    (bin_dir / "dovecot").chmod(0o755)
    return subprocess.run(
        [
            str(REPO / "deploy" / "install-relay"),
            "--root",
            str(root),
            "--no-apt",
            "--no-venv",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DOVECONF": str(fake),
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO),
        },
    )


def test_install_relay_renders_config_and_is_idempotent(tmp_path):
    first = install(tmp_path, "--mail-domain", "chat.example.org")
    assert first.returncode == 0, first.stderr
    snippet = (tmp_path / "etc/dovecot/conf.d/90-chatmail-metadata.conf").read_text()
    assert "@" not in re.sub(r"#.*", "", snippet)  # every placeholder substituted
    assert "proxy:idle_msecs=60000:/run/chatmail-metadata/metadata.socket:metadata" in snippet
    assert "proxy:/run/chatmail-metadata/metadata.socket:lmtp" in snippet
    assert "lua:file=/etc/dovecot/push_notification.lua" in snippet
    lua = tmp_path / "etc/dovecot/push_notification.lua"
    assert lua.read_bytes() == (REPO / "dovecot/push_notification.lua").read_bytes()
    for unit in ("chatmail-metadata.service", "chatmail-metadata.socket"):
        assert (tmp_path / "etc/systemd/system" / unit).is_file()
    ini = tmp_path / "usr/local/lib/chatmaild/chatmail.ini"
    assert "mail_domain = chat.example.org" in ini.read_text()

    ini.write_text("[params]\nmail_domain = kept.example.org\n")
    again = install(tmp_path)
    assert again.returncode == 0, again.stderr
    assert "kept.example.org" in ini.read_text()  # an existing ini is never overwritten
    assert (tmp_path / "etc/dovecot/conf.d/90-chatmail-metadata.conf").read_text() == snippet


def test_own_venv_and_delivery_dict_only_when_dovecot_uses_it(tmp_path):
    root = tmp_path / "root"
    unit = (REPO / "systemd" / "chatmail-metadata.service").read_text()
    # Never upstream's venv (/usr/local/lib/chatmaild/venv): its chatmaild package stays.
    assert "/usr/local/lib/chatmail-metadata/venv/bin/chatmail-metadata" in unit
    assert "chatmaild/venv" not in unit
    dropin = root / "etc/systemd/system/chatmail-metadata.service.d/delivery-dict.conf"

    res = install(root, "--mail-domain", "x.org", lmtp_dict="proxy:/run/m.socket:lmtp")
    assert res.returncode == 0, res.stderr
    assert "--delivery-dict lmtp" in dropin.read_text()
    assert "ExecStart=\n" in dropin.read_text()  # resets the unit's ExecStart

    # upstream's dovecot.conf: LMTP shares the IMAP dict name, so no --delivery-dict
    res = install(root, lmtp_dict="proxy:/run/chatmail-metadata/metadata.socket:metadata")
    assert res.returncode == 0, res.stderr
    assert not dropin.exists()
    assert "not in effect" in res.stderr


def test_install_relay_needs_an_ini_or_a_domain(tmp_path):
    result = install(tmp_path)
    assert result.returncode == 1
    assert "--mail-domain" in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_are_rated_ok_or_better(unit):
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert match.group(2) in {"OK", "SAFE"}, match.group(0)
    assert float(match.group(1)) <= 4.9


def test_install_relay_installs_the_snippet_of_the_installed_dovecot(tmp_path):
    res = install(tmp_path, "--mail-domain", "x.org", dovecot="2.4.1-4 (7d8c0e5759)")
    assert res.returncode == 0, res.stderr
    snippet = (tmp_path / SNIPPET).read_text()
    assert "Dovecot 2.4 syntax" in snippet
    assert "socket_path = /run/chatmail-metadata/metadata.socket" in snippet
    assert "lua_file = /etc/dovecot/push_notification.lua" in snippet
    assert "@" not in re.sub(r"#.*", "", snippet)
    assert "Dovecot 2.4: install dovecot/2.4/conf.d/90-chatmail-metadata.conf" in res.stdout


def test_upgrade_from_2_3_to_2_4_replaces_the_snippet_and_says_so(tmp_path):
    assert install(tmp_path, "--mail-domain", "x.org").returncode == 0
    assert "Dovecot 2.3 syntax" in (tmp_path / SNIPPET).read_text()
    res = install(tmp_path, dovecot="2.4.1-4 (7d8c0e5759)", lmtp_dict=LMTP_ATTRIBUTE_24)
    assert res.returncode == 0, res.stderr
    assert "Dovecot 2.4: replace the Dovecot 2.3 snippet" in res.stdout
    assert "Dovecot 2.4 syntax" in (tmp_path / SNIPPET).read_text()
    # 2.4's LMTP dict name comes from its mail_attribute block
    dropin = tmp_path / "etc/systemd/system/chatmail-metadata.service.d/delivery-dict.conf"
    assert "--delivery-dict lmtp" in dropin.read_text()


def test_dry_run_says_which_snippet_and_changes_nothing(tmp_path):
    assert install(tmp_path, "--mail-domain", "x.org").returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = install(tmp_path, "--dry-run", dovecot="2.4.1-4 (7d8c0e5759)")
    assert res.returncode == 0, res.stderr
    assert "would replace the Dovecot 2.3 snippet" in res.stdout
    assert "nothing changed" in res.stdout
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    res = install(tmp_path / "fresh", "--dry-run", dovecot="2.4.1-4 (7d8c0e5759)")
    assert "would install dovecot/2.4/conf.d/90-chatmail-metadata.conf as" in res.stdout


def test_unknown_dovecot_version_is_one_line(tmp_path):
    res = install(tmp_path, "--mail-domain", "x.org", dovecot="2.5.0 (abc)")
    assert res.returncode == 1
    assert res.stderr.strip() == "install-relay: no snippet for Dovecot 2.5 (supported: 2.3, 2.4)"
