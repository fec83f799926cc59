"""The dict server's attribute read cache (chatmaild.store.AttributeCache): exact, bounded."""

from __future__ import annotations

import pytest

from chatmaild import dictproto as dp
from chatmaild.database import connect
from chatmaild.store import MISSING, AttributeCache, MetadataStore
from tests.helpers_chatmaild import ALICE, Session, make_backend, priv, shared


def cached_store(tmp_path) -> MetadataStore:
    return MetadataStore(connect(tmp_path / "db.sqlite3"), cache_attributes=True)


def test_lookups_see_every_committed_write(tmp_path):
    s = Session(make_backend(tmp_path))
    key = shared("comment")
    assert s.lookup(key) == b"N\n"  # an absence is cached too
    assert s.set(key, b"hello") == b"O1\n"
    assert s.lookup(key) == b"Ohello\n"
    assert s.set(key, b"again") == b"O1\n"
    assert s.lookup(key) == b"Oagain\n"
    assert s.unset(key) == b"O1\n"
    assert s.lookup(key) == b"N\n"


def test_increment_is_seen_by_the_next_lookup(tmp_path):
    s = Session(make_backend(tmp_path))
    key = priv("counter")
    assert s.set(key, b"41") == b"O1\n"
    assert s.lookup(key) == b"O41\n"
    assert s.send(b"B2\t" + ALICE.encode() + b"\nA2\t" + key + b"\t1\nC2\n") == b"O2\n"
    assert s.lookup(key) == b"O42\n"


def test_a_rolled_back_write_leaves_the_committed_value(tmp_path):
    store = cached_store(tmp_path)
    with store.transaction():
        store.set_attribute(ALICE, b"k", b"committed")
    assert store.get_attribute(ALICE, b"k") == b"committed"
    with pytest.raises(RuntimeError), store.transaction():
        store.set_attribute(ALICE, b"k", b"undone")
        assert store.get_attribute(ALICE, b"k") == b"undone"  # read inside: not kept
        raise RuntimeError
    assert store.get_attribute(ALICE, b"k") == b"committed"


def test_a_refused_group_member_leaves_no_stale_value(tmp_path):
    """A commit that fails after its write (the limit check) is rolled back whole."""
    backend = make_backend(tmp_path, metadata="max_attributes = 1\n")
    s = Session(backend)
    assert s.set(priv("a"), b"1") == b"O1\n"
    assert s.lookup(priv("b")) == b"N\n"
    assert s.set(priv("b"), b"2").startswith(b"F1\t")  # over the limit: refused
    assert s.lookup(priv("b")) == b"N\n"
    assert s.lookup(priv("a")) == b"O1\n"


def test_reads_inside_a_transaction_are_not_cached(tmp_path):
    store = cached_store(tmp_path)
    with store.transaction():
        assert store.get_attribute(ALICE, b"k") is None
    assert len(store._cache) == 0  # type: ignore[arg-type]
    assert store.get_attribute(ALICE, b"k") is None
    assert len(store._cache) == 1  # type: ignore[arg-type]


def test_cache_is_bounded():
    cache = AttributeCache(max_entries=2, max_value=4)
    cache.put("u", b"a", b"1")
    cache.put("u", b"b", None)
    cache.put("u", b"c", b"3")  # the oldest entry goes
    assert len(cache) == 2
    assert cache.get("u", b"a") is MISSING
    assert cache.get("u", b"b") is None
    cache.put("u", b"big", b"12345")  # longer than max_value: not kept
    assert cache.get("u", b"big") is MISSING
    assert len(cache) == 2


def test_uncached_store_reads_other_writers(tmp_path):
    """Without the cache (every store but the dict server's), writes of another
    connection are seen at once."""
    reader = MetadataStore(connect(tmp_path / "db.sqlite3"))
    writer = MetadataStore(connect(tmp_path / "db.sqlite3"))
    assert reader.get_attribute(ALICE, b"k") is None
    with writer.transaction():
        writer.set_attribute(ALICE, b"k", b"v")
    assert reader.get_attribute(ALICE, b"k") == b"v"


def test_server_keys_and_tokens_bypass_the_cache(tmp_path):
    backend = make_backend(tmp_path)
    s = Session(backend)
    assert s.lookup(priv("devicetoken")) == b"N\n"
    assert s.set(priv("devicetoken"), b"tok") == b"O1\n"
    assert s.lookup(priv("devicetoken")) == b"Otok\n"
    assert len(backend.store._cache) == 0  # type: ignore[arg-type]
    assert isinstance(backend.lookup(dp.Lookup(shared("comment"), ALICE)), type(dp.NOT_FOUND))
