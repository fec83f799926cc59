"""WAL checkpoints off the commit path (chatmaild.checkpointer)."""

from __future__ import annotations

import time

from chatmaild.checkpointer import Checkpointer
from chatmaild.database import connect
from chatmaild.store import MetadataStore


def _fill(store: MetadataStore, n: int) -> None:
    for i in range(n):
        with store.transaction():
            store.set_attribute(f"u{i}", b"priv/g/k", b"x" * 3000)


def test_service_connection_leaves_checkpoints_to_the_checkpointer(tmp_path):
    conn = connect(tmp_path / "db.sqlite3", autocheckpoint=False)
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert connect(tmp_path / "db.sqlite3").execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    # 1,500 commits of a page each: past SQLite's own 1,000-page threshold
    _fill(MetadataStore(conn), 1500)
    checkpointer = Checkpointer(tmp_path / "db.sqlite3")
    checkpointer.start()
    try:
        busy, frames, done = checkpointer.checkpoint()
    finally:
        checkpointer.stop()
    assert busy == 0
    assert frames >= 1500  # nothing was checkpointed inside a commit
    assert done == frames


def test_checkpointer_thread_runs_until_stopped(tmp_path):
    conn = connect(tmp_path / "db.sqlite3", autocheckpoint=False)
    _fill(MetadataStore(conn), 10)
    checkpointer = Checkpointer(tmp_path / "db.sqlite3", interval=0.01, min_wal_bytes=0)
    checkpointer.start()
    deadline = time.monotonic() + 10
    while checkpointer.checkpoints < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    checkpointer.stop()
    assert checkpointer.checkpoints >= 2
    stopped_at = checkpointer.checkpoints
    time.sleep(0.05)
    assert checkpointer.checkpoints == stopped_at
    assert conn.execute("SELECT count(*) FROM attributes").fetchone()[0] == 10


def test_a_small_wal_is_left_to_grow_as_sqlite_would(tmp_path):
    """Under SQLite's own threshold nothing is checkpointed (a full disk still refuses)."""
    conn = connect(tmp_path / "db.sqlite3", autocheckpoint=False)
    _fill(MetadataStore(conn), 10)
    checkpointer = Checkpointer(tmp_path / "db.sqlite3", interval=0.01)
    checkpointer.start()
    time.sleep(0.1)
    checkpointer.stop()
    assert checkpointer.checkpoints == 0
