"""The C rewrite (``_native.Writer``, made by reader.native_writer) against the Python
one: from the same arena bytes, a same-size set leaves the same arena bytes; refused input
changes nothing. The kill -9 tests (test_crash.py, test_model.py, test_torture.py) run with
both, through the ``both_readers`` fixture: one switch picks C or Python for both."""

import os
import random

import pytest

from shmcache import reader
from shmcache.journal import JournalFull
from shmcache.slabs import STATE_HOT, STATE_LIVE

pytestmark = pytest.mark.unit

native_only = pytest.mark.skipif(reader._native is None,
                                 reason="the C extension is not built (test_native.py says so)")


def test_the_writer_follows_the_reader_switch(make_cache, monkeypatch, both_readers):
    index = make_cache()._store.index
    assert (index.native_writer is not None) == (both_readers == "native")


def _rewrite_once(store, gid, key, value, expire_at, state, native):
    """Arena bytes after one locked same-size store of ``key``, with the C or Python rewrite."""
    index = store.index
    saved = index._native_rewrite
    index._native_rewrite = saved if native else None
    try:
        assert store.locked(index.store, gid, key, value, expire_at, 1.0e9, state, None, None)
    finally:
        index._native_rewrite = saved
    return bytes(store.buf)


@native_only
def test_c_and_python_rewrites_leave_the_same_bytes(make_cache):
    cache = make_cache(memory="4MiB", groups={"g": 1 << 20, "h": 1 << 20})
    store = cache._store
    assert store.index.native_writer is not None
    rng = random.Random(7)
    sizes = {}
    for i in range(300):
        group, key = rng.choice("gh"), f"key-{i}"
        sizes[group, key] = rng.choice((0, 1, 7, 100, 1000))
        cache.set(group, key, os.urandom(sizes[group, key]), ttl=rng.choice((None, 5, 1000.5)))
    for trial in range(200):
        (group, key), size = rng.choice(sorted(sizes.items()))
        gid = store.group_id(group)
        value = os.urandom(size)
        expire_at = rng.choice((None, 2.0e9, 2.0e9 + 0.37, 1.5e9 + 1 / 256))
        state = rng.choice((STATE_LIVE, STATE_HOT))
        before = bytes(store.buf)
        by_c = _rewrite_once(store, gid, key.encode(), value, expire_at, state, native=True)
        store.buf[:] = before
        by_python = _rewrite_once(store, gid, key.encode(), value, expire_at, state, native=False)
        if by_c != by_python:
            first = next(i for i in range(len(by_c)) if by_c[i] != by_python[i])
            pytest.fail(f"trial {trial}: arenas differ first at byte {first}")
        expired = expire_at is not None and expire_at < 1.9e9      # in the past: absent
        assert cache.peek(group, key) == (None if expired else value)
    store.audit()


@native_only
def test_the_c_rewrite_refuses_what_it_cannot_do_and_changes_nothing(make_cache):
    cache = make_cache()
    cache.set("g", "k", b"v" * 10)
    store = cache._store
    index, journal = store.index, store.journal
    rewrite = index._native_rewrite
    before = bytes(store.buf)
    with pytest.raises(ValueError, match="out of bounds"):
        rewrite(len(store.buf) - 8, b"x", 0, STATE_LIVE, journal.start, 1)
    with pytest.raises(ValueError, match="out of bounds"):
        rewrite(index.pages_off - 8, b"x", 0, STATE_LIVE, journal.start, 1)
    with pytest.raises(ValueError, match="out of bounds"):
        rewrite(index.pages_off + 3, b"x", 0, STATE_LIVE, journal.start, 1)
    with pytest.raises(JournalFull):
        rewrite(index.pages_off, b"x", 0, STATE_LIVE, journal.end, 1)
    with pytest.raises(TypeError):
        rewrite(index.pages_off, "text", 0, STATE_LIVE, journal.start, 1)
    assert bytes(store.buf) == before
    assert cache.peek("g", "k") == b"v" * 10
