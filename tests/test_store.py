"""MetadataStore, TokenPolicy and JobStore on a real SQLite database."""

from __future__ import annotations

import threading

import pytest
from helpers_chatmaild import DAY, T0
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmaild.database import DatabaseError, connect, write_lock
from chatmaild.jobqueue import RetryPolicy
from chatmaild.jobstore import JobStore
from chatmaild.store import MetadataStore, TokenPolicy


@pytest.fixture
def store(tmp_path):
    conn = connect(tmp_path / "db.sqlite3")
    yield MetadataStore(conn)
    conn.close()


def mem_store() -> MetadataStore:
    return MetadataStore(connect(":memory:"))


# ---------------------------------------------------------------------------
# attributes


def test_attribute_set_get_unset(store):
    with store.transaction():
        store.set_attribute("a", b"priv/g/k", b"v1")
    assert store.get_attribute("a", b"priv/g/k") == b"v1"
    assert store.get_attribute("b", b"priv/g/k") is None
    with store.transaction():
        store.set_attribute("a", b"priv/g/k", b"v2")
    assert store.get_attribute("a", b"priv/g/k") == b"v2"
    assert store.count_attributes("a") == 1
    with store.transaction():
        store.unset_attribute("a", b"priv/g/k")
        store.unset_attribute("a", b"priv/g/never")
    assert store.get_attribute("a", b"priv/g/k") is None
    assert store.count_attributes("a") == 0


@settings(max_examples=100)
@given(st.binary(), st.binary(min_size=1, max_size=50))
def test_attribute_values_are_byte_exact(value, key):
    s = mem_store()
    with s.transaction():
        s.set_attribute("u", key, value)
    got = s.get_attribute("u", key)
    assert type(got) is bytes and got == value
    assert s.iter_attributes("u", b"") == [(key, value)]


def test_empty_value_is_not_none(store):
    with store.transaction():
        store.set_attribute("a", b"k", b"")
    assert store.get_attribute("a", b"k") == b""


def test_transaction_rolls_back_on_error(store):
    with pytest.raises(RuntimeError), store.transaction():
        store.set_attribute("a", b"k", b"v")
        store.add_token("a", "tok", T0)
        raise RuntimeError("boom")
    assert store.get_attribute("a", b"k") is None
    assert store.valid_tokens("a", T0) == []
    assert not store.conn.in_transaction


_key_alphabet = st.sampled_from([b"a", b"/", b"\x00", b"\x7f", b"\x80", b"\xfe", b"\xff"])
_keys = st.lists(_key_alphabet, max_size=5).map(b"".join)


@settings(max_examples=300)
@given(st.sets(_keys, max_size=20), _keys)
def test_prefix_iteration_is_bytewise(keys, prefix):
    s = mem_store()
    with s.transaction():
        for k in keys:
            s.set_attribute("u", k, b"v" + k)
        s.set_attribute("other", prefix, b"x")
    got = s.iter_attributes("u", prefix)
    expected = sorted((k, b"v" + k) for k in keys if k.startswith(prefix))
    assert got == expected


@pytest.mark.parametrize(
    "prefix",
    [b"priv/g/\xff", b"priv/g/\xff\xff", b"\xff", b"\xff\xff\xff", b"priv/g/a\xff"],
)
def test_prefix_ending_in_ff(store, prefix):
    keys = [
        b"priv/g/\xff",
        b"priv/g/\xff\x00",
        b"priv/g/\xff\xff",
        b"priv/g/\xff\xff\xff",
        b"priv/g/a\xff",
        b"priv/g/a\xff\xff",
        b"priv/g/b",
        b"priv/h",
        b"\xff",
        b"\xff\xff\xff\xff",
    ]
    with store.transaction():
        for k in keys:
            store.set_attribute("u", k, k)
    assert [k for k, _ in store.iter_attributes("u", prefix)] == sorted(
        k for k in keys if k.startswith(prefix)
    )


def test_doveadm_prefix_without_trailing_slash(store):
    base = b"priv/g/vendor/vendor.dovecot/pvt/server/vendor/deltachat"
    keys = [base + b"/a", base + b"/b/c", base + b"x/no-slash", b"priv/g/vendor/deltachat/z"]
    with store.transaction():
        for k in keys:
            store.set_attribute("u", k, b"1")
    got = [k for k, _ in store.iter_attributes("u", base)]
    assert got == [base + b"/a", base + b"/b/c", base + b"x/no-slash"]
    assert [k for k, _ in store.iter_attributes("u", base + b"/")] == got[:2]
    assert store.iter_attributes("u", b"priv/g/vendor/vendor.dovecot/pvt/server//") == []


def test_iteration_limit(store):
    with store.transaction():
        for i in range(5):
            store.set_attribute("u", b"p/%d" % i, b"")
    assert [k for k, _ in store.iter_attributes("u", b"p/", limit=2)] == [b"p/0", b"p/1"]


# ---------------------------------------------------------------------------
# device tokens


def test_token_add_refresh_lookup_order(store):
    with store.transaction():
        store.add_token("a", "t1", T0, "g")
        store.add_token("a", "t2", T0 + 1, "g")
        store.add_token("a", "t1", T0 + 2, "g")  # refresh keeps first-set order
        store.add_token("b", "t9", T0)
    assert store.valid_tokens("a", T0 + 3) == ["t1", "t2"]
    assert store.valid_tokens("b", T0 + 3) == ["t9"]
    assert store.token_guids("a", T0) == ["g"]


def test_token_remove(store):
    with store.transaction():
        for t in ("t1", "t2", "t3"):
            store.add_token("a", t, T0)
        store.add_token("b", "t1", T0)
    with store.transaction():
        assert store.remove_token("a", "t2") is True
        assert store.remove_token("a", "nope") is False
    assert store.valid_tokens("a", T0) == ["t1", "t3"]
    with store.transaction():
        assert store.remove_tokens("a") == 2
    assert store.valid_tokens("a", T0) == []
    assert store.valid_tokens("b", T0) == ["t1"]


def test_unset_on_a_mailbox_removes_its_tokens_and_imported_ones(store):
    with store.transaction():
        store.add_token("a", "on-inbox", T0, guid="inbox")
        store.add_token("a", "on-foo", T0, guid="foo")
        store.import_token("a", "imported", T0)  # from metadata.json: no mailbox known
    with store.transaction():
        assert store.remove_tokens("a", "inbox") == 2
    assert store.valid_tokens("a", T0) == ["on-foo"]


def test_at_most_32_tokens_least_recently_set_evicted(store):
    with store.transaction():
        for i in range(32):
            store.add_token("a", f"t{i}", T0 + i)
        store.add_token("a", "t0", T0 + 100)  # t0 is now the most recent
        store.add_token("a", "new", T0 + 101)
    tokens = store.valid_tokens("a", T0 + 101)
    assert len(tokens) == 32
    assert "t1" not in tokens
    assert "t0" in tokens and "new" in tokens


def test_eviction_within_one_second_keeps_refreshed_token(store):
    with store.transaction():
        for i in range(32):
            store.add_token("a", f"t{i}", T0)
        store.add_token("a", "t0", T0)  # refreshed: t1 is now the least recently set
        store.add_token("a", "new", T0)
    tokens = store.valid_tokens("a", T0)
    assert "t0" in tokens and "t1" not in tokens


def test_validity_window(store):
    p = store.policy
    assert p == TokenPolicy(90 * DAY, 60, 32)
    with store.transaction():
        store.add_token("a", "tok", T0)
    assert store.valid_tokens("a", T0 + 90 * DAY - 1) == ["tok"]
    assert store.valid_tokens("a", T0 + 90 * DAY) == []
    assert store.valid_tokens("a", T0) == ["tok"]  # a lookup only filters
    with store.transaction():
        assert store.prune_tokens("a", T0 + 90 * DAY) == 1
    assert store.valid_tokens("a", T0) == []  # pruning in a commit removes it for good


def test_token_reads_never_write(store):
    """Lookups run on the dict server's event loop: a write there would wait for the
    write lock (and SQLite's 30 s busy timeout) behind any writer."""
    with store.transaction():
        store.import_token("a", "expired", T0 - 90 * DAY)
        store.import_token("a", "future", T0 + 3600)
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)

    def only_selects() -> bool:
        return bool(statements) and all(sql.lstrip().startswith("SELECT") for sql in statements)

    assert store.valid_tokens("a", T0) == []
    assert store.token_guids("a", T0) == []
    assert only_selects(), statements
    assert store.valid_token_stamps("a", T0) == {}
    assert only_selects(), statements
    store.conn.set_trace_callback(None)
    assert store.conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == 2


def test_future_guard(store):
    with store.transaction():
        store.add_token("a", "tok", T0 + 100)
    assert store.valid_tokens("a", T0 + 40) == []  # 100 s ahead of "now" + 60 s guard
    with store.transaction():
        store.add_token("a", "tok2", T0 + 59)
    assert store.valid_tokens("a", T0) == ["tok2"]


def test_policy_boundaries():
    p = TokenPolicy()
    assert p.is_valid(T0, T0)
    assert p.is_valid(T0 + 59, T0)
    assert not p.is_valid(T0 + 60, T0)
    assert p.is_valid(T0 - 90 * DAY + 1, T0)
    assert not p.is_valid(T0 - 90 * DAY, T0)


def test_import_token_semantics(store):
    with store.transaction():
        assert store.import_token("a", "t", T0) is True
        assert store.import_token("a", "t", T0) is False  # same stamp: nothing changes
        assert store.import_token("a", "t", T0 - 5) is False  # older: kept newer
        assert store.import_token("a", "t", T0 + 5) is True  # newer: refreshed
    assert store.valid_tokens("a", T0 + 5) == ["t"]


def test_import_token_keeps_the_limit_evicting_the_least_recently_set(store):
    """Imported tokens count against ``max_per_user`` as added ones do (a later refresh,
    one statement, never evicts, so the store must not be left above the limit)."""
    limit = store.policy.max_per_user
    with store.transaction():
        for i in range(limit + 8):
            store.import_token("a", f"t{i}", T0 - 1000 + i)
        assert store.import_token("a", "older", T0 - 2000) is False  # evicted at once
    assert store.valid_tokens("a", T0) == [f"t{i}" for i in range(8, limit + 8)]
    (count,) = store.conn.execute("SELECT count(*) FROM tokens WHERE user='a'").fetchone()
    assert count == limit


def test_store_persists_across_connections(tmp_path):
    s1 = MetadataStore(connect(tmp_path / "db.sqlite3"))
    with s1.transaction():
        s1.add_token("a", "t", T0)
        s1.set_attribute("a", b"k", b"\x00\xff")
    s2 = MetadataStore(connect(tmp_path / "db.sqlite3"))
    assert s2.valid_tokens("a", T0) == ["t"]
    assert s2.get_attribute("a", b"k") == b"\x00\xff"
    assert s2.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_connect_missing_directory(tmp_path):
    with pytest.raises(DatabaseError, match="does not exist"):
        connect(tmp_path / "nope" / "db.sqlite3")


def test_connect_garbage_file(tmp_path):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError):
        connect(path)


# ---------------------------------------------------------------------------
# job store


def test_job_store_coalesces_and_counts_attempts_before_sending(store):
    jobs = JobStore(store.conn)
    policy = RetryPolicy()
    with store.transaction():
        (job,) = jobs.enqueue("a", ["t1"], T0, policy)
        assert jobs.enqueue("a", ["t1"], T0 + 1, policy) == []  # fresh job absorbs it
    assert jobs.claim(job.id).attempts == 1
    with store.transaction():
        assert len(jobs.enqueue("a", ["t1"], T0 + 2, policy)) == 1  # claimed: absorbs nothing
    assert jobs.count() == 2
    jobs.finish(job.id)
    assert jobs.claim(job.id) is None
    assert [j.attempts for j in jobs.pending()] == [0]


def test_job_store_removes_a_dead_token_with_its_jobs_only(store):
    jobs = JobStore(store.conn)
    with store.transaction():
        for user in ("a", "b"):
            for token in ("dead", "alive"):
                store.add_token(user, token, T0)
            jobs.enqueue(user, ["dead", "alive"], T0, RetryPolicy())
    assert jobs.remove_token("a", "dead") == (True, 1)
    assert jobs.remove_token("a", "dead") == (False, 0)
    assert store.valid_tokens("a", T0) == ["alive"]
    assert store.valid_tokens("b", T0) == ["dead", "alive"]
    assert sorted((j.user, j.token) for j in jobs.pending()) == [
        ("a", "alive"),
        ("b", "alive"),
        ("b", "dead"),
    ]


def test_job_store_writes_wait_for_the_process_write_lock(tmp_path):
    path = tmp_path / "db.sqlite3"
    jobs = JobStore.open(path)
    with MetadataStore(jobs.conn).transaction():
        (job,) = jobs.enqueue("a", ["t"], T0, RetryPolicy())
    claimed: list[object] = []
    with write_lock(path):
        worker = threading.Thread(target=lambda: claimed.append(jobs.claim(job.id)))
        worker.start()
        worker.join(0.2)
        assert worker.is_alive() and claimed == []  # queued on the lock, not on SQLite
    worker.join(5)
    assert claimed[0].attempts == 1
    jobs.close()


def test_tokens_to_push_is_prune_then_valid_tokens(store):
    with store.transaction():
        store.add_token("a", "old", T0)
        store.add_token("a", "t1", T0 + 90 * DAY - 10)
        store.add_token("a", "t2", T0 + 90 * DAY - 5)
        store.add_token("b", "other", T0)
    now = T0 + 90 * DAY
    with store.transaction():
        assert store.tokens_to_push("a", now) == ["t1", "t2"]  # first-set order
    with store.transaction():
        assert store.tokens_to_push("a", now) == ["t1", "t2"]  # nothing left to prune
    rows = store.conn.execute("SELECT token FROM tokens WHERE user='a' ORDER BY token").fetchall()
    assert rows == [("t1",), ("t2",)]  # the expired one is gone for good
    assert store.valid_tokens("b", T0) == ["other"]  # another user's tokens untouched


def test_refreshing_a_stored_token_still_evicts_when_a_new_one_comes(store):
    with store.transaction():
        for i in range(32):
            store.add_token("a", f"t{i}", T0 + i)
    with store.transaction():
        store.add_token("a", "t5", T0 + 200)  # a refresh: one statement, nothing to evict
        store.add_token("a", "new", T0 + 201)
    tokens = store.valid_tokens("a", T0 + 201)
    assert len(tokens) == 32 and "t0" not in tokens and "t5" in tokens and "new" in tokens


def test_prune_expired_batch_walks_the_table_in_bounded_steps(store):
    """Any user's expired or future tokens go, a batch of rows at a time; valid ones stay."""
    with store.transaction():
        for i in range(5):
            store.import_token(f"u{i}", "expired", T0 - 90 * DAY)
            store.import_token(f"u{i}", "live", T0 - DAY)
        store.import_token("u9", "future", T0 + 3600)
    steps: list[tuple[int, int]] = []
    cursor = 0
    while True:
        with store.transaction():
            cursor, deleted = store.prune_expired_batch(cursor, 4, T0)
        steps.append((cursor, deleted))
        if cursor == 0:
            break
    assert [deleted for _, deleted in steps] == [2, 2, 2]  # 4 + 4 + 3 rows looked at
    assert sum(deleted for _, deleted in steps) == 6
    rows = store.conn.execute("SELECT user, token FROM tokens ORDER BY user").fetchall()
    assert rows == [(f"u{i}", "live") for i in range(5)]
    with store.transaction():
        # a new pass: the live rows are the even rowids now, the first four end at 8
        assert store.prune_expired_batch(0, 4, T0) == (8, 0)
        assert store.prune_expired_batch(0, 100, T0) == (0, 0)


def test_token_sweeper_step_deletes_what_no_commit_touches(tmp_path):
    from chatmaild.tokensweep import TokenSweeper

    path = tmp_path / "db.sqlite3"
    store = MetadataStore(connect(path))
    with store.transaction():
        store.import_token("idle", "expired", T0 - 90 * DAY)
        store.import_token("idle", "live", T0)
    sweeper = TokenSweeper(path, interval=3600, batch=10, clock=lambda: T0)
    sweeper.start()  # the first step runs at once, before the thread looks at stop
    sweeper.stop()
    assert sweeper.deleted == 1
    assert store.valid_token_stamps("idle", T0) == {"live": T0}
    assert store.conn.execute("SELECT count(*) FROM tokens").fetchone()[0] == 1
    store.conn.close()
