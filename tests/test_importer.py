"""chatmail-metadata-import: upstream metadata.json files into the SQLite store."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_chatmaild import DAY, T0, Clock, Session, priv, write_ini

from chatmaild import importer
from chatmaild.database import connect
from chatmaild.metadata import MetadataDict
from chatmaild.serverkeys import ServerKeys
from chatmaild.store import MetadataStore

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def mailboxes(tmp_path):
    d = tmp_path / "mailboxes"
    d.mkdir()
    return d


@pytest.fixture
def store(tmp_path):
    conn = connect(tmp_path / "db.sqlite3")
    yield MetadataStore(conn)
    conn.close()


def put(mailboxes: Path, addr: str, content) -> Path:
    d = mailboxes / addr
    d.mkdir(exist_ok=True)
    path = d / "metadata.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))
    return path


def dump(store: MetadataStore):
    return store.conn.execute(
        "SELECT user, token, created, set_at FROM tokens ORDER BY user, token"
    ).fetchall()


def run(store, mailboxes, now=T0, dry_run=False):
    return importer.run_import(store, mailboxes, dry_run=dry_run, clock=Clock(now))


def test_both_formats(store, mailboxes):
    put(mailboxes, "new@example.org", {"devicetoken": {"t1": T0 - 10, "t2": T0 - 5}})
    put(mailboxes, "old@example.org", {"devicetoken": ["l1", "l2"]})
    stats = run(store, mailboxes)
    assert (stats.addresses, stats.files, stats.imported) == (2, 2, 4)
    assert store.valid_tokens("new@example.org", T0) == ["t1", "t2"]
    assert store.valid_tokens("old@example.org", T0) == ["l1", "l2"]
    rows = {(u, t): s for u, t, _c, s in dump(store)}
    assert rows[("old@example.org", "l1")] == T0  # legacy tokens are stamped "now"
    assert rows[("new@example.org", "t1")] == T0 - 10


def test_imported_tokens_served_by_dict(tmp_path, store, mailboxes):
    put(mailboxes, "alice@example.org", {"devicetoken": {"openpgp:abc": T0 - 1}})
    run(store, mailboxes)
    cfg_path = write_ini(tmp_path)
    from chatmaild.config import read_config

    backend = MetadataDict(store, ServerKeys(read_config(cfg_path)), clock=Clock(T0 + 1))
    assert Session(backend).lookup(priv("devicetoken")) == b"Oopenpgp:abc\n"


def test_expired_and_future_skipped(store, mailboxes):
    put(
        mailboxes,
        "a@example.org",
        {
            "devicetoken": {
                "expired": T0 - 90 * DAY,
                "almost": T0 - 90 * DAY + 1,
                "future": T0 + 60,
                "nearfuture": T0 + 59,
            }
        },
    )
    stats = run(store, mailboxes)
    assert (stats.imported, stats.expired, stats.future) == (2, 1, 1)
    assert sorted(store.valid_tokens("a@example.org", T0)) == ["almost", "nearfuture"]


def test_invalid_tokens_skipped(store, mailboxes):
    put(
        mailboxes,
        "a@example.org",
        {"devicetoken": {"good": T0, "with space": T0, "": T0, "ts-str": "x", "ts-bool": True}},
    )
    put(mailboxes, "b@example.org", {"devicetoken": ["ok", 5, None, "x" * 5000, "tab\t"]})
    stats = run(store, mailboxes)
    assert stats.imported == 2 and stats.invalid == 8
    assert store.valid_tokens("a@example.org", T0) == ["good"]
    assert store.valid_tokens("b@example.org", T0) == ["ok"]


def test_corrupt_files_counted_and_logged(store, mailboxes, caplog):
    put(mailboxes, "a@example.org", b"{not json")
    put(mailboxes, "b@example.org", b"\xff\xfe\x00")
    put(mailboxes, "c@example.org", [1, 2])
    put(mailboxes, "d@example.org", {"devicetoken": "single-string"})
    put(mailboxes, "e@example.org", b"")
    put(mailboxes, "ok@example.org", {"devicetoken": {"t": T0}})
    put(mailboxes, "none@example.org", {"other": 1})
    with caplog.at_level(logging.WARNING):
        stats = run(store, mailboxes)
    assert stats.corrupt == 5
    assert stats.imported == 1 and stats.addresses == 7
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 5
    assert store.valid_tokens("ok@example.org", T0) == ["t"]


def test_non_address_directories_skipped(store, mailboxes):
    put(mailboxes, "pending_notifications", {"devicetoken": {"x": T0}})
    put(mailboxes, ".hidden@example.org", {"devicetoken": {"x": T0}})
    put(mailboxes, "@example.org", {"devicetoken": {"x": T0}})
    put(mailboxes, "user@", {"devicetoken": {"x": T0}})
    (mailboxes / "file@example.org").write_text("{}")  # a file, not a directory
    (mailboxes / "nofile@example.org").mkdir()  # address without token file
    put(mailboxes, "real@example.org", {"devicetoken": {"x": T0}})
    stats = run(store, mailboxes)
    assert (stats.addresses, stats.files, stats.imported) == (2, 1, 1)
    assert {u for u, *_ in dump(store)} == {"real@example.org"}


def test_idempotent(store, mailboxes):
    put(mailboxes, "a@example.org", {"devicetoken": {f"t{i}": T0 - i for i in range(40)}})
    put(mailboxes, "b@example.org", {"devicetoken": ["l1", "l2"]})
    put(mailboxes, "c@example.org", b"garbage")
    first = run(store, mailboxes)
    before = dump(store)
    second = run(store, mailboxes, now=T0 + 100)  # later run: legacy tokens get a new "now"
    # the legacy stamp moves, nothing else
    after = dump(store)
    assert [r for r in after if r[0] != "b@example.org"] == [
        r for r in before if r[0] != "b@example.org"
    ]
    assert first.imported == 34
    third = run(store, mailboxes, now=T0 + 100)
    assert third.imported == 0 and dump(store) == after
    assert second.unchanged == 32 and second.over_cap == 8


def test_idempotent_same_time(store, mailboxes):
    put(mailboxes, "a@example.org", {"devicetoken": {"t1": T0 - 3, "t2": T0}})
    put(mailboxes, "b@example.org", {"devicetoken": ["l1"]})
    run(store, mailboxes)
    before = dump(store)
    again = run(store, mailboxes)
    assert again.imported == 0 and again.unchanged == 3
    assert dump(store) == before


def test_cap_32_keeps_most_recent(store, mailboxes):
    tokens = {f"t{i:02d}": T0 - 1000 + i for i in range(40)}
    put(mailboxes, "a@example.org", {"devicetoken": tokens})
    stats = run(store, mailboxes)
    assert (stats.imported, stats.over_cap) == (32, 8)
    valid = store.valid_tokens("a@example.org", T0)
    assert valid == [f"t{i:02d}" for i in range(8, 40)]


def test_cap_counts_tokens_already_in_database(store, mailboxes):
    with store.transaction():
        for i in range(30):
            store.add_token("a@example.org", f"db{i:02d}", T0 - 100 + i)
    put(
        mailboxes,
        "a@example.org",
        {"devicetoken": {"newer1": T0 - 1, "newer2": T0 - 2, "newer3": T0 - 3, "old": T0 - 500}},
    )
    stats = run(store, mailboxes)
    valid = store.valid_tokens("a@example.org", T0)
    assert len(valid) == 32
    assert {"newer1", "newer2", "newer3"} <= set(valid)
    assert "old" not in valid and "db00" not in valid
    assert (stats.imported, stats.over_cap, stats.evicted) == (3, 1, 1)
    again = run(store, mailboxes)
    assert (again.imported, again.evicted) == (0, 0)


def test_newer_file_timestamp_refreshes(store, mailboxes):
    with store.transaction():
        store.add_token("a@example.org", "t", T0 - 50)
        store.add_token("a@example.org", "u", T0 - 5)
    put(mailboxes, "a@example.org", {"devicetoken": {"t": T0 - 10, "u": T0 - 20}})
    stats = run(store, mailboxes)
    assert (stats.imported, stats.unchanged) == (1, 1)
    rows = {t: s for _u, t, _c, s in dump(store)}
    assert rows == {"t": T0 - 10, "u": T0 - 5}


def test_dry_run_writes_nothing(store, mailboxes):
    put(mailboxes, "a@example.org", {"devicetoken": {"t": T0}})
    stats = run(store, mailboxes, dry_run=True)
    assert stats.imported == 1
    assert dump(store) == []


# ---------------------------------------------------------------------------
# command line


def ini_with(tmp_path, mailboxes) -> Path:
    path = tmp_path / "chatmail.ini"
    path.write_text(f"[params]\nmail_domain = example.org\nmailboxes_dir = {mailboxes}\n")
    return path


def test_main_imports_and_prints_summary(tmp_path, mailboxes, capsys, caplog):
    secret = "openpgp:SECRET-TOKEN-VALUE-0123456789"
    # Stamped, not the legacy list: a legacy token is stamped "now" by each run, so the
    # second run below re-imported it whenever the two runs fell in different seconds.
    put(mailboxes, "a@example.org", {"devicetoken": {secret: int(time.time())}})
    put(mailboxes, "b@example.org", b"{")
    ini = ini_with(tmp_path, mailboxes)
    with caplog.at_level(logging.DEBUG):
        assert importer.main([str(ini), "--log-level", "DEBUG"]) == 0
    out, err = capsys.readouterr()
    assert "2 addresses scanned" in out and "1 tokens imported" in out
    assert "1 corrupt files" in out and "0 skipped expired" in out
    assert "SECRET" not in out + err + caplog.text
    db = MetadataStore(connect(mailboxes / "chatmail-metadata.sqlite3"))
    assert db.valid_tokens("a@example.org", int(time.time())) == [secret]
    assert importer.main([str(ini)]) == 0
    assert "0 tokens imported" in capsys.readouterr().out


def test_main_options(tmp_path, mailboxes, capsys):
    other = tmp_path / "other"
    other.mkdir()
    put(other, "a@example.org", {"devicetoken": ["tok"]})
    ini = ini_with(tmp_path, mailboxes)
    db = tmp_path / "custom.sqlite3"
    argv = [str(ini), "--db", str(db), "--mailboxes-dir", str(other)]
    assert importer.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "1 tokens imported" in out
    assert MetadataStore(connect(db)).valid_tokens("a@example.org", 2**40) == []
    assert importer.main(argv) == 0
    assert dump(MetadataStore(connect(db)))[0][:2] == ("a@example.org", "tok")
    assert not (mailboxes / "chatmail-metadata.sqlite3").exists()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing-ini", "not found"),
        ("bad-ini", "mail_domain"),
        ("missing-mailboxes", "does not exist"),
        ("missing-db-dir", "does not exist"),
    ],
)
def test_main_errors(tmp_path, mailboxes, capsys, case, match):
    ini = ini_with(tmp_path, mailboxes)
    argv = [str(ini)]
    if case == "missing-ini":
        argv = [str(tmp_path / "nope.ini")]
    elif case == "bad-ini":
        ini.write_text("[params]\n")
    elif case == "missing-mailboxes":
        argv += ["--mailboxes-dir", str(tmp_path / "nope")]
    else:
        argv += ["--db", str(tmp_path / "nope" / "db.sqlite3")]
    assert importer.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatmail-metadata-import: error:")
    assert match in err


def test_console_script(tmp_path, mailboxes):
    put(mailboxes, "a@example.org", {"devicetoken": {"tok": 10**10}})  # far future
    ini = ini_with(tmp_path, mailboxes)
    exe = VENV_BIN / "chatmail-metadata-import"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "chatmaild.importer"]
    proc = subprocess.run([*cmd, str(ini)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped future" in proc.stdout
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout


def test_a_queue_file_with_a_token_where_the_time_belongs_never_logs_the_token(tmp_path, caplog):
    """A queue file is ``addr\\nstart_ts\\ntoken``; a broken one may hold the token on line 2."""
    from chatmaild.importer import CorruptFile, read_queue_file

    path = tmp_path / "broken"
    secret = "fcm-chat.delta:SECRETTOKENBYTES"
    path.write_text(f"alice@example.org\n{secret}\n")
    with pytest.raises(CorruptFile) as info:
        read_queue_file(path)
    assert "SECRETTOKENBYTES" not in str(info.value)
    assert "time" in str(info.value)  # still says what is wrong
