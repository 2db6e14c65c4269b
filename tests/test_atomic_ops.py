"""Client.add / incr / touch: read-modify-write steps under the segment's write lock."""

import time

import pytest

import shmcache

pytestmark = pytest.mark.unit


def test_add_stores_only_when_the_key_holds_no_live_value(make_cache):
    cache = make_cache()
    assert cache.add("g", "k", b"first") is True
    assert cache.add("g", "k", b"second") is False
    assert cache.peek("g", "k") == b"first"
    cache.set("g", "gone", b"old", ttl=0.05)
    time.sleep(0.1)
    assert cache.add("g", "gone", b"new") is True           # an expired entry is absent
    assert cache.peek("g", "gone") == b"new"
    with pytest.raises(shmcache.ValueTooLarge):
        cache.add("g", "big", b"x" * (128 << 10))
    assert cache.peek("g", "big") is None


def test_incr_counts_decimal_values_and_keeps_their_expiry(make_cache):
    cache = make_cache()
    assert cache.incr("g", "missing") is None
    cache.set("g", "n", b"41", ttl=60)
    store = cache._live_store()
    expiry = store.get_with_expiry("g", "n")[1]
    assert cache.incr("g", "n") == 42
    assert cache.incr("g", "n", -50) == -8                  # changes length: moved, not rewritten
    assert cache.incr("g", "n", 10 ** 30) == 10 ** 30 - 8
    value, after, _hot = store.get_with_expiry("g", "n")
    assert (value, after) == (b"%d" % (10 ** 30 - 8), expiry)
    cache.set("g", "text", b"forty-one")
    with pytest.raises(shmcache.NotAnInteger):
        cache.incr("g", "text")
    with pytest.raises(shmcache.NotAnInteger):
        cache.incr("g", "n", 1.5)
    assert cache.peek("g", "text") == b"forty-one"
    assert store.audit()["items"] == 2


def test_touch_sets_a_new_expiry_on_live_keys_only(make_cache):
    cache = make_cache()
    assert cache.touch("g", "missing", ttl=10) is False
    cache.set("g", "k", b"v", ttl=0.2)
    assert cache.touch("g", "k", ttl=60) is True
    time.sleep(0.3)
    assert cache.peek("g", "k") == b"v"
    assert cache.touch("g", "k") is True                    # the group's TTL: none, forever
    assert cache._live_store().get_with_expiry("g", "k")[1] is None
