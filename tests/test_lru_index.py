"""Index behaviour through the public API: get/set/delete, CLOCK eviction order, budgets, TTL,
limits, clear, stats, memory pressure, and the hit ratio against exact LRU."""

import bisect
import random
import time
from collections import OrderedDict

import pytest

from shmcache import InvalidKey, UnknownGroup, ValueTooLarge

pytestmark = pytest.mark.unit


def test_set_peek_delete_round_trip(make_cache):
    cache = make_cache()
    cache.set("g", "Tom", b"630")
    cache.set("g", b"bytes-key", "text value")
    assert cache.peek("g", "Tom") == b"630"
    assert cache.peek("g", "bytes-key") == b"text value"
    assert cache.peek("g", "missing") is None
    assert cache.delete("g", "Tom") is True
    assert cache.delete("g", "Tom") is False
    assert cache.peek("g", "Tom") is None
    cache.set("g", "empty", b"")
    assert cache.peek("g", "empty") == b""


def test_keys_are_per_group(make_cache):
    cache = make_cache(groups={"a": 1 << 20, "b": 1 << 20})
    cache.set("a", "k", b"in a")
    assert cache.peek("b", "k") is None
    cache.set("b", "k", b"in b")
    assert (cache.peek("a", "k"), cache.peek("b", "k")) == (b"in a", b"in b")


def test_overwrite_same_and_different_length(make_cache):
    cache = make_cache()
    cache.set("g", "k", b"aaaa")
    cache.set("g", "k", b"bbbb")             # in place
    assert cache.peek("g", "k") == b"bbbb"
    cache.set("g", "k", b"c" * 5000)          # moves to another chunk
    assert cache.peek("g", "k") == b"c" * 5000
    stats = cache.stats()["groups"]["g"]
    assert (stats["items"], stats["bytes"]) == (1, 1 + 5000)
    cache._store.audit()


# Each scenario: operations on a group whose budget holds exactly three 10-byte items
# (1-byte key + 9-byte value), then the keys expected to remain. CLOCK: items leave in
# insertion order, except that one read since the hand last passed it is skipped once.
V = b"123456789"
CLOCK_SCENARIOS = {
    "fifo without reads": (["set a", "set b", "set c", "set d"], "bcd"),
    "read item gets a second chance": (["set a", "set b", "set c", "get a", "set d"], "acd"),
    "second chance is used up": (["set a", "set b", "set c", "get a", "set d", "set e",
                                  "set f"], "def"),
    "skipped item is older than new ones": (["set a", "set b", "set c", "get a", "set d",
                                             "set e"], "ade"),
    "all read: hand clears all, evicts first": (["set a", "set b", "set c", "get a", "get b",
                                                 "get c", "set d"], "bcd"),
    "same-length update counts as a read": (["set a", "set b", "set c", "set a", "set d"], "acd"),
    "resized update is a new item": (["set a", "set b", "set c", "setshort a", "set d"], "acd"),
    "delete frees its share": (["set a", "set b", "set c", "del b", "set d"], "acd"),
    "miss does not count": (["set a", "set b", "set c", "get z", "set d"], "bcd"),
}


@pytest.mark.parametrize("ops, survivors", CLOCK_SCENARIOS.values(), ids=CLOCK_SCENARIOS.keys())
def test_clock_eviction_order(make_cache, ops, survivors):
    cache = make_cache(groups={"g": 30})
    for op in ops:
        verb, key = op.split()
        if verb == "set":
            cache.set("g", key, V)
        elif verb == "setshort":
            cache.set("g", key, V[:-1])
        elif verb == "get":
            cache.peek("g", key)
        else:
            cache.delete("g", key)
    present = "".join(k for k in "abcdefz" if cache.peek("g", k) is not None)
    assert present == survivors
    assert cache.stats()["groups"]["g"]["bytes"] <= 30
    cache._store.audit()


def test_budget_counts_key_plus_value_and_is_never_exceeded(make_cache):
    cache = make_cache(groups={"g": 10_000})
    rng = random.Random(7)
    for i in range(3000):
        key = f"key-{rng.randrange(500)}"
        cache.set("g", key, b"x" * rng.randrange(0, 900))
        stats = cache.stats()["groups"]["g"]
        assert stats["bytes"] <= 10_000
    stats = cache.stats()["groups"]["g"]
    assert stats["evictions"] > 0 and stats["bytes"] > 8_000
    cache._store.audit()


def test_shrinking_a_budget_evicts_at_once(make_cache):
    cache = make_cache(groups={"g": 1000})
    for i in range(10):
        cache.set("g", f"k{i}", b"v" * 98)
    cache.define_group("g", 500)
    stats = cache.stats()["groups"]["g"]
    assert stats["bytes"] <= 500 and stats["items"] == 5
    assert [cache.peek("g", f"k{i}") is not None for i in range(10)] == [False] * 5 + [True] * 5


def wait_until_past(deadline):
    """Let the clock pass ``deadline`` (TTL tests test time itself)."""
    while time.time() <= deadline:
        time.sleep(max(0.0, deadline - time.time()) + 0.005)


def test_ttl_expiry_per_item_and_group_default(make_cache):
    cache = make_cache(groups={"g": 1 << 20, "short": 1 << 20})
    # TTLs of 2 s leave a loaded machine ample room to read the items back
    # before they expire; the wait runs from after the last write, so each
    # deadline (write time + TTL) has passed when the absent checks run.
    cache.define_group("short", 1 << 20, ttl=2.0)
    cache.set("g", "brief", b"1", ttl=2.0)
    cache.set("g", "long", b"2", ttl=3600)
    cache.set("g", "forever", b"3")
    cache.set("short", "default", b"4")
    cache.set("short", "override", b"5", ttl=3600)
    written = time.time()
    assert cache.peek("g", "brief") == b"1" and cache.peek("short", "default") == b"4"
    wait_until_past(written + 2.0)
    assert cache.peek("g", "brief") is None
    assert cache.peek("short", "default") is None
    assert cache.peek("g", "long") == b"2" and cache.peek("g", "forever") == b"3"
    assert cache.peek("short", "override") == b"5"
    assert cache.delete("g", "brief") is False          # expired counts as absent
    cache.set("g", "brief", b"again")                   # an expired key can be set again
    assert cache.peek("g", "brief") == b"again"
    assert cache.stats()["groups"]["g"]["expirations"] == 1


def test_expired_items_are_evicted_first_and_counted(make_cache):
    cache = make_cache(groups={"g": 30})
    cache.set("g", "a", V)
    cache.set("g", "b", V, ttl=0.05)
    cache.set("g", "c", V)
    cache.peek("g", "b")
    wait_until_past(time.time() + 0.05)
    cache.set("g", "d", V)                  # hand: a unread -> evicted (b is not reached)
    cache.set("g", "e", V)                  # hand: b, read but expired -> goes
    assert [cache.peek("g", k) is not None for k in "abcde"] == [False, False, True, True, True]
    stats = cache.stats()["groups"]["g"]
    assert (stats["evictions"], stats["expirations"]) == (1, 1)


@pytest.mark.parametrize("ttl", [0, -1, "10", True, float("nan")])
def test_bad_ttl_is_refused(make_cache, ttl):
    cache = make_cache()
    with pytest.raises(ValueError, match="ttl"):
        cache.set("g", "k", b"v", ttl=ttl)
    assert cache.peek("g", "k") is None


def test_value_too_large_is_refused_and_stores_nothing(make_cache):
    cache = make_cache(max_item_size="64KiB", groups={"g": 1 << 20, "tiny": 100})
    cache.set("g", "k", b"old")
    with pytest.raises(ValueTooLarge, match="max item size"):
        cache.set("g", "k", b"x" * (64 * 1024 + 1))
    assert cache.peek("g", "k") == b"old"
    cache.set("g", "k", b"x" * 64 * 1024)                   # exactly the limit fits
    assert len(cache.peek("g", "k")) == 64 * 1024
    with pytest.raises(ValueTooLarge, match="budget"):
        cache.set("tiny", "k", b"x" * 100)                  # 1 + 100 > 100
    assert cache.peek("tiny", "k") is None
    cache._store.audit()


@pytest.mark.parametrize("key", ["", b"", "k" * 251, "é" * 126, 5, None, 1.5])
def test_invalid_keys_are_refused(make_cache, key):
    cache = make_cache()
    for call in (lambda: cache.set("g", key, b"v"), lambda: cache.peek("g", key),
                 lambda: cache.delete("g", key)):
        with pytest.raises(InvalidKey):
            call()


def test_longest_key_and_unicode_keys(make_cache):
    cache = make_cache()
    cache.set("g", "k" * 250, b"long")
    cache.set("g", "clé/with space+%", b"unicode")
    assert cache.peek("g", "k" * 250) == b"long"
    assert cache.peek("g", "clé/with space+%") == b"unicode"
    assert cache.peek("g", "clé/with space+%".encode()) == b"unicode"


def test_unknown_group_and_bad_values(make_cache):
    cache = make_cache()
    with pytest.raises(UnknownGroup, match="nope"):
        cache.peek("nope", "k")
    with pytest.raises(UnknownGroup):
        cache.set("nope", "k", b"v")
    with pytest.raises(TypeError, match="bytes or str"):
        cache.set("g", "k", 42)
    with pytest.raises(ValueError, match="group name"):
        cache.define_group("x" * 65, 100)


def test_clear_one_group_or_all(make_cache):
    cache = make_cache(groups={"a": 1 << 20, "b": 1 << 20})
    for i in range(50):
        cache.set("a", f"k{i}", b"v")
        cache.set("b", f"k{i}", b"v")
    cache.clear("a")
    assert cache.peek("a", "k1") is None and cache.peek("b", "k1") == b"v"
    assert cache.stats()["groups"]["a"]["items"] == 0
    cache.clear()
    assert cache.stats()["items"] == 0
    cache._store.audit()


def test_stats(make_cache):
    cache = make_cache(memory="8MiB", groups={"g": 5000})
    for i in range(100):
        cache.set("g", f"k{i:02d}", b"v" * 97)          # 100 bytes each
    cache.delete("g", "k99")
    stats = cache.stats()
    group = stats["groups"]["g"]
    assert group["cache_bytes"] == 5000 and group["items"] == 49 and group["bytes"] == 4900
    assert group["sets"] == 100 and group["deletes"] == 1 and group["evictions"] == 50
    assert stats["items"] == 49 and stats["bytes"] == 4900 and stats["memory"] == 8 << 20
    assert stats["payload_share"] == pytest.approx(4900 / (8 << 20))
    assert stats["slabs"]["classes"][0]["chunks_used"] == 49


def test_memory_pressure_never_fails_a_set(make_cache):
    """Budgets far above the arena, sizes that change over time: every set succeeds, the
    newest value is always readable, memory moves between classes, structures stay sound."""
    cache = make_cache(memory="4MiB", max_item_size="16KiB",
                       groups={"a": 1 << 30, "b": 1 << 30})
    rng = random.Random(3)
    for phase, sizes in enumerate([(100,), (3000, 12000), (40, 900), (16000,), (100, 5000)]):
        for i in range(3000):
            group, key = rng.choice("ab"), f"{phase}-{i}"
            value = bytes([i % 251]) * rng.choice(sizes)
            cache.set(group, key, value)
            assert cache.peek(group, key) == value
        cache._store.audit()
    stats = cache.stats()
    assert stats["slabs"]["page_moves"] > 0
    assert stats["groups"]["a"]["evictions"] + stats["groups"]["b"]["evictions"] > 10_000


def zipf_trace(keys, requests, skew, seed):
    weights = [1.0 / (rank ** skew) for rank in range(1, keys + 1)]
    total, cumulative, acc = sum(weights), [], 0.0
    for weight in weights:
        acc += weight
        cumulative.append(acc / total)
    rng = random.Random(seed)
    ranks = list(range(keys))
    rng.shuffle(ranks)                               # popularity is not key order
    return [ranks[min(bisect.bisect(cumulative, rng.random()), keys - 1)]
            for _ in range(requests)]


def test_clock_hit_ratio_within_one_point_of_exact_lru(make_cache):
    """Zipf(0.99), 1M requests over 100k keys, budget 10% of the key space."""
    keys, requests = 100_000, 1_000_000
    value = b"v" * 100
    names = [f"key:{i:06d}" for i in range(keys)]
    item_bytes = len(names[0]) + len(value)
    budget = keys * item_bytes // 10
    trace = zipf_trace(keys, requests, 0.99, seed=11)

    lru, held, lru_hits = OrderedDict(), 0, 0
    for k in trace:
        if k in lru:
            lru.move_to_end(k)
            lru_hits += 1
        else:
            lru[k] = True
            held += item_bytes
            while held > budget:
                lru.popitem(last=False)
                held -= item_bytes

    cache = make_cache(memory="64MiB", groups={"z": budget})
    peek, put, hits = cache.peek, cache.set, 0
    for k in trace:
        if peek("z", names[k]) is None:
            put("z", names[k], value)
        else:
            hits += 1
    lru_ratio, clock_ratio = lru_hits / requests, hits / requests
    print(f"hit ratio: exact LRU {lru_ratio:.4f}, shmcache CLOCK {clock_ratio:.4f}")
    assert abs(clock_ratio - lru_ratio) <= 0.01
    assert cache.stats()["groups"]["z"]["bytes"] <= budget


def test_reads_fall_back_to_the_lock_when_lock_free_reads_cannot_validate(make_cache, monkeypatch):
    """A chain too long for a lock-free walk, or a stripe that stays odd, is read under the
    write lock, with the same answers."""
    from shmcache import reader
    from shmcache.arena import _OFFSET_WRITER_PID
    cache = make_cache()
    for i in range(100):
        cache.set("g", f"k{i}", f"v{i}")
    monkeypatch.setattr(reader, "MAX_CHAIN", 0)          # every walk is "too long"
    assert [cache.peek("g", f"k{i}") for i in range(100)] == [f"v{i}".encode() for i in range(100)]
    assert cache.peek("g", "absent") is None
    monkeypatch.setattr(reader, "MAX_CHAIN", 64)
    store = cache._store
    stripe = store.arena.layout.stripes_off
    for index in range(store.arena.layout.nstripes):     # as a writer killed mid-write leaves them
        offset = stripe + 4 * index
        store.arena.set_u32(offset, store.arena.get_u32(offset) | 1)
    store.arena.set_u32(_OFFSET_WRITER_PID, 12345)      # its pid still marks the write lock
    assert cache.peek("g", "k7") == b"v7"                # spins, locks, repairs, reads
    assert cache.stats()["repairs"] == 1
    assert cache.peek("g", "k8") == b"v8"                # lock-free again
    store.audit()


def test_many_groups_keep_separate_keys_budgets_and_counters(segment_name):
    import shmcache
    with shmcache.create(segment_name, "16MiB", max_item_size="64KiB", max_groups=200) as cache:
        for index in range(200):
            cache.define_group(f"g{index}", 1000)
        for index in range(200):
            cache.set(f"g{index}", "k", f"value {index}")
        for index in range(0, 200, 7):
            assert cache.peek(f"g{index}", "k") == f"value {index}".encode()
        assert cache.peek("g199", "missing") is None
        stats = cache.stats()
        assert len(stats["groups"]) == 200 and stats["items"] == 200
        assert stats["groups"]["g7"]["hits"] == 1 and stats["groups"]["g199"]["misses"] == 1
        assert stats["groups"]["g198"]["hits"] == 0
        with pytest.raises(ValueError, match="at most 200 groups"):
            cache.define_group("one-too-many", 1000)
        cache._store.audit()
