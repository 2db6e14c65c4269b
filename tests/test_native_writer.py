"""The C writer (``_native.Writer``, made by reader.native_writer) against the Python one:
from the same arena bytes, a same-size set (the rewrite) and a new-key set (the insertion,
or its decline, after which Python inserts) leave the same arena bytes; refused input and
declined insertions change nothing. The kill -9 tests (test_crash.py, test_model.py,
test_torture.py) run with both, through the ``both_readers`` fixture: one switch picks C or
Python for reads and writes alike."""

import os
import random

import pytest

from shmcache import reader
from shmcache.errors import ValueTooLarge
from shmcache.journal import JournalFull
from shmcache.layout import BUCKET_BYTES
from shmcache.slabs import STATE_HOT, STATE_LIVE, STATE_NEGATIVE, VOTES_FOR_NEW_CLASS

pytestmark = pytest.mark.unit

# The C writer exists when the C reader is used: not when the whole run is pure Python.
native_only = pytest.mark.skipif(not reader.native_wanted(),
                                 reason="the C extension is not built (test_native.py says "
                                        "so), or SHMCACHE_PURE_PYTHON is set for the whole run")


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


def _store_once(store, gid, key, value, expire_at, state, native, answers):
    """(what a locked store answered, arena bytes after it), with the C writer or without;
    ``answers`` collects what the C insertion answered (None: declined)."""
    index = store.index
    saved = index._native_rewrite, index._native_insert

    def insert(*args):
        answers.append(saved[1](*args))
        return answers[-1]
    index._native_rewrite, index._native_insert = (saved[0], insert) if native else (None, None)
    try:
        result = store.locked(index.store, gid, key, value, expire_at, 1.0e9, state, None, None)
    except ValueTooLarge as exc:
        result = repr(exc)
    finally:
        index._native_rewrite, index._native_insert = saved
    return result, bytes(store.buf)


@native_only
def test_c_and_python_insertions_leave_the_same_bytes(make_cache):
    # A small arena with a tight group: sets of every size class find a partial page with
    # room (C), or need a new page, a full page off the list, an eviction by budget or by
    # memory, or a vote that makes a class (declined: Python); deletes and resizes leave
    # free chunks for the C path to take from a page's free list.
    cache = make_cache(memory="2MiB", max_item_size="16KiB",
                       groups={"g": 1 << 30, "h": 1 << 30, "tight": 6000})
    store = cache._store
    index = store.index
    rng = random.Random(11)
    sizes = [0, 1, 5, 40, 100, 100, 100, 250, 700, 1000, 1500, 3000, 5000, 9000, 16000]
    odd_sizes = [rng.randrange(1, 2000) for _ in range(6)]      # bad fits: votes, new classes
    keys, answers = {}, []
    for trial in range(1500):
        group = rng.choice(("g", "g", "h", "tight"))
        gid = store.group_id(group)
        if keys.get(group) and rng.random() < 0.2:
            key = rng.choice(sorted(keys[group]))
            keys[group].discard(key)
            store.locked(index.remove, gid, key, 1.0e9)         # a free chunk, or a free page
            continue
        if keys.get(group) and rng.random() < 0.1:
            key = rng.choice(sorted(keys[group]))               # a resize: unlink, then insert
        else:
            key = f"k{trial}-".encode() + b"x" * rng.choice((0, 1, 20, 200))
        keys.setdefault(group, set()).add(key)
        size = rng.choice(sizes + odd_sizes * 3)
        state = rng.choice((STATE_LIVE, STATE_LIVE, STATE_HOT, STATE_NEGATIVE))
        value = b"" if state == STATE_NEGATIVE else os.urandom(size)
        expire_at = rng.choice((None, 2.0e9, 2.0e9 + 0.37, 0.5e9 + 1 / 256))
        before = bytes(store.buf)
        by_c = _store_once(store, gid, key, value, expire_at, state, True, answers)
        store.buf[:] = before
        by_python = _store_once(store, gid, key, value, expire_at, state, False, [])
        if by_c[0] != by_python[0]:
            pytest.fail(f"trial {trial}: C answered {by_c[0]!r}, Python {by_python[0]!r}")
        if by_c[1] != by_python[1]:
            first = next(i for i in range(len(by_c[1])) if by_c[1][i] != by_python[1][i])
            pytest.fail(f"trial {trial}: arenas differ first at byte {first}")
        if trial % 100 == 0:
            store.audit()
    store.audit()
    took = sum(answer is not None for answer in answers)
    assert took > 300 and len(answers) - took > 100, (took, len(answers))


def _try_insert(store, group, key, value):
    """What the C insertion answers for new ``key`` (None: declined, and then it wrote
    nothing); an accepted one is committed, a declined step stays empty."""
    index, journal = store.index, store.journal
    gid = store.group_id(group)
    key = key.encode()
    bucket_off = index.buckets_off + index._bucket(gid, key) * BUCKET_BYTES

    def attempt():
        before = bytes(store.buf)
        pos = index._native_insert(gid, bucket_off, key, value, 0, STATE_LIVE, journal.pos,
                                   journal.step)
        if pos is None:
            assert bytes(store.buf) == before
        else:
            journal.pos = pos
        return pos
    return store.locked(attempt)


@native_only
def test_the_c_insertion_takes_the_common_case_and_declines_the_rest(make_cache):
    cache = make_cache(memory="4MiB", max_item_size="64KiB",
                       groups={"g": 1 << 20, "tight": 1000})
    store = cache._store
    value = b"v" * 100
    assert _try_insert(store, "g", "first", value) is None          # no page for the class yet
    cache.set("g", "first", value)
    assert _try_insert(store, "g", "second", value) is not None     # carved from that page
    cache.set("g", "third", value)
    cache.delete("g", "first")
    assert _try_insert(store, "g", "fourth", value) is not None     # from the page's free list
    assert [cache.peek("g", k) for k in ("second", "third", "fourth")] == [value] * 3
    cache.set("tight", "a", b"t" * 400)
    cache.set("tight", "b", b"t" * 400)
    assert _try_insert(store, "tight", "c", b"t" * 400) is None     # over budget: evict first
    whole = b"p" * (store.slabs.page_size // 2 + 100)               # one chunk a page
    cache.set("g", "page1", whole)
    assert _try_insert(store, "g", "page2", whole) is None          # the page at the head is full
    odd = b"o" * 137                                                # a bad fit: a vote each
    for i in range(VOTES_FOR_NEW_CLASS - 1):
        cache.set("g", f"odd{i}", odd)
    classes = store.slabs.stats()["class_count"]
    assert _try_insert(store, "g", "oddlast", odd) is None          # its vote makes a class
    cache.set("g", "oddlast", odd)
    assert store.slabs.stats()["class_count"] == classes + 1
    store.audit()
